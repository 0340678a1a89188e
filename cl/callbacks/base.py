"""The run-level callback base class; every hook is a documented no-op."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from cl.evaluation import PassCounts
    from cl.runner import RunContext
    from scenarios.base import Experience


class CLCallback:
    """Hooks the runner calls on every rank (write files on ``ctx.dist.is_main`` only)."""

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return True

    def trainer_callbacks(self, ctx: RunContext) -> list[pl.Callback]:
        """Lightning callbacks to add to every ``Trainer`` of the run."""
        return []

    def on_run_start(self, ctx: RunContext) -> None: ...

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None: ...

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        """After training and the strategy's own end-of-experience step, before evaluation."""

    def on_evaluated(self, exp: Experience, results: dict[str, PassCounts], ctx: RunContext) -> None: ...

    def on_run_end(self, ctx: RunContext) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CALLBACKS: list[type[CLCallback]] = []
