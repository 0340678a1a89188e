"""`cl report` and `cl eval`: hand-made run directories with known numbers, seed groups, plots, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from cl.cli import main
from cl.errors import UserError
from cl.plots import forgetting_per_experience
from cl.results import compare, find_runs, group_runs, load_run

PNG = b"\x89PNG\r\n\x1a\n"


def _config(strategy: str, seed: int, run_dir: Path, lr: float = 0.05) -> dict:
    return {"seed": seed, "resume": "never", "strategy": {"name": strategy, "lr": lr, "epochs": 1},
            "scenario": {"name": "split_digits", "n_experiences": 2}, "backbone": {"name": "mlp"},
            "run": {"root": str(run_dir.parent), "dir": None, "name": None}}


def _write_run(root: Path, strategy: str, seed: int, matrix: list[list[float | None]], summary: dict,
               times: tuple[float, float], extras: tuple[dict, dict] = ({}, {}),
               passes: dict[str, list[list[float]]] | None = None, lr: float = 0.05) -> Path:
    d = root / "split_digits" / strategy / f"seed{seed}"
    d.mkdir(parents=True)
    exps = []
    for i in range(2):
        p = {"main": [v for v in matrix[i][: i + 1]]}
        for name, m in (passes or {}).items():
            p[name] = m[i][: i + 1]
        exps.append({"index": i, "classes": [2 * i, 2 * i + 1], "train_time_s": times[i], "peak_memory_mb": 100.0,
                     "cl_state_bytes": 10, "passes": p, "passes_seen_acc": {k: float(np.mean(v)) for k, v in p.items()},
                     "extra": extras[i]})
    metrics = {**summary, "finished": True, "strategy": strategy, "scenario": "split_digits", "seed": seed,
               "n_experiences": 2, "world_size": 1, "accuracy_matrix": matrix, "experiences": exps}
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "config.yaml").write_text(yaml.safe_dump(_config(strategy, seed, d, lr)))
    return d


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """finetune seeds 0 and 1 (one group) and slca seed 0 with FLOPs, parameters added and an extra pass."""
    root = tmp_path / "runs"
    _write_run(root, "finetune", 0, [[1.0, None], [0.2, 0.8]],
               {"last_acc": 0.5, "avg_inc_acc": 0.75, "forgetting": 0.8, "avg_acc": 0.5}, (1.0, 2.0))
    _write_run(root, "finetune", 1, [[1.0, None], [0.4, 0.8]],
               {"last_acc": 0.6, "avg_inc_acc": 0.8, "forgetting": 0.6, "avg_acc": 0.6}, (2.0, 2.0))
    _write_run(root, "slca", 0, [[0.95, None], [0.9, 0.9]],
               {"last_acc": 0.9, "avg_inc_acc": 0.925, "forgetting": 0.05, "avg_acc": 0.9}, (3.0, 4.0),
               extras=({"compute/total_flops": 100, "compute/cumulative_flops": 100, "added_params": 1000},
                       {"compute/total_flops": 200, "compute/cumulative_flops": 300, "added_params": 1234}),
               passes={"unaligned": [[0.95, None], [0.5, 0.9]]})
    return root


def test_compare_groups_seeds_with_mean_and_std(runs: Path) -> None:
    ev = runs / "split_digits" / "slca" / "seed0" / "eval" / "other"  # `cl eval` output: not a run
    ev.mkdir(parents=True)
    (ev / "metrics.json").write_text(json.dumps({"kind": "eval", "accuracy_matrix": [[0.1, 0.2]]}))
    loaded = [load_run(d) for d in find_runs([runs])]
    assert len(loaded) == 3
    groups = group_runs(loaded)
    assert [(g.label, g.seeds) for g in groups] == [("finetune", [0, 1]), ("slca", [0])]
    t = compare(loaded).set_index("group")
    ft, sl = t.loc["finetune"], t.loc["slca"]
    assert ft.n_runs == 2 and ft.last_acc_mean == pytest.approx(0.55)
    assert ft.last_acc_std == pytest.approx(math.sqrt(0.005))  # sample std of 0.5, 0.6
    assert ft.forgetting_mean == pytest.approx(0.7) and ft.forgetting_std == pytest.approx(math.sqrt(0.02))
    assert ft.time_s_mean == pytest.approx(3.5) and ft.time_s_std == pytest.approx(math.sqrt(0.5))
    assert math.isnan(ft.flops_mean) and math.isnan(ft.params_added_mean)
    assert sl.flops_mean == 300 and sl.params_added_mean == 1234 and sl.last_acc_std == 0
    np.testing.assert_allclose(groups[0].mean_matrix(), [[1.0, np.nan], [0.3, 0.8]])


def test_a_changed_hyperparameter_is_another_group(runs: Path) -> None:
    _write_run(runs, "finetune_lr", 0, [[1.0, None], [0.0, 1.0]], {"last_acc": 0.5}, (1.0, 1.0), lr=0.1)
    d = runs / "split_digits" / "finetune_lr" / "seed0"
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["strategy"]["name"] = "finetune"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    m = json.loads((d / "metrics.json").read_text())
    (d / "metrics.json").write_text(json.dumps({**m, "strategy": "finetune"}))
    labels = [g.label for g in group_runs([load_run(p) for p in find_runs([runs])])]
    assert labels == ["finetune [strategy.lr=0.05]", "finetune [strategy.lr=0.1]", "slca"]


def test_report_cli_numbers_and_plots(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for text in (md, html):
        assert "55.00 ± 7.07" in text  # last acc of the finetune seeds, %
        assert "77.50 ± 3.54" in text  # avg inc acc
        assert "70.00 ± 14.14" in text  # forgetting
        assert "3.5 ± 0.7" in text  # train time (s)
        assert "90.00" in text and "1,234" in text and "300" in text  # slca: one run, FLOPs, params added
    assert "55.00 ± 7.07" in printed and "finetune" in printed and "slca" in printed
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) == 2 * 3 + 1  # heatmap, over time, forgetting per group + the comparison bars
    for p in pngs:
        assert p.read_bytes()[:8] == PNG
        from PIL import Image

        with Image.open(p) as im:
            im.verify()
        assert f"plots/{p.name}" in md
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("group,") and len(summary) == 3


def test_run_tables(runs: Path) -> None:
    r = load_run(runs / "split_digits" / "slca" / "seed0")
    assert r.pass_names() == ["main", "unaligned"]
    assert r.pass_matrix("unaligned").iloc[1].tolist() == [0.5, 0.9]
    assert r.seen_acc_by_pass().loc[1].tolist() == [0.9, pytest.approx(0.7)]
    assert r.extra_frame("added_params")["added_params"].tolist() == [1000, 1234]
    assert r.summary().iloc[0]["time_s"] == 7.0
    assert list(r.matrix().columns) == ["exp0", "exp1"] and np.isnan(r.matrix().iloc[0, 1])
    with pytest.raises(UserError, match="no evaluation pass 'online'"):
        r.pass_matrix("online")


def test_forgetting_per_experience_by_hand() -> None:
    r = np.array([[0.9, np.nan, np.nan], [0.5, 0.8, np.nan], [0.6, 0.3, 0.7]])
    f = forgetting_per_experience(r)
    np.testing.assert_allclose(f[:2], [0.9 - 0.6, 0.8 - 0.3])
    assert np.isnan(f[2])


@pytest.mark.parametrize("content", [None, "{not json", '{"accuracy_matrix": "x"}', "[1, 2]"])
def test_missing_or_malformed_metrics_is_one_clear_line(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        content: str | None) -> None:
    bad = runs / "split_digits" / "finetune" / "seed1" / "metrics.json"
    if content is None:
        bad.unlink()
    else:
        bad.write_text(content)
    with pytest.raises(UserError, match="metrics.json"):
        load_run(bad.parent)
    assert main(["report", str(bad.parent), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and err.startswith("cl report: error:")


def test_report_on_a_folder_without_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_eval_reproduces_the_last_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cl import build_config, train
    from cl.report import evaluate_run

    run_dir = tmp_path / "run"
    res = train(build_config("configs/quickstart.yaml" if Path("configs/quickstart.yaml").is_file() else
                             str(Path(__file__).resolve().parents[1] / "configs/quickstart.yaml"),
                             ["scenario.n_experiences=2", "strategy.epochs=1", "trainer.limit_train_batches=5",
                              "trainer.enable_progress_bar=false", "trainer.logger=none", f"run.dir={run_dir}"]))
    assert main(["eval", str(run_dir)]) == 0
    out = json.loads((run_dir / "eval" / "split_digits" / "metrics.json").read_text())
    assert out["accuracy_matrix"] == [res.accuracy_matrix[-1]]
    assert out["correct"][0] == res["correct"][-1] and out["same_stream"] is True and out["notes"] == []
    assert out["acc"] == pytest.approx(res["last_acc"])
    csv = (run_dir / "eval" / "split_digits" / "accuracy_matrix.csv").read_text().splitlines()
    assert csv[1] == (run_dir / "accuracy_matrix.csv").read_text().splitlines()[-1].replace("exp1,", "final,")
    # the Results frames of the same run
    assert res.to_frame().iloc[0]["last_acc"] == res["last_acc"]
    assert res.matrix_frame().shape == (2, 2)
    # another stream (the same test samples cut into 5 experiences): the same correct count, and a note
    m = evaluate_run(run_dir, ["scenario.n_experiences=5"], out=tmp_path / "ev5")
    assert len(m["accuracy_matrix"][0]) == 5 and not m["same_stream"]
    assert any("label spaces match" in n for n in m["notes"])
    assert sum(m["correct"][0]) == sum(res["correct"][-1]) and sum(m["total"][0]) == sum(res["total"][-1])
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    assert main(["eval", str(run_dir)]) == 2
    assert "last.ckpt" in capsys.readouterr().err
