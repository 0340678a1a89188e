"""Step checkpoints: resume inside an experience, at the batch after the last one trained.

The experience checkpoints (``exp<i>.ckpt``, ``last.ckpt``, :mod:`cl.runner`) hold what an experience boundary
needs. At paper scale one experience is hours, so a pre-empted job must not redo it: every
``run.checkpoint_every_n_steps`` optimizer steps, and at the batch boundary after SIGUSR1 or SIGTERM (Slurm's
pre-emption signal), rank 0 writes ``checkpoints/step.ckpt`` (atomically, replacing the previous one; only tensors
and plain values, so it loads with ``torch.load(weights_only=True)``). It holds the strategy's weights,
``cl_structure``/``extra_state``, the experience-loop callbacks' state and records, the optimizer and LR-scheduler
state dicts, the loop position (experience, phase, epoch, batch, global step), every RNG state (torch CPU and CUDA,
NumPy, Python) and the sampler position.

How the fit continues. Lightning 2.6 resumes mid-epoch from ``trainer.fit(ckpt_path=...)``: it restores the fit
loop's progress counters (epoch, batch index, optimizer steps, scheduler steps, the "saved at train batch end"
restart stage) and the state of a *stateful* data loader (one with ``state_dict``/``load_state_dict``, loaded right
before the loader's first ``iter``), but a plain sampler starts its epoch again and, before that, iterates the
epoch-0 permutation (``set_epoch`` comes after the first ``iter`` of a fit). Its checkpoint file is pickled, written
non-atomically by its own CheckpointIO, knows nothing of ``cl_structure``, and its SLURM/SIGTERM handling is
disabled here. So we keep our file and use only the two pieces of its machinery that are sound: the fit loop's
``state_dict``/``load_state_dict`` (plain counters, taken at ``on_train_batch_end`` exactly as its own
``ModelCheckpoint(every_n_train_steps)`` takes them, so its restart logic applies unchanged) and the stateful-loader
protocol: the training loader (:class:`cl.data.loaders.TrainLoader`, or ``TensorBatches`` for tensor sources) takes
``{"epoch", "start"}``, and its sampler's permutation is a function of (seed, experience, phase, epoch) only, so the
resumed epoch draws the same order and skips the first ``start`` batches without loading them. RNG states are put
back when the resumed fit starts training (``on_train_start``: Lightning does not call ``on_train_epoch_start`` for
an epoch restarted in its middle), after the loader's iterator (which draws a base seed) exists and before the first
batch is augmented.

Signals. The handler only sets a flag (nothing else is safe in a signal handler). With one process and no
periodic checkpoint the callback is not even attached to the Trainer: the handler appends it to the running
Trainer's callbacks, so an uninterrupted run pays nothing per step. Under DDP the ranks must stop at the same step:
each batch end starts an asynchronous all-reduce (a separate gloo group, CPU tensor: no GPU sync) of the local flag
and waits for the previous batch's one, which has long completed; every rank thus sees the same sum at the same
step, one step after the signal. A signal that arrives outside training (evaluation, post-hoc steps) is served at
the next experience boundary. Handlers are installed only where nothing else handles the signal (under submitit,
SIGTERM stays bypassed and USR2 stays with its requeue handler, which resumes from the newest step checkpoint).
"""

from __future__ import annotations

import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as tdist

from cl.errors import Preempted, UserError
from cl.utils import atomic_torch_save

if TYPE_CHECKING:
    from cl.runner import RunContext

STEP_FORMAT = 1
STEP_FILE = "step.ckpt"
#: the signals that ask for a checkpoint and a clean exit (Slurm sends SIGTERM on pre-emption / scancel)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
__all__ = ["Preempted", "StepCheckpoint", "StepState", "find_step_checkpoint", "load_step_checkpoint"]


# ---------------------------------------------------------------------------------------------------- signals
class _Request:
    """The one piece of state a signal handler touches (plus attaching the lazy callback)."""

    signum: int | None = None
    trainer: pl.Trainer | None = None
    callback: StepCheckpoint | None = None


_REQUEST = _Request()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _REQUEST.signum is None:
        _REQUEST.signum = signum
        # os.write, not print: a handler that interrupts a print to stderr would re-enter its buffer and raise
        os.write(2, f"cl: {signal.Signals(signum).name} received: checkpoint at the next batch boundary, then "
                    "exit\n".encode())
    trainer, cb = _REQUEST.trainer, _REQUEST.callback
    if trainer is not None and cb is not None and cb not in trainer.callbacks:
        cb.arm(trainer)  # a list append: Lightning reads trainer.callbacks afresh at every hook
        trainer.callbacks.append(cb)


def install_signal_handlers() -> dict[int, Any]:
    """Route SIGUSR1/SIGTERM to the stop flag where nothing else handles them; returns what to restore."""
    previous: dict[int, Any] = {}
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread (a notebook kernel thread): no handlers, periodic checkpoints still
            break
    _REQUEST.signum = None
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _REQUEST.signum, _REQUEST.trainer, _REQUEST.callback = None, None, None


def stop_requested() -> int | None:
    """The signal number asked for on this rank, or None."""
    return _REQUEST.signum


class _StopVote:
    """One collective decision per batch end, overlapped with the next step (see the module docstring)."""

    _group: Any = None

    def __init__(self) -> None:
        self.work: Any = None
        self.buf = torch.zeros(1, dtype=torch.int32)

    @classmethod
    def setup(cls) -> None:
        """Create the gloo group once per process (a collective: every rank calls it at the same point)."""
        if cls._group is None and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            cls._group = tdist.new_group(backend="gloo")

    def poll(self) -> bool:
        """True on every rank at the same batch end once any rank got a signal (one batch end later)."""
        decided = False
        if self.work is not None:
            self.work.wait()
            decided = bool(self.buf.item() > 0)
        self.buf = torch.tensor([int(_REQUEST.signum is not None)], dtype=torch.int32)
        self.work = tdist.all_reduce(self.buf, group=self._group, async_op=True)
        return decided

    def drain(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


def setup_stop_vote() -> None:
    """Create the stop vote's process group; every rank calls it at the same point, once per run, before any fit."""
    _StopVote.setup()


# ---------------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and plain values (``weights_only``-loadable)."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- the file
@dataclass
class StepState:
    """A loaded step checkpoint, with the position it records."""

    path: Path
    data: dict[str, Any]

    @property
    def exp_index(self) -> int:
        return int(self.data["exp_index"])

    @property
    def phase(self) -> int:
        return int(self.data["phase"])

    @property
    def manual_optimization(self) -> bool:
        """Whether the fit ran in manual optimisation (cl/fast_step.py); checkpoints from before it was recorded
        were written by automatic fits."""
        return bool(self.data.get("manual_optimization", False))

    def where(self) -> str:
        d = self.data
        return (f"experience {d['exp_index']}, phase {d['phase']} ({d['phase_name']}), epoch {d['epoch']}, "
                f"batch {d['batch']}")


def load_step_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"step checkpoint '{path}' is unreadable or truncated ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STEP_FORMAT or state.get("kind") != "step":
        raise UserError(f"'{path}' is not a cl step checkpoint (format {STEP_FORMAT})")
    return state


def find_step_checkpoint(folder: Path, next_exp: int, fingerprint: str) -> StepState | None:
    """The step checkpoint to continue from: one taken inside experience ``next_exp`` (the one after the newest
    experience checkpoint) on the same stream. An older one (its experience finished since) is ignored; an
    unreadable one is reported and ignored (the experience is then redone from its boundary)."""
    path = folder / STEP_FILE
    if not path.is_file():
        return None
    try:
        data = load_step_checkpoint(path)
    except UserError as err:
        print(f"cl: warning: {err}; resuming from the experience boundary", file=sys.stderr)
        return None
    if data["fingerprint"] != fingerprint:
        raise UserError(f"step checkpoint '{path}' was made on a different stream (class order or samples differ)")
    if int(data["exp_index"]) != next_exp:
        return None
    return StepState(path, data)


# ---------------------------------------------------------------------------------------------------- the callback
class StepCheckpoint(pl.Callback):
    """Writes step checkpoints during one phase's fit and, when given one, continues that fit from it.

    Args:
        ctx: the run context (model, ranks, run directory, callbacks' state via ``cl_callbacks``).
        phase: the phase index within the experience and its name.
        every_n: ``run.checkpoint_every_n_steps`` (None: only on a signal).
        phase_start_step: ``ctx.global_step`` before this fit (the run-wide step of the phase's step 0).
        cl_callbacks: the experience-loop callbacks, whose ``state_dict`` goes into the file.
        resume: the step checkpoint to continue from (this phase's), or None.
        write: False while re-running earlier phases of a strategy whose phases are not replayable.
    """

    def __init__(self, ctx: RunContext, phase: int, phase_name: str, every_n: int | None, phase_start_step: int,
                 cl_callbacks: list[Any], resume: StepState | None = None, write: bool = True) -> None:
        self.ctx, self.phase, self.phase_name = ctx, phase, phase_name
        self.every_n, self.phase_start_step, self.cl_callbacks = every_n, phase_start_step, cl_callbacks
        self.resume, self.write = resume, write
        self.vote = _StopVote() if ctx.dist.world_size > 1 else None
        self._last_step = 0
        self._pending = False  # a checkpoint that fell on the last batch of an epoch: taken at the next step

    def arm(self, trainer: pl.Trainer) -> None:
        """Attached mid-fit by the signal handler: count steps from now."""
        self._last_step = trainer.global_step

    # -------------------------------------------------------------------------------------------- continuing
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resume is None:
            return
        d = self.resume.data
        if len(d["optimizers"]) != len(trainer.optimizers) or len(d["schedulers"]) != len(trainer.lr_scheduler_configs):
            raise UserError(f"step checkpoint '{self.resume.path}' has {len(d['optimizers'])} optimizer(s) and "
                            f"{len(d['schedulers'])} scheduler(s); this phase configures {len(trainer.optimizers)} "
                            f"and {len(trainer.lr_scheduler_configs)}")
        for opt, state in zip(trainer.optimizers, d["optimizers"]):
            opt.load_state_dict(state)
        for cfg, state in zip(trainer.lr_scheduler_configs, d["schedulers"]):
            cfg.scheduler.load_state_dict(state)
        # Lightning's own mid-epoch restart: counters, and the loader state loaded before its first iter()
        trainer.fit_loop.load_state_dict(d["loop"])
        self._last_step = int(d["trainer_step"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the loader's iterator exists (it draws a base seed from the global RNG), before the first batch is
        # augmented; on_train_epoch_start is not called for an epoch restarted in its middle
        if self.resume is not None:
            set_rng_state(self.resume.data["rng"])
            self.resume = None

    # -------------------------------------------------------------------------------------------- writing
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.vote.poll() if self.vote is not None else _REQUEST.signum is not None
        stepped = trainer.global_step > self._last_step  # not inside a gradient accumulation
        if not stepped:
            return
        self._last_step = trainer.global_step
        run_step = self.phase_start_step + trainer.global_step
        due = self._pending or (self.every_n is not None and run_step % self.every_n == 0)
        if (due or stop) and (batch_idx + 1 >= trainer.num_training_batches
                              or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            # Lightning restarts a fit saved at an epoch's last batch as if the epoch's end (its hooks, the
            # epoch-interval scheduler step) had run too: not what happened. Take it one step later, in the next
            # epoch (a phase that ends first leaves it to the next phase, or to the experience boundary).
            self._pending = due
            return
        self._pending = False
        if (due or stop) and self.write:
            self.save(trainer, batch_idx)
        if stop:
            if self.vote is not None:
                self.vote.drain()
            self.ctx.dist.barrier()  # no rank exits (and no launcher kills rank 0) before the file is in place
            signum = _REQUEST.signum if _REQUEST.signum is not None else signal.SIGTERM
            raise Preempted(int(signum), f"at experience {self.ctx.exp_index}, phase {self.phase} "
                                         f"({self.phase_name}), epoch {trainer.current_epoch}, batch {batch_idx}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.vote is not None:
            self.vote.drain()

    def save(self, trainer: pl.Trainer, batch_idx: int) -> None:
        ctx = self.ctx
        if not ctx.dist.is_main:
            return
        model = ctx.model
        loop = trainer.fit_loop.state_dict()
        # the loader's position is the batch after this one: its own counter ran ahead (Lightning prefetches)
        loop.setdefault("state_dict", {})["combined_loader"] = [{"epoch": int(trainer.current_epoch),
                                                                 "start": int(batch_idx) + 1}]
        state = {
            "format": STEP_FORMAT,
            "kind": "step",
            "exp_index": ctx.exp_index,
            "phase": self.phase,
            "phase_name": self.phase_name,
            "epoch": int(trainer.current_epoch),
            "batch": int(batch_idx) + 1,  # batches of this epoch already trained
            "trainer_step": int(trainer.global_step),
            "manual_optimization": not model.automatic_optimization,
            "phase_start_step": int(self.phase_start_step),
            "global_step": int(self.phase_start_step + trainer.global_step),
            "strategy": ctx.cfg.strategy.name,
            "fingerprint": ctx.scenario.fingerprint(),
            "structure": model.cl_structure(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": model.extra_state(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.cl_callbacks},
            "records": {int(k): v for k, v in ctx.records.items()},
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "schedulers": [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs],
            "loop": loop,
            "rng": rng_state(),
        }
        atomic_torch_save(state, ctx.run_dir / "checkpoints" / STEP_FILE)  # replaces the previous one: newest only


def attach(trainer_callbacks: list[pl.Callback], cb: StepCheckpoint, always: bool) -> None:
    """Put ``cb`` in the Trainer's callbacks now (periodic checkpoints, DDP's vote, a resume), or leave it for the
    signal handler to attach (one process, signal only: no per-step cost)."""
    if always:
        trainer_callbacks.append(cb)


def activate(trainer: pl.Trainer | None, cb: StepCheckpoint | None) -> None:
    """Tell the signal handler which fit is running (None after it).

    Lightning 2.6 puts its own SIGTERM handler over ours during every fit: it raises ``SIGTERMException`` at the
    next batch without any checkpoint of ours (under submitit it turns the bypassed pre-emption SIGTERM into a
    failed job before the USR2 requeue), and under DDP it broadcasts from inside the handler, which can pair with
    the wrong collective. One mechanism: its registration is turned off for our fits (its auto-requeue already is,
    :func:`cl.runner.make_trainer`); what stays handled is what was installed before the fit.
    """
    _REQUEST.trainer, _REQUEST.callback = trainer, cb
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = lambda: None
    if trainer is not None and cb is not None and _REQUEST.signum is not None and cb not in trainer.callbacks:
        cb.arm(trainer)
        trainer.callbacks.append(cb)
