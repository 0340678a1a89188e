"""The experience loop. Every rank runs all of it; collectives inside CL steps meet their peers.

Per experience: start hook, one ``Trainer.fit`` per training phase, end hook, evaluation on every seen test
experience (and unseen ones with ``run.eval_unseen``), a checkpoint at the boundary. See :class:`Runner.run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks.progress import ProgressBar
from torch import nn

from cl import checkpointing, distributed, provenance
from cl.callbacks import CALLBACKS, CLCallback, MetricsCallback
from cl.config import section
from cl.data.loaders import ExperienceDataModule, make_loader
from cl.errors import ConfigError, UserError
from cl.evaluation import evaluate
from cl.fast_step import ManualStep, NullProfiler
from cl.loggers import RunLogger, build_loggers
from cl.progress import progress_bar
from cl.registry import SCENARIOS, STRATEGIES
from cl.strategy import CLStrategy, Phase
from cl.utils import atomic_torch_save, atomic_write_json, atomic_write_text, seed_everything, tensor_hash
from scenarios.base import Experience, ExperienceData, Scenario

CKPT_FORMAT = 1


@dataclass
class RunContext:
    """What hooks get besides the experience: config, scenario, ranks, device, run directory, helpers."""

    cfg: DictConfig
    scenario: Scenario
    dist: distributed.Dist
    device: torch.device
    run_dir: Path
    model: CLStrategy
    loggers: list[RunLogger] = field(default_factory=list)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    exp_index: int = 0
    global_step: int = 0  # optimizer steps over the whole run (every experience and phase); restored on resume
    initial_eval: bool = False

    def loader(self, data: ExperienceData, *, train: bool, batch_size: int | None = None, shuffle: bool | None = None,
               tag: str = "") -> torch.utils.data.DataLoader:
        """Raw batches of ``data`` for this rank (apply ``model.train_transform``/``eval_transform`` yourself)."""
        bs = batch_size or (self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size)
        return make_loader(data, bs, train=train, rank=self.dist.rank, world=self.dist.world_size,
                           seed=self.seed_for(tag), shuffle=shuffle, num_workers=self.cfg.data.num_workers,
                           drop_last=drop_last(self.cfg, type(self.model)) if train else None)

    def seed_for(self, tag: str) -> int:
        """A seed that is the same on every rank for (run seed, experience, tag)."""
        digest = hashlib.sha256(f"{self.cfg.seed}/{self.exp_index}/{tag}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def generator(self, tag: str, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed_for(tag))

    def record(self, key: str, value: Any) -> None:
        """Keep a per-experience value (plain Python) in ``metrics.json`` under ``experiences[i].extra``."""
        self.records.setdefault(self.exp_index, {})[key] = value

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log on rank 0 at ``step`` (default: the run's global step now), with the experience index."""
        if not self.dist.is_main:
            return
        for lg in self.loggers:
            lg.experience = self.exp_index
            lg.log_at(metrics, self.global_step if step is None else step)
            lg.save()


@dataclass
class Results:
    """What a run returns: the summary, the accuracy matrix and the run directory."""

    metrics: dict[str, Any]
    run_dir: Path

    @property
    def accuracy_matrix(self) -> list[list[float | None]]:
        return self.metrics["accuracy_matrix"]

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    # Tables and plots (pandas, matplotlib) live in cl.results / cl.plots; these delegate to them.
    def tables(self) -> Any:
        """This run as a :class:`cl.results.RunResults` (DataFrames: summary, matrix, experiences, passes)."""
        from cl.results import from_metrics

        return from_metrics(self.metrics, self.run_dir)

    def to_frame(self) -> Any:
        """The summary row (last/avg/avg-inc accuracy, forgetting, time, FLOPs, parameters added) as a DataFrame."""
        return self.tables().summary()

    def matrix_frame(self) -> Any:
        """The accuracy matrix as a DataFrame (rows: after training exp i; columns: evaluated on exp j)."""
        return self.tables().matrix()

    def experiences_frame(self) -> Any:
        """Per-experience details (time, memory, per-pass seen accuracy, ``ctx.record`` values) as a DataFrame."""
        return self.tables().experiences()

    def plot_matrix(self, path: str | os.PathLike | None = None, **kw: Any) -> Any:
        """Heatmap of the accuracy matrix (a matplotlib Figure; saved as PNG with ``path``)."""
        return self.tables().plot_matrix(path, **kw)


def build_scenario(cfg: DictConfig) -> Scenario:
    return SCENARIOS.get(cfg.scenario.name)().build(section(cfg, "scenario"), section(cfg, "data"))


def build_strategy(cfg: DictConfig, scenario: Scenario) -> CLStrategy:
    from cl.backbones import build_backbone

    cls = STRATEGIES.get(cfg.strategy.name)
    backbone = build_backbone(section(cfg, "backbone"), (scenario.channels, scenario.image_size, scenario.image_size))
    model = cls(section(cfg, "strategy"), backbone, scenario.n_classes)
    if cfg.fpf.enabled and cls.fpf_refusal:
        raise ConfigError(f"fpf.enabled=true does not apply to strategy '{cfg.strategy.name}': {cls.fpf_refusal}")
    convention = input_convention(cfg, cls)
    check_pretrained_convention(cfg, backbone, convention, scenario)
    train_tf, eval_tf = scenario.transforms(convention)
    model.train_transform, model.eval_transform = train_tf, eval_tf
    return model


def input_convention(cfg: DictConfig, cls: type[CLStrategy]) -> str:
    """``strategy.input_convention`` when set, else the strategy's paper convention."""
    return cfg.strategy.get("input_convention") or cls.input_convention


def drop_last(cfg: DictConfig, cls: type[CLStrategy]) -> bool:
    """``data.drop_last`` when set, else what the strategy's official loader does."""
    value = cfg.data.get("drop_last")
    return cls.drop_last if value is None else bool(value)


#: the (mean, std) each convention feeds, when it does not depend on the scenario
_CONVENTION_STATS = {"unit": (0.0, 1.0), "pm1": (0.5, 0.5)}


def check_pretrained_convention(cfg: DictConfig, backbone: nn.Module, convention: str, scenario: Scenario) -> None:
    """Warn when pretrained timm weights expect other inputs than the convention feeds (LAE's and SEMA's raw
    [0, 1] inputs on an ImageNet-normalised checkpoint, say): a silent change of every number."""
    pcfg = getattr(backbone, "pretrained_cfg", None)
    if not cfg.backbone.get("pretrained") or not isinstance(pcfg, dict) or "mean" not in pcfg:
        return
    want_mean, want_std = tuple(pcfg["mean"]), tuple(pcfg["std"])
    mean, std = _CONVENTION_STATS.get(convention, (None, None))
    fed_mean = (mean,) * len(want_mean) if mean is not None else tuple(scenario.mean)
    fed_std = (std,) * len(want_std) if std is not None else tuple(scenario.std)
    if len(fed_mean) != len(want_mean) or any(abs(a - b) > 0.01 for a, b in zip(fed_mean + fed_std,
                                                                                   want_mean + want_std)):
        warnings.warn(f"backbone '{cfg.backbone.get('model', cfg.backbone.name)}' was pre-trained on inputs with "
                      f"mean {want_mean} / std {want_std}, but strategy.input_convention={convention} feeds mean "
                      f"{fed_mean} / std {fed_std}. That is the paper's choice for this strategy if it is the default; "
                      "set strategy.input_convention to change it", UserWarning, stacklevel=2)


def run_dir_for(cfg: DictConfig) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    parts = [cfg.run.root, _path_part(cfg.scenario.name), _path_part(cfg.strategy.name)]
    return Path(*parts, *([cfg.run.name] if cfg.run.name else []), f"seed{cfg.seed}")


def _path_part(name: str) -> str:
    """A registered name as is; an import path (``mylab.methods:MyStrategy``) without the colon Windows refuses."""
    return str(name).replace(":", ".")


def quiet_lightning() -> None:
    """Lightning prints device and tip banners at every Trainer; one run makes many Trainers."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "pytorch_lightning.accelerators.cuda", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Runner:
    """Runs one config. ``argv`` is the command line that re-launches this run (needed to spawn DDP ranks)."""

    def __init__(self, cfg: DictConfig, argv: list[str] | None = None, loggers: list[Any] | None = None,
                 callbacks: list[Any] | None = None) -> None:
        self.cfg = cfg
        self.argv = argv
        self._extra_loggers = list(loggers or [])
        self._extra_callbacks = list(callbacks or [])
        self._callbacks: list[Any] | None = None
        self._run_loggers: list[RunLogger] = []

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> Results:
        quiet_lightning()
        dist = distributed.setup(self.cfg.trainer, self.argv)
        ok = stopped = False
        handlers = checkpointing.install_signal_handlers() if self.cfg.run.checkpoint else {}
        try:
            results = self._run(dist)
            ok = True
            return results
        except checkpointing.Preempted:
            stopped = True  # every rank stops at the same step: wait for the spawned ranks, do not kill them
            raise
        finally:
            checkpointing.restore_signal_handlers(handlers)
            for lg in self._run_loggers:  # once per run, not at the end of every phase's Trainer
                lg.finish("success" if ok else "failed")
            code = distributed.finish(dist, ok or stopped)
            if ok and code:
                raise UserError(f"a DDP rank exited with code {code}; see its output above")

    def _run(self, dist: distributed.Dist) -> Results:
        cfg = self.cfg
        seed_everything(cfg.seed)
        scenario = build_scenario(cfg)
        self._check_same_stream(scenario, dist)
        run_dir = run_dir_for(cfg)
        start = self._prepare_run_dir(run_dir, dist)
        model = build_strategy(cfg, scenario)
        callbacks: list[CLCallback] = [cb() for cb in CALLBACKS if cb.enabled(cfg)]
        callbacks += [cb for cb in self._user_callbacks() if isinstance(cb, CLCallback)]
        self._run_loggers = self._loggers(run_dir, dist)
        ctx = RunContext(cfg, scenario, dist, dist.device, run_dir, model, loggers=self._run_loggers)
        step_state: checkpointing.StepState | None = None
        if dist.active:
            checkpointing.setup_stop_vote()  # collective: every rank, once, before the first fit
        if start is not None:
            folder = start
            start = self._restore(folder, model, callbacks, ctx)
            step_state = checkpointing.find_step_checkpoint(folder, start, scenario.fingerprint())
            if step_state is not None and dist.is_main:
                print(f"cl: continuing inside {step_state.where()} (step checkpoint)", file=sys.stderr)
        else:
            start = 0
            if dist.is_main:
                atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        hosts = dist.all_gather_object(provenance.hostname())
        if dist.is_main:  # rewritten on resume: hosts and world size may have changed
            atomic_write_json(run_dir / "provenance.json",
                              provenance.collect(cfg, scenario, hosts, dist.world_size, self.argv))
        for lg in ctx.loggers:
            lg.log_run_hyperparams(cfg)
        for cb in callbacks:
            cb.on_run_start(ctx)
        if cfg.run.eval_unseen and start == 0:
            ctx.initial_eval = True
            self._evaluate(model, scenario.experiences, scenario.experiences[0], callbacks, ctx)
            ctx.initial_eval = False

        for exp in scenario.experiences[start:]:
            ctx.exp_index = exp.index
            seed_everything(cfg.seed + 1000 * exp.index)  # each experience is reproducible on its own (resume)
            for cb in callbacks:
                cb.on_experience_start(exp, ctx)
            model.on_experience_start(exp, ctx)
            resume = step_state if step_state is not None and step_state.exp_index == exp.index else None
            step_state = None
            for k, phase in enumerate(model.phases(exp, ctx)):
                if resume is not None and k < resume.phase:
                    # phases before the interrupted one: skipped when the code between phases() yields does not
                    # read what they trained, else re-run (deterministically, without writing step checkpoints)
                    if not type(model).phases_replayable:
                        self._fit(model, exp, phase, k, callbacks, ctx, write_steps=False)
                    continue
                if resume is not None and k == resume.phase:
                    self._fit(model, exp, phase, k, callbacks, ctx, resume=resume)
                    resume = None
                    continue
                self._fit(model, exp, phase, k, callbacks, ctx)
            if resume is not None:
                raise UserError(f"step checkpoint '{resume.path}' is inside phase {resume.phase} "
                                f"({resume.data['phase_name']}), but experience {exp.index} has fewer phases now")
            model.on_experience_end(exp, ctx)
            for cb in callbacks:
                cb.on_experience_end(exp, ctx)
            seen = scenario.experiences if cfg.run.eval_unseen else scenario.experiences[: exp.index + 1]
            self._evaluate(model, seen, exp, callbacks, ctx)
            self._checkpoint(model, callbacks, ctx, exp.index)
            if cfg.run.checkpoint and exp.index + 1 < len(scenario):
                # a signal that came outside training (evaluation, post-hoc steps) stops here, on every rank
                signum = next((s for s in dist.all_gather_object(checkpointing.stop_requested()) if s), None)
                if signum:
                    raise checkpointing.Preempted(signum, f"after experience {exp.index} (experience checkpoint)")

        for cb in callbacks:
            cb.on_run_end(ctx)
        self._write_state_hashes(model, ctx)
        metrics_cb = next(cb for cb in callbacks if isinstance(cb, MetricsCallback))
        results = Results(metrics_cb.results(ctx), run_dir)
        self._checkpoint(model, callbacks, ctx, len(scenario) - 1, finished=True)
        self.model, self.scenario, self.ctx = model, scenario, ctx
        return results

    # ------------------------------------------------------------------------------------------------ pieces
    def _fit(self, model: CLStrategy, exp: Experience, phase: Phase, k: int, callbacks: list[CLCallback],
             ctx: RunContext, resume: checkpointing.StepState | None = None, write_steps: bool = True) -> None:
        cfg = self.cfg
        model.phase = phase
        epochs = phase.epochs or model.cfg.epochs or cfg.trainer.max_epochs
        data = phase.data if phase.data is not None else exp.train
        # the shuffle seed depends on (run seed, experience, phase) only and the sampler's permutation on it and the
        # epoch, so a step checkpoint's position (epoch, batch) names the same batches in a resumed run
        dm = ExperienceDataModule(data, phase.batch_size or cfg.data.batch_size, ctx.dist.rank, ctx.dist.world_size,
                                  seed=ctx.seed_for(f"fit{k}/{phase.name}"), num_workers=cfg.data.num_workers,
                                  drop_last=drop_last(cfg, type(model)))
        if resume is not None:
            self._restore_step(resume, model, phase, callbacks, ctx)
        step_cb = None
        if cfg.run.checkpoint or resume is not None:
            step_cb = checkpointing.StepCheckpoint(ctx, k, phase.name, cfg.run.checkpoint_every_n_steps,
                                                   ctx.global_step, callbacks, resume=resume,
                                                   write=write_steps and bool(cfg.run.checkpoint))
        pl_callbacks = [c for cb in callbacks for c in cb.trainer_callbacks(ctx)]
        pl_callbacks += [cb for cb in self._user_callbacks() if isinstance(cb, pl.Callback)]
        if cfg.trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in pl_callbacks):
            n, name = len(ctx.scenario), phase.name
            pl_callbacks.append(progress_bar(lambda: f"experience {exp.index + 1}/{n} · phase {name}"))
        for lg in ctx.loggers:
            lg.offset, lg.experience = ctx.global_step, exp.index
        if step_cb is not None:
            # attached now when it has per-step work (periodic checkpoints, the DDP stop vote, a resume); else the
            # signal handler attaches it, and an uninterrupted single-process run pays nothing per step
            needed = (cfg.run.checkpoint_every_n_steps is not None and step_cb.write) or resume is not None \
                or (ctx.dist.world_size > 1 and bool(cfg.run.checkpoint))
            checkpointing.attach(pl_callbacks, step_cb, needed)
        manual = ManualStep(allowed=bool(cfg.run.fast_step),
                            resumed_manual=None if resume is None else resume.manual_optimization)
        pl_callbacks.append(manual)
        trainer = make_trainer(cfg, epochs, pl_callbacks, ctx.loggers, ctx.run_dir)
        checkpointing.activate(trainer, step_cb)
        try:
            trainer.fit(model, datamodule=dm)
        finally:
            checkpointing.activate(None, None)
            steps = trainer.global_step  # counted by the manual or the automatic loop: read before the restore
            manual.restore()
        # the next phase's rows continue after this one's (and after anything logged at a later step)
        ctx.global_step = max([ctx.global_step + steps] + [lg.last_step + 1 for lg in ctx.loggers])

    def _evaluate(self, model: CLStrategy, exps: list[Experience], exp: Experience, callbacks: list[CLCallback],
                  ctx: RunContext) -> None:
        show = self.cfg.trainer.enable_progress_bar and ctx.dist.is_main and len(exps) > 1
        with _eval_progress(show, f"evaluating after experience {exp.index + 1}/{len(ctx.scenario)}",
                            len(exps)) as step:
            results = evaluate(model, exps, ctx.dist, ctx.device, self.cfg.data.eval_batch_size,
                               num_workers=self.cfg.data.num_workers, on_experience=step)
        for cb in callbacks:
            cb.on_evaluated(exp, results, ctx)

    def _user_callbacks(self) -> list[Any]:
        """The ``callbacks`` config items, instantiated once per run (a Lightning callback keeps its state across
        the run's Trainers, as it would across epochs of one fit)."""
        if self._callbacks is None:
            from cl.config import callback_spec

            specs = map(callback_spec, self.cfg.get("callbacks", []))
            for cb in self._extra_callbacks:
                if not isinstance(cb, (pl.Callback, CLCallback)):
                    raise UserError(f"train(callbacks=...): {cb!r} is neither a pytorch_lightning.Callback nor a "
                                    "cl CLCallback")
            self._callbacks = [cls(**kwargs) for cls, kwargs in specs] + self._extra_callbacks
        return self._callbacks

    def _loggers(self, run_dir: Path, dist: distributed.Dist) -> list[RunLogger]:
        """``trainer.logger``'s loggers and those passed to :func:`train`, on rank 0 only, each seen through the
        whole run (:class:`cl.loggers.RunLogger`)."""
        if not dist.is_main:
            return []
        return ([RunLogger(lg, owned=True) for lg in build_loggers(self.cfg, run_dir)]
                + [RunLogger(lg) for lg in self._extra_loggers])

    def _check_same_stream(self, scenario: Scenario, dist: distributed.Dist) -> None:
        prints = dist.all_gather_object(scenario.fingerprint())
        if len(set(prints)) > 1:
            raise UserError(f"DDP ranks built different streams (fingerprints {prints}); check that every rank "
                            "reads the same data.root and config")

    def _prepare_run_dir(self, run_dir: Path, dist: distributed.Dist) -> Path | None:
        """Decide on rank 0 whether to start, resume or refuse; every rank gets the same answer."""
        decision: tuple[str, str] = ("start", "")
        if dist.is_main:
            decision = self._decide(run_dir)
        decision = dist.broadcast_object(decision)
        kind, arg = decision
        if kind == "error":
            raise UserError(arg)
        if kind == "done":
            raise RunAlreadyFinished(run_dir)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        return Path(arg) if kind == "resume" else None

    def _decide(self, run_dir: Path) -> tuple[str, str]:
        cfg = self.cfg
        metrics = run_dir / "metrics.json"
        last = run_dir / "checkpoints" / "last.ckpt"
        finished = False
        if metrics.is_file():
            try:
                finished = bool(json.loads(metrics.read_text()).get("finished"))
            except (json.JSONDecodeError, OSError):
                finished = False
        if cfg.run.overwrite:
            return ("start", "")
        if finished:
            if cfg.resume == "auto":
                return ("done", "")
            return ("error", f"run directory '{run_dir}' holds a finished run; use another seed or run.name, "
                             "or run.overwrite=true to replace it")
        has_ckpt = (last.is_file() or any(last.parent.glob("exp*.ckpt"))
                    or (last.parent / checkpointing.STEP_FILE).is_file())
        if cfg.resume == "auto" and has_ckpt:
            return ("resume", str(last.parent))
        if has_ckpt or metrics.is_file():
            return ("error", f"run directory '{run_dir}' holds an unfinished run; resume=auto continues it, "
                             "run.overwrite=true starts over")
        return ("start", "")

    def _write_state_hashes(self, model: CLStrategy, ctx: RunContext) -> None:
        """Every rank hashes its CL state; rank 0 writes all of them (identical hashes = no divergence)."""
        hashes = ctx.dist.all_gather_object(tensor_hash(model.cl_state_tensors()))
        if ctx.dist.is_main:
            atomic_write_text(ctx.run_dir / "state_hashes.json", json.dumps({"ranks": hashes}, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint(self, model: CLStrategy, callbacks: list[CLCallback], ctx: RunContext, exp_index: int,
                    finished: bool = False) -> None:
        if not self.cfg.run.checkpoint or not ctx.dist.is_main:
            return
        state = {
            "format": CKPT_FORMAT,
            "exp_index": exp_index,
            "finished": finished,
            "strategy": self.cfg.strategy.name,
            "fingerprint": ctx.scenario.fingerprint(),
            "structure": model.cl_structure(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": model.extra_state(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in callbacks},
            "records": {int(k): v for k, v in ctx.records.items()},
            "global_step": ctx.global_step,
        }
        folder = ctx.run_dir / "checkpoints"
        atomic_torch_save(state, folder / f"exp{exp_index}.ckpt")
        atomic_torch_save(state, folder / "last.ckpt")
        (folder / checkpointing.STEP_FILE).unlink(missing_ok=True)  # inside a finished experience: stale now

    def _restore_step(self, step: checkpointing.StepState, model: CLStrategy, phase: Phase,
                      callbacks: list[CLCallback], ctx: RunContext) -> None:
        """Put the model, callbacks, records and run step back as they were at the step checkpoint (the optimizer,
        schedulers, loop position and RNG states follow inside the fit, :class:`cl.checkpointing.StepCheckpoint`)."""
        d = step.data
        if d["phase_name"] != phase.name or model.cl_structure() != d["structure"]:
            raise UserError(f"step checkpoint '{step.path}' ({step.where()}) does not match the resumed run: phase "
                            f"'{phase.name}', structure {model.cl_structure()} vs {d['structure']}; was the config "
                            "changed? Delete the file to resume from the experience boundary")
        # no regrow: replaying on_experience_start and phases() rebuilt the same structure, with its requires_grad
        model.load_state_dict(d["state_dict"], strict=True)
        model.load_extra_state(d["extra"])
        for cb in callbacks:
            if type(cb).__name__ in d["callbacks"]:
                cb.load_state_dict(d["callbacks"][type(cb).__name__])
        ctx.records.update({int(k): v for k, v in d["records"].items()})
        ctx.global_step = int(d["phase_start_step"])

    def _restore(self, folder: Path, model: CLStrategy, callbacks: list[CLCallback], ctx: RunContext) -> int:
        """Restore the newest readable checkpoint: ``last.ckpt``, else ``exp<k>.ckpt`` from the highest k down.

        A truncated or corrupt file is reported by name and skipped; atomic writes make this rare (a crash while
        writing leaves the previous file in place), but a disk can still fail.
        """
        candidates = [folder / "last.ckpt"] + sorted(folder.glob("exp*.ckpt"), reverse=True,
                                                     key=lambda p: int(p.stem[3:]) if p.stem[3:].isdigit() else -1)
        if not any(p.is_file() for p in candidates) and (folder / checkpointing.STEP_FILE).is_file():
            return 0  # stopped inside the first experience: only the step checkpoint exists
        errors = []
        for path in candidates:
            if not path.is_file():
                continue
            try:
                state = load_checkpoint(path)
            except UserError as err:
                errors.append(str(err))
                if ctx.dist.is_main:
                    print(f"cl: warning: {err}; trying an older checkpoint", file=sys.stderr)
                continue
            if state["fingerprint"] != ctx.scenario.fingerprint():
                raise UserError(f"checkpoint '{path}' was made on a different stream (class order or samples differ)")
            restore_model(model, state)
            for cb in callbacks:
                if type(cb).__name__ in state["callbacks"]:
                    cb.load_state_dict(state["callbacks"][type(cb).__name__])
            ctx.records.update({int(k): v for k, v in state.get("records", {}).items()})
            ctx.global_step = int(state.get("global_step", 0))
            return int(state["exp_index"]) + 1
        raise UserError(f"no readable checkpoint in '{folder}': {'; '.join(errors) or 'none found'}")


@contextmanager
def _eval_progress(show: bool, label: str, total: int) -> Iterator[Callable[[], None] | None]:
    """A transient bar over the experiences being evaluated (long streams take a while); nothing when hidden."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


class RunAlreadyFinished(Exception):
    """``resume=auto`` found a finished run: nothing is redone."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"run in '{run_dir}' is already finished; nothing to do")
        self.run_dir = run_dir


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a run checkpoint with ``weights_only=True``; a truncated or foreign file is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"checkpoint '{path}' is unreadable or truncated ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise UserError(f"checkpoint '{path}' is not a cl run checkpoint (format {CKPT_FORMAT})")
    return state


def restore_model(model: CLStrategy, state: dict[str, Any]) -> None:
    """Regrow the architecture recorded in the checkpoint, then load weights and extra state."""
    model.regrow(state["structure"])
    model.load_state_dict(state["state_dict"], strict=True)
    model.load_extra_state(state["extra"])


def make_trainer(cfg: DictConfig, epochs: int, callbacks: list[pl.Callback], loggers: list[Any],
                 run_dir: Path) -> pl.Trainer:
    """A lean Trainer for one training phase: no validation, no Lightning checkpointing, no model summary; other
    ``pytorch_lightning.Trainer`` arguments the config sets (``trainer.accumulate_grad_batches``) are passed on."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from cl.config import trainer_extra_args

    t = cfg.trainer
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_epochs=epochs, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, gradient_clip_val=t.gradient_clip_val,
        sync_batchnorm=t.sync_batchnorm, log_every_n_steps=t.log_every_n_steps, logger=loggers or False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=callbacks, default_root_dir=str(run_dir),
    )
    if t.limit_train_batches is not None:
        lim = t.limit_train_batches
        kwargs["limit_train_batches"] = int(lim) if float(lim).is_integer() and lim > 1 else float(lim)
    if "SLURM_JOB_ID" in os.environ and "plugins" not in t:
        # one requeue mechanism: submitit's handler (cl slurm, cl/cluster.py) checkpoints at experience boundaries
        # and requeues; Lightning's own SLURM auto-requeue would also catch the signal and write an hpc_ckpt that a
        # later fit restores from, out of step with the experience loop
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    extra = trainer_extra_args(t)
    kwargs.update(extra)
    kwargs.setdefault("profiler", NullProfiler())
    try:
        return pl.Trainer(**kwargs)
    except (TypeError, ValueError, MisconfigurationException) as err:
        if not extra:
            raise
        given = ", ".join(f"trainer.{k}={v}" for k, v in extra.items())
        raise ConfigError(f"pytorch_lightning.Trainer refused {given}: {str(err).strip().splitlines()[0]}") from None


def train(cfg: DictConfig, argv: list[str] | None = None, loggers: list[Any] | None = None,
          callbacks: list[Any] | None = None) -> Results:
    """Run a config in this process (the notebook entry point; ``cl train`` calls this too).

    Args:
        cfg: from :func:`cl.config.build_config`.
        argv: the command line that re-launches this run (multi-process DDP needs it).
        loggers: ``pytorch_lightning`` logger objects, added to those ``trainer.logger`` names (rank 0 only).
        callbacks: ``pytorch_lightning.Callback`` objects (added to every Trainer) and
            :class:`cl.callbacks.CLCallback` objects (the experience-loop hooks), added to the config's ``callbacks``.
    """
    return Runner(cfg, argv, loggers=loggers, callbacks=callbacks).run()

