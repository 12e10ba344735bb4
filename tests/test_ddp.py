"""Data-parallel training with torch.distributed: two CPU processes over gloo.

Both ranks must end with identical weights, equal (within float tolerance) to a single
process that sees the same global batch; only rank 0 writes files; a stop asked by one
rank stops both; a data-parallel run resumes from its checkpoint.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from audiotoken_core.training import Trainer, TrainConfig
from test_trainer import ToyBackend, assert_equivalent, make_batches, make_token, split_batches, weights

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 4


def _rendezvous() -> dist.TCPStore:
    """A store server on a free loopback port, bound here (port 0) so no other process can take it."""
    return dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=60), wait_for_workers=False)


def _config(**kw) -> TrainConfig:
    base = dict(steps=STEPS, batch_size=GLOBAL_BATCH // WORLD, base_lr=2.5e-4, scale_lr=True, save_every=2,
                keep_last=0, log_every=1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _shard(rank: int):
    """Rank r gets the r-th half of every global batch (samples in global order)."""
    return split_batches(make_batches(STEPS + 2, GLOBAL_BATCH, seed=7), WORLD)[rank::WORLD]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        # Different initial weights per rank: the trainer must broadcast rank 0's.
        token = make_token(seed=0 if rank == 0 else 99, dropout=0.0)
        trainer = Trainer(_config(), ToyBackend(), token, None, _shard(rank), f"{out}/rank{rank}")
        summary = trainer.run()
        result = {"weights": weights(token), "lr": trainer.lr, "status": summary.status,
                  "losses": [h["loss"] for h in summary.history]}
        # Resume the data-parallel run from rank 0's checkpoint at step 2 (every rank reads the
        # same files) and stop when rank 1 alone asks to: both ranks must stop at step 3.
        resumed = Trainer(_config(steps=STEPS + 2), ToyBackend(), make_token(seed=5, dropout=0.0), None,
                          _shard(rank), f"{out}/resumed{rank}")
        resumed.resume(f"{out}/rank0/audiotoken-step000002.state.pt")
        stop = resumed.run(should_stop=lambda: rank == 1 and resumed.step >= 3)
        result.update(resumed_step=stop.step, resumed_status=stop.status, resumed_weights=weights(resumed.token))
        torch.save(result, f"{out}/result{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (seen: SIGABRT under load)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_a_single_process_with_the_global_batch(tmp_path):
    store = _rendezvous()
    mp.spawn(_worker, args=(store.port, str(tmp_path)), nprocs=WORLD, join=True)
    del store
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD))

    # both ranks end identical (gradients all-reduced, rank 0's initial weights broadcast)
    assert r0["weights"].keys() == r1["weights"].keys()
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])
    assert r0["losses"] == r1["losses"] and r0["status"] == "completed"
    assert r0["lr"] == pytest.approx(2.5e-4 * GLOBAL_BATCH)  # scaled by the world size

    # only rank 0 writes files
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        "audiotoken-step000002.safetensors", "audiotoken-step000002.state.pt",
        "audiotoken-step000004.safetensors", "audiotoken-step000004.state.pt", "audiotoken.safetensors"]
    assert not (tmp_path / "rank1").exists()

    # a single process with the whole global batch reaches the same weights
    single = make_token(seed=0, dropout=0.0)
    config = _config(batch_size=GLOBAL_BATCH)
    trainer = Trainer(config, ToyBackend(), single, None, make_batches(STEPS + 2, GLOBAL_BATCH, seed=7),
                      tmp_path / "single")
    summary = trainer.run()
    assert trainer.lr == pytest.approx(r0["lr"])
    assert [h["loss"] for h in summary.history] == pytest.approx(r0["losses"], rel=1e-6)
    ddp = make_token(dropout=0.0)
    ddp.embedders["l"].load_state_dict({k.split(".", 1)[1]: v for k, v in r0["weights"].items()})
    assert_equivalent(single, ddp)

    # a stop asked by one rank stops both at the same step, with the same weights
    assert r0["resumed_step"] == r1["resumed_step"] == 3
    assert r0["resumed_status"] == r1["resumed_status"] == "stopped"
    assert all(torch.equal(r0["resumed_weights"][k], r1["resumed_weights"][k]) for k in r0["resumed_weights"])
