"""``ranpac``: random projections and a streamed ridge classifier on a (first-session adapted) pre-trained model.

McDonnell, Gong, Parvaneh, Abbasnejad, van den Hengel. "RanPAC: Random Projections and Pre-trained Models for
Continual Learning", NeurIPS 2023 (arXiv 2307.02251). Follows the official code (RanPAC/RanPAC@012927f,
``RanPAC.py``, ``args/*_publish.csv``) as docs/strategies/ranpac.md describes it:

* **Phase 1** (optional, ``adapt=adapter``): an AdaptFormer adapter in every ViT block is trained on the first
  experience with a cosine head, then frozen (:mod:`cl.components.first_session`).
* **Phase 2**: a fixed Gaussian random projection ``W_rand`` (D x M, M = 10000) with a ReLU, ``h = relu(f W_rand)``
  (``projection_dim=0``: ``h = f``, the paper's "no RP" ablation). Over the stream the Gram matrix
  ``G = sum h^T h`` (M x M) and ``Q = sum h^T y`` (M x C, one-hot ``y``) accumulate every experience's training
  features (test transform); the classifier is the ridge solution ``W = (G + lambda I)^-1 Q`` and the logits are
  ``h W``. Nothing of the stream is trained by gradient.
* **lambda**: at every experience (as the official ``replace_fc``) the grid ``10^-8 .. 10^8`` is scored on that
  experience's data: fit on 80 %, mean squared error of the one-hot targets on the other 20 %; the best one is
  used for the whole ``G``. ``ridge_criterion=accuracy`` scores held-out accuracy instead. The search solves in
  float32 as the official code does (``ridge_search_precision``): with fewer fitting rows than M the exact error is
  flat over the small lambdas and an exact search can pick 1e-8, which fails once ``G`` holds about M samples.

CL state (buffers, so checkpoints carry it): ``w_rand`` (float32, drawn once after phase 1 from
``ctx.generator``, the same on every rank), ``gram`` and ``q`` (float64 sums, reduced across ranks with
``ctx.dist.all_reduce_sum`` before they are added, so DDP gives the one-process ``G`` and ``Q`` up to summation
order), ``weight`` (C_seen x M, float32) and ``ridge`` (the lambda in use). The 80/20 split is a seeded
permutation of the experience's samples, the same on every rank; the held-out score is computed from reduced sums
(MSE needs only ``G_val``, ``Q_val`` and the count; accuracy sums per-rank correct counts), so every rank picks the
same lambda.

Input convention: ``unit`` ([0, 1]) inputs, as the official code does not normalise ViT inputs
(``use_input_norm=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cl.components.first_session import FirstSessionAdaptation
from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.registry import register_strategy
from cl.strategy import CLStrategy
from scenarios.base import ExperienceData

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

#: the official grid, ``ridges = 10.0 ** np.arange(-8, 9)``
RIDGE_GRID = [10.0 ** k for k in range(-8, 9)]


@register_strategy("ranpac")
class RanPAC(FirstSessionAdaptation, CLStrategy):
    """Phase-1 adapter, frozen random ReLU projection, ridge regression on streamed Gram statistics (NeurIPS'23)."""

    description = "first-session adapter, random ReLU projection, streamed Gram matrix, ridge classifier (NeurIPS'23)"
    input_convention = "unit"
    drop_last = False  # the official DataLoader keeps the last partial batch
    fpf_refusal = "ranpac keeps no replay buffer and trains only in the first session; FPF does not apply"
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16",
                          "strategy.epochs=1", "strategy.adapter_width=4", "strategy.projection_dim=64"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("ranpac", "registered strategy name")
        adapt: str = opt("adapter", "phase 1 on the first experience: adapter (AdaptFormer) | none (frozen model)",
                         choices=("adapter", "none"))
        epochs: int | None = opt(20, "phase-1 epochs (official tuned_epoch: 20)", ge=1)
        lr: float = opt(0.01, "phase-1 SGD learning rate (official body_lr: 0.01)", gt=0)
        momentum: float = opt(0.9, "phase-1 SGD momentum (official: 0.9)", ge=0)
        weight_decay: float = opt(0.0005, "phase-1 weight decay (official: 0.0005)", ge=0)
        min_lr: float = opt(0.0, "eta_min of the per-epoch cosine annealing (official min_lr: 0.0)", ge=0)
        adapter_width: int = opt(64, "adapter bottleneck units (official ffn_num: 64)", ge=1)
        adapter_scale: float = opt(0.1, "fixed adapter output scale (official ffn_adapter_scalar: 0.1)", gt=0)
        adapter_dropout: float = opt(0.1, "dropout after the adapter's ReLU (official: 0.1)", ge=0)
        projection_dim: int = opt(10000, "M, the random projection's width; 0 = no projection (official M: 10000)",
                                  ge=0)
        ridge_grid: list[float] = opt(default_factory=lambda: list(RIDGE_GRID),
                                      help="lambda candidates (official: 10^-8 .. 10^8)")
        ridge_val_fraction: float = opt(0.2, "held-out share of an experience for choosing lambda (official: 0.2)",
                                        gt=0)
        ridge_criterion: str = opt("mse", "held-out score: mse of one-hot targets (official) | accuracy",
                                   choices=("mse", "accuracy"))
        ridge_every: str = opt("experience", "choose lambda at every experience (official) | first (then keep it)",
                               choices=("experience", "first"))
        ridge_search_precision: str = opt(
            "float32", "precision of the lambda search's solves: float32 (official: torch.linalg.solve in float32, "
            "which cannot resolve lambdas below ~0.1 on a singular G_fit and so never picks them) | float64 (exact)",
            choices=("float32", "float64"))
        feature_batch_size: int | None = opt(None, "batch size of feature passes (null = data.eval_batch_size)",
                                             ge=1)

        def validate(self) -> None:
            if not self.ridge_grid or any(float(r) <= 0 for r in self.ridge_grid):
                raise ConfigError(f"strategy.ridge_grid={list(self.ridge_grid)} must be a non-empty list of "
                                  "positive values")
            if self.ridge_val_fraction >= 1:
                raise ConfigError(f"strategy.ridge_val_fraction={self.ridge_val_fraction} must be in (0, 1)")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.setup_adaptation(backbone)
        d = int(backbone.num_features)
        m = int(cfg.projection_dim) or d
        self.register_buffer("w_rand", torch.zeros(d, cfg.projection_dim))  # (D, M), drawn after phase 1
        self.register_buffer("gram", torch.zeros(m, m, dtype=torch.float64))  # (M, M) = sum h^T h
        self.register_buffer("q", torch.zeros(m, 0, dtype=torch.float64))  # (M, C_seen) = sum h^T y
        self.register_buffer("weight", torch.zeros(0, m))  # (C_seen, M) ridge solution, float32
        self.register_buffer("ridge", torch.zeros((), dtype=torch.float64))  # lambda in use (0 = not chosen yet)
        self.register_buffer("projected", torch.zeros((), dtype=torch.bool))  # w_rand drawn

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self._resize(self.n_seen)
        self.start_adaptation()

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self.end_adaptation()
        self.to(ctx.device)
        if not bool(self.projected):
            self.draw_projection(ctx)
        fit, val = split_held_out(exp.train, self.cfg.ridge_val_fraction, ctx.generator("ranpac/ridge_split"))
        g_fit, q_fit, _, _ = self.gram_sums(fit, ctx)
        g_val, q_val, h_val, y_val = self.gram_sums(val, ctx, keep=self.cfg.ridge_criterion == "accuracy")
        g_fit, q_fit = ctx.dist.all_reduce_sum(g_fit), ctx.dist.all_reduce_sum(q_fit)
        g_val, q_val = ctx.dist.all_reduce_sum(g_val), ctx.dist.all_reduce_sum(q_val)
        self.gram += g_fit + g_val
        self.q += q_fit + q_val
        if self.cfg.ridge_every == "experience" or float(self.ridge) == 0.0:
            scores = self.ridge_scores(g_fit, q_fit[:, exp.classes], g_val, q_val[:, exp.classes], len(val),
                                       h_val, None if y_val is None else y_val - min(exp.classes), ctx)
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first (smallest) lambda
            self.ridge.fill_(float(self.cfg.ridge_grid[best]))
            ctx.record("ranpac/ridge_scores", [float(s) for s in scores])
        self.solve()
        ctx.record("ranpac/ridge", float(self.ridge))

    # ------------------------------------------------------------------ statistics
    def draw_projection(self, ctx: RunContext) -> None:
        """``W_rand ~ N(0, 1)`` (D x M) from a generator seeded by the run seed, identical on every rank."""
        if self.cfg.projection_dim:
            g = ctx.generator("ranpac/projection")
            self.w_rand.copy_(torch.randn(self.w_rand.shape, generator=g).to(self.w_rand.device))
        self.projected.fill_(True)

    def project(self, f: Tensor) -> Tensor:
        """``h = relu(f W_rand)`` (B, M), or ``f`` without a projection."""
        if not self.cfg.projection_dim:
            return f
        return torch.relu(f @ self.w_rand)

    @torch.no_grad()
    def gram_sums(self, data: ExperienceData, ctx: RunContext, keep: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """This rank's ``sum h^T h`` and ``sum h^T y`` (float64) over ``data``; with ``keep`` also its ``h`` and
        labels (for the accuracy criterion)."""
        was_training = self.training
        self.eval()
        m = self.gram.shape[0]
        g = torch.zeros(m, m, dtype=torch.float64, device=self.gram.device)
        q = torch.zeros(m, self.q.shape[1], dtype=torch.float64, device=self.gram.device)
        hs, ys = [], []
        if len(data):
            for x, y in ctx.loader(data, train=False, batch_size=self.cfg.feature_batch_size):
                x, y = x.to(ctx.device), y.to(ctx.device)
                h = self.project(self.features(self.eval_transform(x)))
                h64 = h.double()
                g += h64.t() @ h64
                q.index_add_(1, y, h64.t())  # column y_i gets h_i: h^T @ one_hot(y)
                if keep:
                    hs.append(h)
                    ys.append(y)
        self.train(was_training)
        if not keep:
            return g, q, None, None
        h_all = torch.cat(hs) if hs else torch.zeros(0, m, device=self.gram.device)
        y_all = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long, device=self.gram.device)
        return g, q, h_all, y_all

    def ridge_scores(self, g_fit: Tensor, q_fit: Tensor, g_val: Tensor, q_val: Tensor, n_val: int,
                     h_val: Tensor | None, y_val: Tensor | None, ctx: RunContext) -> list[float]:
        """Held-out score of each grid lambda (higher is better: minus the MSE, or the accuracy).

        ``W(lambda) = (G_fit + lambda I)^-1 Q_fit``: a float32 ``solve`` per lambda as the official code
        (``ridge_search_precision=float32``), or exactly for all lambdas from one float64 eigendecomposition. The
        squared error of the one-hot targets is ``tr(W^T G_val W) - 2 tr(W^T Q_val) + n_val`` (sums only, exact
        under DDP), divided by the number of targets as ``F.mse_loss`` does.
        """
        exact = self.cfg.ridge_search_precision == "float64"
        if exact:
            evals, evecs = torch.linalg.eigh(g_fit)  # G_fit = V diag(e) V^T
            vq = evecs.t() @ q_fit  # (M, C)
        else:
            g32, q32 = g_fit.float(), q_fit.float()
            eye32 = torch.eye(g32.shape[0], dtype=g32.dtype, device=g32.device)
        scores: list[float] = []
        for lam in self.cfg.ridge_grid:
            if exact:
                w = evecs @ (vq / (evals + float(lam)).unsqueeze(1))  # (M, C)
            else:
                # the official float32 solve: with fewer fitting rows than M (G_fit singular) it returns noise for
                # small lambdas, whose held-out error then rules them out. Exact float64 finds the error flat there
                # (the minimum-norm interpolator) and may pick 1e-8, which breaks down once the accumulated G has
                # about M samples (measured: docs/strategies/ranpac.md, "Proxy table")
                w = torch.linalg.solve(g32 + float(lam) * eye32, q32).double()
            if self.cfg.ridge_criterion == "mse":
                sq = (w * (g_val @ w)).sum() - 2 * (w * q_val).sum() + n_val
                scores.append(-float(sq) / max(1, n_val * q_fit.shape[1]))
            else:
                correct = torch.zeros((), dtype=torch.int64, device=g_fit.device)
                if h_val is not None and len(h_val):
                    correct += ((h_val.double() @ w).argmax(1) == y_val).sum()
                scores.append(float(ctx.dist.all_reduce_sum(correct)) / max(1, n_val))
        return scores

    def solve(self) -> None:
        """``W = (G + lambda I)^-1 Q`` (float64 solve, as the official ``torch.linalg.solve``)."""
        eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype, device=self.gram.device)
        w = torch.linalg.solve(self.gram + self.ridge * eye, self.q)  # (M, C_seen)
        self.weight = w.t().to(torch.float32).contiguous()

    def _resize(self, n: int) -> None:
        """Grow (or, in regrow, set) ``q`` and ``weight`` to ``n`` classes, keeping existing columns/rows."""
        old = self.q.shape[1]
        if n == old:
            return
        keep = min(n, old)
        q = torch.zeros(self.q.shape[0], n, dtype=self.q.dtype, device=self.q.device)
        w = torch.zeros(n, self.weight.shape[1], dtype=self.weight.dtype, device=self.weight.device)
        q[:, :keep], w[:keep] = self.q[:, :keep], self.weight[:keep]
        self.q, self.weight = q, w

    # ------------------------------------------------------------------ prediction
    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x)) @ self.weight.t()  # (B, C_seen)

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        return {**super().cl_structure(), "classes": int(self.q.shape[1]), **self.adaptation_structure()}

    def regrow(self, structure: dict[str, Any]) -> None:
        super().regrow(structure)
        self._resize(int(structure["classes"]))
        self.regrow_adaptation(structure)


def split_held_out(data: ExperienceData, fraction: float, generator: torch.Generator
                   ) -> tuple[ExperienceData, ExperienceData]:
    """A seeded (fit, held-out) split of ``data``; ``fraction`` of it held out, the same on every rank.

    The official code takes the first 80 % of a shuffled loader's features to fit and the rest to score.
    """
    perm = torch.randperm(len(data), generator=generator).numpy()
    n_fit = int(len(data) * (1.0 - fraction))
    fit, val = perm[:n_fit], perm[n_fit:]
    return (ExperienceData(data.source, data.indices[fit], data.targets[fit]),
            ExperienceData(data.source, data.indices[val], data.targets[val]))
