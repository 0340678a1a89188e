"""Metrics that agree with Avalanche's: identical predictions go through Avalanche's metric plugins (a real ``Naive``
strategy on our stream's Avalanche export) and through our evaluation loop and accuracy matrix; the numbers match,
and our Chaudhry ``forgetting`` differs from Avalanche's stream forgetting exactly where the definitions do."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cl.config import ScenarioConfig
from cl.distributed import Dist
from cl.evaluation import evaluate
from cl.metrics.accuracy import AccuracyMatrix
from scenarios.base import TensorSource, class_incremental

T, PER_CLASS, N_CLASSES = 3, (5, 7, 4, 6, 3, 8), 6  # uneven test sets: sample weighting matters
# P(correct) of the predictions after training experience i (rows) on experience j (columns); experience 0 improves
# after experience 1 (backward transfer), so its best accuracy is not the one right after its own training
P_CORRECT = [[0.5, 0, 0], [0.9, 0.8, 0], [0.3, 0.4, 0.9]]


class Lookup(nn.Module):
    """Logits read from a fixed table by the sample id stored in pixel (0, 0, 0); ``stage`` = experiences trained."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table  # (T, N test samples, N_CLASSES)
        self.w = nn.Parameter(torch.zeros(1))  # for the optimizer (lr 0): predictions never change by training
        self.stage, self.n_seen = 0, 2
        self.eval_transform = nn.Identity()

    def eval_passes(self) -> dict:
        return {"main": self}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0, 0, 0] * 4096).round().long().clamp(0, self.table.shape[1] - 1)
        return self.table[self.stage, ids, : self.n_seen] + 0 * self.w


def _stream():
    rng = np.random.default_rng(0)
    test_y = np.concatenate([[c] * n for c, n in enumerate(PER_CLASS)])
    n = len(test_y)
    test_x = torch.zeros(n, 1, 2, 2)
    test_x[:, 0, 0, 0] = torch.arange(n) / 4096  # exact in float32
    train_y = np.repeat(np.arange(N_CLASSES), 2)
    train_x = torch.zeros(len(train_y), 1, 2, 2)
    cfg = ScenarioConfig(n_experiences=T, augment=False)
    scenario = class_incremental("lookup", TensorSource(train_x, train_y), TensorSource(test_x, test_y), cfg,
                                 image_size=2, channels=1, mean=(0.0,), std=(1.0,))
    table = torch.rand(T, n, N_CLASSES, generator=torch.Generator().manual_seed(0))
    for i in range(T):
        seen = 2 * (i + 1)
        for s, y in enumerate(test_y):
            exp = y // 2
            if exp > i:
                continue
            right = rng.random() < P_CORRECT[i][exp]
            label = y if right else rng.choice([c for c in range(seen) if c != y])
            table[i, s, label] = 5.0
    return scenario, table


def test_identical_predictions_give_avalanche_numbers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
        from avalanche.training import Naive
        from avalanche.training.plugins import EvaluationPlugin

        scenario, table = _stream()
        model = Lookup(table)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                     forgetting_metrics(experience=True, stream=True),
                                     bwt_metrics(experience=True, stream=True), loggers=[])
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                         criterion=nn.CrossEntropyLoss(), train_mb_size=4, train_epochs=1, eval_mb_size=5,
                         device="cpu", evaluator=evaluator)
        bench = scenario.benchmark  # our stream's Avalanche export: same samples, same renumbered labels
        ours = AccuracyMatrix(T)
        res = {}
        for i, exp in enumerate(bench.train_stream):
            model.stage, model.n_seen = i, 2 * (i + 1)
            strategy.train(exp)
            res = strategy.eval(bench.test_stream[: i + 1])
            counts = evaluate(model, scenario.experiences[: i + 1], Dist(), torch.device("cpu"), batch_size=5)
            ours.set_row(i, counts["main"].correct, counts["main"].total)
            # the experience confusion: which experience's classes each test sample was predicted as
            preds = table[i, :, : 2 * (i + 1)].argmax(1) // 2
            true = torch.as_tensor(np.concatenate([[c] * n for c, n in enumerate(PER_CLASS)])) // 2
            expected = [[int(((true == j) & (preds == k)).sum()) for k in range(i + 1)] for j in range(i + 1)]
            assert counts["main"].exp_confusion == expected
            for j in range(i + 1):
                assert res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] == pytest.approx(
                    ours.acc(i, j), abs=1e-12)
            assert res["Top1_Acc_Stream/eval_phase/test_stream/Task000"] == pytest.approx(ours.seen_acc(i), abs=1e-12)
    s, r = ours.summary(), ours.matrix()
    assert s["last_acc"] == pytest.approx(res["Top1_Acc_Stream/eval_phase/test_stream/Task000"], abs=1e-12)
    assert s["stream_forgetting"] == pytest.approx(res["StreamForgetting/eval_phase/test_stream"], abs=1e-12)
    assert s["bwt"] == pytest.approx(res["StreamBWT/eval_phase/test_stream"], abs=1e-12)
    for j in range(T - 1):  # Avalanche's per-experience forgetting: right after training j, minus the last
        assert res[f"ExperienceForgetting/eval_phase/test_stream/Task000/Exp{j:03d}"] == pytest.approx(
            r[j, j] - r[T - 1, j], abs=1e-12)
    # ours (Chaudhry et al.) takes the best earlier accuracy: experience 0 peaked after experience 1
    assert r[1, 0] > r[0, 0]
    chaudhry = np.mean([max(r[j:T - 1, j]) - r[T - 1, j] for j in range(T - 1)])
    assert s["forgetting"] == pytest.approx(chaudhry) and s["forgetting"] > s["stream_forgetting"] + 0.05


def test_experience_confusion_is_saved_and_drawn(tmp_path):
    from cl.config import build_config
    from cl.report import build_report
    from cl.runner import Runner
    from conftest import TINY, read_metrics

    Runner(build_config(None, [*TINY, f"run.dir={tmp_path / 'runs' / 'r'}"])).run()
    m = read_metrics(tmp_path / "runs" / "r")
    for i, e in enumerate(m["experiences"]):  # rows: true experience, columns: predicted; every sample counted once
        assert [sum(row) for row in e["exp_confusion"]] == m["total"][i][: i + 1]
        assert [e["exp_confusion"][j][j] >= m["correct"][i][j] for j in range(i + 1)] == [True] * (i + 1)
    rep = build_report([tmp_path / "runs"], out=tmp_path / "rep")
    (png,) = (tmp_path / "rep" / "plots").glob("*_confusion.png")
    assert png.stat().st_size > 0 and f"plots/{png.name}" in (tmp_path / "rep" / "report.md").read_text()
    assert rep["files"]
