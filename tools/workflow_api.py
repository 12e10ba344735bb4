"""Convert a ComfyUI UI-format workflow (what users share) to the API format `/prompt` runs.

The UI format stores widget values positionally; the meaning of each position comes from
the server's /object_info (input order, which inputs are widgets). The same walk checks
a workflow against a live server: node types exist, values are valid, links match types.
"""
from __future__ import annotations

import json

# A combo whose chosen option brings its own inputs (upstream comfy_api's DynamicCombo, e.g. SaveVideo's `format`
# with a nested `codec` since 2026; not in ComfyUI 0.3.75). The API format names a nested input by its path:
# "format.codec".
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
SEED_NAMES = {"seed", "noise_seed"}
MUTED, BYPASSED = 2, 4


def _inputs_in_order(info: dict) -> list[tuple[str, list]]:
    spec = info["input"]
    order = info.get("input_order") or {s: list(spec.get(s, {})) for s in ("required", "optional")}
    return [(name, spec[section][name]) for section in ("required", "optional") for name in order.get(section, [])]


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1].get("options") if len(spec) > 1 else None
    if spec[0] == DYNAMIC_COMBO:
        return [option["key"] for option in spec[1]["options"]]
    return None


def _default(spec: list):
    """The value a widget the saved workflow has no value for starts with in the frontend: its default, else a
    combo's first option (an input the node gained after the workflow was saved, e.g. CreateVideo's bit_depth)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    options = _options(spec)
    return options[0] if options else None


def _chosen_inputs(spec: list, key) -> list[tuple[str, list]]:
    """The inputs a dynamic combo's chosen option adds, in the order the frontend makes their widgets."""
    for option in spec[1]["options"]:
        if option["key"] == key:
            inputs = option.get("inputs") or {}
            return [(name, sub) for section in ("required", "optional") for name, sub in inputs.get(section, {}).items()]
    return []


def _has_control_widget(name: str, spec: list) -> bool:
    """The frontend adds a 'control after generate' widget (saved right after the value) to INT inputs that
    ask for one, and to INT inputs named seed / noise_seed unless they say control_after_generate: false."""
    opts = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and bool(opts.get("control_after_generate", name in SEED_NAMES))


def convert(workflow: dict, object_info: dict, overrides: dict[str, dict] | None = None) -> tuple[dict, list[str]]:
    """(API prompt, problems). Problems name the node and what is wrong; empty when valid.

    `overrides` maps a node type to widget values to use instead of the saved ones (the
    model files and audio a given machine has), applied before validation. Widget values are read in the
    order the frontend makes the widgets (a dynamic combo's chosen option's inputs right after it); a widget
    the saved values do not reach gets its default, as the frontend gives it (inputs a newer server added).
    """
    overrides = overrides or {}
    workflow, promoted = flatten(workflow)
    problems: list[str] = []
    links = {link[0]: link for link in workflow.get("links", [])}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        where = f"node {node['id']} ({kind})"
        info = object_info.get(kind)
        if info is None:
            problems.append(f"{where}: node type is not installed on the server")
            continue
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            problems.append(f"{where}: dict widgets_values are not supported")
            values = []
        inputs: dict = {}
        pending = _inputs_in_order(info)
        while pending:
            name, spec = pending.pop(0)
            value = None
            if _is_widget(spec):
                value = values.pop(0) if values else _default(spec)
                if values and _has_control_widget(name, spec):
                    values.pop(0)
                value = promoted.get(node["id"], {}).get(name, value)
                value = overrides.get(kind, {}).get(name, value)
                if name not in linked and value is not None:
                    problems += _check_value(where, name, spec, value)
                    inputs[name] = value
                if spec[0] == DYNAMIC_COMBO:  # the chosen option's widgets come right after it
                    pending[:0] = [(f"{name}.{sub}", sub_spec) for sub, sub_spec in _chosen_inputs(spec, value)]
            if name in linked:
                link = links.get(linked[name])
                if link is None:
                    problems.append(f"{where}: input '{name}' refers to missing link {linked[name]}")
                    continue
                _, src_id, src_slot, _, _, _ = link
                src = nodes.get(src_id)
                src_info = object_info.get(src["type"]) if src else None
                if src_info is not None:
                    out_type = src_info["output"][src_slot]
                    want = spec[0] if not isinstance(spec[0], list) else "COMBO"
                    if not _types_match(out_type, want):
                        problems.append(f"{where}: input '{name}' ({want}) is linked to output {src_slot} of node "
                                        f"{src_id} ({src['type']}) of type {out_type}")
                inputs[name] = [str(src_id), src_slot]
            elif value is None and name in info["input"].get("required", {}):
                problems.append(f"{where}: required input '{name}' has neither a link nor a value")
        if any(v is not None for v in values):
            problems.append(f"{where}: {len(values)} widget values left over ({values[:3]}): the saved values do not "
                            f"line up with the server's inputs")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt, problems


SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the ids a subgraph's links give its input and output nodes


def flatten(workflow: dict) -> tuple[dict, dict]:
    """(the workflow with every subgraph node replaced by the nodes of its definition, promoted widget values).

    As the frontend queues a graph with subgraph nodes (subgraph blueprints, subgraphs/*.json): an inner node gets
    the id "<subgraph node id>:<inner id>"; an inner input fed by the subgraph's input k is fed by whatever feeds
    the subgraph node's input k, and when nothing does and that input is a widget, by the subgraph node's widget
    value (returned as {inner node id: {input: value}}; without one, the inner node's own saved value stays).
    Nested subgraphs are expanded in turn.
    """
    definitions = {d["id"]: d for d in (workflow.get("definitions") or {}).get("subgraphs", [])}
    if not any(n["type"] in definitions for n in workflow["nodes"]):
        return workflow, {}
    workflow = json.loads(json.dumps(workflow))
    promoted: dict = {}
    while subgraph_nodes := [n for n in workflow["nodes"] if n["type"] in definitions]:
        _expand(workflow, subgraph_nodes[0], definitions[subgraph_nodes[0]["type"]], promoted)
    return workflow, promoted


def _expand(workflow: dict, node: dict, definition: dict, promoted: dict) -> None:
    prefix = f"{node['id']}:"
    links = {link[0]: link for link in workflow["links"]}
    next_id = max([0, *(lid for lid in links if isinstance(lid, int))]) + 1
    inner = {n["id"]: json.loads(json.dumps(n)) for n in definition["nodes"]}
    for n in inner.values():
        n["id"] = prefix + str(n["id"])
        for i in n.get("inputs", []):
            i["link"] = None
        for o in n.get("outputs", []):
            o["links"] = []
    nodes = {n["id"]: n for n in workflow["nodes"] if n is not node}
    nodes.update({n["id"]: n for n in inner.values()})
    outer_in = {i["name"]: i for i in node.get("inputs", [])}
    widget_values = dict(zip([i["name"] for i in node.get("inputs", []) if i.get("widget")],
                             node.get("widgets_values") or []))
    new_links = [link for link in workflow["links"] if node["id"] not in (link[1], link[3])]

    def source(origin_id, origin_slot):
        """(node id, slot) feeding an inner link's origin, or the name of an unfed subgraph input."""
        if origin_id != SUBGRAPH_INPUT:
            return inner[origin_id]["id"], origin_slot
        name = definition["inputs"][origin_slot]["name"]
        fed = outer_in.get(name, {}).get("link")
        return (links[fed][1], links[fed][2]) if fed is not None else name

    def connect(src, dst_id, dst_slot, kind):
        nonlocal next_id
        new_links.append([next_id, src[0], src[1], dst_id, dst_slot, kind])
        nodes[dst_id]["inputs"][dst_slot]["link"] = next_id
        nodes[src[0]]["outputs"][src[1]].setdefault("links", []).append(next_id)
        next_id += 1

    for link in workflow["links"]:  # the subgraph node's own links go: drop them from the nodes they join
        if link[3] == node["id"] or link[1] == node["id"]:
            other = nodes.get(link[1] if link[3] == node["id"] else link[3])
            for slot in (other or {}).get("outputs", []):
                slot["links"] = [lid for lid in slot.get("links") or [] if lid != link[0]]
    for link in definition["links"]:
        src = source(link["origin_id"], link["origin_slot"])
        if link["target_id"] == SUBGRAPH_OUTPUT:
            for outer in (lk for lk in workflow["links"] if lk[1] == node["id"] and lk[2] == link["target_slot"]):
                if isinstance(src, str):
                    continue  # an unfed input passed straight through: the outer target stays unfed
                connect(src, outer[3], outer[4], outer[5])
            continue
        target = inner[link["target_id"]]
        if isinstance(src, str):
            if src in widget_values:
                slot = target["inputs"][link["target_slot"]]
                promoted.setdefault(target["id"], {})[slot["name"]] = widget_values[src]
            continue
        connect(src, target["id"], link["target_slot"], link["type"])
    workflow["nodes"] = list(nodes.values())
    workflow["links"] = new_links


TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above `pos`
NODE_GAP = 20  # the least space between two nodes (title bars included)
# What the frontend's missing-model scan takes for a model file name in a widget value.
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf")


def format_problems(workflow: dict) -> list[str]:
    """Structure checks against what the ComfyUI frontend (1.32 to 1.58) saves and reads, without a server.

    Version 0.4; links as [id, origin_id, origin_slot, target_id, target_slot, type], consistent with
    the nodes' `inputs[].link` and `outputs[].links`; last_node_id / last_link_id not below the ids in
    use; no two nodes closer than NODE_GAP (title bars included), so the graph reads cleanly when opened;
    every model file a node names is declared in its `properties.models` (see `model_entry_problems`).
    """
    problems: list[str] = []
    if workflow.get("version") != 0.4:
        problems.append(f"version is {workflow.get('version')!r}, the frontend saves 0.4")
    nodes = {}
    for n in workflow.get("nodes", []):
        missing = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties"} - set(n)
        if missing:
            problems.append(f"node {n.get('id')}: missing {sorted(missing)}")
        if n.get("id") in nodes:
            problems.append(f"node id {n['id']} used twice")
        nodes[n.get("id")] = n
    links = workflow.get("links", [])
    ids = [link[0] for link in links if isinstance(link, list)]
    if len(set(ids)) != len(ids):
        problems.append("link ids are not unique")
    if nodes and workflow.get("last_node_id", -1) < max(k for k in nodes if isinstance(k, int)):
        problems.append("last_node_id is below the largest node id")
    if ids and workflow.get("last_link_id", -1) < max(ids):
        problems.append("last_link_id is below the largest link id")
    for link in links:
        if not (isinstance(link, list) and len(link) == 6 and all(isinstance(x, int) for x in link[:5])
                and isinstance(link[5], str)):
            problems.append(f"link {link!r} is not [id, origin_id, origin_slot, target_id, target_slot, type]")
            continue
        lid, src, src_slot, dst, dst_slot, kind = link
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            problems.append(f"link {lid} joins missing node {src if s is None else dst}")
            continue
        outs, ins = s.get("outputs", []), d.get("inputs", [])
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            problems.append(f"link {lid}: node {src} output {src_slot} does not list it")
        elif outs[src_slot]["type"] not in (kind, "*"):
            problems.append(f"link {lid} has type {kind} but node {src} output {src_slot} is {outs[src_slot]['type']}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: node {dst} input {dst_slot} does not point back at it")
        elif ins[dst_slot]["type"] not in (kind, "*"):
            problems.append(f"link {lid} has type {kind} but node {dst} input {dst_slot} is {ins[dst_slot]['type']}")
    known = set(ids)
    for n in nodes.values():
        for i in n.get("inputs", []):
            if i.get("link") is not None and i["link"] not in known:
                problems.append(f"node {n['id']} input {i['name']} points at missing link {i['link']}")
        for o in n.get("outputs", []):
            for lid in o.get("links") or []:
                if lid not in known:
                    problems.append(f"node {n['id']} output {o['name']} lists missing link {lid}")
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in nodes.values() if "pos" in n and "size" in n]
    g = NODE_GAP
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[1] < b[3] + g and b[1] < a[3] + g and a[2] < b[4] + g and b[2] < a[4] + g:
                problems.append(f"nodes {a[0]} and {b[0]} overlap or are closer than {g} px")
    groups = [(grp.get("title"), x, y, x + w, y + h) for grp in workflow.get("groups") or []
              for x, y, w, h in [grp["bounding"]]]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]:
                problems.append(f"groups {a[0]!r} and {b[0]!r} overlap")
        for box in boxes:
            inside = a[1] <= box[1] and box[3] <= a[3] and a[2] <= box[2] and box[4] <= a[4]
            apart = box[3] <= a[1] or a[3] <= box[1] or box[4] <= a[2] or a[4] <= box[2]
            if not (inside or apart):
                problems.append(f"node {box[0]} sticks out of group {a[0]!r}")
    for n in nodes.values():
        problems += model_entry_problems(n)
    return problems


def model_entry_problems(node: dict) -> list[str]:
    """Each model file a node names must be declared in its `properties.models` as {name, url, directory}.

    The frontend's Missing Models panel takes the folder from that entry (else it shows "Unknown")
    and offers the url; its workflow schema needs all three strings, the url an absolute https one.
    """
    where = f"node {node.get('id')} ({node.get('type')})"
    declared = (node.get("properties") or {}).get("models") or []
    problems = []
    for entry in declared:
        bad = [k for k in ("name", "url", "directory") if not (isinstance(entry, dict) and isinstance(entry.get(k), str)
                                                               and entry[k])]
        if bad:
            problems.append(f"{where}: models entry {entry!r} lacks {bad}")
        elif not entry["url"].startswith("https://"):
            problems.append(f"{where}: models entry {entry['name']} has url {entry['url']!r}, not an https:// address")
    names = {e.get("name") for e in declared if isinstance(e, dict)}
    values = node.get("widgets_values") or []
    for value in values.values() if isinstance(values, dict) else values:
        if isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES) and value not in names:
            problems.append(f"{where}: model file {value!r} has no properties.models entry "
                            "{name, url, directory}: the Missing Models panel would show its folder as Unknown")
    return problems


def _types_match(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def _check_value(where: str, name: str, spec: list, value) -> list[str]:
    options = _options(spec)
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options is not None:
        return [] if value in options else [f"{where}: '{name}' = {value!r} is not one of {options[:8]}"]
    kind = spec[0]
    if kind in ("INT", "FLOAT"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{where}: '{name}' = {value!r} is not a number"]
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return [f"{where}: '{name}' = {value} is outside [{opts.get('min')}, {opts.get('max')}]"]
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return [f"{where}: '{name}' = {value!r} is not a boolean"]
    if kind == "STRING" and not isinstance(value, str):
        return [f"{where}: '{name}' = {value!r} is not a string"]
    return []
