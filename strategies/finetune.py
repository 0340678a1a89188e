"""``finetune``: sequential fine-tuning, the lower bound. One head per experience, cross-entropy over all seen
classes, the whole network trains, nothing protects old experiences."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from cl.registry import register_strategy
from cl.strategy import CLStrategy, IncrementalClassifier

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience


@register_strategy("finetune")
class Finetune(CLStrategy):
    description = "sequential fine-tuning of backbone and growing heads (lower bound)"

    def __init__(self, cfg, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.classifier = IncrementalClassifier(backbone.num_features)

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        if self.n_seen > self.classifier.n_classes:
            self.classifier.grow(self.n_seen - self.classifier.n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def cl_structure(self) -> dict:
        return {**super().cl_structure(), "heads": self.classifier.sizes}

    def regrow(self, structure: dict) -> None:
        super().regrow(structure)
        self.classifier.regrow(structure["heads"])
