"""Compute accounting for every strategy: forward and backward FLOPs and samples seen, per experience.

FLOPs are *measured*, never guessed: ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul, convolution and
attention FLOPs (2 per multiply-add; element-wise ops such as BatchNorm, ReLU and the optimizer update count zero)
of one training step, once per training phase and per distinct step shape, and the count is multiplied by the
number of steps taken with that shape. A step is split at Lightning's ``on_before_backward`` hook: FLOPs before it
are the forward pass (including any replay forward the strategy does), after it the backward pass.

The shape key is the shapes of every tensor in the batch plus, when the strategy defines it, the value of its
``compute_signature()`` (ER returns its replay batch size, which grows while the buffer fills), so a step whose cost
changes is measured again.

Compute outside Lightning steps (an FPF call, a feature pass) is added with :func:`account` by the code that does it,
measured the same way (see :func:`cl.components.fpf.run_fpf`).

Written with ``ctx.record`` into ``metrics.json`` (``experiences[i].extra``), summed over DDP ranks (the compute
actually spent): ``compute/<phase>_fwd_flops``, ``_bwd_flops``, ``_steps``; ``compute/<name>_...`` for accounted
extras; ``compute/samples_seen`` (training samples through Lightning steps), ``compute/total_flops`` and
``compute/cumulative_flops`` (the run so far, kept across a resume).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from cl.callbacks.base import CALLBACKS, CLCallback

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

_ACTIVE: FlopsCallback | None = None
_FIELDS = ("fwd_flops", "bwd_flops", "steps", "samples")


def account(name: str, fwd_flops: int, bwd_flops: int, steps: int = 1, samples: int = 0) -> None:
    """Add compute done outside Lightning training steps to the running experience (no-op without a run)."""
    if _ACTIVE is not None:
        _ACTIVE.add(name, fwd_flops, bwd_flops, steps, samples)


def measure(fn: Any, *args: Any) -> int:
    """FLOPs of ``fn(*args)`` as ``FlopCounterMode`` counts them."""
    with FlopCounterMode(display=False) as fc:
        fn(*args)
    return int(fc.get_total_flops())


def _batch_key(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape),)
    if isinstance(batch, (list, tuple)):
        return tuple(k for b in batch for k in _batch_key(b))
    if isinstance(batch, dict):
        return tuple(k for key in sorted(batch) for k in _batch_key(batch[key]))
    return ()


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_len(next(iter(batch.values())))
    return 0


class _StepMeter(pl.Callback):
    """Measures one step per (phase, step shape) inside each ``Trainer.fit`` and counts every step."""

    def __init__(self, owner: FlopsCallback) -> None:
        self.owner = owner
        self.cache: dict[tuple, tuple[int, int]] = {}
        self.counter: FlopCounterMode | None = None
        self.key: tuple = ()
        self.fwd = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cache = {}  # once per phase

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.counter is not None:  # the previous step never ended (a strategy skipped it): drop its count
            self.counter.__exit__(None, None, None)
            self.counter = None
        sig = getattr(pl_module, "compute_signature", None)
        phase = getattr(getattr(pl_module, "phase", None), "name", "train")
        self.key = (phase, _batch_key(batch), sig() if callable(sig) else None)
        if self.key not in self.cache:
            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()
            self.fwd = -1

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.counter is not None and self.fwd < 0:
            self.fwd = int(self.counter.get_total_flops())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.counter is not None:
            self._stop()
        fwd, bwd = self.cache.get(self.key, (0, 0))
        self.owner.add(str(self.key[0]), fwd, bwd, 1, _batch_len(batch))
        self.owner.samples += _batch_len(batch)

    def _stop(self) -> None:
        assert self.counter is not None
        self.counter.__exit__(None, None, None)
        total = int(self.counter.get_total_flops())
        fwd = total if self.fwd < 0 else self.fwd
        self.cache[self.key] = (fwd, total - fwd)
        self.counter = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None


class FlopsCallback(CLCallback):
    """Per-experience FLOPs (forward/backward, per phase and accounted extra) and samples seen."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, int]] = {}
        self.samples = 0
        self.cumulative = self.cumulative_before = 0
        self.closed = False
        self.ctx: RunContext | None = None

    def trainer_callbacks(self, ctx: RunContext) -> list[pl.Callback]:
        return [_StepMeter(self)]

    def add(self, name: str, fwd: int, bwd: int, steps: int, samples: int) -> None:
        s = self.stats.setdefault(name, dict.fromkeys(_FIELDS, 0))
        s["fwd_flops"] += int(fwd) * int(steps)
        s["bwd_flops"] += int(bwd) * int(steps)
        s["steps"] += int(steps)
        s["samples"] += int(samples)
        if self.closed and self.ctx is not None:  # compute after this callback's experience end (another
            self._close(self.ctx)                  # callback's post-hoc step): record again, on every rank

    def on_run_start(self, ctx: RunContext) -> None:
        global _ACTIVE
        _ACTIVE = self
        self.ctx = ctx

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        self.stats, self.samples, self.closed = {}, 0, False
        self.cumulative_before = self.cumulative

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self._close(ctx)

    def _close(self, ctx: RunContext) -> None:
        """Sum this experience's counts over ranks (a collective) and record them."""
        names = sorted(self.stats)
        local = torch.tensor([[self.stats[n][f] for f in _FIELDS] for n in names] + [[self.samples, 0, 0, 0]],
                             dtype=torch.long)
        summed = ctx.dist.all_reduce_sum(local).tolist()
        total = 0
        for n, row in zip(names, summed[:-1]):
            for f, v in zip(_FIELDS, row):
                ctx.record(f"compute/{n}_{f}", int(v))
            total += int(row[0]) + int(row[1])
        self.cumulative = self.cumulative_before + total
        ctx.record("compute/samples_seen", int(summed[-1][0]))
        ctx.record("compute/total_flops", total)
        ctx.record("compute/cumulative_flops", self.cumulative)
        self.closed = True

    def on_run_end(self, ctx: RunContext) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None

    def state_dict(self) -> dict[str, Any]:
        return {"cumulative": self.cumulative}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cumulative = int(state.get("cumulative", 0))


CALLBACKS.append(FlopsCallback)
