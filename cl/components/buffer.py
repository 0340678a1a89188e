"""A reservoir replay buffer whose state is tensors (so it checkpoints) and is identical on every DDP rank.

Reservoir sampling (Vitter's algorithm R, as mammoth's ``Buffer`` uses it): the n-th sample of the stream (0-based)
fills slot n while the buffer is not full, afterwards it replaces slot ``j ~ U{0..n}`` when ``j < capacity``. Every
sample seen so far is then kept with the same probability ``capacity / n_seen``.

What is stored: the **raw** input (float in [0, 1] at native size, before the scenario's batch transform, so a
replayed sample gets fresh augmentation), the label, the experience index and optionally the logits at insertion
(DER++, k-FPF-KD; padded to ``n_logits`` columns, with the number of valid columns per sample in ``logit_width``).

The DDP rule: every rank holds the *whole* buffer, and all ranks make the same insertions.

* The random decisions of a batch come from a generator seeded with ``(seed, n_seen)``. They depend only on the
  number of samples seen before the batch and on the global batch size, so every rank draws the same ones, and a
  resumed run draws what the uninterrupted one would have (no generator state to checkpoint).
* ``add`` receives this rank's shard of a global batch (rank ``r`` holds elements ``r, r + world, ...``, the rule of
  :mod:`cl.data.loaders`). When any sample of the global batch is to be inserted, the shards are all-gathered and
  re-interleaved into the global batch order; when none is, nothing is communicated. So the buffer after N ranks
  equals the buffer after one process that saw the same global batches.
* Replay mini-batches are drawn from the whole buffer with a generator every rank seeds identically, and each rank
  takes its own shard of them (:meth:`sample_indices` with ``rank``/``world``), the same rule as the data loader.

The tensors are allocated at :meth:`allocate` (call it before the first ``Trainer.fit``, so DDP sees the final
tensors) and re-sized when a checkpoint is loaded into a fresh buffer. Strategies that put a buffer in a
``LightningModule`` should list :meth:`ddp_ignore_names` in ``_ddp_params_and_buffers_to_ignore``: the buffer is
already identical on every rank, and DDP would otherwise broadcast all of it before every forward pass.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

__all__ = ["ReservoirBuffer", "reservoir_slots"]


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def reservoir_slots(n_seen: int, batch: int, capacity: int, generator: torch.Generator) -> Tensor:
    """Reservoir decisions for ``batch`` new samples after ``n_seen`` seen ones: the slot of each, or -1 (dropped).

    Later samples of a batch may overwrite a slot chosen by earlier ones, as in the sequential algorithm; the caller
    applies the writes in order.
    """
    n = n_seen + torch.arange(batch, dtype=torch.float64)  # 0-based stream position of each new sample
    j = (torch.rand(batch, generator=generator, dtype=torch.float64) * (n + 1)).long()  # U{0..n}
    return torch.where(n < capacity, n.long(), torch.where(j < capacity, j, torch.full_like(j, -1)))


def _world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class ReservoirBuffer(nn.Module):
    """Reservoir-sampled replay memory of ``capacity`` samples.

    Args:
        capacity: number of slots.
        n_logits: columns kept for logits at insertion (0 = do not store logits).
        seed: base seed of the reservoir decisions (the run seed).
    """

    _TENSORS = ("x", "y", "task", "logits", "logit_width")

    def __init__(self, capacity: int, n_logits: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.n_logits = int(n_logits)
        self.seed = int(seed)
        self.register_buffer("x", torch.zeros(0))
        self.register_buffer("y", torch.zeros(0, dtype=torch.long))
        self.register_buffer("task", torch.zeros(0, dtype=torch.long))
        self.register_buffer("logits", torch.zeros(0))
        self.register_buffer("logit_width", torch.zeros(0, dtype=torch.long))
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------------------------------------- storage
    @property
    def allocated(self) -> bool:
        return self.x.dim() > 1

    def allocate(self, sample_shape: tuple[int, ...], device: torch.device | str | None = None) -> None:
        """Create the storage for inputs of ``sample_shape`` (e.g. (C, H, W)); a no-op once allocated."""
        if self.allocated:
            return
        dev = device if device is not None else self.n_seen.device
        self.x = torch.zeros(self.capacity, *sample_shape, device=dev)
        self.y = torch.full((self.capacity,), -1, dtype=torch.long, device=dev)
        self.task = torch.full((self.capacity,), -1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(self.capacity, self.n_logits, device=dev)
        self.logit_width = torch.zeros(self.capacity, dtype=torch.long, device=dev)

    def __len__(self) -> int:
        return min(int(self.n_seen), self.capacity)

    def is_empty(self) -> bool:
        return len(self) == 0

    def ddp_ignore_names(self, prefix: str) -> list[str]:
        """Fully qualified names of this buffer's tensors, for ``_ddp_params_and_buffers_to_ignore``."""
        return [f"{prefix}.{n}" for n in (*self._TENSORS, "n_seen")]

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a fresh buffer has empty storage: take the checkpoint's shapes before copying (checkpoint round trip)
        for name in self._TENSORS:
            t = state_dict.get(prefix + name)
            if t is not None and tuple(t.shape) != tuple(getattr(self, name).shape):
                setattr(self, name, torch.empty_like(t, device=self.n_seen.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------- insertion
    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor, task: int, logits: Tensor | None = None) -> int:
        """Offer this rank's shard of a global batch to the reservoir; returns how many samples were written.

        Under DDP every rank must call this with its shard of the same global batch (all shards the same size).
        """
        if not self.allocated:
            self.allocate(tuple(x.shape[1:]), x.device)
        rank, world = _world()
        n_global = x.shape[0] * world
        n0 = int(self.n_seen)
        g = torch.Generator().manual_seed(_seed(self.seed, "reservoir", n0))
        slots = reservoir_slots(n0, n_global, self.capacity, g)
        self.n_seen += n_global
        if not bool((slots >= 0).any()):
            return 0
        if logits is not None and self.n_logits:
            width = min(logits.shape[1], self.n_logits)
            lg = torch.zeros(x.shape[0], self.n_logits, device=x.device, dtype=self.logits.dtype)
            lg[:, :width] = logits[:, :width].to(lg.dtype)
        else:
            width = 0
            lg = torch.zeros(x.shape[0], self.n_logits, device=x.device, dtype=self.logits.dtype)
        xs, ys, lgs = x.detach().to(self.x.dtype), y.detach().long(), lg
        if world > 1:  # rebuild the global batch: element k*world + r came from rank r
            xs, ys, lgs = (_gather_interleaved(t) for t in (xs, ys, lgs))
        keep = (slots >= 0).nonzero().flatten()
        for i in keep.tolist():  # in stream order: a later sample may overwrite an earlier one's slot
            s = int(slots[i])
            self.x[s] = xs[i].to(self.x.device)
            self.y[s] = ys[i].to(self.y.device)
            self.task[s] = task
            if self.n_logits:
                self.logits[s] = lgs[i].to(self.logits.device)
                self.logit_width[s] = width
        return len(keep)

    # ---------------------------------------------------------------------------------------------- sampling
    def sample_indices(self, n: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> Tensor:
        """Indices of a global replay batch of ``min(n, len)`` distinct samples; this rank's shard of it.

        ``generator`` must be seeded identically on every rank (``ctx.generator(tag)`` or :meth:`generator`).
        """
        size = len(self)
        if size == 0:
            return torch.zeros(0, dtype=torch.long)
        m = min(n, size)
        m -= m % world  # equal shards on every rank
        idx = torch.randperm(size, generator=generator)[:m]
        return idx[rank::world]

    def generator(self, *tag: Any) -> torch.Generator:
        """A CPU generator seeded by the buffer seed and ``tag`` (e.g. a step counter): equal on every rank."""
        return torch.Generator().manual_seed(_seed(self.seed, *tag))

    def get(self, idx: Tensor) -> dict[str, Tensor]:
        """The stored tensors at ``idx`` (raw inputs: apply the training transform yourself)."""
        idx = idx.to(self.x.device)
        out = {"x": self.x[idx], "y": self.y[idx], "task": self.task[idx]}
        if self.n_logits:
            out["logits"], out["logit_width"] = self.logits[idx], self.logit_width[idx]
        return out

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, n_logits={self.n_logits}, filled={len(self)}"


def _gather_interleaved(t: Tensor) -> Tensor:
    """All-gather equal shards and interleave them back into the global order (rank r holds r, r+world, ...)."""
    world = tdist.get_world_size()
    comm = t.cuda() if tdist.get_backend() == "nccl" and not t.is_cuda else t
    comm = comm.contiguous()
    parts = [torch.empty_like(comm) for _ in range(world)]
    tdist.all_gather(parts, comm)
    stacked = torch.stack(parts, dim=1).to(t.device)  # (B/world, world, ...)
    return stacked.reshape(t.shape[0] * world, *t.shape[1:])
