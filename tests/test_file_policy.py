"""The pack's file policy through a real ComfyUI server: what the loaders accept, where Import writes,
when it refuses, and that a file rewritten under the same name is loaded again."""
from __future__ import annotations

import os

import pytest
import torch

from audiotoken_core.embedding import AudioEmbedding, load_embedding, save_embedding
from audiotoken_core.token_file import load_audiotoken, save_audiotoken
from comfy_fixtures import BEATS, REFERENCE_BIN, TOKEN_SD15, _token, graph, write_reference_bin
from tools.comfy_server import execution_error

pytestmark = pytest.mark.comfyui


def _import(reference_file: str, output_name, **extra) -> dict:
    return {"imp": {"class_type": "AudioTokenImportReference",
                    "inputs": {"reference_file": reference_file, "output_name": output_name, **extra}}}


def _rejected(comfy, prompt: dict, node: str) -> str:
    """The validation message /prompt gives for `node` (the graph must be refused with 400)."""
    status, body = comfy.queue(prompt)
    assert status == 400 and node in body.get("node_errors", {}), body
    return str(body["node_errors"][node])


def _failed(comfy, prompt: dict) -> str:
    entry = comfy.run(prompt)
    err = execution_error(entry)
    assert err is not None, "the graph ran although it should have been refused"
    return err["exception_message"]


@pytest.mark.parametrize("value", [5, None], ids=["int", "null"])
def test_loader_widgets_of_the_wrong_type_are_refused_with_a_message(comfy, value):
    g = graph(save="wrong_type")
    g["tok"]["inputs"]["audiotoken_name"] = value
    assert f"got {type(value).__name__} {value!r}; pick a file from the list" in _rejected(comfy, g, "tok")
    g = graph(save="wrong_type")
    g["enc"]["inputs"]["encoder_name"] = value
    assert "pick a file from the list" in _rejected(comfy, g, "enc")


@pytest.mark.parametrize("name", [".", "..", "bad\x00name", "../escape", ".hidden", " padded"],
                         ids=["dot", "dotdot", "nul", "parent", "hidden", "spaces"])
def test_import_refuses_names_that_are_not_plain_file_names(comfy, name):
    message = _rejected(comfy, _import(REFERENCE_BIN, name), "imp")
    assert "is not a plain file name" in message
    folder = comfy.base / "models" / "audiotoken"
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no hidden file was written


def test_import_never_overwrites_unless_asked(comfy):
    target = comfy.base / "models" / "audiotoken" / "policy_existing.safetensors"
    target.write_bytes(b"the user's own file")
    message = _failed(comfy, _import(REFERENCE_BIN, "policy_existing"))
    assert "policy_existing.safetensors already exists; turn on 'overwrite'" in message
    assert target.read_bytes() == b"the user's own file"
    entry = comfy.run(_import(REFERENCE_BIN, "policy_existing", overwrite=True))
    assert execution_error(entry) is None, execution_error(entry)
    assert load_audiotoken(target).widths == {"l": 768}


def test_import_writes_into_the_models_folder_never_through_links(comfy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_reference_bin(outside / "ref.bin")
    folder = comfy.base / "models" / "audiotoken"
    (folder / "linked_dir").symlink_to(outside, target_is_directory=True)  # users link folders of big files in
    (folder / "trap.safetensors").symlink_to(outside / "victim.safetensors")
    (outside / "victim.safetensors").write_bytes(b"not ours")
    try:
        entry = comfy.run(_import("linked_dir/ref.bin", "from_linked_source"))
        assert execution_error(entry) is None, execution_error(entry)
        written = folder / "from_linked_source.safetensors"
        assert written.is_file() and not written.is_symlink() and load_audiotoken(written).widths == {"l": 768}
        assert sorted(p.name for p in outside.iterdir()) == ["ref.bin", "victim.safetensors"]  # nothing beside the source

        message = _failed(comfy, _import(REFERENCE_BIN, "trap", overwrite=True))
        assert "trap.safetensors is a symlink; the pack never writes through links" in message
        assert (outside / "victim.safetensors").read_bytes() == b"not ours" and (folder / "trap.safetensors").is_symlink()
    finally:
        (folder / "linked_dir").unlink()
        (folder / "trap.safetensors").unlink()


def test_a_listed_entry_may_be_a_symlink(comfy, tmp_path):
    """The read rule: names come from the folder's listing; the entry itself may link elsewhere."""
    original = AudioEmbedding(vectors={"l": torch.randn(2, 768)}, source="linked")
    save_embedding(tmp_path / "kept_elsewhere.safetensors", original)
    folder = comfy.base / "input" / "audiotoken_embeddings"
    folder.mkdir(exist_ok=True)
    (folder / "linked.safetensors").symlink_to(tmp_path / "kept_elsewhere.safetensors")
    try:
        entry = comfy.run({
            "load": {"class_type": "AudioTokenLoadEmbedding", "inputs": {"embedding_name": "linked.safetensors"}},
            "save": {"class_type": "AudioTokenSaveEmbedding",
                     "inputs": {"audio_embedding": ["load", 0], "filename_prefix": "emb/linked_copy"}}})
        assert execution_error(entry) is None, execution_error(entry)
        copy = load_embedding(sorted((comfy.base / "output" / "emb").glob("linked_copy_*.safetensors"))[-1])
        assert torch.equal(copy.vectors["l"], original.vectors["l"])
    finally:
        (folder / "linked.safetensors").unlink()


def test_retrained_token_under_the_same_name_is_loaded_again(comfy):
    path = comfy.base / "models" / "audiotoken" / "retrained.safetensors"
    save_audiotoken(path, _token({"l": 768}, seed=21))
    entry = comfy.run(graph(token="retrained.safetensors", save="retrain_a"))
    assert execution_error(entry) is None, execution_error(entry)
    save_audiotoken(path, _token({"l": 768}, seed=22))  # the same name, other weights
    entry = comfy.run(graph(token="retrained.safetensors", save="retrain_b"))
    assert execution_error(entry) is None, execution_error(entry)
    cached = [n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]]
    assert "enc" in cached and "tok" not in cached  # the unchanged encoder stays cached, the token reloads
    first, second = (load_embedding(sorted((comfy.base / "output" / "emb").glob(f"{n}_*.safetensors"))[-1])
                     for n in ("retrain_a", "retrain_b"))
    assert not torch.equal(first.vectors["l"], second.vectors["l"])
    entry = comfy.run(graph(token="retrained.safetensors", save="retrain_c"))  # unchanged file: a cache hit
    cached = [n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]]
    assert "tok" in cached


def test_core_audio_encoder_list_keeps_core_extensions(comfy):
    stray = comfy.base / "models" / "audio_encoders" / "stray_config.json"
    stray.write_text("{}")
    try:
        options = comfy.get("/object_info/AudioEncoderLoader")["AudioEncoderLoader"]["input"]["required"][
            "audio_encoder_name"]
        listed = options[0] if isinstance(options[0], list) else options[1]["options"]
        assert BEATS in listed and "stray_config.json" not in listed, listed
        ours = comfy.get("/object_info/AudioTokenLoader")["AudioTokenLoader"]["input"]["required"]["audiotoken_name"]
        assert TOKEN_SD15 in str(ours)
    finally:
        os.remove(stray)
