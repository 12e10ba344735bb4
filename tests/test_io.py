"""audiotoken_core.io: atomic writes, safetensors sniffing, weights-only loading and its refusals."""
from __future__ import annotations

import collections
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from audiotoken_core.io import (
    UnsafeFileError,
    atomic_write,
    is_safetensors,
    load_torch_weights_only,
    save_safetensors,
    save_torch,
)


class Harmless:
    """A class of this test module: a pickle naming it carries code, even though this one does nothing."""


def test_atomic_write_replaces_in_one_step_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def fail(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["file.bin"]


def test_save_safetensors_and_save_torch_round_trip(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    save_safetensors(path, tensors, {"format": "x"})
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    state = {"step": 3, "weights": collections.OrderedDict(w=torch.randn(4)), "rng": torch.get_rng_state()}
    save_torch(tmp_path / "s.pt", state)
    loaded = load_torch_weights_only(tmp_path / "s.pt", "a training state")
    assert loaded["step"] == 3 and torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert sorted(os.listdir(tmp_path)) == ["s.pt", "t.safetensors"]


def test_is_safetensors_reads_the_header_not_the_name(tmp_path):
    real = tmp_path / "weights.bin"
    save_file({"x": torch.zeros(2)}, str(real))
    assert is_safetensors(real)
    pickled = tmp_path / "weights.safetensors"
    torch.save({"x": torch.zeros(2)}, pickled)
    assert not is_safetensors(pickled)
    text = tmp_path / "notes.safetensors"
    text.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")  # header length 5 but only 2 bytes follow
    assert not is_safetensors(text)
    (tmp_path / "empty").write_bytes(b"")
    assert not is_safetensors(tmp_path / "empty")


@pytest.mark.parametrize("payload, named", [(Harmless(), "Harmless"), (os.system, "system"),
                                            (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear")],
                         ids=["class", "os.system", "whole-module"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_pickles_that_carry_code_are_refused_with_our_message(tmp_path, payload, named, zipped):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "extra": payload}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeFileError) as info:
        load_torch_weights_only(path, "the reference embedder_learned_embeds.bin")
    text = str(info.value)
    assert text.startswith("model.pt was refused because it contains code (") and named in text
    assert "the reference embedder_learned_embeds.bin" in text and "convert the file to .safetensors" in text
    assert "weights_only" not in text and "GLOBAL" not in text and "Unpickl" not in text
    assert isinstance(info.value, ValueError)


def test_plain_pickle_of_a_function_is_refused_and_never_run(tmp_path):
    path = tmp_path / "raw.pkl"
    path.write_bytes(pickle.dumps({"go": os.system}, protocol=2))
    with pytest.raises(UnsafeFileError, match=r"raw.pkl was refused because it contains code \(posix.system|nt.system"):
        load_torch_weights_only(path, "a checkpoint")


def test_damaged_file_is_not_called_unsafe(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError) as info:
        load_torch_weights_only(path, "a checkpoint")
    assert not isinstance(info.value, UnsafeFileError)
    assert "broken.pt is not a readable torch file (expected a checkpoint)" in str(info.value)
    assert "weights_only" not in str(info.value)
