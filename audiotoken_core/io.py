"""Reading and writing weight files: the one place for weights-only loading, format sniffing
and atomic writes.

* Writes go to a hidden temporary file in the target's folder, are flushed to disk, and then
  replace the target in one step, so a crash never leaves half a file under the real name.
* Torch pickles are only read with ``torch.load(weights_only=True)``. A pickle that names
  Python code (a class or function outside torch's tensor types) is refused with
  :class:`UnsafeFileError`; which globals it names is found by reading the pickle's opcodes,
  never by running them and never from the text of torch's exception.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import pickletools
import uuid
import zipfile
from typing import Any, Callable

import torch

__all__ = [
    "UnsafeFileError",
    "atomic_write",
    "save_safetensors",
    "save_torch",
    "load_torch_weights_only",
    "is_safetensors",
    "git_blob_id",
]

# What a legacy (pre-zip) tensor pickle names besides code: tensor rebuild helpers, storages, containers.
_LEGACY_TENSOR_GLOBALS = ("torch._utils._rebuild", "torch.Size", "torch.device", "collections.OrderedDict")


class UnsafeFileError(ValueError):
    """A pickle that would run code when loaded; refused."""


def git_blob_id(path: str | os.PathLike) -> str:
    """The id git gives the file's content (`git hash-object`): sha1 of b"blob <size>\\0" + content.

    A fixed identity for files whose publishers give no checksum but keep them in a git repository."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it, then move it onto ``path``.

    The temporary file is removed if ``write`` fails.
    """
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (contiguous, on any device) and string ``metadata`` as a safetensors file, atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` atomically (for training state; read back with :func:`load_torch_weights_only`)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def is_safetensors(path: str | os.PathLike) -> bool:
    """True if the file starts like safetensors: an 8-byte header length, then a JSON object that fits."""
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = os.fstat(handle.fileno()).st_size
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= size - 8


def _pickle_globals(data: bytes) -> set[str]:
    """``module.name`` of every GLOBAL/STACK_GLOBAL in the pickles of ``data`` (read, not run)."""
    found: set[str] = set()
    stream = io.BytesIO(data)
    for _ in range(5):  # a legacy torch file: magic, protocol, sys info, the object, storage keys; then raw bytes
        if stream.tell() == len(data):
            break
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except (ValueError, pickle.UnpicklingError, EOFError):
            break  # damage
    return found


def _is_tensor_global(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return (name.startswith(_LEGACY_TENSOR_GLOBALS) or (module == "torch" and attr.endswith("Storage"))
            or (module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)))


def _code_globals(path: str) -> list[str]:
    """Globals named by the checkpoint's pickles that torch's weights-only loader does not allow:
    torch's own list for zip checkpoints, tensor/storage helpers only for legacy pickles."""
    if zipfile.is_zipfile(path):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - no data.pkl, TorchScript, damage: not a weights file we can vet
            return []
    with open(path, "rb") as handle:
        return sorted(g for g in _pickle_globals(handle.read()) if not _is_tensor_global(g))


def load_torch_weights_only(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``, with our own refusal messages.

    ``what`` names the expected file in messages (e.g. "the reference embedder_learned_embeds.bin").
    Raises :class:`UnsafeFileError` for a pickle that carries code and ValueError for a file
    torch cannot read.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        code = _code_globals(path)
        if code:
            shown = ", ".join(code[:5]) + (f" and {len(code) - 5} more" if len(code) > 5 else "")
            raise UnsafeFileError(
                f"{name} was refused because it contains code ({shown}), not only tensors; loading it "
                f"could run that code. Get a safe copy of {what}: the .safetensors release if there is "
                "one, or convert the file to .safetensors on a machine where you trust it."
            ) from None
        raise ValueError(f"{name} is not a readable torch file (expected {what}); it may be damaged.") from exc
    except Exception as exc:  # noqa: BLE001 - zip/EOF/format errors: any failure means "not readable"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{name} is not a readable torch file (expected {what}): {type(exc).__name__}: {first}"
        ) from exc
