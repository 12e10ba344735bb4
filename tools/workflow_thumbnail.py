"""Draw a workflow's graph (nodes at their UI positions, links between them) as a JPEG thumbnail.

ComfyUI's template browser shows `<workflow>.jpg` next to `<workflow>.json`. Real outputs
need real weights, which our machines do not have; a drawing of the graph tells a user what
the workflow does without them.

    python -m tools.workflow_thumbnail workflows/*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from tools.workflow_api import TITLE_HEIGHT

SIZE = (640, 400)
PACK_COLOR, CORE_COLOR, NOTE_COLOR = (42, 77, 99), (60, 60, 66), (80, 72, 40)
GROUP_COLOR = (52, 74, 92)


def draw(workflow: dict, size: tuple[int, int] = SIZE) -> Image.Image:
    nodes = workflow["nodes"]
    groups = workflow.get("groups") or []
    # a node's box as drawn: its title bar sits above `pos`
    rects = [(n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0], n["size"][1] + TITLE_HEIGHT) for n in nodes]
    rects += [tuple(g["bounding"]) for g in groups]
    x0 = min(r[0] for r in rects)
    y0 = min(r[1] for r in rects)
    x1 = max(r[0] + r[2] for r in rects)
    y1 = max(r[1] + r[3] for r in rects)
    margin = 16
    scale = min((size[0] - 2 * margin) / (x1 - x0), (size[1] - 2 * margin) / (y1 - y0))

    def box(n):
        left = margin + (n["pos"][0] - x0) * scale
        top = margin + (n["pos"][1] - TITLE_HEIGHT - y0) * scale
        return left, top, left + n["size"][0] * scale, top + (n["size"][1] + TITLE_HEIGHT) * scale

    img = Image.new("RGB", size, (24, 24, 28))
    d = ImageDraw.Draw(img)
    for g in groups:  # behind everything, titled like the canvas draws them
        gx, gy, gw, gh = g["bounding"]
        left, top = margin + (gx - x0) * scale, margin + (gy - y0) * scale
        d.rectangle([left, top, left + gw * scale, top + gh * scale], fill=(32, 38, 46), outline=GROUP_COLOR, width=2)
        d.text((left + 5, top + 4), g.get("title", ""), fill=(170, 200, 225))
    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in workflow.get("links", []):
        a, b = box(by_id[src]), box(by_id[dst])
        d.line([(a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)], fill=(140, 160, 190), width=2)
    for n in nodes:
        kind = n["type"]
        color = NOTE_COLOR if "Note" in kind else PACK_COLOR if kind.startswith("AudioToken") else CORE_COLOR
        left, top, right, bottom = box(n)
        d.rectangle([left, top, right, bottom], fill=color, outline=(200, 200, 210))
        d.text((left + 4, top + 3), n.get("title", kind)[: max(4, int((right - left) / 6))], fill=(235, 235, 240))
    return img


def main(paths: list[str]) -> None:
    for p in map(Path, paths):
        out = p.with_suffix(".jpg")
        draw(json.loads(p.read_text())).save(out, quality=85)
        print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
