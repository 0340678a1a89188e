"""The manual-optimisation fast step (cl/fast_step.py): bit-identical to Lightning's automatic optimisation, the
epoch schedulers stepped as Lightning steps them, automatic wherever the fit needs it, resumed in the mode saved."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from cl import build_config
from cl.checkpointing import STEP_FILE, load_step_checkpoint
from cl.errors import UserError
from cl.fast_step import ManualStep, automatic_reason
from cl.runner import Runner
from cl.utils import tensor_hash
from conftest import TINY, cl_cli, read_metrics
from strategies.finetune import Finetune

BASE = [*TINY, "backbone=mlp", "backbone.hidden=32", "seed=5", "strategy.lr=0.1"]


class Decayed(Finetune):
    """Finetune with an epoch-interval StepLR at frequency 2, recording the learning rate each epoch starts with."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 2}}

    def on_train_epoch_start(self) -> None:
        self.__dict__.setdefault("lrs", []).append(self.optimizers().optimizer.param_groups[0]["lr"])


class DecayedModes(Decayed):
    """Decayed, appending each fit's mode ("manual"/"automatic") to modes<rank>.txt in the run directory."""

    def on_train_start(self) -> None:
        mode = "automatic" if self.automatic_optimization else "manual"
        with open(Path(self.trainer.default_root_dir) / f"modes{self.global_rank}.txt", "a") as f:
            f.write(mode + "\n")


class StepInterval(Finetune):
    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Decisions(pl.Callback):
    """What each fit ran as: ``automatic_optimization`` once the fit started."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.modes.append(pl_module.automatic_optimization)


def _run(run: Path, *extra: str, callbacks=()) -> tuple[Runner, dict]:
    runner = Runner(build_config(None, [*BASE, f"run.dir={run}", *extra]), callbacks=list(callbacks))
    res = runner.run()
    return runner, {"matrix": res.accuracy_matrix, "correct": res.metrics["correct"],
                    "weights": tensor_hash(runner.model.cl_state_tensors())}


@pytest.mark.parametrize("strategy", ["finetune", "test_fast_step:Decayed"])
def test_fast_step_is_bit_identical_to_automatic_optimisation(tmp_path, strategy, monkeypatch):
    """Three ways to one result: the direct step (one process, 32-bit), the manual step through Lightning's
    precision-plugin chain, and Lightning's automatic optimisation."""
    import cl.fast_step as fast_step

    direct = fast_step._direct_backward_and_step
    taken: list[bool] = []
    monkeypatch.setattr(fast_step, "_direct_backward_and_step",
                        lambda *a: taken.append(True) or direct(*a) if use_direct else None)
    got = {}
    for mode in ("direct", "manual", "automatic"):
        use_direct = mode == "direct"
        spy = Decisions()
        runner, got[mode] = _run(tmp_path / mode, f"strategy={strategy}", "trainer.max_epochs=4",
                                 f"run.fast_step={str(mode != 'automatic').lower()}", callbacks=[spy])
        assert spy.modes == [mode == "automatic"] * 2, "both experiences' fits ran in the chosen mode"
        model = runner.model
        assert model.automatic_optimization and "training_step" not in model.__dict__, "restored after each fit"
        if strategy != "finetune":
            # frequency 2: the rate halves after epochs 2 and 4 of each experience's fit (a new scheduler per fit)
            assert model.lrs == [0.1, 0.1, 0.05, 0.05] * 2
    assert taken == [True, True], "the direct step ran in the first run's two fits"
    assert got["direct"] == got["manual"] == got["automatic"]
    assert got["direct"]["matrix"][1][1] > 0.5, "it learned"


def test_direct_step_calls_the_hooks_that_are_overridden(tmp_path):
    """A callback on on_after_backward and on_before_optimizer_step sees every step, with gradients in place."""

    class GradSpy(pl.Callback):
        def __init__(self) -> None:
            self.after, self.before = [], []

        def on_after_backward(self, trainer, pl_module) -> None:
            self.after.append(all(p.grad is not None for p in pl_module.trainable_parameters()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.before.append(trainer.global_step)

    spy = GradSpy()
    runner = Runner(build_config(None, [*BASE, f"run.dir={tmp_path}", "scenario.n_experiences=2"]), callbacks=[spy])
    runner.run()
    n = runner.ctx.global_step
    assert len(spy.after) == n and all(spy.after)
    assert spy.before[:3] == [0, 1, 2], "before the step is counted, as in Lightning"


@pytest.mark.parametrize("extra, reason", [
    (["strategy=lae"], "LAE overrides optimizer_step"),
    (["strategy=l2p"], "L2P overrides configure_gradient_clipping"),
    (["trainer.gradient_clip_val=1.0"], "gradient_clip_val"),
    (["trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
])
def test_fits_that_need_the_automatic_loop_keep_it(extra, reason):
    from cl.registry import STRATEGIES
    from cl.runner import build_scenario, build_strategy

    name = next((e.split("=")[1] for e in extra if e.startswith("strategy=")), "finetune")
    base = BASE if name == "finetune" or ":" in name else [*TINY, *STRATEGIES.get(name).contract_overrides]
    cfg = build_config(None, [*base, *extra, "run.dir=/nonexistent"])
    model = build_strategy(cfg, build_scenario(cfg))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # one optimizer, as every strategy here
    t = cfg.trainer
    trainer = SimpleNamespace(gradient_clip_val=t.gradient_clip_val, optimizers=[opt], callbacks=[],
                              accumulate_grad_batches=t.get("accumulate_grad_batches", 1), lr_scheduler_configs=[])
    assert reason in (automatic_reason(trainer, model) or "")


def test_other_reasons_and_a_plain_fit_qualifies():
    backbone = torch.nn.Linear(3, 4)
    backbone.num_features = 4
    model = Finetune(Finetune.Config(), backbone, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def trainer(**kw):
        base = dict(gradient_clip_val=None, accumulate_grad_batches=1, optimizers=[opt], lr_scheduler_configs=[],
                    callbacks=[])
        return SimpleNamespace(**{**base, **kw})

    class ZeroGradSpy(pl.Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
            pass

    assert automatic_reason(trainer(), model) is None
    assert "2 optimizers" in automatic_reason(trainer(optimizers=[opt, opt]), model)
    plateau = SimpleNamespace(interval="epoch", reduce_on_plateau=True)
    assert "ReduceLROnPlateau" in automatic_reason(trainer(lr_scheduler_configs=[plateau]), model)
    per_step = SimpleNamespace(interval="step", reduce_on_plateau=False)
    assert "step-interval" in automatic_reason(trainer(lr_scheduler_configs=[per_step]), model)
    assert "ZeroGradSpy" in automatic_reason(trainer(callbacks=[ZeroGradSpy()]), model)
    model.automatic_optimization = False
    assert "optimises manually" in automatic_reason(trainer(), model)


def test_clipping_runs_automatic_and_restores_after_a_crash(tmp_path):
    spy = Decisions()
    runner, _ = _run(tmp_path / "clip", "trainer.gradient_clip_val=0.5", callbacks=[spy])
    assert spy.modes == [True, True]
    spy = Decisions()
    _run(tmp_path / "per_step", "strategy=test_fast_step:StepInterval", callbacks=[spy])
    assert spy.modes == [True, True], "a step-interval scheduler keeps Lightning's automatic loop"

    class Crash(pl.Callback):
        module = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            assert not pl_module.automatic_optimization, "a plain fit runs the fast step"
            Crash.module = pl_module
            raise RuntimeError("crash")

    runner = Runner(build_config(None, [*BASE, f"run.dir={tmp_path / 'crash'}"]), callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="crash"):
        runner.run()
    model = Crash.module
    assert model.automatic_optimization and "training_step" not in model.__dict__, "restored after the crash too"


class CrashAt(pl.Callback):
    def __init__(self, exp: int, step: int) -> None:
        self.exp, self.step = exp, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.exp_index == self.exp and trainer.global_step == self.step:
            raise RuntimeError("crash")


@pytest.mark.parametrize("written, resumed", [("true", "false"), ("false", "true")])
def test_a_fit_resumes_in_the_mode_its_step_checkpoint_was_written_in(tmp_path, written, resumed):
    """Lightning counts a manual fit's steps in another loop than an automatic one's: the recorded mode wins over
    ``run.fast_step`` on resume, and the result is the uninterrupted run's."""
    extra = ["strategy=test_fast_step:Decayed", "trainer.max_epochs=3"]
    _, want = _run(tmp_path / "ref", *extra, f"run.fast_step={written}")
    run = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="crash"):
        _run(run, *extra, f"run.fast_step={written}", "run.checkpoint_every_n_steps=5", callbacks=[CrashAt(1, 30)])
    state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
    assert state["manual_optimization"] is (written == "true") and state["epoch"] == 1
    spy = Decisions()
    _, got = _run(run, *extra, f"run.fast_step={resumed}", "resume=auto", callbacks=[spy])
    assert spy.modes == [written == "false"]
    assert got == want


def test_a_manual_step_checkpoint_cannot_resume_into_an_automatic_fit(tmp_path):
    run = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="crash"):
        _run(run, "trainer.max_epochs=3", "run.checkpoint_every_n_steps=5", callbacks=[CrashAt(1, 30)])
    with pytest.raises(UserError, match="written by a fit in manual optimisation.*gradient_clip_val"):
        _run(run, "trainer.max_epochs=3", "trainer.gradient_clip_val=1.0", "resume=auto")


def test_manual_step_restore_is_a_no_op_before_a_fit():
    step = ManualStep()
    step.restore()
    assert not step.active


@pytest.mark.ddp
def test_ddp_fast_step_matches_automatic(tmp_path):
    args = ["train", *BASE, "strategy=test_fast_step:DecayedModes", "trainer.max_epochs=2", "trainer.devices=2",
            "trainer.strategy=ddp", "scenario.augment=false"]
    for fast in ("true", "false"):
        proc = cl_cli([*args, f"run.fast_step={fast}", f"run.dir={tmp_path / fast}"], env_extra={"PYTHONPATH": "tests"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        mode = "manual" if fast == "true" else "automatic"
        for rank in (0, 1):
            assert (tmp_path / fast / f"modes{rank}.txt").read_text().split() == [mode, mode]
    hashes = [json.loads((tmp_path / f / "state_hashes.json").read_text())["ranks"] for f in ("true", "false")]
    assert hashes[0][0] == hashes[0][1] == hashes[1][0] == hashes[1][1]
    assert read_metrics(tmp_path / "true")["correct"] == read_metrics(tmp_path / "false")["correct"]
