"""``aper``: first-session adaptation, then prototypes of the pre-trained and adapted features concatenated (APER).

Zhou, Cai, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024 (arXiv 2303.07338). Follows the official code
(zhoudw-zdw/RevisitingCIL@a2e6b71, ``models/aper_adapter.py``, ``utils/inc_net.py``, ``exps/aper_adapter/``) as
docs/strategies/aper.md describes it:

* **First session** (``adapt=adapter``): an AdaptFormer adapter in every block of the frozen ViT is trained with a
  cosine head on the first experience only, then frozen (:mod:`cl.components.first_session`).
* **Prototypes**: after each experience, the mean of ``[phi(x), phi_adapted(x)]`` (the pre-trained model's and the
  adapted model's features concatenated, 2D) over each new class's training images with the test transform; a test
  image is scored by the cosine similarity of its concatenated feature to each prototype (the official
  ``MultiBranchCosineIncrementalNet`` + ``CosineLinear``, whose ``sigma`` of 1 does not change the argmax).

The pre-trained branch is the same ViT with the adapter switched off (:func:`cl.peft.active_adapters`): the
official code builds a second copy of the pre-trained ViT, whose weights equal the frozen backbone's.

CL state: per-class feature ``sums`` (float64) and ``counts``, summed across DDP ranks before the ``means`` are
formed (as ``ncm``), plus the frozen adapter and head. Evaluation passes: ``main`` (concatenation), ``pretrained``
(the pre-trained half alone: SimpleCIL, the ``ncm`` strategy) and ``adapted`` (the adapted half alone); one forward
pass of each branch per batch serves the three.

Input convention: ``unit`` ([0, 1]) inputs, as the official ViT pipeline does not normalise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.components.first_session import FirstSessionAdaptation
from cl.config import StrategyConfig, opt
from cl.peft import active_adapters
from cl.registry import register_strategy
from cl.strategy import CLStrategy
from strategies.ncm import ClassMeans, accumulate

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience, ExperienceData


@register_strategy("aper")
class APER(FirstSessionAdaptation, ClassMeans, CLStrategy):
    """First-session adapter, then cosine prototypes on [pre-trained, adapted] features (IJCV'24)."""

    description = "first-session adapter, cosine prototypes on pre-trained + adapted features concatenated (IJCV'24)"
    input_convention = "unit"
    drop_last = False  # the official DataLoader keeps the last partial batch
    fpf_refusal = "aper keeps no replay buffer and trains only in the first session; FPF does not apply"
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16",
                          "strategy.epochs=1", "strategy.adapter_width=4"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("aper", "registered strategy name")
        adapt: str = opt("adapter", "first-session adaptation: adapter (AdaptFormer) | none (= SimpleCIL on the "
                         "pre-trained features twice)", choices=("adapter", "none"))
        epochs: int | None = opt(20, "first-session epochs (official tuned_epoch: 20)", ge=1)
        lr: float = opt(0.01, "first-session SGD learning rate (official init_lr: 0.01 CIFAR, 0.05 ImageNet-R)",
                        gt=0)
        momentum: float = opt(0.9, "SGD momentum (official: 0.9)", ge=0)
        weight_decay: float = opt(0.0005, "weight decay (official: 0.0005 CIFAR, 0.005 ImageNet-R)", ge=0)
        min_lr: float = opt(0.0, "eta_min of the per-epoch cosine annealing (official min_lr: 0)", ge=0)
        adapter_width: int = opt(64, "adapter bottleneck units (official ffn_num: 64)", ge=1)
        adapter_scale: float = opt(0.1, "fixed adapter output scale (official ffn_adapter_scalar: 0.1)", gt=0)
        adapter_dropout: float = opt(0.1, "dropout after the adapter's ReLU (official: 0.1)", ge=0)
        feature_batch_size: int | None = opt(None, "batch size for prototype features (null = data.eval_batch_size)",
                                             ge=1)

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.setup_adaptation(backbone)
        dim = 2 * int(backbone.num_features)
        self.init_class_means(dim)  # over the concatenated (2D) features

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self._resize(self.n_seen)
        self.start_adaptation()

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self.end_adaptation()
        self.to(ctx.device)
        sums, counts = self.class_sums(exp.train, ctx)
        self.sums += ctx.dist.all_reduce_sum(sums)
        self.counts += ctx.dist.all_reduce_sum(counts)
        self._update_means()

    @torch.no_grad()
    def class_sums(self, data: ExperienceData, ctx: RunContext) -> tuple[Tensor, Tensor]:
        """This rank's per-class sums (float64) and counts of the concatenated features (test transform)."""
        was_training = self.training
        self.eval()
        sums, counts = torch.zeros_like(self.sums), torch.zeros_like(self.counts)
        for x, y in ctx.loader(data, train=False, batch_size=self.cfg.feature_batch_size):
            x, y = x.to(ctx.device), y.to(ctx.device)
            sums, counts = accumulate(sums, counts, self.dual_features(self.eval_transform(x), cache=False), y)
        self.train(was_training)
        return sums, counts

    # ------------------------------------------------------------------ prediction
    def dual_features(self, x: Tensor, cache: bool = True) -> Tensor:
        """``[phi(x), phi_adapted(x)]`` (B, 2D); the pre-trained branch is the backbone with the adapter off.

        With ``cache`` (evaluation), the passes main/pretrained/adapted of one batch share one forward of each
        branch (:meth:`CLStrategy.batch_cached`).
        """
        return self.batch_cached("dual", x, self._dual) if cache else self._dual(x)

    def _dual(self, x: Tensor) -> Tensor:
        with active_adapters(self.backbone, []):
            pre = self.features(x)
        return torch.cat([pre, self.features(x)], dim=1)

    def _cosine(self, f: Tensor, means: Tensor) -> Tensor:
        return F.normalize(f, dim=1) @ F.normalize(means, dim=1).t()  # (B, C_seen)

    def forward(self, x: Tensor) -> Tensor:
        return self._cosine(self.dual_features(x), self.means)

    def pretrained_logits(self, x: Tensor) -> Tensor:
        d = self.sums.shape[1] // 2
        return self._cosine(self.dual_features(x)[:, :d], self.means[:, :d])

    def adapted_logits(self, x: Tensor) -> Tensor:
        d = self.sums.shape[1] // 2
        return self._cosine(self.dual_features(x)[:, d:], self.means[:, d:])

    def eval_passes(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"main": self, "pretrained": self.pretrained_logits, "adapted": self.adapted_logits}

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        return {**super().cl_structure(), "n_prototypes": int(self.sums.shape[0]), **self.adaptation_structure()}

    def regrow(self, structure: dict[str, Any]) -> None:
        super().regrow(structure)
        self._resize(int(structure["n_prototypes"]))
        self.regrow_adaptation(structure)

