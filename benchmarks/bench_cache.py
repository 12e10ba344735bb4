"""Benchmark the feature cache's two possible layouts: one safetensors file per item vs shards.

Writes N items of BEATs-feature size ([248, 2304], a 5 s window through three 768-wide
layers) in fp16 with each layout, then reads random training batches (both layouts side by
side, in alternating chunks, so a changing machine load weighs on both alike). Reads are timed twice:
warm (the files still in the page cache, as right after precompute) and cold (each file's
pages dropped with posix_fadvise(DONTNEED) first, as after a restart or on a big dataset).

  per-file: the real audiotoken_core.data.FeatureCache (atomic write per item: temp file, fsync, rename)
  shards:   the layout the cache used before, reproduced here: 64 items per safetensors file,
            "<key>/features" tensors, one atomic write per shard, safe_open + get_tensor per read

    .venv/bin/python benchmarks/bench_cache.py --items 2000 --batch 8 --batches 200
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from audiotoken_core.data import FeatureCache  # noqa: E402
from audiotoken_core.io import save_safetensors  # noqa: E402

SHARD_ITEMS = 64


class ShardStore:
    """The shard layout: SHARD_ITEMS items per file, an in-memory index key -> shard."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.where, self.pending = folder, {}, {}
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, tensors: dict) -> None:
        self.pending[key] = {n: t.clone() for n, t in tensors.items()}  # own storage, as the cache copies
        if len(self.pending) >= SHARD_ITEMS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = self.folder / f"shard-{len(list(self.folder.iterdir())):06d}.safetensors"
        flat = {f"{key}/{n}": t for key, tensors in self.pending.items() for n, t in tensors.items()}
        save_safetensors(name, flat, {"items": json.dumps({k: sorted(v) for k, v in self.pending.items()})})
        self.where.update((key, name) for key in self.pending)
        self.pending = {}

    def get(self, key: str) -> dict:
        with safe_open(str(self.where[key]), framework="pt") as handle:
            return {"features": handle.get_tensor(f"{key}/features")}


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_stats(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def bench(stores: dict, base: Path, keys: list[str], item: torch.Tensor, batches: list[list[int]]) -> dict:
    """Both layouts side by side: writes in alternating chunks of SHARD_ITEMS items, reads in alternating
    batches, so a machine whose load changes during the run (shared cores) weighs on both alike."""
    results = {name: {"layout": name, "items": len(keys), "write_s": 0.0} for name in stores}
    for first in range(0, len(keys), SHARD_ITEMS):
        for name, store in stores.items():
            t0 = time.perf_counter()
            for key in keys[first:first + SHARD_ITEMS]:
                store.put(key, {"features": item})
            store.flush()
            results[name]["write_s"] += time.perf_counter() - t0
    for name, r in results.items():
        files, size = folder_stats(base / name)
        r.update(write_items_per_s=round(len(keys) / r["write_s"], 1), files=files, MiB=round(size / 2**20))
        r["write_s"] = round(r["write_s"], 2)
        for batch in batches[:3]:  # warm-up: first calls into safetensors and torch
            torch.stack([stores[name].get(keys[i])["features"] for i in batch])
    for kind in ("warm", "cold"):
        if kind == "cold":
            for name in stores:
                drop_page_cache(base / name)
        times = {name: [] for name in stores}
        for batch in batches:
            for name, store in stores.items():
                t0 = time.perf_counter()
                torch.stack([store.get(keys[i])["features"] for i in batch]).float()
                times[name].append(time.perf_counter() - t0)
        for name, r in results.items():
            r[f"{kind}_batch_ms_median"] = round(1000 * statistics.median(times[name]), 2)
            r[f"{kind}_items_per_s"] = round(len(batches) * len(batches[0]) / sum(times[name]), 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--shape", default="248x2304", help="feature shape per item, e.g. 248x2304 (BEATs, 3 layers)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder; removed after)")
    args = parser.parse_args()

    shape = tuple(int(v) for v in args.shape.split("x"))
    item = torch.randn(shape).to(torch.float16)
    keys = [f"{i:040x}" for i in range(args.items)]
    rng = random.Random(0)
    batches = [rng.sample(range(args.items), args.batch) for _ in range(args.batches)]
    base = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.dir))
    try:
        stores = {"per-file": FeatureCache(base / "per-file", {"bench": "per-file"}),
                  "shards": ShardStore(base / "shards")}
        results = list(bench(stores, base, keys, item, batches).values())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for r in results:
        print(json.dumps(r))
    load = os.getloadavg()[0]
    print(f"\n{args.items} items of {list(shape)} fp16 ({item.nbytes / 2**20:.2f} MiB each), "
          f"{args.batches} random batches of {args.batch}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| layout | write items/s | files | MiB | warm batch ms | cold batch ms |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layout']} | {r['write_items_per_s']} | {r['files']} | {r['MiB']} | "
              f"{r['warm_batch_ms_median']} | {r['cold_batch_ms_median']} |")


if __name__ == "__main__":
    main()
