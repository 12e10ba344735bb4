"""On-disk caches of frozen-encoder outputs, so later epochs and later runs skip the encoders.

Layout under the cache folder:

    file_hashes.json                   path -> [size, mtime_ns, sha256]  (hashing 200k videos once)
    settings-<hash>/settings.json      the settings this folder belongs to (for humans)
    settings-<hash>/index.json         shard -> {item key: [tensor names]}  (rebuilt from shards if lost)
    settings-<hash>/shard-*.safetensors  many items per file; tensors named "<item key>/<name>"

An item key is a hash of the *content* of the item's source files plus item details (window
start, frame choice); the settings (encoder, layers, VAE, image size ...) pick the folder. A
changed file or changed settings is therefore a miss, never a stale hit. Shards get unique
names and are written atomically (temp file + rename); each shard also lists its items in
its own metadata, so concurrent writers (several ranks) never lose entries: `refresh()`
picks up shards written by others.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from .dataset import AudioImageDataset, _ItemError, seeded_generator
from .items import DatasetSourceError, VideoFrame

__all__ = ["FeatureCache", "CachedFeatures", "CacheError"]

logger = logging.getLogger("audiotoken.data")

_FORMAT = "audiotoken-feature-cache"
_VERSION = "1"
_HASHES = "file_hashes.json"
_INDEX = "index.json"


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message says what to change."""


def _jsonable(value: Any) -> Any:
    """Settings -> plain JSON values (EncoderSpec and dataclasses, paths, dtypes, tuples are accepted)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (os.PathLike, torch.dtype, torch.device)):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CacheError(
        f"cache settings must be JSON-like (str, number, list, dict, EncoderSpec, path), got {type(value).__name__} "
        f"{value!r}; describe it by a string such as a model name or file hash"
    )


def _digest(value: Any) -> str:
    text = json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class FeatureCache:
    """Tensors per item key in safetensors shards; `get` returns None on a miss.

        cache = FeatureCache("cache/", {"encoder": encoder.spec, "vae": "sd15-vae"})
        key = cache.item_key(["clip.mp4"], start=2)
        cache.get(key) or cache.put(key, {"features": f})

    `store_dtype` (e.g. torch.float16) halves the disk for float tensors; default keeps
    the dtype given. A shard is written every `shard_size` items or `max_shard_bytes`;
    call `flush()` (or use `with`) at the end so the last partial shard is written.
    """

    def __init__(self, directory: str | os.PathLike, key_settings: Mapping[str, Any], *, shard_size: int = 64,
                 max_shard_bytes: int = 256 << 20, store_dtype: torch.dtype | None = None) -> None:
        if not isinstance(key_settings, Mapping):
            raise CacheError(f"key_settings must be a dict of what the cached tensors depend on, got {key_settings!r}")
        if shard_size < 1:
            raise CacheError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(directory)
        self.settings = _jsonable(key_settings)
        self.settings_hash = _digest(self.settings)[:20]
        self.dir = self.root / f"settings-{self.settings_hash}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache folder {self.dir}: {exc}; pick a writable folder") from exc
        if not (self.dir / "settings.json").exists():
            _atomic_write_text(self.dir / "settings.json", json.dumps(self.settings, indent=1, sort_keys=True))
        self.shard_size = int(shard_size)
        self.max_shard_bytes = int(max_shard_bytes)
        self.store_dtype = store_dtype
        self._shards: dict[str, dict[str, list[str]]] = {}  # shard file -> {key: names}
        self._where: dict[str, str] = {}  # key -> shard file
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._pending_bytes = 0
        self._hashes: dict[str, list] = {}
        self._hashes_dirty = False
        self._saved_at = time.monotonic()
        self._index_dirty = False
        self.save_interval_s = 30.0
        self._load_hashes()
        self.refresh()

    # ------------------------------------------------------------------ file content hashes

    def _load_hashes(self) -> None:
        try:
            data = json.loads((self.root / _HASHES).read_text(encoding="utf-8"))
            self._hashes = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._hashes = {}

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

    def _save_hashes(self) -> None:
        if not self._hashes_dirty:
            return
        path = self.root / _HASHES
        try:  # merge what other processes wrote meanwhile
            on_disk = json.loads(path.read_text(encoding="utf-8"))
            merged = {**on_disk, **self._hashes} if isinstance(on_disk, dict) else self._hashes
        except (OSError, ValueError):
            merged = self._hashes
        _atomic_write_text(path, json.dumps(merged, separators=(",", ":")))
        self._hashes, self._hashes_dirty = merged, False

    # ------------------------------------------------------------------ index

    def refresh(self) -> None:
        """Reload the index, adding shards written by other processes and dropping deleted ones."""
        try:
            data = json.loads((self.dir / _INDEX).read_text(encoding="utf-8"))
            listed = data.get("shards", {}) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            listed = {}
        on_disk = {p.name for p in self.dir.glob("shard-*.safetensors")}
        shards, changed = {}, set(listed) != on_disk
        for name in sorted(on_disk):
            items = listed.get(name)
            if not isinstance(items, dict):
                items = self._read_shard_items(name)
                if items is None:
                    continue
            shards[name] = items
        self._shards = shards
        self._where = {key: name for name, items in shards.items() for key in items}
        if changed:
            self._save_index()

    def _read_shard_items(self, name: str) -> dict[str, list[str]] | None:
        try:
            with safe_open(str(self.dir / name), framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            return json.loads(meta["items"])
        except Exception as exc:  # a damaged shard costs its entries, never the run
            logger.warning("ignoring unreadable cache shard %s: %s", self.dir / name, exc)
            return None

    def _save_index(self) -> None:
        _atomic_write_text(self.dir / _INDEX, json.dumps(
            {"format": _FORMAT, "version": _VERSION, "settings_hash": self.settings_hash, "shards": self._shards},
            separators=(",", ":")))
        self._index_dirty = False

    # ------------------------------------------------------------------ get / put

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._where

    def __len__(self) -> int:
        return len(set(self._where) | set(self._pending))

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The tensors stored under `key`, or None (never stored, or its shard is gone)."""
        if key in self._pending:
            return dict(self._pending[key])
        name = self._where.get(key)
        if name is None:
            return None
        try:
            with safe_open(str(self.dir / name), framework="pt") as handle:
                return {n: handle.get_tensor(f"{key}/{n}") for n in self._shards[name][key]}
        except Exception as exc:
            logger.warning("cache shard %s is unreadable (%s); its items will be recomputed", self.dir / name, exc)
            for lost in self._shards.pop(name, {}):
                self._where.pop(lost, None)
            return None

    def put(self, key: str, tensors: Mapping[str, Tensor]) -> None:
        """Store `tensors` (copied to CPU) under `key`; written to disk with the next shard."""
        if not isinstance(key, str) or not key or "/" in key:
            raise CacheError(f"item keys must be non-empty strings without '/', got {key!r}; use item_key(...)")
        if not tensors or not all(isinstance(n, str) and isinstance(t, Tensor) for n, t in tensors.items()):
            raise CacheError(f"put expects a non-empty dict of name -> Tensor, got {type(tensors).__name__}")
        stored = {}
        for name, tensor in tensors.items():
            tensor = tensor.detach().to("cpu")
            if self.store_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.store_dtype)
            stored[name] = tensor.clone().contiguous()  # own storage: safetensors refuses shared memory
        if key in self._pending:
            self._pending_bytes -= sum(t.nbytes for t in self._pending[key].values())
        self._pending[key] = stored
        self._pending_bytes += sum(t.nbytes for t in stored.values())
        if len(self._pending) >= self.shard_size or self._pending_bytes >= self.max_shard_bytes:
            self._write_shard()

    def _write_shard(self) -> None:
        if not self._pending:
            return
        name = f"shard-{time.time_ns():x}-{uuid.uuid4().hex[:8]}.safetensors"
        items = {key: sorted(tensors) for key, tensors in self._pending.items()}
        flat = {f"{key}/{n}": t for key, tensors in self._pending.items() for n, t in tensors.items()}
        tmp = self.dir / f".tmp-{name}"
        save_file(flat, str(tmp), metadata={"format": _FORMAT, "version": _VERSION, "items": json.dumps(items)})
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self.dir / name)
        self._shards[name] = items
        self._where.update((key, name) for key in items)
        self._pending, self._pending_bytes = {}, 0
        self._index_dirty = True
        if time.monotonic() - self._saved_at > self.save_interval_s:
            self._save_bookkeeping()

    def _save_bookkeeping(self) -> None:
        # index.json and file_hashes.json grow with the dataset (tens of MB at VGGSound scale), so
        # they are rewritten at most every save_interval_s; shards list their own items, so an
        # index that lags behind loses nothing (refresh() reads the shards it does not list).
        if self._index_dirty:
            self._save_index()
        self._save_hashes()
        self._saved_at = time.monotonic()

    def flush(self) -> None:
        """Write pending items as a (partial) shard, the index and the file-hash memo."""
        self._write_shard()
        self._save_bookkeeping()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    @property
    def shard_files(self) -> list[Path]:
        return [self.dir / name for name in sorted(self._shards)]


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
                 window_starts: Sequence[int] | None = None, batch_size: int = 8,
                 image_cache: FeatureCache | None = None) -> None:
        if window_starts is None:
            if dataset.clip_seconds is None:
                raise DatasetSourceError(
                    "with clip_seconds=None the window starts depend on each clip; pass window_starts, e.g. range(5)")
            window_starts = dataset.window_starts() if dataset.train else [0]
        starts = sorted({int(s) for s in window_starts})
        if not starts or starts[0] < 0:
            raise DatasetSourceError(f"window_starts must be whole seconds >= 0, got {list(window_starts)!r}")
        if dataset.clip_seconds is not None and starts[-1] + dataset.window_seconds > dataset.clip_seconds:
            raise DatasetSourceError(
                f"window start {starts[-1]} s + a {dataset.window_seconds:g} s window passes the "
                f"{dataset.clip_seconds:g} s clip; use starts in {dataset.window_starts()}")
        self.dataset = dataset
        self.encode_audio = encode_audio
        self.encode_image = encode_image
        self.cache = cache
        self.image_cache = image_cache if image_cache is not None else cache
        self.window_starts = starts
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
                image_key = self.image_cache.item_key(
                    [spec.path], kind="frame", start=start, mode=spec.mode, candidates=spec.candidates,
                    label=item.label if spec.mode == "clip" else None,
                    frame_seed=[ds.seed, item.item_id] if spec.mode == "random" else None,
                    image_size=list(ds.image_size), **{k: v for k, v in audio_details.items() if k != "kind"})
            else:
                image_key = self.image_cache.item_key([item.image], kind="image", image_size=list(ds.image_size))
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
                need_image = [s for s, (_, i) in keys.items() if i not in self.image_cache and i not in queued]
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
            self._run(audio_todo, self.encode_audio, self.cache, "features", "audio")
            self._run(image_todo, self.encode_image, self.image_cache, "latents", "image")
            if progress is not None:
                progress(index + 1, len(ds))
        self._run(audio_todo, self.encode_audio, self.cache, "features", "audio", final=True)
        self._run(image_todo, self.encode_image, self.image_cache, "latents", "image", final=True)
        self.cache.flush()
        if self.image_cache is not self.cache:
            self.image_cache.flush()
        if not entries:
            raise DatasetSourceError(f"none of the {len(ds)} examples could be loaded; see dataset.problems")
        self._entries = entries
        return computed

    def _run(self, todo: list[tuple[str, Tensor]], encode: Callable[[Tensor], Tensor], cache: FeatureCache,
             name: str, kind: str, final: bool = False) -> None:
        """Encode full batches from the front of `todo` (and the rest when `final`), storing each row."""
        while len(todo) >= self.batch_size or (final and todo):
            chunk, todo[:] = todo[:self.batch_size], todo[self.batch_size:]
            with torch.no_grad():
                out = encode(torch.stack([t for _, t in chunk]))
            self.encoder_calls[kind] += 1
            if not isinstance(out, Tensor) or out.shape[0] != len(chunk):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise CacheError(f"the {kind} encoder returned {shape} for a batch of {len(chunk)}; "
                                 "it must return a tensor with one row per input")
            for (key, _), row in zip(chunk, out):
                cache.put(key, {name: row})

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
        audio, image = self.cache.get(audio_key), self.image_cache.get(image_key)
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
