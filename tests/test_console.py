"""A quiet, informative console: no library warnings at the default verbosity (``cl -v`` shows them), a progress line
naming the experience, phase and epoch, the summary table at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cl.progress import progress_bar
from conftest import REPO


def test_progress_label_names_experience_phase_and_epoch():
    bar = progress_bar(lambda: "experience 3/10 · phase joint")
    bar._trainer = SimpleNamespace(max_epochs=5)
    assert bar._get_train_description(1) == "experience 3/10 · phase joint · epoch 2/5"  # rich: a dependency


def _run(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "CL_VERBOSE")}
    env["HF_HUB_OFFLINE"] = "1"
    args = [*flags, "train", f"config={REPO / 'configs' / 'quickstart.yaml'}", "scenario.n_experiences=2",
            "strategy.epochs=1", f"run.dir={tmp_path / ('v' if flags else 'q')}"]
    return subprocess.run([sys.executable, "-m", "cl", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_default_run_prints_no_warning_and_v_shows_them(tmp_path):
    quiet = _run(tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "warn" not in quiet.stderr.lower() and "Warning" not in quiet.stdout, quiet.stderr[-2000:]
    assert "log_every_n_steps" not in quiet.stderr + quiet.stdout  # Lightning's hint about short epochs
    assert "experience 2/2 · phase train · epoch 1/1" in quiet.stdout
    assert "accuracy matrix" in quiet.stdout and "last_acc" in quiet.stdout
    loud = _run(tmp_path, "-v")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "log_every_n_steps" in loud.stderr  # the library's warnings are back with -v
