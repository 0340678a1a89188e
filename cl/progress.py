"""Console progress: the training bar names where the run is ("experience 3/10 · phase joint · epoch 2/5"), and a
transient bar follows evaluation over many experiences. Library warnings are silenced unless ``cl -v``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from pytorch_lightning.utilities.imports import _RICH_AVAILABLE

#: our own packages: their warnings are always shown (they are about the user's run, not library internals)
OWN_MODULES = r"(cl|strategies|scenarios)(\.|$)"


def configure_warnings(verbose: bool | None = None) -> None:
    """At the default verbosity hide library warnings (Lightning's hints, deprecations inside dependencies) but keep
    ours; ``verbose`` (``cl -v``, inherited by DDP ranks through ``CL_VERBOSE``) shows everything."""
    if verbose is None:
        verbose = os.environ.get("CL_VERBOSE", "") not in ("", "0")
    if verbose:
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=OWN_MODULES)


def _label(where: Callable[[], str], epoch: int, epochs: int | None) -> str:
    return f"{where()} · epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")


class _RichBar(RichProgressBar):
    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self._where = where

    def _get_train_description(self, current_epoch: int) -> str:
        return _label(self._where, current_epoch, self.trainer.max_epochs)


class _TQDMBar(TQDMProgressBar):
    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self._where = where

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_label(self._where, trainer.current_epoch, trainer.max_epochs))


def progress_bar(where: Callable[[], str]) -> pl.Callback:
    """Lightning's own bar (rich when installed, as Lightning chooses) with the run's position as its label."""
    return _RichBar(where) if _RICH_AVAILABLE else _TQDMBar(where)
