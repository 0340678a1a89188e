"""Plugins without a fork: a strategy, scenario, backbone or callback in the user's own module, used by import path
(``strategy=mod:Class``), registered on import (``imports=[mod]``) or through the ``cl.plugins`` entry-point group;
``cl list`` names where each entry comes from; mistakes are one-line errors with exit code 2."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from cl import cli
from cl.config import build_config
from cl.registry import BACKBONES, STRATEGIES, load_entry_points
from cl.runner import Runner
from conftest import TINY, cl_cli, read_metrics

USER_MODULE = '''
"""A user's lab module: a strategy with its own config key, a registered one, callbacks, a backbone."""
from dataclasses import dataclass

import pytorch_lightning as pl
from torch import nn

from cl.backbones.base import BackboneBuilder
from cl.callbacks import CLCallback
from cl.config import BackboneConfig, StrategyConfig, opt
from cl.registry import register_backbone, register_strategy
from strategies.finetune import Finetune


@dataclass
class ScaledConfig(StrategyConfig):
    scale: float = opt(1.0, "multiplies the logits", gt=0)


class Scaled(Finetune):
    """Fine-tuning with scaled logits (by import path only)."""
    Config = ScaledConfig

    def forward(self, x):
        return self.cfg.scale * super().forward(x)


@register_strategy("{prefix}_registered")
class Registered(Finetune):
    description = "registered on import"


@register_backbone("{prefix}_tiny")
class Tiny(BackboneBuilder):
    description = "a linear backbone"

    def build(self, cfg: BackboneConfig, input_shape):
        net = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 16))
        net.num_features = 16
        return net


class EpochCounter(pl.Callback):
    def __init__(self, start: int = 0) -> None:
        self.epochs = start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1


class Recorder(CLCallback):
    def on_experience_end(self, exp, ctx) -> None:
        ctx.record("recorder_saw", exp.index)


NOT_A_STRATEGY = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A fresh module ``lab_<id>.methods`` in tmp_path; registrations it makes are undone after the test."""
    prefix = f"lab_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / prefix
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "methods.py").write_text(textwrap.dedent(USER_MODULE).replace("{prefix}", prefix))
    monkeypatch.syspath_prepend(str(tmp_path))
    for reg in (STRATEGIES, BACKBONES):
        reg._discover()
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
    return prefix


def _tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"run.dir={tmp_path / 'run'}", *extra]


def test_strategy_by_import_path_trains_and_resumes(tmp_path, user_module):
    path = f"{user_module}.methods:Scaled"
    cb = [f"callbacks=[{user_module}.methods:Recorder,{{class: {user_module}.methods:EpochCounter, start: 10}}]"]
    cfg = build_config(None, _tiny(tmp_path, f"strategy={path}", "strategy.scale=2.0", "trainer.max_epochs=2", *cb))
    assert cfg.strategy.scale == 2.0  # the strategy's own Config came with it
    runner = Runner(cfg)
    full = runner.run()
    assert full["finished"] and full["strategy"] == path
    assert [e["extra"]["recorder_saw"] for e in full["experiences"]] == [0, 1]  # the CL callback ran
    counter = next(c for c in runner._callbacks if type(c).__name__ == "EpochCounter")
    assert counter.epochs == 10 + 2 * 2  # one Lightning callback object across both experiences' Trainers
    assert type(runner.model).__name__ == "Scaled"
    # crash after experience 0, then resume=auto from the same directory
    run = tmp_path / "run"
    (run / "checkpoints" / "exp0.ckpt").replace(run / "checkpoints" / "last.ckpt")
    m = read_metrics(run)
    (run / "metrics.json").write_text(json.dumps({**m, "finished": False}))
    resumed = Runner(build_config(None, _tiny(tmp_path, f"strategy={path}", "strategy.scale=2.0",
                                              "trainer.max_epochs=2", "resume=auto", *cb))).run()
    assert resumed["correct"] == full["correct"]


def test_imports_register_and_cl_list_names_the_origin(tmp_path, user_module, capsys):
    cfg = build_config(None, _tiny(tmp_path, f"imports=[{user_module}.methods]", f"strategy={user_module}_registered",
                                   f"backbone={user_module}_tiny"))
    assert cfg.imports == [f"{user_module}.methods"]
    res = Runner(cfg).run()
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    assert cli.main(["list", f"imports={user_module}.methods"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if f"{user_module}_registered" in ln)
    assert "registered on import" in line and f"[imports= ({user_module}.methods)]" in line
    assert "[" not in next(ln for ln in out.splitlines() if ln.strip().startswith("finetune "))  # built-in


def test_entry_point_plugin_registers(tmp_path, user_module, monkeypatch):
    dist = tmp_path / "mylab_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mylab-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[cl.plugins]\nmylab = {user_module}.methods\n")
    monkeypatch.setattr("cl.registry._plugins_loaded", False)
    load_entry_points()
    assert f"{user_module}_registered" in STRATEGIES.names()
    assert STRATEGIES.origin(f"{user_module}_registered") == (
        f"entry point 'mylab' of mylab-plugin ({user_module}.methods)")


@pytest.mark.parametrize("override, message", [
    ("strategy=nolab_zz.methods:X", "cannot import 'nolab_zz.methods': no module named 'nolab_zz'"),
    ("strategy={m}.methods:Scaledd", "has no attribute 'Scaledd' (did you mean: Scaled"),
    ("strategy={m}.methods:NOT_A_STRATEGY", "is an int, not a subclass of cl.strategy.CLStrategy"),
    ("backbone={m}.methods:Scaled", "not a subclass of cl.backbones.base.BackboneBuilder"),
    ("imports=[nolab_zz]", "imports=: cannot import 'nolab_zz'"),
    ("imports=[a-b]", "'a-b' is not a module name"),
    ("callbacks=[{m}.methods:Scaled]", "is not a pytorch_lightning.Callback or cl CLCallback"),
    ("callbacks=[{{class: {m}.methods:EpochCounter, stat: 1}}]", "does not accept ['stat']"),
    ("callbacks=[nope]", "'nope' is not an import path"),
])
def test_plugin_mistakes_are_one_line_errors(tmp_path, user_module, capsys, override, message):
    code = cli.main(["train", *_tiny(tmp_path, override.format(m=user_module))])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.ddp
def test_user_strategy_under_two_process_ddp(tmp_path, user_module):
    # the module is found from the working directory, as a user's `cl train` in their project folder would
    args = ["train", f"strategy={user_module}.methods:Scaled", "strategy.scale=2.0", *TINY,
            f"run.dir={tmp_path / 'ddp'}", "trainer.devices=2", "trainer.strategy=ddp"]
    out = cl_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads((tmp_path / "ddp" / "state_hashes.json").read_text())["ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    m = read_metrics(tmp_path / "ddp")
    assert m["finished"] and m["world_size"] == 2 and m["strategy"] == f"{user_module}.methods:Scaled"
