"""`cl train` end to end: files written, same seed same matrix, finished runs protected, resume=auto."""

from __future__ import annotations

import json

import pytest

from cl.config import build_config
from cl.errors import UserError
from cl.runner import RunAlreadyFinished, Runner
from conftest import cl_cli, read_metrics

FAST = ["trainer.enable_progress_bar=false", "strategy.epochs=1"]


@pytest.mark.slow
def test_quickstart_writes_results(tmp_path):
    out = cl_cli(["train", "config=configs/quickstart.yaml", f"run.root={tmp_path}", *FAST])
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "split_digits" / "finetune" / "seed0"
    m = read_metrics(run)
    for key in ("last_acc", "avg_acc", "avg_inc_acc", "forgetting", "bwt", "fwt"):
        assert key in m
    assert m["finished"] and len(m["accuracy_matrix"]) == 5
    assert (run / "accuracy_matrix.csv").read_text().startswith("trained\\evaluated,exp0")
    assert "name: finetune" in (run / "config.yaml").read_text()
    assert (run / "logs" / "metrics.csv").is_file()  # the CSV logger
    assert "accuracy matrix" in out.stdout and "last_acc" in out.stdout
    # a finished run is never overwritten silently
    again = cl_cli(["train", "config=configs/quickstart.yaml", f"run.root={tmp_path}", *FAST])
    assert again.returncode == 2 and "holds a finished run" in again.stderr


def _cfg(tmp_path, *extra):
    return build_config("configs/quickstart.yaml", [f"run.dir={tmp_path}", *FAST, "trainer.logger=none", *extra])


def test_same_seed_same_matrix(tmp_path):
    a = Runner(_cfg(tmp_path / "a", "seed=7")).run()
    b = Runner(_cfg(tmp_path / "b", "seed=7")).run()
    assert a.metrics["correct"] == b.metrics["correct"]
    c = Runner(_cfg(tmp_path / "c", "seed=8")).run()
    assert c.metrics["correct"] != a.metrics["correct"]


def test_resume_from_boundary_matches_uninterrupted(tmp_path):
    full = Runner(_cfg(tmp_path / "full", "seed=3")).run()
    # simulate a crash after experience 2: keep that checkpoint as last.ckpt and an unfinished metrics.json
    part = tmp_path / "part"
    Runner(_cfg(part, "seed=3")).run()
    ckpts = part / "checkpoints"
    (ckpts / "exp2.ckpt").replace(ckpts / "last.ckpt")
    m = json.loads((part / "metrics.json").read_text())
    m["finished"] = False
    (part / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="unfinished run"):
        Runner(_cfg(part, "seed=3")).run()
    resumed = Runner(_cfg(part, "seed=3", "resume=auto")).run()
    assert resumed.metrics["correct"] == full.metrics["correct"]
    with pytest.raises(RunAlreadyFinished):
        Runner(_cfg(part, "seed=3", "resume=auto")).run()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    Runner(_cfg(tmp_path, "seed=1")).run()
    m = json.loads((tmp_path / "metrics.json").read_text())
    m["finished"] = False
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    ckpts = tmp_path / "checkpoints"
    for name in ("last.ckpt", "exp4.ckpt", "exp3.ckpt"):  # the newest three are damaged
        (ckpts / name).write_bytes((ckpts / name).read_bytes()[:100])
    resumed = Runner(_cfg(tmp_path, "seed=1", "resume=auto")).run()  # falls back to exp2.ckpt
    assert resumed.metrics["correct"] == m["correct"]
    for path in ckpts.glob("*.ckpt"):  # nothing readable left: a clear error naming the files
        path.write_bytes(b"garbage")
    m["finished"] = False
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="last.ckpt' is unreadable or truncated"):
        Runner(_cfg(tmp_path, "seed=1", "resume=auto")).run()
