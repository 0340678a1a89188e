"""L2P parity tools: the whole-run replay's names and step comparison, the draw statistics, and (with the official
source) a tiny replay that must agree, and must disagree once our side is changed.

The replay (``benchmarks/parity/official/l2p.py --check-run``) needs the official code (JH-LEE-KR/l2p-pytorch): the
replay tests run only where its mirror or extracted copy is present (skipped in CI). They run the replay in a
subprocess, because it imports their top-level modules (``main``, ``engine``, ``datasets``, ``utils``, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.parity.common import CACHE, OFFICIAL, REPO, thread_env
from benchmarks.parity.l2p_draws import compare
from benchmarks.parity.official.l2p import HPARAMS, REPLAY_NAMES, ROWS, _step_divergence
from cl.config import build_config
from cl.runner import build_scenario, build_strategy
from conftest import TINY


def test_replay_names_are_exactly_our_trainable_parameters():
    overrides = [o for o in ROWS["l2p"]["ours"] if not o.startswith(("backbone=", "backbone.checkpoint="))]
    cfg = build_config(None, [*TINY, *overrides, "backbone=vit_p4_w64_d4", "backbone.depth=2",
                              "scenario.image_size=16"])
    model = build_strategy(cfg, build_scenario(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(REPLAY_NAMES.values())
    # THEIR names: the prompt pool module of their VisionTransformer and the head
    assert set(REPLAY_NAMES) == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}


def test_step_divergence_finds_the_first_step_past_each_threshold():
    theirs = [{"a": torch.zeros(3), "b": torch.zeros(2)} for _ in range(5)]
    ours = [{k: v.clone() for k, v in s.items()} for s in theirs]
    ours[1]["b"][0] = 1e-7  # float noise
    ours[2]["a"][1] = 5e-5
    ours[4]["b"][1] = -0.5
    d = _step_divergence(theirs, ours)
    assert d["first_step_over"] == {"1e-06": 2, "0.0001": 4, "0.01": 4}
    assert d["per_step"] == pytest.approx([0.0, 1e-7, 5e-5, 0.0, 0.5])
    assert d["steps_official"] == d["steps_ours"] == 5 and d["max"] == pytest.approx(0.5)
    same = _step_divergence(theirs, [{k: v.clone() for k, v in s.items()} for s in theirs])
    assert same["first_step_over"] == {"1e-06": None, "0.0001": None, "0.01": None} and same["max"] == 0.0


def test_draw_comparison_by_hand():
    c = compare([50.0, 52.0, 54.0], [46.0, 48.0, 50.0], n_perm=20_000)
    assert c["diff"] == pytest.approx(-4.0) and c["se"] == pytest.approx(np.sqrt(4 / 3 + 4 / 3))
    # sign flips of the paired differences (-4, -4, -4): only all-minus and all-plus reach |mean| 4 -> 2 / 8
    assert c["p_sign_flip"] == pytest.approx(0.25)
    # of the 20 splits of (46, 48, 50, 50, 52, 54) into 3 + 3, four separate the means by 4 or more: {46, 48, 50}
    # and {50, 52, 54}, each with either 50 (exact p 0.2)
    assert c["p_two_sample"] == pytest.approx(0.2, abs=0.01)
    same = compare([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], n_perm=2_000)
    assert same["diff"] == 0.0 and same["p_two_sample"] == 1.0


_REPO_NAME, _COMMIT = OFFICIAL["l2p"]
_MIRROR = Path(os.environ.get("CL_PARITY_MIRROR", "/work/.mirror")) / _REPO_NAME.replace("/", "+") / "repo"
_HAS_SOURCE = _MIRROR.exists() or (CACHE / "src" / f"l2p@{_COMMIT[:7]}" / ".complete").exists()


def _tiny_setup(path: Path, n_tasks: int = 2, cpt: int = 2, train: int = 44, test: int = 20) -> Path:
    """Class-dependent random 32x32 grey images; 2 x 44 train images per task: 5 batches of 16 and one of 8 (their
    loader keeps it, so must ours)."""
    rng = np.random.default_rng(0)
    n_cls = n_tasks * cpt

    def split(per: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.repeat(np.arange(n_cls), per))  # interleaved classes: natural order != by class
        x = np.clip(rng.normal(40 + 40 * y[:, None, None], 30, (len(y), 32, 32)), 0, 255).astype(np.uint8)
        return x, y.astype(np.int64)

    (tx, ty), (vx, vy) = split(train), split(test)
    np.savez(path, train_x=tx, train_y=ty, test_x=vx, test_y=vy, mean=np.array([0.5]), std=np.array([0.25]),
             class_order=np.arange(n_cls), n_tasks=np.array(n_tasks), classes_per_task=np.array(cpt))
    return path


def _check_run(tmp_path: Path, *ours: str, mode: str = "--check-run") -> dict:
    setup, out = _tiny_setup(tmp_path / "setup.npz"), tmp_path / f"report{len(ours)}{mode}.json"
    argv = [sys.executable, str(REPO / "benchmarks" / "parity" / "official" / "l2p.py"), "--row", "l2p", "--setup",
            str(setup), "--seed", "3", mode, "--out", str(out)]
    if ours:
        argv += ["--ours", *ours]
    proc = subprocess.run(argv, env=thread_env(1), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SOURCE, reason="needs the official l2p-pytorch source (mirror or extracted copy)")
def test_replay_of_a_tiny_run_agrees_and_catches_a_changed_loss(tmp_path: Path):
    steps_per_task = 6 * HPARAMS["epochs"]
    report = _check_run(tmp_path)
    assert report["replay_misses"] == [] and report["unused_shuffles"] == []
    assert report["trainable_official"] == sorted(REPLAY_NAMES)
    div = report["step_divergence"]
    assert div["steps_official"] == div["steps_ours"] == 2 * steps_per_task
    assert div["max"] < 1e-5 and div["first_step_over"]["0.0001"] is None  # float noise only (~1e-6)
    assert report["same_matrix_seen"] and report["acc_ours"] == report["acc_official_seen"]
    # our loss without the training mask: the same as theirs on experience 0 (only its 2 classes are seen), not
    # from the first step of experience 1 on (the old classes' logits compete): the replay must say exactly that
    changed = _check_run(tmp_path, "strategy.train_mask=false")
    first = changed["step_divergence"]["first_step_over"]["0.0001"]  # Adam moves the old rows by ~lr = 1.9e-3
    assert first == steps_per_task, changed["step_divergence"]
    assert changed["experiences"][0]["step_max_abs_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SOURCE, reason="needs the official l2p-pytorch source (mirror or extracted copy)")
def test_reverse_replay_of_a_tiny_run_agrees(tmp_path: Path):
    """OUR run first, then THEIR code fed our initial pool, keys, head and batch order: the same run to float noise."""
    report = _check_run(tmp_path, mode="--check-run-reverse")
    assert report["their_own_shuffles"] == [] and report["unused_shuffles"] == []
    div = report["step_divergence"]
    assert div["steps_official"] == div["steps_ours"] == 2 * 6 * HPARAMS["epochs"]
    assert div["max"] < 1e-5 and div["first_step_over"]["0.0001"] is None
    assert report["same_matrix_seen"] and report["acc_ours"] == report["acc_official_seen"]
