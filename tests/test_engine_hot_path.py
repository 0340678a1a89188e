"""The training hot path: cheap per-hook bookkeeping that changes no number, and the overhead benchmark's plain loop
on the same network as ``strategy=finetune``."""

from __future__ import annotations

import torch
from torch import nn

from cl import build_config, train
from cl.strategy import CLStrategy
from conftest import TINY

FAST = [*TINY, "strategy=finetune", "backbone=mlp", "backbone.hidden=32",
        "run.checkpoint=false", "seed=3"]


def test_plain_attribute_fast_path_keeps_module_registration():
    """``_current_fx_name`` skips nn.Module's registry; parameters, modules and buffers still register."""
    m = CLStrategy(CLStrategy.Config(), nn.Linear(3, 2), 4)
    m._current_fx_name = "training_step"
    assert m._current_fx_name == "training_step" and "_current_fx_name" in m.__dict__
    m.extra = nn.Linear(2, 2)
    m.scale = nn.Parameter(torch.ones(1))
    m.register_buffer("count", torch.zeros(1))
    names = dict(m.named_parameters())
    assert "extra.weight" in names and "scale" in names and "count" in dict(m.named_buffers())
    assert "extra" not in m.__dict__ and "scale" not in m.__dict__


def test_fast_path_changes_no_number(tmp_path, monkeypatch):
    """A run with nn.Module's own ``__setattr__`` for every attribute gives the identical matrix and weights."""
    fast = train(build_config(None, [*FAST, f"run.dir={tmp_path}/fast"]))
    monkeypatch.delattr(CLStrategy, "__setattr__")
    slow = train(build_config(None, [*FAST, f"run.dir={tmp_path}/slow"]))
    assert fast.accuracy_matrix == slow.accuracy_matrix
    hashes = [(tmp_path / name / "state_hashes.json").read_text() for name in ("fast", "slow")]
    assert hashes[0] == hashes[1]


def test_overhead_plain_loop_grows_finetune_heads():
    """The plain loop of benchmarks/engine_overhead.py trains the network ``finetune`` has: one head per
    experience, concatenated, with the parameter count of ours after the last experience."""
    from benchmarks.engine_overhead import growing_heads
    from cl.config import section
    from cl.runner import build_scenario, build_strategy

    cfg = build_config(None, FAST + ["run.dir=/nonexistent"])
    scenario = build_scenario(cfg)
    net = growing_heads(section(cfg, "backbone"), scenario)
    ours = build_strategy(cfg, scenario)
    for exp in scenario.experiences:
        net.grow(exp)
        ours.on_experience_start(exp, None)  # finetune's growth reads only the experience
        assert net.classifier.sizes == ours.classifier.sizes == [len(e.classes) for e in
                                                                  scenario.experiences[: exp.index + 1]]
    x = torch.zeros(5, scenario.channels, scenario.image_size, scenario.image_size)
    assert net(x).shape == (5, scenario.n_classes)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ours.parameters())
