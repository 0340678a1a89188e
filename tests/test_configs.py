"""Every shipped config builds: keys exist, types and values are valid, names are registered.

Paper presets cannot run here (their data sets and weights are not local), but a preset with a misspelled key or a
scenario that does not exist must still fail CI, not a user's first cluster job.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cl.config import build_config
from cl.registry import SCENARIOS, STRATEGIES

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds(path):
    if path.parent.name == "pretrain":
        from cl.pretrain import build_pretrain_config

        build_pretrain_config(str(path))
        return
    cfg = build_config(str(path))
    assert cfg.strategy.name in STRATEGIES and cfg.scenario.name in SCENARIOS


def test_every_strategy_has_a_cpu_preset():
    names = {p.parent.name for p in CONFIGS if p.name == "cpu.yaml"}
    missing = set(STRATEGIES.names()) - names - {"finetune", "joint"}  # baselines run with configs/quickstart.yaml
    assert not missing, f"strategies without configs/<name>/cpu.yaml: {sorted(missing)}"
