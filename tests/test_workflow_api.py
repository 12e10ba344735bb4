"""tools.workflow_api.convert on SaveVideo / CreateVideo as each server describes them (no server needed).

ComfyUI 0.3.75 has plain combos `format` and `codec`; upstream (0.33) has a dynamic combo `format` whose chosen
option adds a required `format.codec`, a hidden optional top-level `codec`, and CreateVideo gained an optional
`bit_depth`. A workflow saved on 0.3.75 must convert to what each server's frontend sends (checked in the browser
by tests/test_workflows.py); these are the same facts on hand-written /object_info excerpts.
"""
from __future__ import annotations

from tools.workflow_api import convert

VIDEO = ["VIDEO", {}]
OLD = {  # ComfyUI 0.3.75
    "SaveVideo": {"input": {"required": {"video": VIDEO, "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                                         "format": [["auto", "mp4"], {"default": "auto"}],
                                         "codec": [["auto", "h264"], {"default": "auto"}]}},
                  "input_order": {"required": ["video", "filename_prefix", "format", "codec"]}, "output": []},
}


def _codec(*codecs: str) -> list:
    encoding = ["COMFY_DYNAMICCOMBO_V3", {"options": [
        {"key": "auto", "inputs": {"required": {}}},
        {"key": "re-encode", "inputs": {"required": {"crf": ["FLOAT", {"default": 23.0, "min": 0.0, "max": 51.0}]}}}]}]
    options = [{"key": c, "inputs": {"required": {}} if c == "auto" else {"required": {}, "optional": {"encoding": encoding}}}
               for c in codecs]
    return ["COMFY_DYNAMICCOMBO_V3", {"options": options}]


NEW = {  # upstream 0.33
    "SaveVideo": {"input": {"required": {"video": VIDEO, "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
                                         "format": ["COMFY_DYNAMICCOMBO_V3", {"options": [
                                             {"key": k, "inputs": {"required": {"codec": _codec("auto", "h264")}}}
                                             for k in ("auto", "mp4")]}]},
                            "optional": {"codec": _codec("auto", "h264")}},
                  "input_order": {"required": ["video", "filename_prefix", "format"], "optional": ["codec"]},
                  "output": []},
}


def _workflow(values: list) -> dict:
    return {"nodes": [{"id": 1, "type": "SaveVideo", "inputs": [], "widgets_values": values}], "links": []}


def test_old_save_video_values_convert_as_before_on_0_3_75():
    prompt, problems = convert(_workflow(["video/x", "mp4", "h264"]), OLD)
    assert problems == ["node 1 (SaveVideo): required input 'video' has neither a link nor a value"]
    assert prompt["1"]["inputs"] == {"filename_prefix": "video/x", "format": "mp4", "codec": "h264"}


def test_old_save_video_values_fill_the_nested_codec_upstream_like_the_frontend():
    """The third saved value lands in format.codec (the widget after format); the hidden codec gets its first
    option, as frontend 1.58 sends it."""
    prompt, _ = convert(_workflow(["video/x", "mp4", "auto"]), NEW)
    assert prompt["1"]["inputs"] == {"filename_prefix": "video/x", "format": "mp4", "format.codec": "auto",
                                     "codec": "auto"}


def test_nested_options_follow_the_chosen_keys_and_bad_keys_are_named():
    prompt, problems = convert(_workflow(["video/x", "auto", "h264", "re-encode", 18.0, "auto"]), NEW)
    assert prompt["1"]["inputs"] == {"filename_prefix": "video/x", "format": "auto", "format.codec": "h264",
                                     "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 18.0,
                                     "codec": "auto"}
    _, problems = convert(_workflow(["video/x", "mkv", "auto"]), NEW)
    assert "node 1 (SaveVideo): 'format' = 'mkv' is not one of ['auto', 'mp4']" in problems


# Subgraphs (blueprints, subgraphs/*.json): hand-made nodes on a hand-written /object_info excerpt.
TOY = {"Num": {"input": {"required": {"value": ["INT", {"default": 0}]}}, "input_order": {"required": ["value"]},
               "output": ["INT"]},
       "Add": {"input": {"required": {"a": ["INT", {}], "b": ["INT", {"default": 1}]}},
               "input_order": {"required": ["a", "b"]}, "output": ["INT"]}}


def _subgraph(sid: str, inner_type: str) -> dict:
    """A subgraph with inputs x (link) and y (widget b) feeding one `inner_type` node (id 5) that feeds output 0, and
    output 1 passing x straight through."""
    return {"id": sid, "inputs": [{"name": "x", "type": "INT"}, {"name": "y", "type": "INT"}],
            "outputs": [{"name": "sum", "type": "INT"}, {"name": "x", "type": "INT"}],
            "nodes": [{"id": 5, "type": inner_type, "widgets_values": [0, 2],
                       "inputs": [{"name": "a", "type": "INT", "link": 1},
                                  {"name": "b", "type": "INT", "widget": {"name": "b"}, "link": 2}],
                       "outputs": [{"name": "INT", "type": "INT", "links": [3]}]}],
            "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "INT"},
                      {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 5, "target_slot": 1, "type": "INT"},
                      {"id": 3, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"},
                      {"id": 4, "origin_id": -10, "origin_slot": 0, "target_id": -20, "target_slot": 1, "type": "INT"}]}


def _instance(nid: int, sid: str, x_link, out_links: list[list[int]], y=None) -> dict:
    return {"id": nid, "type": sid, "widgets_values": [] if y is None else [y],
            "inputs": [{"name": "x", "type": "INT", "link": x_link},
                       {"name": "y", "type": "INT", "widget": {"name": "y"}, "link": None}],
            "outputs": [{"name": "sum", "type": "INT", "links": out_links[0]},
                        {"name": "x", "type": "INT", "links": out_links[1]}]}


def test_subgraph_nodes_flatten_as_the_frontend_queues_them_nested_and_passed_through():
    """Inner ids "<outer>:<inner>" (nested: "<outer>:<mid>:<inner>"), inputs fed from outside the subgraph node, the
    subgraph node's widget value for an unfed widget input (else the inner node's own value), and an output that
    passes an input straight through."""
    outer = {"id": "outer", "inputs": [{"name": "x", "type": "INT"}, {"name": "y", "type": "INT"}],
             "outputs": [{"name": "sum", "type": "INT"}, {"name": "x", "type": "INT"}],
             "nodes": [_instance(3, "inner", 1, [[2], []])],
             "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 3, "target_slot": 0, "type": "INT"},
                       {"id": 2, "origin_id": 3, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "INT"},
                       {"id": 5, "origin_id": -10, "origin_slot": 0, "target_id": -20, "target_slot": 1, "type": "INT"}]}
    workflow = {
        "nodes": [{"id": 1, "type": "Num", "widgets_values": [7], "inputs": [],
                   "outputs": [{"name": "INT", "type": "INT", "links": [10, 11]}]},
                  _instance(2, "inner", 10, [[12], [13]], y=40),
                  _instance(4, "outer", 11, [[14], []]),
                  {"id": 6, "type": "Add", "widgets_values": [0, 0], "outputs": [{"name": "INT", "type": "INT", "links": []}],
                   "inputs": [{"name": "a", "type": "INT", "link": 12}, {"name": "b", "type": "INT", "link": 13}]},
                  {"id": 7, "type": "Add", "widgets_values": [0, 0], "outputs": [{"name": "INT", "type": "INT", "links": []}],
                   "inputs": [{"name": "a", "type": "INT", "link": 14}, {"name": "b", "type": "INT", "widget": {"name": "b"},
                                                                        "link": None}]}],
        "links": [[10, 1, 0, 2, 0, "INT"], [11, 1, 0, 4, 0, "INT"], [12, 2, 0, 6, 0, "INT"], [13, 2, 1, 6, 1, "INT"],
                  [14, 4, 0, 7, 0, "INT"]],
        "definitions": {"subgraphs": [_subgraph("inner", "Add"), outer]}}
    prompt, problems = convert(workflow, TOY)
    assert not problems, problems
    assert prompt == {
        "1": {"class_type": "Num", "inputs": {"value": 7}},
        "2:5": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 40}},  # the subgraph node's widget value
        "4:3:5": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 2}},  # no value there: the inner node's own
        "6": {"class_type": "Add", "inputs": {"a": ["2:5", 0], "b": ["1", 0]}},  # output 1 passes x through
        "7": {"class_type": "Add", "inputs": {"a": ["4:3:5", 0], "b": 0}}}
