"""Shared test setup: offline, quiet, and helpers to run tiny streams in-process or as `cl train` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# A two-experience stream, tiny and fast; strategies add their `contract_overrides`.
TINY = ["scenario=split_digits", "scenario.n_experiences=2", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.logger=none", "trainer.max_epochs=1", "data.batch_size=32"]


def cl_cli(args: list[str], cwd: Path | None = None, timeout: int = 600,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `cl` CLI in a subprocess (as users and clusters do), from the repository root by default."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "cl", *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture
def repo() -> Path:
    return REPO
