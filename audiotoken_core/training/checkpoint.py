"""Checkpoint files of a training run, and the RNG state they carry.

A checkpoint is a pair in the run's folder:

* ``<name>-step000100.safetensors``: a normal AudioToken file (the encode node can load it
  at once) with the training metadata;
* ``<name>-step000100.state.pt``: optimizer, gradient scaler, step, data position, loss
  history and the RNG states of every rank; plain tensors and Python values, so it loads
  with ``torch.load(weights_only=True)``.

A checkpoint counts only when both files exist (the state file is written last).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..io import load_torch_weights_only, save_torch

__all__ = [
    "STATE_SUFFIX",
    "CheckpointError",
    "checkpoint_paths",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "prune_checkpoints",
    "save_state",
    "load_state",
    "capture_rng_state",
    "restore_rng_state",
]

STATE_FORMAT = "audiotoken-trainer-state"
STATE_VERSION = 1
STATE_SUFFIX = ".state.pt"
_TOKEN_NAME = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


def checkpoint_paths(out_dir: str | os.PathLike, name: str, step: int) -> tuple[Path, Path]:
    """(token file, state file) of the checkpoint at ``step``."""
    stem = f"{name}-step{int(step):06d}"
    return Path(out_dir) / f"{stem}.safetensors", Path(out_dir) / f"{stem}{STATE_SUFFIX}"


def _state_of(token: Path) -> Path:
    return token.with_name(token.name[: -len(".safetensors")] + STATE_SUFFIX)


def list_checkpoints(out_dir: str | os.PathLike, name: str | None = None) -> list[tuple[int, Path, Path]]:
    """(step, token, state) of the complete checkpoint pairs in ``out_dir`` (optionally of ``name``), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for entry in out_dir.iterdir():
        match = _TOKEN_NAME.match(entry.name)
        if match and (name is None or match["name"] == name) and _state_of(entry).is_file():
            found.append((int(match["step"]), entry, _state_of(entry)))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def latest_checkpoint(out_dir: str | os.PathLike, name: str | None = None) -> Path | None:
    """The state file of the newest complete checkpoint in ``out_dir``, or None."""
    found = list_checkpoints(out_dir, name)
    return found[-1][2] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """(token file, state file) from a state file, its token file, or a folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        state = latest_checkpoint(path)
        if state is None:
            raise CheckpointError(
                f"no checkpoint in {path}: expected a pair <name>-stepNNNNNN.safetensors + "
                f"<name>-stepNNNNNN{STATE_SUFFIX}"
            )
        path = state
    if path.name.endswith(STATE_SUFFIX):
        token, state = path.with_name(path.name[: -len(STATE_SUFFIX)] + ".safetensors"), path
    else:
        token, state = path, _state_of(path) if path.suffix == ".safetensors" else path
    for needed in (token, state):
        if not needed.is_file():
            raise CheckpointError(
                f"cannot resume from {path}: {needed} does not exist. A resumable checkpoint is a "
                f"<name>-stepNNNNNN.safetensors token and its {STATE_SUFFIX} twin, or the folder that holds them "
                "(a final token alone can be loaded, but not resumed)"
            )
    return token, state


def prune_checkpoints(out_dir: str | os.PathLike, name: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of ``name`` (0 keeps all)."""
    if not keep:
        return
    for _, token, state in list_checkpoints(out_dir, name)[:-keep]:
        for path in (token, state):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def save_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a trainer state file atomically (plain tensors and Python values only)."""
    save_torch(path, {"format": STATE_FORMAT, "version": STATE_VERSION, **state})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trainer state file; its tensors are normal tensors even under ``torch.inference_mode()``."""
    with torch.inference_mode(False):
        state = load_torch_weights_only(path, "an AudioToken trainer state file (<name>-stepNNNNNN.state.pt)")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not an AudioToken trainer state file")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} has trainer-state version {state.get('version')}; this trainer reads {STATE_VERSION}"
        )
    return state


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and (for a CUDA ``device``) that GPU's RNG states.

    Only the training GPU is read, so a process of a multi-GPU job opens no context on the others.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = device is not None and device.type == "cuda"
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if cuda else None,
    }


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA state goes to ``device``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
