"""On-disk caches of frozen-encoder outputs, so later epochs and later runs skip the encoders.

Layout under the cache folder:

    file_hashes.json                          path -> [size, mtime_ns, sha256]  (hashing 200k videos once)
    settings-<hash>/settings.json             the settings this folder belongs to (for humans)
    settings-<hash>/<ab>/<item key>.safetensors  one file per item (ab = the key's first two characters)

An item key is a hash of the *content* of the item's source files plus item details (window
start, frame choice); the settings (encoder, layers, VAE, image size ...) pick the folder. A
changed file or changed settings is therefore a miss, never a stale hit. Every file is written
atomically (temp file, fsync, rename), so concurrent writers (several ranks) never clash, and
an entry that is truncated or unreadable counts as missing: it is deleted and computed again.
One file per item is as fast as shards of many items on a 2-core machine (docs/benchmarks.md,
benchmarks/bench_cache.py) and needs no index. Delete the folder to clear the cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from ..io import atomic_write, save_safetensors
from .dataset import AudioImageDataset, _ItemError, seeded_generator
from .items import DatasetSourceError, VideoFrame

__all__ = ["FeatureCache", "CachedFeatures", "CacheError"]

logger = logging.getLogger("audiotoken.data")

_FORMAT = "audiotoken-feature-cache"
_VERSION = "2"
_HASHES = "file_hashes.json"


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message says what to change."""


def _plain(value: Any) -> Any:
    """json.dumps fallback for settings: EncoderSpec (to_dict), dataclasses, paths, dtypes, devices, sets."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cache settings must be JSON-like, got {type(value).__name__} {value!r}")


def _json(value: Any, **options) -> str:
    return json.dumps(value, sort_keys=True, default=_plain, **options)


def _digest(value: Any) -> str:
    return hashlib.sha256(_json(value, separators=(",", ":")).encode()).hexdigest()


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def _complete(path: Path) -> bool:
    """True if `path` is a whole safetensors file: its header parses and the data reaches the declared end."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return os.fstat(handle.fileno()).st_size == 8 + size + end
    except (OSError, ValueError, KeyError, TypeError):
        return False


class FeatureCache:
    """Tensors per item key, one safetensors file each; `get` returns None on a miss.

        cache = FeatureCache("cache/", {"encoder": encoder.spec, "vae": "sd15-vae"})
        key = cache.item_key(["clip.mp4"], start=2)
        cache.get(key) or cache.put(key, {"features": f})

    `store_dtype` (e.g. torch.float16) halves the disk for float tensors; default keeps the
    dtype given. Call `flush()` at the end to save the file-hash memo.
    """

    def __init__(self, directory: str | os.PathLike, key_settings: Mapping[str, Any], *,
                 store_dtype: torch.dtype | None = None) -> None:
        self.root = Path(directory)
        self.settings = json.loads(_json(dict(key_settings)))
        self.settings_hash = _digest(self.settings)[:20]
        self.dir = self.root / f"settings-{self.settings_hash}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder {self.dir}: {exc}; pick a writable folder") from exc
        if not (self.dir / "settings.json").exists():
            _write_text(self.dir / "settings.json", _json(self.settings, indent=1))
        self.store_dtype = store_dtype
        try:
            self._hashes = json.loads((self.root / _HASHES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._hashes = {}
        self._hashes_dirty = False

    # ------------------------------------------------------------------ keys

    def file_hash(self, path: str | os.PathLike) -> str:
        """sha256 of the file's bytes, remembered by (resolved path, size, mtime) across runs."""
        path = Path(path)
        stat = path.stat()
        name = str(path.resolve())
        known = self._hashes.get(name)
        if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
            return known[2]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self._hashes[name] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
        self._hashes_dirty = True
        return digest.hexdigest()

    def item_key(self, files: Iterable[str | os.PathLike], **details: Any) -> str:
        """Key of an item: the content of `files` plus `details` (window start, frame choice ...)."""
        return _digest({"files": [self.file_hash(f) for f in files], "details": details})[:40]

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ get / put

    def __contains__(self, key: str) -> bool:
        """Whether a complete entry is stored under `key` (a truncated one is deleted: a miss)."""
        path = self.path(key)
        if not path.is_file():
            return False
        if _complete(path):
            return True
        self._drop(path, "truncated")
        return False

    def _drop(self, path: Path, why: str) -> None:
        logger.warning("cache entry %s is %s; it will be computed again", path, why)
        path.unlink(missing_ok=True)

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The tensors stored under `key`, or None (never stored, or unreadable: then deleted)."""
        path = self.path(key)
        try:
            return load_file(str(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged entry costs a recomputation, never the run
            self._drop(path, f"unreadable ({exc})")
            return None

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> None:
        """Store `tensors` (copied to CPU, in `store_dtype` if set) under `key`, atomically."""
        stored = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach().to("cpu")
            if self.store_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.store_dtype)
            stored[name] = tensor.contiguous()
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        save_safetensors(path, stored, {"format": _FORMAT, "version": _VERSION})

    def flush(self) -> None:
        """Save the file-hash memo (merged with what other processes wrote meanwhile)."""
        if not self._hashes_dirty:
            return
        path = self.root / _HASHES
        try:
            on_disk = json.loads(path.read_text(encoding="utf-8"))
            merged = {**on_disk, **self._hashes} if isinstance(on_disk, dict) else self._hashes
        except (OSError, ValueError):
            merged = self._hashes
        _write_text(path, json.dumps(merged, separators=(",", ":")))
        self._hashes, self._hashes_dirty = merged, False


class CachedFeatures(Dataset):
    """A dataset of cached encoder outputs: {"features": [N, F], "latents": [C, h, w], "label", "id", ...}.

    `precompute()` runs the frozen encoders once per missing entry, in batches:
    `encode_audio(wave16 [B, T]) -> [B, N, F]` for every whole-second window start in
    `window_starts` (default: the dataset's, 0..4 for a 10 s clip and 5 s window) and
    `encode_image(images [B, 3, H, W] in [0, 1]) -> [B, C, h, w]` for the image (a still
    once; a video frame once per window start, since it comes from inside the window; a
    "random" frame is drawn once per start and then fixed). Training then draws the window
    start exactly as the dataset would (same generator), and reads both from the cache.

    Put whatever the encoders depend on (encoder spec, layers, VAE id, CLIP scorer id) in the
    cache's key_settings; the dataset's own settings are added to every key here.
    """

    def __init__(self, dataset: AudioImageDataset, encode_audio: Callable[[Tensor], Tensor],
                 encode_image: Callable[[Tensor], Tensor], cache: FeatureCache, *,
                 window_starts: Sequence[int] | None = None, batch_size: int = 8) -> None:
        if window_starts is None:  # needs a fixed clip length (clip_seconds); the dataset says so if not
            window_starts = dataset.window_starts() if dataset.train else [0]
        self.dataset = dataset
        self.encode_audio = encode_audio
        self.encode_image = encode_image
        self.cache = cache
        self.window_starts = sorted({int(s) for s in window_starts})
        self.batch_size = int(batch_size)
        self._entries: list[tuple[int, dict[int, tuple[str, str]]]] | None = None
        self.encoder_calls = {"audio": 0, "image": 0}

    # ------------------------------------------------------------------ keys

    def _keys(self, index: int) -> dict[int, tuple[str, str]]:
        """start -> (audio key, image key) for example `index`."""
        ds, item = self.dataset, self.dataset.items[index]
        audio_details = {"kind": "audio", "clip_start": item.clip_start, "clip_seconds": ds.clip_seconds,
                         "window_seconds": ds.window_seconds, "channel_policy": ds.channel_policy}
        keys = {}
        for start in self.window_starts:
            audio_key = self.cache.item_key([item.audio], start=start, **audio_details)
            if isinstance(item.image, VideoFrame):
                spec = item.image
                image_key = self.cache.item_key(
                    [spec.path], kind="frame", start=start, mode=spec.mode, candidates=spec.candidates,
                    label=item.label if spec.mode == "clip" else None,
                    frame_seed=[ds.seed, item.item_id] if spec.mode == "random" else None,
                    image_size=list(ds.image_size), **{k: v for k, v in audio_details.items() if k != "kind"})
            else:
                image_key = self.cache.item_key([item.image], kind="image", image_size=list(ds.image_size))
            keys[start] = (audio_key, image_key)
        return keys

    # ------------------------------------------------------------------ precompute

    def precompute(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Encode every missing entry (bad examples are skipped and reported); returns how many were computed."""
        ds = self.dataset
        audio_todo: list[tuple[str, Tensor]] = []
        image_todo: list[tuple[str, Tensor]] = []
        queued: set[str] = set()
        entries = []
        computed = 0
        for index in range(len(ds)):
            item = ds.items[index]
            try:
                try:
                    keys = self._keys(index)
                except OSError as exc:
                    raise _ItemError(getattr(exc, "filename", None) or str(item.audio),
                                     f"cannot read the file: {exc}; check that it exists and is readable") from exc
                need_audio = [s for s, (a, _) in keys.items() if a not in self.cache and a not in queued]
                need_image = [s for s, (_, i) in keys.items() if i not in self.cache and i not in queued]
                new_audio, new_image = [], []
                if need_audio or need_image:
                    clip = ds.load_clip(index)
                    for s in need_audio:
                        new_audio.append((keys[s][0], ds.window(index, clip, s)))
                    done: set[str] = set()
                    for s in need_image:
                        key = keys[s][1]
                        if key in done:  # a still image: one latent for every start
                            continue
                        done.add(key)
                        generator = seeded_generator(ds.seed, "frame", item.item_id, s)
                        new_image.append((key, ds.image(index, clip, s, generator)[0]))
            except _ItemError as error:
                ds._report(index, error)
                continue
            for key, _ in new_audio + new_image:
                queued.add(key)
            audio_todo += new_audio
            image_todo += new_image
            entries.append((index, keys))
            computed += len(new_audio) + len(new_image)
            self._run(audio_todo, self.encode_audio, "features", "audio")
            self._run(image_todo, self.encode_image, "latents", "image")
            if progress is not None:
                progress(index + 1, len(ds))
        self._run(audio_todo, self.encode_audio, "features", "audio", final=True)
        self._run(image_todo, self.encode_image, "latents", "image", final=True)
        self.cache.flush()
        if not entries:
            raise DatasetSourceError(f"none of the {len(ds)} examples could be loaded; see dataset.problems")
        self._entries = entries
        return computed

    def _run(self, todo: list[tuple[str, Tensor]], encode: Callable[[Tensor], Tensor], name: str, kind: str,
             final: bool = False) -> None:
        """Encode full batches from the front of `todo` (and the rest when `final`), storing each row."""
        while len(todo) >= self.batch_size or (final and todo):
            chunk, todo[:] = todo[:self.batch_size], todo[self.batch_size:]
            with torch.no_grad():
                out = encode(torch.stack([t for _, t in chunk]))
            self.encoder_calls[kind] += 1
            for (key, _), row in zip(chunk, out, strict=True):
                self.cache.put(key, {name: row})

    # ------------------------------------------------------------------ Dataset API

    def _ready(self) -> list[tuple[int, dict[int, tuple[str, str]]]]:
        if self._entries is None:
            self.precompute()
        return self._entries

    def __len__(self) -> int:
        return len(self._ready())

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index, keys = self._ready()[position]
        ds, item = self.dataset, self.dataset.items[index]
        generator = ds.generator(index)
        if ds.train:  # the same first draw as AudioImageDataset.draw_start for the default starts
            start = self.window_starts[int(torch.randint(len(self.window_starts), (1,), generator=generator))]
        else:
            start = self.window_starts[0]
        audio_key, image_key = keys[start]
        audio, image = self.cache.get(audio_key), self.cache.get(image_key)
        if audio is None or image is None:
            raise CacheError(f"cache entry for {item.item_id!r} (start {start}) is missing from {self.cache.dir}; "
                             "was the cache folder changed during the run? call precompute() again")
        return {"features": audio["features"].float(), "latents": image["latents"].float(), "label": item.label,
                "id": item.item_id, "window_start": start, "frame_seconds": None, "problems": []}


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short id of a model's weights for `key_settings`: two VAEs (or encoders) of one class
    must not share cached outputs. Hashes the first and last two tensors of the state dict."""
    h = hashlib.sha256()
    # ComfyUI leaves CLIP's logit_scale / text_projection as torch.empty() when a checkpoint lacks them
    # (every SD1.x checkpoint): uninitialised memory, different in every process. Never hash those.
    tensors = [(n, t) for n, t in module.state_dict().items()
               if not n.endswith(("logit_scale", "text_projection.weight"))]
    for name, t in tensors[:2] + tensors[-2:]:
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
