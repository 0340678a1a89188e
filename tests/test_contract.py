"""The shared strategy contract, parametrized over the registry: every registered strategy gets it for free.

Two tiny experiences; logits grow with the seen classes; parameters frozen at the start of a fit stay
bit-identical through it; a checkpoint round trip gives identical logits; a 2-process CPU DDP run (`cl train` as a
subprocess, gloo) ends with identical CL state on both ranks and metrics close to the 1-process run.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch

from cl.callbacks import base as cb_base
from cl.config import build_config
from cl.registry import STRATEGIES
from cl.runner import Runner, build_strategy, load_checkpoint, restore_model
from conftest import TINY, cl_cli, read_metrics

NAMES = STRATEGIES.names()


def _overrides(name: str, tmp_path, extra: list[str] = ()) -> list[str]:
    cls = STRATEGIES.get(name)
    return [f"strategy={name}", *TINY, *cls.contract_overrides, f"run.dir={tmp_path / 'run'}", *extra]


class _Probe(cb_base.CLCallback):
    """Records logits widths after each experience and checks frozen parameters inside every fit."""

    widths: list[int] = []
    frozen_violations: list[str] = []
    changed: list[bool] = []

    def trainer_callbacks(self, ctx):
        probe = self

        class Frozen(pl.Callback):
            def on_train_start(self, trainer, module):
                self.before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
                self.trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

            def on_train_end(self, trainer, module):
                params = dict(module.named_parameters())
                for n, t in self.before.items():
                    if n in params and not torch.equal(params[n].detach().cpu(), t.cpu()):
                        probe.frozen_violations.append(n)
                probe.changed.append(any(not torch.equal(params[n].detach().cpu(), t.cpu())
                                         for n, t in self.trainable.items() if n in params))

        return [Frozen()]

    def on_evaluated(self, exp, results, ctx):
        if ctx.initial_eval:
            return
        x = torch.stack([exp.test.source[int(i)] for i in exp.test.indices[:4]]).to(ctx.device)
        ctx.model.eval()
        with torch.no_grad():
            _Probe.widths.append(ctx.model(ctx.model.eval_transform(x)).shape[1])


@pytest.fixture
def probe(monkeypatch):
    _Probe.widths, _Probe.frozen_violations, _Probe.changed = [], [], []
    monkeypatch.setattr(cb_base, "CALLBACKS", cb_base.CALLBACKS + [_Probe])
    import cl.runner

    monkeypatch.setattr(cl.runner, "CALLBACKS", cb_base.CALLBACKS)
    return _Probe


@pytest.mark.parametrize("name", NAMES)
def test_contract_growth_frozen_and_checkpoint(name, tmp_path, probe):
    cfg = build_config(None, _overrides(name, tmp_path))
    runner = Runner(cfg)
    results = runner.run()
    sizes = [len(e.classes) for e in runner.scenario.experiences]
    assert probe.widths == [sizes[0], sizes[0] + sizes[1]], "logits must grow with the seen classes"
    assert not probe.frozen_violations, f"frozen parameters changed during fit: {probe.frozen_violations[:5]}"
    if STRATEGIES.get(name).trains_parameters:
        assert any(probe.changed), "no trainable parameter changed in any fit"
    assert results["last_acc"] is not None and 0.0 <= results["last_acc"] <= 1.0

    # checkpoint round trip into a fresh model: identical logits
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    fresh = build_strategy(cfg, runner.scenario)
    restore_model(fresh, state)
    exp = runner.scenario.experiences[-1]
    x = torch.stack([exp.test.source[int(i)] for i in exp.test.indices[:8]])
    runner.model.cpu().eval()
    fresh.eval()
    with torch.no_grad():
        a = runner.model(runner.model.eval_transform(x))
        b = fresh(fresh.eval_transform(x))
    assert torch.equal(a, b), "a checkpoint round trip must reproduce the logits exactly"


@pytest.mark.ddp
@pytest.mark.parametrize("name", NAMES)
def test_contract_ddp_two_processes(name, tmp_path):
    # without the shared run.dir (each run gets its own below); augmentation off so both runs see the same images
    base = [o for o in _overrides(name, tmp_path, ["scenario.augment=false"]) if not o.startswith("run.dir=")]
    one = cl_cli(["train", *base, f"run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = cl_cli(["train", *base, f"run.dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"])
    assert two.returncode == 0, two.stderr[-3000:]
    hashes = json.loads((tmp_path / "two" / "state_hashes.json").read_text())["ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], "CL state differs between DDP ranks"
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert m2["world_size"] == 2
    assert m1["total"] == m2["total"], "every test sample must be counted exactly once under DDP"
    tol = STRATEGIES.get(name).contract_ddp_tolerance
    assert abs(m1["last_acc"] - m2["last_acc"]) <= tol
