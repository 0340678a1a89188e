"""First-session adaptation: train an AdaptFormer adapter on the first experience, then freeze it for good.

APER (Zhou et al., IJCV 2024, arXiv 2303.07338) introduced it and RanPAC (McDonnell et al., NeurIPS 2023,
arXiv 2307.02251) reuses it ("Phase 1"): both official codes (zhoudw-zdw/RevisitingCIL ``models/aper_adapter.py``,
RanPAC/RanPAC ``RanPAC.py``) inject the same AdaptFormer adapter into every block of a frozen ViT, train it with a
cosine classifier on the first experience's classes only (SGD, momentum 0.9, cosine annealing per epoch), then
freeze everything; the classifier of the stream is built in closed form afterwards.

The adapter (their ``petl/vision_transformer_adapter.py``, ``tuning_config``): parallel to the MLP, reading the
un-normalised post-attention residual ``r`` (``ffn_adapter_layernorm_option="none"``), ``x <- r + mlp(LN2(r)) +
0.1 * Up(dropout(ReLU(Down(r))))`` with 64 bottleneck units, dropout 0.1, Down kaiming-uniform, Up and biases zero
(``init_option="lora"``). Here it is :class:`cl.peft.AdapterSpec` (``placement="mlp"``, ``input="residual"``) with
the dropout added after the activation (:class:`AdaptFormerSpec`).

The head of that phase is their ``CosineLinear``: ``sigma * cos(f, w)`` with a learnable ``sigma`` (init 1) and
weights uniform in ``+-1/sqrt(D)``. It is used for the adaptation only and kept (frozen) so checkpoints restore the
same module set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import ConfigError
from cl.peft import AdapterSpec, inject, pet_parameters
from cl.strategy import Phase

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

__all__ = ["ADAPTER", "AdaptFormerSpec", "CosineHead", "FirstSessionAdaptation"]

#: the name of the first-session adapter in every cl.peft wrapper
ADAPTER = "first_session"


@dataclass
class AdaptFormerSpec(AdapterSpec):
    """AdaptFormer's parallel MLP adapter with dropout after the ReLU (the official ``Adapter(dropout=0.1)``)."""

    dropout: float = 0.1

    def build(self, base_layer: nn.Module) -> nn.Module:
        adapter = super().build(base_layer)
        # the activation holds no parameters, so the state-dict keys stay those of cl.peft's Adapter
        adapter.act = nn.Sequential(adapter.act, nn.Dropout(self.dropout))
        return adapter


def adaptformer_spec(width: int, scale: float, dropout: float) -> AdaptFormerSpec:
    """The official tuning config: parallel to the MLP on the raw residual, ReLU, fixed scale, lora init."""
    return AdaptFormerSpec(width=int(width), activation="relu", scale="fixed", scale_value=float(scale),
                           placement="mlp", mode="parallel", input="residual", dropout=float(dropout))


class CosineHead(nn.Module):
    """``sigma * cos(f, w)`` over ``n`` classes, ``sigma`` learnable (the official ``CosineLinear``)."""

    def __init__(self, in_features: int, n: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n, in_features).uniform_(-bound, bound))  # (C0, D)
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, f: Tensor) -> Tensor:
        return self.sigma * (F.normalize(f, dim=1) @ F.normalize(self.weight, dim=1).t())  # (B, C0)


class FirstSessionAdaptation:
    """Mixin for a :class:`cl.strategy.CLStrategy` whose config has ``adapt``, ``adapter_width``, ``adapter_scale``,
    ``adapter_dropout``, ``epochs``, ``lr``, ``momentum``, ``weight_decay`` and ``min_lr``.

    Call :meth:`setup_adaptation` in ``__init__`` and :meth:`start_adaptation` / :meth:`end_adaptation` from the
    experience hooks; ``phases``, ``training_step`` and ``configure_optimizers`` are provided.
    """

    backbone: nn.Module
    cfg: Any
    exp_index: int
    n_seen: int
    adapt_head: CosineHead | None

    def setup_adaptation(self, backbone: nn.Module) -> None:
        """Freeze the backbone; with ``adapt=adapter`` inject a trainable adapter into every block."""
        backbone.requires_grad_(False)
        self.adapt_head = None
        self.adapted = False  # True once the first session has trained (and frozen) the adapter
        if self.cfg.adapt == "none":
            return
        blocks = getattr(backbone, "blocks", None)
        if blocks is None or not len(blocks):
            raise ConfigError(f"strategy.adapt=adapter needs a timm ViT backbone with `blocks` (got "
                              f"{type(backbone).__name__}); use strategy.adapt=none for other backbones")
        spec = adaptformer_spec(self.cfg.adapter_width, self.cfg.adapter_scale, self.cfg.adapter_dropout)
        inject(backbone, range(len(blocks)), spec, name=ADAPTER)

    @property
    def adapts_now(self) -> bool:
        """Whether the current experience is the first session and there is something to adapt."""
        return self.cfg.adapt != "none" and self.exp_index == 0 and not self.adapted

    def start_adaptation(self) -> None:
        """Grow the cosine head of the first session (in ``on_experience_start`` of experience 0)."""
        if self.adapts_now and self.adapt_head is None:
            self._make_head(self.n_seen)

    def _make_head(self, n: int) -> None:
        dev = next(self.backbone.parameters()).device
        self.adapt_head = CosineHead(int(self.backbone.num_features), n).to(dev)

    def end_adaptation(self) -> None:
        """Freeze the adapter and the head after the first session (the official ``freeze_backbone``)."""
        if self.adapts_now:
            self.adapted = True
        for p in pet_parameters(self.backbone, ADAPTER):
            p.requires_grad_(False)
        if self.adapt_head is not None:
            self.adapt_head.requires_grad_(False)

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        if self.adapts_now:
            yield Phase("adapt", epochs=self.cfg.epochs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.adapt_head(self.backbone(x)), y)  # the first experience owns labels 0..C0-1
        self.log_train_loss(loss)  # type: ignore[attr-defined]
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        epochs = self.cfg.epochs or self.trainer.max_epochs  # type: ignore[attr-defined]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(epochs), eta_min=self.cfg.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def adaptation_structure(self) -> dict[str, Any]:
        return {"adapt_head": 0 if self.adapt_head is None else int(self.adapt_head.weight.shape[0]),
                "adapted": self.adapted}

    def regrow_adaptation(self, structure: dict[str, Any]) -> None:
        self.adapted = bool(structure.get("adapted", False))
        n = int(structure.get("adapt_head", 0))
        if n and self.adapt_head is None:
            self._make_head(n)
        if self.adapted:
            self.end_adaptation()
