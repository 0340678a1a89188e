"""The reservoir buffer: equal keep probability, checkpoint round trip, logits bookkeeping, identical DDP buffers."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from cl.components.buffer import ReservoirBuffer, reservoir_slots
from cl.utils import tensor_hash


def _stream(n: int, batch: int):
    ids = torch.arange(n, dtype=torch.float32)
    for b in range(0, n, batch):
        chunk = ids[b:b + batch]
        yield chunk.view(-1, 1), chunk.long()


def test_reservoir_keeps_every_sample_with_equal_probability():
    """1,000 independent runs (seeds 0..999) of a 100-sample stream into 10 slots, batches of 5.

    Each sample must be kept with probability 10/100; a chi-square test over the 100 keep counts (99 degrees of
    freedom) must not reject uniformity, and the early and late halves of the stream must be kept equally often.
    """
    n, cap, trials = 100, 10, 1000
    counts = np.zeros(n)
    for seed in range(trials):
        buf = ReservoirBuffer(cap, seed=seed)
        for x, y in _stream(n, 5):
            buf.add(x, y, task=0)
        assert len(buf) == cap and int(buf.n_seen) == n
        kept = buf.y.tolist()
        assert len(set(kept)) == cap, "a sample is stored twice"
        counts[kept] += 1
    expected = trials * cap / n  # 100
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 99 dof: mean 99, sd 14; 160 is beyond the 99.99th percentile (about 156)
    assert chi2 < 160, f"keep counts are not uniform (chi2={chi2:.1f})"
    assert abs(counts[:50].sum() - counts[50:].sum()) < 0.1 * counts.sum(), "early and late samples differ"
    assert counts.min() > 0.5 * expected and counts.max() < 1.6 * expected


def test_reservoir_slots_fill_then_replace():
    g = torch.Generator().manual_seed(0)
    s = reservoir_slots(0, 4, 6, g)
    assert s.tolist() == [0, 1, 2, 3]  # filling: slot = position
    s = reservoir_slots(4, 4, 6, g)
    assert s[:2].tolist() == [4, 5] and all(-1 <= v < 6 for v in s[2:].tolist())


def test_checkpoint_round_trip_and_resume_equal_uninterrupted():
    a = ReservoirBuffer(8, n_logits=4, seed=3)
    stream = list(_stream(40, 4))
    for x, y in stream[:5]:
        a.add(x, y, task=0, logits=torch.randn(len(y), 2))  # narrower than n_logits: width recorded
    fresh = ReservoirBuffer(8, n_logits=4, seed=3)
    assert not fresh.allocated
    fresh.load_state_dict(a.state_dict())
    assert tensor_hash(dict(fresh.state_dict())) == tensor_hash(dict(a.state_dict()))
    assert set(a.logit_width.tolist()) == {2} and torch.all(a.logits[:, 2:] == 0)
    for x, y in stream[5:]:
        lg = torch.zeros(len(y), 4)
        a.add(x, y, task=1, logits=lg)
        fresh.add(x, y, task=1, logits=lg)
    assert tensor_hash(dict(fresh.state_dict())) == tensor_hash(dict(a.state_dict()))


def test_sample_indices_shards_partition_the_global_batch():
    buf = ReservoirBuffer(20, seed=0)
    for x, y in _stream(20, 5):
        buf.add(x, y, task=0)
    full = buf.sample_indices(8, buf.generator("t", 1))
    shards = [buf.sample_indices(8, buf.generator("t", 1), rank=r, world=2) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(full.tolist()) and len(set(full.tolist())) == 8


# ------------------------------------------------------------------------------------------------ 2 processes
def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    buf = ReservoirBuffer(16, n_logits=3, seed=7)
    for x, y in _stream(96, 8):  # global batches of 8; this rank's shard is rank::world
        buf.add(x[rank::world], y[rank::world], task=0, logits=x[rank::world].expand(-1, 3))
    torch.save({k: v.clone() for k, v in buf.state_dict().items()}, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_hold_the_single_process_buffer(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = ReservoirBuffer(16, n_logits=3, seed=7)
    for x, y in _stream(96, 8):
        single.add(x, y, task=0, logits=x.expand(-1, 3))
    hashes = {tensor_hash(r) for r in ranks} | {tensor_hash(dict(single.state_dict()))}
    assert len(hashes) == 1, "DDP ranks' buffers differ from each other or from the single-process buffer"
