"""``ncm``: nearest class mean on a frozen pre-trained backbone (SimpleCIL).

Reference: Zhou, Cai, Ye, Zhan, Liu. "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability
and Adaptivity are All You Need" (SimpleCIL), arXiv 2303.07338 / IJCV 2024. The backbone never trains; after each
experience the mean feature of every new class becomes its prototype, and a test image is scored by the cosine
similarity of its feature to each prototype. It is the bar every pre-trained-model strategy must clear.

CL state: per-class feature ``sums`` (float64) and ``counts`` accumulated over the experience's training images in
evaluation mode (no augmentation), summed across DDP ranks before the ``means`` are formed; all three are buffers
that grow with the seen classes (``cl_structure``/``regrow`` restore their shapes). There is no gradient training:
``phases`` yields nothing and ``trains_parameters = False`` tells the shared contract test so.

Input convention: ``unit`` ([0, 1]) inputs, as LAMDA-PILOT's SimpleCIL feeds un-normalised tensors (our reading of
its data pipeline, not checked against every data set); the locally pre-trained ViT is trained on both conventions
(docs/pretrain.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.registry import register_strategy
from cl.strategy import CLStrategy, Phase

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience, ExperienceData


class ClassMeans:
    """Per-class feature ``sums`` (float64), ``counts`` and ``means`` as buffers, grown with the seen classes: the
    state of the prototype classifiers (``ncm``, ``aper``). Mixed into a :class:`CLStrategy`."""

    sums: Tensor
    counts: Tensor
    means: Tensor

    def init_class_means(self, dim: int) -> None:
        self.register_buffer("sums", torch.zeros(0, dim, dtype=torch.float64))  # (C_seen, D)
        self.register_buffer("counts", torch.zeros(0, dtype=torch.int64))  # (C_seen,)
        self.register_buffer("means", torch.zeros(0, dim))  # (C_seen, D) = sums / counts, float32

    def _update_means(self) -> None:
        seen = self.counts > 0
        means = torch.zeros_like(self.sums)
        means[seen] = self.sums[seen] / self.counts[seen].unsqueeze(1).to(self.sums.dtype)
        self.means = means.to(self.means.dtype)

    def _resize(self, n: int) -> None:
        """Grow (or shrink, in regrow) the buffers to ``n`` classes, keeping existing rows."""
        old = self.sums.shape[0]
        if n == old:
            return
        dev = self.sums.device
        keep = min(n, old)
        sums = torch.zeros(n, self.sums.shape[1], dtype=self.sums.dtype, device=dev)
        counts = torch.zeros(n, dtype=self.counts.dtype, device=dev)
        sums[:keep], counts[:keep] = self.sums[:keep], self.counts[:keep]
        self.sums, self.counts = sums, counts
        self._update_means()



@register_strategy("ncm")
class NCM(ClassMeans, CLStrategy):
    description = "nearest class mean (cosine) on a frozen pre-trained backbone, no training (SimpleCIL baseline)"
    input_convention = "unit"
    trains_parameters = False
    fpf_refusal = "ncm trains no parameters, so there is nothing for FPF to fine-tune"

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("ncm", "registered strategy name")
        metric: str = opt("cosine", "cosine (SimpleCIL) | euclidean (negative squared distance to the means)",
                          choices=("cosine", "euclidean"))
        feature_batch_size: int | None = opt(None, "batch size for prototype features (null = data.eval_batch_size)",
                                             ge=1)

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.backbone.requires_grad_(False)
        dim = int(backbone.num_features)
        self.init_class_means(dim)

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self._resize(self.n_seen)

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        return iter(())  # no gradient training

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self.to(ctx.device)
        sums, counts = self.class_sums(exp.train, ctx)
        sums, counts = ctx.dist.all_reduce_sum(sums), ctx.dist.all_reduce_sum(counts)
        self.sums += sums
        self.counts += counts
        self._update_means()
        ctx.record("ncm_counts", [int(c) for c in self.counts.tolist()])

    @torch.no_grad()
    def class_sums(self, data: ExperienceData, ctx: RunContext) -> tuple[Tensor, Tensor]:
        """This rank's per-class feature sums (float64) and counts over ``data`` (evaluation transform, no grad)."""
        was_training = self.training
        self.eval()
        sums = torch.zeros_like(self.sums)
        counts = torch.zeros_like(self.counts)
        loader = ctx.loader(data, train=False, batch_size=self.cfg.feature_batch_size)  # rank shards, no repeats
        for x, y in loader:
            x, y = x.to(ctx.device), y.to(ctx.device)
            sums, counts = accumulate(sums, counts, self.features(self.eval_transform(x)), y)
        self.train(was_training)
        return sums, counts

    # ------------------------------------------------------------------ prediction
    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)  # (B, D)
        if self.cfg.metric == "cosine":
            return F.normalize(f, dim=1) @ F.normalize(self.means, dim=1).t()  # (B, C_seen)
        return -torch.cdist(f, self.means).pow(2)

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        return {**super().cl_structure(), "n_prototypes": int(self.sums.shape[0])}

    def regrow(self, structure: dict[str, Any]) -> None:
        super().regrow(structure)
        self._resize(int(structure["n_prototypes"]))


def accumulate(sums: Tensor, counts: Tensor, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Add a batch of features to per-class sums and counts (``labels`` index the rows)."""
    sums = sums.index_add(0, labels, feats.to(sums.dtype))
    counts = counts + torch.bincount(labels, minlength=counts.shape[0])[: counts.shape[0]].to(counts.dtype)
    return sums, counts
