"""The parity harness on our side (the official code cannot be fetched in CI): the shared setup, ``scenario=npz``,
the rows' overrides, a real ``run_ours`` and the table made from results with hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.parity import table
from benchmarks.parity.common import RunResult, make_setup, run_ours, seen_accuracy, write_npz
from benchmarks.parity.run import all_rows
from cl.config import build_config
from cl.errors import ConfigError, DataError
from cl.runner import build_scenario
from scenarios.base import pycil_permutation
from scenarios.fmnist import load_fmnist
from scenarios.proxy import proxy_split


@pytest.fixture(scope="module")
def setup():
    return make_setup(1, train_per_class=20, test_per_class=10)


def test_setup_is_the_stream_half_in_the_pycil_order(setup):
    assert setup.train_x.shape == (200, 32, 32) and setup.train_x.dtype == np.uint8
    assert setup.test_x.shape == (100, 32, 32)
    assert setup.class_order == pycil_permutation(10, 1)
    # labels are positions in the class order: 20 per class, experience t owns labels 2t, 2t + 1
    assert np.bincount(setup.train_y).tolist() == [20] * 10
    # every training image is a STREAM image of the class its label names (never the ViT's pre-training SOURCE)
    train, _ = load_fmnist("data")
    _, stream = proxy_split(train.targets)
    imgs = F.interpolate(train.images[stream].float(), size=(32, 32), mode="bilinear", align_corners=False)
    imgs = imgs.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy().reshape(len(stream), -1)
    lookup = {row.tobytes(): int(train.targets[stream[i]]) for i, row in enumerate(imgs)}
    found = [lookup.get(x.reshape(-1).tobytes()) for x in setup.train_x]
    assert found == [setup.class_order[y] for y in setup.train_y]


def test_npz_scenario_reads_the_setup_unchanged(setup, tmp_path):
    path = write_npz(setup, tmp_path / "s.npz")
    cfg = build_config(None, ["scenario=npz", f"scenario.path={path}", "scenario.n_experiences=5",
                              "scenario.augment=false"])
    sc = build_scenario(cfg)
    assert [e.classes for e in sc.experiences] == [[2 * t, 2 * t + 1] for t in range(5)]
    assert sc.image_size == 32 and sc.channels == 1 and sc.mean == pytest.approx(setup.mean)
    exp = sc.experiences[3]
    x = exp.train.source.batch(torch.as_tensor(exp.train.indices))
    assert torch.equal((x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(setup.train_x[exp.train.indices]))
    assert (setup.train_y[exp.train.indices] == exp.train.targets).all()


def test_npz_scenario_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="scenario.path"):
        build_scenario(build_config(None, ["scenario=npz"]))
    with pytest.raises(ConfigError, match="does not exist"):
        build_scenario(build_config(None, ["scenario=npz", f"scenario.path={tmp_path / 'no.npz'}"]))
    np.savez(tmp_path / "bad.npz", train_x=np.zeros((2, 8, 8)))
    with pytest.raises(DataError, match="lacks train_y, test_x, test_y"):
        build_scenario(build_config(None, ["scenario=npz", f"scenario.path={tmp_path / 'bad.npz'}"]))


def test_every_row_builds_a_valid_config_of_ours(setup, tmp_path):
    rows = all_rows()
    path = write_npz(setup, tmp_path / "s.npz")
    for row, (_, spec) in rows.items():
        cfg = build_config(None, ["scenario=npz", f"scenario.path={path}", *spec["ours"]])
        assert cfg.strategy.name in row, row


def test_seen_accuracy_is_sample_weighted():
    correct = [[9, 0], [3, 10]]
    total = [[10, 10], [10, 30]]
    assert seen_accuracy(correct, total) == pytest.approx([90.0, 100.0 * 13 / 40])


def test_run_ours_reads_counts_into_a_result(setup, tmp_path):
    path = write_npz(setup, tmp_path / "s.npz")
    res = run_ours("finetune", path, 0, ["strategy=finetune", "backbone=mlp", "strategy.epochs=1",
                                         "scenario.n_experiences=2"], threads=1)
    assert len(res.acc) == 2 and len(res.matrix) == 2
    # the first row's seen accuracy is the first experience's own accuracy
    assert res.acc[0] == pytest.approx(res.matrix[0][0])
    assert res.wall_s > 0 and "SETUP.npz" in res.command


def _result(row, side, seed, acc, wall):
    return RunResult(row=row, side=side, seed=seed, acc=acc, wall_s=wall)


def test_table_numbers_by_hand(tmp_path):
    for seed, (off, ours) in enumerate([([90.0, 60.0], [92.0, 64.0]), ([80.0, 50.0], [82.0, 50.0])]):
        _result("x", "official", seed, off, 10.0).save(tmp_path)
        _result("x", "ours", seed, ours, 5.0).save(tmp_path)
    res = RunResult(row="x", side="ours", seed=2, acc=[1.0, 1.0], wall_s=1.0)  # no official seed 2: left out
    res.save(tmp_path)
    text = table.make_table(table.load_results(tmp_path))
    # official last 60/50 -> 55.0 ± 5.0; ours 64/50 -> 57.0 ± 7.0; avg-inc official (75, 65) -> 70, ours (78, 66) -> 72
    assert "| x | official | 85.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 70.0 ± 5.0 | 10 |" in text
    assert "| x | ours | 87.0 ± 5.0 | 57.0 ± 7.0 | 57.0 ± 7.0 | 72.0 ± 6.0 | 5 |" in text
    assert "**+2.0** | **+2.0** | 0.50x" in text and "(2 seeds) ✓" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n")
    table.write_readme(text, readme)
    written = readme.read_text()
    assert written.startswith("intro\n") and written.endswith("outro\n") and "old" not in written and "0.50x" in written


def test_counts_from_predictions_by_hand():
    from benchmarks.parity.common import counts_from_predictions

    # 2 experiences of 2 classes; after exp 0: 3/4 right on exp 0; after exp 1: exp 0 2/4, exp 1 1/2
    evals = [([0, 1, 1, 0], [0, 1, 1, 1]), ([0, 3, 1, 0, 2, 2], [0, 1, 1, 1, 2, 3])]
    acc, matrix = counts_from_predictions(evals, n_tasks=2, classes_per_task=2)
    assert acc == pytest.approx([75.0, 50.0])
    assert matrix == [[75.0, None], [50.0, 50.0]]


def _override(overrides: list[str], key: str) -> str:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    assert len(values) == 1, (key, values)
    return values[0]


@pytest.mark.parametrize("row, pairs", [
    ("ranpac", {"strategy.epochs": "tuned_epoch", "strategy.lr": "body_lr", "strategy.weight_decay": "weight_decay",
                "strategy.min_lr": "min_lr", "strategy.adapter_width": "ffn_num", "strategy.projection_dim": "M",
                "data.batch_size": "batch_size"}),
    ("aper", {"strategy.epochs": "tuned_epoch", "strategy.lr": "init_lr", "strategy.weight_decay": "weight_decay",
              "strategy.min_lr": "min_lr", "strategy.adapter_width": "ffn_num", "data.batch_size": "batch_size"}),
])
def test_analytic_rows_give_both_sides_the_same_hyperparameters(row, pairs):
    spec = all_rows()[row][1]
    for ours_key, their_key in pairs.items():
        assert float(_override(spec["ours"], ours_key)) == float(spec["official"][their_key]), (row, ours_key)
    assert spec["official"]["init_cls"] == spec["official"]["increment"] == 2  # 5 tasks of 2, as the setup
    assert _override(spec["ours"], "strategy.input_convention") == "unit"  # their raw [0, 1] ToTensor inputs


def test_ranpac_row_runs_on_our_side(setup, tmp_path):
    from strategies.ranpac import RIDGE_GRID

    path = write_npz(setup, tmp_path / "s.npz")
    res = run_ours("ranpac", path, 0, [*all_rows()["ranpac"][1]["ours"], "strategy.epochs=1",
                                       "scenario.n_experiences=2"], threads=1)
    assert len(res.acc) == 2 and res.acc[0] > 60.0  # above chance (50) with 16 fit images per class
    recs = [res.extra["records"][k] for k in sorted(res.extra["records"], key=int)]
    for rec in recs:  # lambda chosen per experience (as their replace_fc): the grid value of the best score
        scores = rec["ranpac/ridge_scores"]
        assert len(scores) == len(RIDGE_GRID)
        assert rec["ranpac/ridge"] == RIDGE_GRID[int(np.argmax(scores))]


def test_aper_row_runs_on_our_side(setup, tmp_path):
    path = write_npz(setup, tmp_path / "s.npz")
    res = run_ours("aper", path, 0, [*all_rows()["aper"][1]["ours"], "strategy.epochs=1",
                                     "scenario.n_experiences=2"], threads=1)
    assert len(res.acc) == 2 and res.acc[0] > 60.0  # above chance (50) with 20 prototype images per class
    assert res.acc[1] == pytest.approx((res.matrix[1][0] + res.matrix[1][1]) / 2)  # 10 test images per class


def test_capturing_eval_cnn_keeps_top1_and_returns_unchanged():
    """The official runners' wrapper of a PyCIL ``_eval_cnn``: bound (a learner's method) and unbound (a class
    attribute taking ``self``) alike, it returns what the original returns and keeps the top-1 column and labels."""
    from benchmarks.parity.common import capturing_eval_cnn

    y_pred = np.array([[3, 1], [0, 2], [1, 0]])
    y_true = np.array([3, 2, 1])

    class Learner:
        def _eval_cnn(self, loader):
            return y_pred, y_true

    captured: dict = {}
    learner = Learner()
    out = capturing_eval_cnn(learner._eval_cnn, captured)("loader")
    assert out[0] is y_pred and out[1] is y_true
    Learner._eval_cnn = capturing_eval_cnn(Learner._eval_cnn, captured)
    learner._eval_cnn("loader")
    assert len(captured["evals"]) == 2
    for top1, labels in captured["evals"]:
        assert top1.tolist() == [3, 0, 1] and labels.tolist() == [3, 2, 1]
    y_pred[0, 0] = 9  # copies: a later change of their arrays does not reach the captured ones
    assert captured["evals"][0][0].tolist() == [3, 0, 1]


def test_run_result_write_is_atomic_json_that_loads_back(tmp_path):
    res = RunResult(row="r", side="official", seed=3, acc=[90.0, 80.0], wall_s=1.5, matrix=[[90.0, None]],
                    extra={"k": [1, 2]}, command="cmd")
    path = res.write(tmp_path / "sub" / "out.json")
    assert path == tmp_path / "sub" / "out.json" and not list(tmp_path.glob("sub/*.tmp"))
    assert RunResult.load(path) == res
    assert res.save(tmp_path) == tmp_path / "r" / "official_seed3.json"
    assert RunResult.load(tmp_path / "r" / "official_seed3.json") == res
