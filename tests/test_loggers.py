"""Lightning as users know it: loggers by name or class path, Trainer arguments under trainer.*, one monotonic global
step with the experience on every row, hyperparameters once, train(cfg, loggers=, callbacks=); W&B offline and MLflow
write their runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.logger import Logger

from cl import cli
from cl.config import build_config
from cl.errors import ConfigError
from cl.loggers import logger_specs
from cl.runner import make_trainer, train
from conftest import TINY, read_metrics


class Spy(Logger):
    """Records every call Lightning and the runner make."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.hparams: list[dict[str, Any]] = []
        self.finalized: list[str] = []

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params))

    def finalize(self, status: str) -> None:
        self.finalized.append(status)


class Batches(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.n += 1


def _cfg(tmp_path, *extra: str):
    return build_config(None, [*TINY, f"run.dir={tmp_path}", "trainer.max_epochs=2", "trainer.log_every_n_steps=5",
                               *extra])


def test_one_global_step_experience_on_every_row_hparams_once_and_resume(tmp_path):
    spy, batches = Spy(), Batches()
    res = train(_cfg(tmp_path / "run", "trainer.logger=csv"), loggers=[spy], callbacks=[batches])
    steps = [s for s, _ in spy.rows]
    assert steps == sorted(steps) and steps[-1] >= batches.n - 1  # one count over both experiences' Trainers
    assert all("experience" in m for _, m in spy.rows)
    train_rows = [(s, m["experience"]) for s, m in spy.rows if "train/loss" in m]
    assert {e for _, e in train_rows} == {0, 1}
    evals = [(s, m["experience"]) for s, m in spy.rows if "cl/last_acc" in m]
    assert [e for _, e in evals] == [0, 1]
    # the experience-0 evaluation sits after its training rows and before experience 1's
    assert max(s for s, e in train_rows if e == 0) <= evals[0][0] <= min(s for s, e in train_rows if e == 1)
    assert evals[-1][1] == 1 and spy.rows[-1][1]["cl/last_acc"] == pytest.approx(res["last_acc"])
    assert len(spy.hparams) == 1 and spy.hparams[0]["strategy.lr"] == 0.01 and spy.hparams[0]["seed"] == 0
    assert spy.finalized == ["success"]  # once, at the end of the run, not after every Trainer
    csv_text = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    assert csv_text.splitlines()[0].count("experience") == 1
    assert "strategy.lr: 0.01" in (tmp_path / "run" / "logs" / "hparams.yaml").read_text()
    # crash after experience 0, resume: experience 1's rows continue at the same global steps
    run = tmp_path / "run"
    (run / "checkpoints" / "exp0.ckpt").replace(run / "checkpoints" / "last.ckpt")
    (run / "metrics.json").write_text(json.dumps({**read_metrics(run), "finished": False}))
    again = Spy()
    train(_cfg(run, "trainer.logger=none", "resume=auto"), loggers=[again])
    assert [s for s, m in again.rows if "train/loss" in m] == [s for s, e in train_rows if e == 1]


def test_trainer_arguments_pass_through_and_are_checked(tmp_path):
    cfg = _cfg(tmp_path, "trainer.accumulate_grad_batches=2", "trainer.max_steps=7")
    trainer = make_trainer(cfg, 1, [], [], tmp_path)
    assert trainer.accumulate_grad_batches == 2 and trainer.max_steps == 7
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.acumulate_grad_batches' \(did you mean: "
                                          "accumulate_grad_batches"):
        _cfg(tmp_path, "trainer.acumulate_grad_batches=2")
    with pytest.raises(ConfigError, match="trainer.enable_checkpointing is not available: the runner checkpoints"):
        _cfg(tmp_path, "trainer.enable_checkpointing=true")
    bad = _cfg(tmp_path, "trainer.gradient_clip_algorithm=sideways")  # a value only Lightning can judge
    with pytest.raises(ConfigError, match="pytorch_lightning.Trainer refused trainer.gradient_clip_algorithm="):
        make_trainer(bad, 1, [], [], tmp_path)
    (tmp_path / "c.yaml").write_text("trainer:\n  detect_anomaly: true\n")
    assert build_config(str(tmp_path / "c.yaml")).trainer.detect_anomaly is True  # from a file too


def test_logger_names_class_paths_and_mistakes():
    path = "pytorch_lightning.loggers:CSVLogger"
    specs = logger_specs(["csv", "tensorboard", {"class": path, "flush_logs_every_n_steps": 5}])
    assert [(label, cls) for label, cls, _ in specs] == [
        ("csv", CSVLogger), ("tensorboard", TensorBoardLogger), (path, CSVLogger)]
    assert specs[2][2] == {"flush_logs_every_n_steps": 5}
    assert logger_specs("none") == [] and logger_specs([]) == []
    for value, message in [("wandbb", "'wandbb' (did you mean: wandb?)"),
                           ("cl.config:RootConfig", "is not a pytorch_lightning logger class"),
                           ({"class": "csv", "flush_every": 1}, "csv does not take flush_every"),
                           (3, "invalid value for 'trainer.logger': 3")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            logger_specs(value)


@pytest.mark.parametrize("override, message", [
    ("trainer.logger=tensorbord", "did you mean: tensorboard"),
    ("trainer.acumulate_grad_batches=2", "unknown config key 'trainer.acumulate_grad_batches'"),
    ("trainer.callbacks=[a:B]", "use the top-level callbacks="),
])
def test_trainer_mistakes_exit_2_in_one_line(tmp_path, capsys, override, message):
    assert cli.main(["train", *TINY, f"run.dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_wandb_offline_and_mlflow_write_their_runs(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = (tmp_path / "mlruns").as_uri()
    res = train(build_config(None, [*TINY, f"run.dir={tmp_path / 'run'}",
                                    f"trainer.logger=[wandb, mlflow, {{class: mlflow, tracking_uri: '{store}'}}]"]))
    # W&B, offline: one run folder; its transaction log (protobuf records, values as JSON text; wandb >= 0.19 has no
    # Python reader) holds the config, the rows with the experience and global step, and the final accuracy
    (wandb_log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = wandb_log.read_bytes()
    final = repr(res["last_acc"]).encode()
    for needle in (b"strategy.lr", b"experience", b"trainer/global_step", b"cl/last_acc", final):
        assert needle in data, needle
    # MLflow: the default SQLite store in the run directory and the file store, each with a finished run
    for uri in (f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}", store):
        client = mlflow.tracking.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("cl").experiment_id])
        assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "finetune"
        history = client.get_metric_history(run.info.run_id, "cl/last_acc")
        assert [m.value for m in history][-1] == pytest.approx(res["last_acc"]) and len(history) == 2
        exp_rows = client.get_metric_history(run.info.run_id, "experience")
        assert [m.step for m in exp_rows] == sorted(m.step for m in exp_rows)
