"""The optimisation step without Lightning's automatic-optimisation machinery, where that changes nothing.

Lightning's automatic optimisation wraps every step in a closure: ``training_step``, ``optimizer_zero_grad``,
``backward`` and ``optimizer_step`` run through a chain of hook calls, result objects and progress trackers. On a
small network that bookkeeping is a tenth of the step (benchmarks/README.md, "Engine overhead"). :class:`ManualStep`
turns the fit into manual optimisation and takes the same step itself, in the same order::

    out = training_step(batch, batch_idx)     # forward (autocast as before: the strategy's train_step_context)
    optimizer.zero_grad()                     # Lightning's default optimizer_zero_grad (set_to_none)
    manual_backward(out loss)                 # the on_before_backward / on_after_backward hooks, DDP's reducer
    optimizer.step()                          # the on_before_optimizer_step hooks, the precision plugin

so weights, optimizer state and every metric are bit-identical to the automatic run (tests/test_fast_step.py).
Epoch-interval schedulers, which Lightning does not step in manual optimisation, are stepped here where Lightning
steps them: after the epoch's last optimizer step, at the scheduler's frequency.

It steps aside (the fit stays automatic) wherever automatic optimisation does something this step would not: a
strategy that overrides ``optimizer_step`` (LAE's EMA update), ``optimizer_zero_grad`` or
``configure_gradient_clipping`` (L2P, DualPrompt); ``trainer.gradient_clip_val`` or
``trainer.accumulate_grad_batches``; more than one optimizer; a step-interval or ReduceLROnPlateau scheduler; a
callback hooked on ``on_before_zero_grad``; a strategy that already optimises manually; ``run.fast_step=false``; and a
resumed step checkpoint written by an automatic fit.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.profilers import PassThroughProfiler
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor

from cl.errors import UserError

#: LightningModule hooks that automatic optimisation calls and manual optimisation skips or calls elsewhere
_AUTOMATIC_ONLY_HOOKS = ("optimizer_step", "optimizer_zero_grad", "configure_gradient_clipping",
                         "on_before_zero_grad")


def automatic_reason(trainer: pl.Trainer, module: pl.LightningModule) -> str | None:
    """Why this fit must keep Lightning's automatic optimisation, or None when :class:`ManualStep` may take over
    (called at ``on_fit_start``, once the optimizers and schedulers are configured)."""
    if not module.automatic_optimization:
        return "the strategy optimises manually itself"
    for name in _AUTOMATIC_ONLY_HOOKS:
        if is_overridden(name, module):
            return f"{type(module).__name__} overrides {name}"
    if trainer.gradient_clip_val:
        return "trainer.gradient_clip_val is set"
    if trainer.accumulate_grad_batches != 1:
        return "trainer.accumulate_grad_batches is not 1"
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers"
    for config in trainer.lr_scheduler_configs:
        if config.interval != "epoch" or config.reduce_on_plateau:
            return "a step-interval or ReduceLROnPlateau scheduler"
    for cb in trainer.callbacks:
        if is_overridden("on_before_zero_grad", cb, pl.Callback):
            return f"callback {type(cb).__name__} hooks on_before_zero_grad"
    return None


#: the hooks Lightning calls around a manual step (precision plugin, optimizer closure)
_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def _direct_backward_and_step(trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> tuple | None:
    """``(backward(loss), step())`` without Lightning's precision-plugin and strategy chain, for a fit where that
    chain does nothing but call hooks: one process (no DDP reducer to prepare), 32-bit precision (no scaler, no
    autocast exit), ``backward`` not overridden. Only the hooks something overrides are called, through Lightning's
    own dispatch, in its order (callbacks, then the module). One difference: ``on_before_optimizer_step`` runs
    before the optimizer's own step pre-hooks, not after them. None where Lightning's chain is needed."""
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies import SingleDeviceStrategy
    from pytorch_lightning.trainer import call

    if type(trainer.strategy) is not SingleDeviceStrategy or type(trainer.precision_plugin) is not Precision \
            or is_overridden("backward", module):
        return None
    listened = {hook: (any(is_overridden(hook, cb, pl.Callback) for cb in trainer.callbacks),
                       is_overridden(hook, module)) for hook in _STEP_HOOKS}

    def hooks(name: str, *args: Any) -> None:
        on_callbacks, on_module = listened[name]
        if on_callbacks:
            call._call_callback_hooks(trainer, name, *args)
        if on_module:
            call._call_lightning_module_hook(trainer, name, *args)

    raw = optimizer.optimizer

    def backward(loss: Tensor) -> None:
        hooks("on_before_backward", loss)
        loss.backward()
        hooks("on_after_backward")

    def step() -> None:
        optimizer._on_before_step()  # the manual loop's step count (trainer.global_step)
        hooks("on_before_optimizer_step", raw)
        raw.step()
        optimizer._on_after_step()

    return backward, step


class NullProfiler(PassThroughProfiler):
    """Lightning's default no-op profiler, without its generator-based context manager: Lightning enters
    ``profiler.profile(name)`` some forty times per training step (every hook of every callback), and a shared
    ``nullcontext`` costs a fraction of a ``@contextmanager`` generator. The runner uses it unless
    ``trainer.profiler`` names one."""

    _NULL = nullcontext()

    def profile(self, action_name: str) -> Any:  # type: ignore[override]
        return self._NULL


class ManualStep(pl.Callback):
    """Runs one fit in manual optimisation with the automatic loop's step (module docstring).

    ``allowed=False`` keeps the fit automatic (``run.fast_step=false``). A resumed fit runs in the mode its step
    checkpoint was written in (``resumed_manual``; the loop's step counter lives in the automatic or the manual
    loop), whatever ``allowed`` says.
    ``active`` and ``reason`` say what was decided; :meth:`restore` (the runner calls it after the fit, however it
    ended) gives the module back its own ``training_step`` and automatic optimisation.
    """

    def __init__(self, allowed: bool = True, resumed_manual: bool | None = None) -> None:
        self.allowed = allowed if resumed_manual is None else resumed_manual
        self.resumed_manual = resumed_manual
        self.reason: str | None = None if self.allowed else "switched off"
        self._module: pl.LightningModule | None = None  # the module while its fit runs the manual step
        self._own_step: Any = None

    @property
    def active(self) -> bool:
        return self._module is not None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # nothing to do after this hook: out of the Trainer's list, so that the per-step hooks skip it (a new list,
        # so that the loop now calling on_fit_start, which iterates over the old one, is undisturbed)
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self]
        if not self.allowed:
            return
        self.reason = automatic_reason(trainer, pl_module)
        if self.resumed_manual and self.reason is not None:
            raise UserError(f"the step checkpoint was written by a fit in manual optimisation (cl/fast_step.py), but "
                            f"this fit must stay automatic ({self.reason}): resume with the settings it was written "
                            "with")
        if self.reason is not None:
            return
        self._module = pl_module
        self._own_step = pl_module.__dict__.get("training_step")  # an instance-level step (rare) is kept
        inner = pl_module.training_step
        # the lightning optimizer: its step runs the precision plugin and counts the loop's optimizer steps
        optimizer = trainer.strategy._lightning_optimizers[0]
        epoch_loop, schedulers = trainer.fit_loop.epoch_loop, trainer.lr_scheduler_configs
        backward, step = _direct_backward_and_step(trainer, pl_module, optimizer) or (
            pl_module.manual_backward, optimizer.step)

        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            loss = out["loss"] if isinstance(out, dict) else out
            # automatic optimisation's order: forward, zero_grad, backward, step; a None step still zeroes the
            # gradients and steps (with no gradients nothing moves, but the step counts, as in Lightning)
            optimizer.zero_grad()
            if isinstance(loss, Tensor):
                backward(loss)
            step()
            # Lightning steps epoch-interval schedulers right after the last batch's step, before its
            # on_train_batch_end hooks (TrainingEpochLoop.advance); in manual optimisation it does not step them
            if schedulers and epoch_loop._num_ready_batches_reached():
                for config in schedulers:
                    if (trainer.current_epoch + 1) % config.frequency == 0:
                        pl_module.lr_scheduler_step(config.scheduler, None)
            return out

        pl_module.automatic_optimization = False
        pl_module.training_step = training_step

    def restore(self) -> None:
        module, self._module = self._module, None
        if module is None:
            return
        if self._own_step is not None:
            module.training_step = self._own_step
        else:
            del module.training_step
        module.automatic_optimization = True
