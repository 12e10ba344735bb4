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
