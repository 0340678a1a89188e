"""FPF as an add-on to any strategy that accepts it (``fpf.enabled=true``), and the training-dynamics logger.

:class:`FPFAddon`: after the strategy's own end-of-experience step, fine-tune only the sensitive modules on a replay
buffer for ``fpf.iters`` steps (:func:`cl.components.fpf.fpf_call`), then restore what trains. A strategy that keeps
its own :class:`~cl.components.buffer.ReservoirBuffer` as ``replay_buffer`` (``er``, ``derpp``) lends it; for any
other one the add-on fills its own reservoir buffer of ``fpf.buffer_size`` during training: it captures the raw
training batch as it enters the strategy's ``train_transform`` (a forward pre-hook armed once per step, so replay
batches a strategy transforms inside ``training_step`` are not captured) and offers it to the buffer after the step.
The buffer is part of this callback's checkpointed state, and identical on every DDP rank (see the buffer's rule).

:class:`DynamicsCallback` (``fpf.dynamics``): the per-module L1 change within and across experiences and the
sensitivity score, written to ``metrics.json`` as ``fpf/dynamics``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from cl.callbacks.base import CALLBACKS, CLCallback
from cl.components.buffer import ReservoirBuffer
from cl.components.fpf import TrainingDynamics, fpf_call

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience


class _Capture:
    """Forward pre-hook on ``train_transform``: keeps the first raw input after being armed."""

    def __init__(self) -> None:
        self.armed = False
        self.x: torch.Tensor | None = None

    def arm(self) -> None:
        self.armed, self.x = True, None

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        if self.armed and args and isinstance(args[0], torch.Tensor):
            self.x, self.armed = args[0].detach(), False


class _Filler(pl.Callback):
    def __init__(self, addon: FPFAddon, ctx: RunContext) -> None:
        self.addon, self.ctx = addon, ctx

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.addon.capture.arm()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        cap = self.addon.capture
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if cap.x is not None and isinstance(y, torch.Tensor) and len(y) == len(cap.x):
            self.addon.own_buffer.add(cap.x, y, task=self.ctx.exp_index)
        elif not self.addon.warned:
            self.addon.warned = True
            warnings.warn("fpf: could not capture the raw training batch (the strategy does not pass it through "
                          "train_transform); the FPF buffer is not filled", stacklevel=1)
        cap.arm()


class FPFAddon(CLCallback):
    """Runs one FPF call after every experience of a strategy that accepts FPF."""

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.fpf.enabled)

    def __init__(self) -> None:
        self.own_buffer: ReservoirBuffer | None = None
        self.pending: dict[str, Any] | None = None
        self.capture = _Capture()
        self.warned = False
        self._hook: Any = None

    def buffer(self, ctx: RunContext) -> ReservoirBuffer:
        lent = getattr(ctx.model, "replay_buffer", None)
        return lent if isinstance(lent, ReservoirBuffer) else self.own_buffer  # type: ignore[return-value]

    def on_run_start(self, ctx: RunContext) -> None:
        if isinstance(getattr(ctx.model, "replay_buffer", None), ReservoirBuffer):
            return
        self.own_buffer = ReservoirBuffer(ctx.cfg.fpf.buffer_size, seed=int(ctx.cfg.seed)).to(ctx.device)
        if self.pending is not None:
            self.own_buffer.load_state_dict(self.pending)
        self._hook = ctx.model.train_transform.register_forward_pre_hook(self.capture)

    def trainer_callbacks(self, ctx: RunContext) -> list[pl.Callback]:
        return [_Filler(self, ctx)] if self.own_buffer is not None else []

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        buf = self.buffer(ctx)
        if buf is None or buf.is_empty():
            return
        ctx.model.to(ctx.device)
        fpf_call(ctx, ctx.model, buf, tag=("addon", exp.index))

    def on_run_end(self, ctx: RunContext) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        if self.own_buffer is None:
            return {}
        return {k: v.detach().cpu() for k, v in self.own_buffer.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = dict(state) or None


class _EpochProbe(pl.Callback):
    def __init__(self, dyn: TrainingDynamics) -> None:
        self.dyn = dyn

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dyn.epoch_end(pl_module)


class DynamicsCallback(CLCallback):
    """Logs the paper's per-module training dynamics (``fpf.dynamics``; ``auto`` = when FPF or kfpf is used)."""

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        mode = cfg.fpf.dynamics
        return mode == "on" or (mode == "auto" and (bool(cfg.fpf.enabled) or cfg.strategy.name == "kfpf"))

    def __init__(self) -> None:
        self.dyn = TrainingDynamics()

    def trainer_callbacks(self, ctx: RunContext) -> list[pl.Callback]:
        return [_EpochProbe(self.dyn)]

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        self.dyn.experience_start(ctx.model)  # before the strategy grows: a new head has no "before" (skipped)

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        ctx.record("fpf/dynamics", self.dyn.experience_end(ctx.model))

    def state_dict(self) -> dict[str, Any]:
        return self.dyn.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dyn.load_state_dict(state)


CALLBACKS.extend([FPFAddon, DynamicsCallback])
