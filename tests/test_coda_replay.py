"""CODA-Prompt whole-run replay (``benchmarks/parity/official/coda_prompt.py --check-run``) on a tiny setup: given
THEIR drawn components, classifier and batch order, our run must compute theirs to float noise, and must split from
it at the exact step a deliberate change on our side first matters.

Needs the official code (GT-RIPL/CODA-Prompt, mirror or extracted copy): skipped where it is absent (CI). Runs the
replay in a subprocess, because it imports their top-level modules (``run``, ``trainer``, ``models``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.parity.common import CACHE, OFFICIAL, REPO, thread_env
from benchmarks.parity.official.coda_prompt import HPARAMS

_REPO_NAME, _COMMIT = OFFICIAL["coda_prompt"]
_MIRROR = Path(os.environ.get("CL_PARITY_MIRROR", "/work/.mirror")) / _REPO_NAME.replace("/", "+") / "repo"
_HAS_SOURCE = _MIRROR.exists() or (CACHE / "src" / f"coda_prompt@{_COMMIT[:7]}" / ".complete").exists()
N_TASKS, CPT, TRAIN, TEST = 2, 5, 20, 8  # their runner stands in for CIFAR-10: 10 classes, here 2 tasks of 5
STEPS_PER_EPOCH = CPT * TRAIN // HPARAMS["batch_size"]  # drop_last on both sides: 100 images -> 3 batches of 32


def _tiny_setup(path: Path) -> Path:
    """Class-dependent random 32 x 32 grey images, classes interleaved (their task data are taken by ``np.isin``
    in natural order, ours through the experience's indices: the replay must map one to the other)."""
    rng = np.random.default_rng(0)

    def split(per: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.repeat(np.arange(N_TASKS * CPT), per))
        x = np.clip(rng.normal(20 + 20 * y[:, None, None], 30, (len(y), 32, 32)), 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    (tx, ty), (vx, vy) = split(TRAIN), split(TEST)
    np.savez(path, train_x=tx, train_y=ty, test_x=vx, test_y=vy, mean=np.array([0.5]), std=np.array([0.25]),
             class_order=np.arange(N_TASKS * CPT), n_tasks=np.array(N_TASKS), classes_per_task=np.array(CPT))
    return path


def _check_run(tmp_path: Path, *ours: str) -> dict:
    setup, out = _tiny_setup(tmp_path / "setup.npz"), tmp_path / f"report{len(ours)}.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "parity" / "official" / "coda_prompt.py"), "--row",
            "coda_prompt", "--setup", str(setup), "--seed", "2", "--check-run", "--out", str(out)]
    if ours:
        argv += ["--ours", *ours]
    proc = subprocess.run(argv, env=thread_env(1), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _first_over(diffs: list[float], threshold: float) -> int | None:
    return next((i for i, d in enumerate(diffs) if d > threshold), None)


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SOURCE, reason="needs the official CODA-Prompt source (mirror or extracted copy)")
def test_replay_of_a_tiny_run_agrees_and_catches_the_written_schedule(tmp_path: Path):
    steps_per_task = STEPS_PER_EPOCH * HPARAMS["epochs"]
    report = _check_run(tmp_path)
    assert report["replay_misses"] == [] and report["unused_shuffles"] == 0
    assert report["steps"] == {"official": N_TASKS * steps_per_task, "ours": N_TASKS * steps_per_task}
    assert max(report["step_max_abs_diff"]) < 1e-5  # float noise only (~1e-6 on the real setup)
    assert max(e["max_abs_diff"] for e in report["experiences"]) < 1e-5
    assert report["matrix_ours"] == report["matrix_official"] and report["acc_ours"] == report["acc_official"]
    # the rates they ran: epochs 0 and 1 at the base rate (their scheduler starts one step behind), then cosine
    lr = HPARAMS["lr"]
    assert report["lr"]["ours"] == pytest.approx(report["lr"]["official"], rel=1e-9)
    assert report["lr"]["official"][:2 * STEPS_PER_EPOCH] == pytest.approx([lr] * (2 * STEPS_PER_EPOCH))
    assert report["lr"]["official"][2 * STEPS_PER_EPOCH] < lr
    # our side at a constant rate: the same run through epoch 1, a different one from the first step of epoch 2
    changed = _check_run(tmp_path, "strategy.schedule=constant")
    assert _first_over(changed["step_max_abs_diff"], 1e-5) == 2 * STEPS_PER_EPOCH, changed["step_max_abs_diff"]


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SOURCE, reason="needs the official CODA-Prompt source (mirror or extracted copy)")
def test_reverse_replay_their_code_on_our_draws_computes_our_run(tmp_path: Path):
    """``--check-run-reverse``: our run first, then THEIR code fed our components, classifier and batch order. The
    tool behind the parity row's measured cause (seed 0: our 21.1 is 21.1 in their code too)."""
    setup, out = _tiny_setup(tmp_path / "setup.npz"), tmp_path / "reverse.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "parity" / "official" / "coda_prompt.py"), "--row",
            "coda_prompt", "--setup", str(setup), "--seed", "2", "--check-run-reverse", "--out", str(out)]
    proc = subprocess.run(argv, env=thread_env(1), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    steps_per_task = STEPS_PER_EPOCH * HPARAMS["epochs"]
    # every one of our shuffles was used by their loader, and they never fell back to an order of their own
    assert report["their_own_shuffles"] == [] and report["unused_shuffles"] == 0
    assert report["steps"] == {"official": N_TASKS * steps_per_task, "ours": N_TASKS * steps_per_task}
    assert max(report["step_max_abs_diff"]) < 1e-5
    assert report["lr"]["ours"] == pytest.approx(report["lr"]["official"], rel=1e-9)
    assert report["same_matrix"] and report["acc_ours"] == report["acc_official"]
