"""Lightning loggers for a run: by short name (``csv``, ``tensorboard``, ``wandb``, ``mlflow``), by class path
(``mylab.log:MyLogger``) or with init arguments (``{class: wandb, offline: true, project: mylab}``), several at once.

A run makes one ``Trainer`` per training phase, and each Trainer counts steps from zero, calls
``log_hyperparams`` and ``finalize``. :class:`RunLogger` wraps each logger so the run looks like one job to it: one
monotonic global step across experiences and phases (restored on resume), the experience index on every row,
hyperparameters (the resolved config) logged once per run, ``finalize`` once at the end.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.loggers.logger import Logger

from cl.errors import ConfigError

#: short name -> (class path, the package it needs)
LOGGERS: dict[str, tuple[str, str]] = {
    "csv": ("pytorch_lightning.loggers:CSVLogger", "pytorch_lightning"),
    "tensorboard": ("pytorch_lightning.loggers:TensorBoardLogger", "tensorboard"),
    "wandb": ("pytorch_lightning.loggers:WandbLogger", "wandb"),
    "mlflow": ("pytorch_lightning.loggers:MLFlowLogger", "mlflow"),
}


def logger_specs(value: Any) -> list[tuple[str, type[Logger], dict[str, Any]]]:
    """``trainer.logger`` as checked ``(label, class, user kwargs)`` items; ``none`` (or an empty list) is no logger.

    Raises :class:`ConfigError` in one line for an unknown name, a missing package, a class that is not a
    ``pytorch_lightning`` logger or init arguments its signature does not take.
    """
    from cl.registry import is_import_path, load_object

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if item is None or item == "none":
            continue
        if isinstance(item, dict) and isinstance(item.get("class"), str):
            label, kwargs = item["class"], {k: v for k, v in item.items() if k != "class"}
        elif isinstance(item, str):
            label, kwargs = item, {}
        else:
            raise ConfigError(f"invalid value for 'trainer.logger': {item!r} (a name, module:Class, or "
                              "{class: NAME, arg: value})")
        if label in LOGGERS:
            path, package = LOGGERS[label]
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"trainer.logger={label} needs the '{package}' package: "
                                  "pip install 'cl-lightning-lab[loggers]'")
        elif is_import_path(label):
            path = label
        else:
            from cl.errors import closest

            raise ConfigError(f"invalid value for 'trainer.logger': '{label}'{closest(label, [*LOGGERS, 'none'])} "
                              f"(choose {', '.join(LOGGERS)}, none, or a module:Class logger)")
        cls = load_object(path, "trainer.logger")
        if not (isinstance(cls, type) and issubclass(cls, Logger)):
            raise ConfigError(f"trainer.logger: '{label}' is not a pytorch_lightning logger class")
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = sorted(k for k in kwargs if k not in params and not takes_any)
        if unknown:
            raise ConfigError(f"trainer.logger: {label} does not take {', '.join(unknown)}")
        out.append((label, cls, kwargs))
    return out


def _defaults(label: str, cls: type[Logger], cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Where each logger writes by default: inside the run directory, named after the run."""
    run_name = f"{cfg.scenario.name}/{cfg.strategy.name}/seed{cfg.seed}"
    if label in ("csv", "tensorboard"):
        return {"save_dir": str(run_dir), "name": "logs", "version": ""}
    if label == "wandb":
        return {"save_dir": str(run_dir), "name": run_name, "project": "cl"}
    if label == "mlflow":
        # MLflow 3 refuses new file stores by default; a SQLite file needs no server. Runs under one run.root share
        # it: `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` compares them.
        store = (run_dir if cfg.run.dir else Path(cfg.run.root)).resolve() / "mlflow.db"
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}"
        return {"experiment_name": "cl", "run_name": run_name, "tracking_uri": uri}
    params = inspect.signature(cls).parameters
    return {"save_dir": str(run_dir)} if "save_dir" in params else {}


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers ``trainer.logger`` names, each with its run-directory defaults under the user's arguments."""
    return [cls(**{**_defaults(label, cls, cfg, run_dir), **kwargs})
            for label, cls, kwargs in logger_specs(cfg.trainer.logger)]


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"strategy.lr": 0.01, ...}`` (lists as strings): what every logger accepts."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


class RunLogger(Logger):
    """One user logger seen through the whole run (see the module docstring). Anything else is delegated to it,
    so ``trainer.logger.experiment`` is still the W&B run or MLflow client a user's callback expects."""

    def __init__(self, inner: Logger, owned: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.owned = owned  # built from trainer.logger (not passed in by the user): the run ends with it
        self.offset = 0  # global steps taken before the current fit
        self.experience = 0
        self.last_step = -1

    # what Lightning and the runner call
    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def log_dir(self) -> str | None:
        return getattr(self.inner, "log_dir", None)

    @property
    def root_dir(self) -> str | None:
        return getattr(self.inner, "root_dir", None)

    @property
    def experiment(self) -> Any:
        return getattr(self.inner, "experiment", None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """A Trainer's row: its fit-local step moved by the steps of earlier fits; the experience added."""
        self.log_at(metrics, self.offset + (step or 0))

    def log_at(self, metrics: dict[str, float], step: int) -> None:
        step = max(step, self.last_step)  # never backwards (an epoch-end row may repeat the last step)
        self.last_step = step
        self.inner.log_metrics({**metrics, "experience": self.experience}, step=step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Ignored: every Trainer of the run would log (empty) module hyperparameters; the runner logs the config
        once with :meth:`log_run_hyperparams`."""

    def log_run_hyperparams(self, cfg: DictConfig) -> None:
        self.inner.log_hyperparams(flat_hparams(cfg))

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        self.inner.log_graph(model, input_array)

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        """Ignored at the end of each fit (MLflow would mark the run terminated after the first experience)."""

    def finish(self, status: str = "success") -> None:
        self.inner.save()
        self.inner.finalize(status)
        run = getattr(self.inner, "_experiment", None)  # a W&B run we started: close it so its summary is written
        if self.owned and type(self.inner).__name__ == "WandbLogger" and hasattr(run, "finish"):
            run.finish(exit_code=0 if status == "success" else 1)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.inner.after_save_checkpoint(checkpoint_callback)

    def advance(self, steps: int) -> None:
        """After a fit of ``steps`` optimizer steps: the next fit starts past every step logged so far."""
        self.offset = max(self.offset + steps, self.last_step + 1)

    def __getattr__(self, item: str) -> Any:
        if item == "inner":  # not set yet (during unpickling): avoid recursion
            raise AttributeError(item)
        return getattr(self.inner, item)
