"""``joint``: the upper bound. At experience i it trains on the union of experiences 0..i (from the current
weights), so its last accuracy-matrix row is joint training on the whole stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from cl.data.loaders import concat
from cl.registry import register_strategy
from cl.strategy import Phase
from strategies.finetune import Finetune

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience


@register_strategy("joint")
class Joint(Finetune):
    description = "joint training on all data seen so far (upper bound; the last row is full joint training)"

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        seen = ctx.scenario.experiences[: exp.index + 1]
        yield Phase("joint", epochs=self.cfg.epochs, data=concat([e.train for e in seen]))
