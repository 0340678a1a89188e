"""User-facing errors. The CLI turns a :class:`UserError` into one line on stderr and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, unknown name). Never shown with a traceback."""


class ConfigError(UserError):
    """An invalid configuration key, type or value."""


class DataError(UserError):
    """A data set that is missing, incomplete or different from what the scenario expects."""


class Preempted(Exception):
    """A run stopped on SIGUSR1/SIGTERM after writing its step checkpoint (:mod:`cl.checkpointing`); raised on every
    rank, and the CLI exits with ``128 + signum``."""

    def __init__(self, signum: int, where: str) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; `resume=auto` (or `cl resume RUN_DIR`) "
                         "continues from there")
        self.signum = signum


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean: a, b?)"`` for the closest candidates, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" (did you mean: {', '.join(matches)}?)" if matches else ""
