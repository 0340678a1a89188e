"""``sema``: Self-Expansion of pre-trained models with Mixture of Adapters (SEMA).

Wang et al., "Self-Expansion of Pre-trained Models with Mixture of Adapters for Continual Learning", CVPR 2025
(arXiv 2403.18886); official code ``huiyiwang01/SEMA-CL@5a45512``. Spec: ``shared/specs/sema.md``.

A frozen timm ViT gets a *functional adapter* (Down -> ReLU -> Up, zero-init Up, no scaling) beside the MLP of
every block, fed with the un-normalised residual stream ``r`` after attention (placed with :mod:`cl.peft`)::

    block(x):  r = x + attn(norm1(x));   out = r + mlp(norm2(r)) + sum_k w_k(r) * adapter_k(r)

In the *expandable* blocks (the last three by default) each adapter comes with a *representation descriptor* (RD,
a linear autoencoder on the token-mean of ``r``) whose recent reconstruction losses are kept in a sliding window,
and a router column; the router's softmax mixes the block's adapters. Experience 0 trains the adapters, routers and
the classifier (functional phase), then the RDs (RD phase). Each later experience first runs *detection*: the new
data is scored under every RD of the expandable blocks, shallow to deep, as ``z = |loss - mean| / (std + eps)``
against its window; a block where even the most familiar RD has a batch-mean z above ``threshold`` gets a new
adapter, RD and router column, which train while everything old stays frozen. As in the official
``_detect_outlier``, the scan then goes on with the next batch of the same pass (every block not yet grown in this
experience stays eligible, shallower ones included), and passes repeat until one adds nothing; at most one adapter
per block per experience. If no block expands, only the classifier trains.

Deviations from the official code, all numerically neutral or required here:

* modules are injected into an unmodified timm ``VisionTransformer`` with :func:`cl.peft.inject` (``blocks.N.mlp``
  becomes a parallel wrapper whose module reads the input tapped at ``blocks.N.norm2``); q, k, v stay fused;
* the router is one ``Linear(D, 1)`` per adapter (the official code concatenates such columns, then merges them);
* RD inputs are detached (the official gradients to earlier modules are computed but never applied);
* detection decides on statistics summed over DDP ranks, and RD windows are filled from all-gathered losses in
  global batch order, so every rank grows the same architecture and holds the same windows;
* ``detect_on=all`` (the paper: "scan all samples") is offered beside the code's per-batch decision (default).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.peft import Adapter, AdapterSpec, inject, io_dims
from cl.registry import register_strategy
from cl.strategy import CLStrategy, Phase

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

__all__ = ["RepresentationDescriptor", "AdapterMixture", "MixtureSpec", "inject_mixtures", "SEMA"]

#: the name of SEMA's modules in the :mod:`cl.peft` wrappers (``blocks.N.mlp.pet_modules.sema``)
PET_NAME = "sema"


# ------------------------------------------------------------------------------------------------ building blocks


class RepresentationDescriptor(nn.Module):
    """Linear autoencoder on a block's token-mean feature, with a sliding window of its reconstruction losses.

    The window (``record``, ``count``) is a buffer, so checkpoints and the DDP state hashes carry it.
    """

    def __init__(self, dim: int, latent: int, window: int, eps: float) -> None:
        super().__init__()
        self.enc = nn.Linear(dim, latent)
        self.dec = nn.Linear(latent, dim)
        nn.init.zeros_(self.enc.bias)
        nn.init.zeros_(self.dec.bias)
        self.eps = eps
        self.register_buffer("record", torch.zeros(window))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def loss(self, feat: Tensor) -> Tensor:
        """Per-sample mean squared reconstruction error. ``feat`` (B, D) -> (B,)."""
        return (self.dec(self.enc(feat)) - feat).pow(2).mean(dim=1)

    def push(self, losses: Tensor) -> None:
        """Append losses to the window, keeping the most recent ``window`` values."""
        n = int(self.count)
        merged = torch.cat([self.record[:n], losses.detach().to(self.record)])[-self.record.numel():]
        self.record[: merged.numel()] = merged
        self.count.fill_(merged.numel())

    def stats(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased standard deviation of the window."""
        vals = self.record[: int(self.count)]
        return vals.mean(), vals.std(unbiased=True)

    def z_score(self, losses: Tensor) -> Tensor:
        """``|loss - mean| / (std + eps)`` per sample; zero while the window holds two values or fewer."""
        if int(self.count) <= 2:
            return torch.zeros_like(losses)
        mean, std = self.stats()
        return (losses - mean).abs() / (std + self.eps)


class AdapterMixture(nn.Module):
    """The adapters of one block; in an expandable block also their RDs and router columns.

    ``forward(r)`` with ``r`` (B, N, D) returns ``sum_k w_k * adapter_k(r)`` where ``w = softmax(router(mean_N r))``;
    a non-expandable block holds exactly one adapter and no router. With ``capture`` set, the token mean of ``r``
    (the RD input) is kept in ``captured`` for the RD phase and detection.
    """

    def __init__(self, dim: int, hidden: int, expandable: bool, rd_latent: int, window: int, eps: float) -> None:
        super().__init__()
        self.dim, self.hidden, self.expandable = dim, hidden, expandable
        self.rd_latent, self.window, self.eps = rd_latent, window, eps
        self.adapters = nn.ModuleList()
        self.descriptors = nn.ModuleList()
        self.router = nn.ModuleList()  # one Linear(D, 1) column per adapter
        self.capture = False
        self.captured: Tensor | None = None

    def __len__(self) -> int:
        return len(self.adapters)

    def add(self, device: torch.device | None = None) -> None:
        """Append an adapter (plus RD and router column when expandable) on ``device`` (default: the old ones')."""
        if len(self.adapters) and not self.expandable:
            raise RuntimeError("a non-expandable block holds exactly one adapter")
        if device is None and len(self.adapters):
            device = next(self.parameters()).device
        # the functional adapter: Down(D -> hidden) -> ReLU -> Up, zero-init Up, no output scale
        self.adapters.append(Adapter(self.dim, self.hidden, activation="relu", scale="none").to(device))
        if self.expandable:
            rd = RepresentationDescriptor(self.dim, self.rd_latent, self.window, self.eps)
            self.descriptors.append(rd.to(device))
            self.router.append(nn.Linear(self.dim, 1).to(device))

    def weights(self, r: Tensor) -> Tensor:
        """Router softmax weights (B, K) from the token mean of ``r``."""
        pooled = r.mean(dim=1)
        return torch.softmax(torch.cat([col(pooled) for col in self.router], dim=1), dim=1)

    def forward(self, r: Tensor) -> Tensor:
        if self.capture:
            self.captured = r.detach().mean(dim=1)  # (B, D): RDs see detached features only
        if not self.expandable:
            return self.adapters[0](r)
        w = self.weights(r)  # (B, K)
        out = torch.stack([a(r) for a in self.adapters], dim=1)  # (B, K, N, D)
        return torch.einsum("bk,bknd->bnd", w, out)


@dataclass
class MixtureSpec(AdapterSpec):
    """SEMA's placement of :mod:`cl.peft`'s adapter (parallel to the MLP, reading the raw residual entering
    ``norm2``), holding an :class:`AdapterMixture` instead of a single adapter."""

    placement: str = "mlp"
    input: str = "residual"
    activation: str = "relu"
    scale: str = "none"
    expandable: bool = False
    rd_latent: int = 128
    window: int = 500
    eps: float = 1e-8

    def build(self, base_layer: nn.Module) -> nn.Module:
        dim, _ = io_dims(base_layer)
        return AdapterMixture(dim, int(self.width), self.expandable, self.rd_latent, self.window, self.eps)


def inject_mixtures(vit: nn.Module, hidden: int, expandable: set[int], rd_latent: int, window: int,
                    eps: float) -> list[AdapterMixture]:
    """Put an (empty) mixture beside the MLP of every block of a timm ViT; returns them in block order."""
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not all(hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks):
        raise ConfigError("strategy=sema needs a timm VisionTransformer backbone (blocks.N.norm2/.mlp), e.g. "
                          "backbone=vit_p4_w64_d4 or backbone=timm backbone.model=vit_base_patch16_224")
    created: dict[str, nn.Module] = {}
    for flag in (False, True):
        ids = [i for i in range(len(blocks)) if (i in expandable) == flag]
        spec = MixtureSpec(width=hidden, expandable=flag, rd_latent=rd_latent, window=window, eps=eps)
        created.update(inject(vit, ids, spec, name=PET_NAME))
    return [created[MixtureSpec().target(i)] for i in range(len(blocks))]


def round_z(sums: Tensor) -> list[float]:
    """Mean z per RD from ``[sum_1, ..., sum_K, count]``, rounded for metrics.json."""
    n = max(sums[-1].item(), 1.0)
    return [round(v / n, 4) for v in sums[:-1].tolist()]


def _n_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ------------------------------------------------------------------------------------------------ the strategy


@register_strategy("sema")
class SEMA(CLStrategy):
    """SEMA (CVPR'25): frozen ViT + self-expanding mixtures of adapters; see the module docstring."""

    description = "self-expanding mixture of adapters with representation descriptors (frozen ViT)"
    input_convention = "unit"  # the official code feeds ToTensor() images, no normalisation
    drop_last = False  # the official (PILOT) loader keeps the last partial batch
    phases_replayable = False  # the expansion test between phases reads the trained adapters (resume re-runs them)
    fpf_refusal = "SEMA trains no backbone layers; FPF has nothing to fine-tune"
    contract_overrides = [
        "backbone=vit", "backbone.width=32", "backbone.depth=2", "backbone.heads=2", "backbone.patch=4",
        "strategy.epochs=1", "strategy.rd_epochs=1", "strategy.adapter_dim=4", "strategy.rd_dim=8",
        "strategy.window=64", "strategy.detect_batch=32", "strategy.expandable_blocks=[-1]",
    ]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("sema", "registered strategy name")
        lr: float = opt(0.005, "SGD learning rate of adapters, router columns and classifier", gt=0)
        momentum: float = opt(0.9, "SGD momentum (both phases)", ge=0)
        weight_decay: float = opt(5e-4, "SGD weight decay (both phases)", ge=0)
        epochs: int | None = opt(5, "functional-phase epochs (func_epoch; also the classifier-only phase)", ge=1)
        rd_lr: float = opt(0.01, "SGD learning rate of the representation descriptors", gt=0)
        rd_epochs: int = opt(20, "RD-phase epochs (rd_epoch)", ge=1)
        adapter_dim: int = opt(16, "functional adapter bottleneck width", ge=1)
        rd_dim: int = opt(128, "representation descriptor latent width", ge=1)
        window: int = opt(500, "RD loss record window (most recent per-sample losses)", ge=3)
        threshold: float = opt(2.0, "expansion threshold on the mean z-score (exp_threshold)", ge=0)
        eps: float = opt(1e-8, "added to the window's std in z-scores (a constant window gives no NaN)", gt=0)
        detect_batch: int = opt(128, "global batch size of the detection pass", ge=1)
        detect_on: str = opt("batch", "batch: expand at the first batch whose mean z exceeds the threshold (code); "
                             "all: decide on the mean over the whole experience (paper's wording)",
                             choices=("batch", "all"))
        expandable_blocks: list[int] = opt(default_factory=lambda: [-3, -2, -1],
                                           help="indices of blocks that may expand (negative = from the end)")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        depth = len(getattr(backbone, "blocks", []))
        expandable = set()
        for i in cfg.expandable_blocks:
            if not -depth <= int(i) < depth:
                raise ConfigError(f"strategy.expandable_blocks: block {i} does not exist in a {depth}-block ViT")
            expandable.add(int(i) % depth)
        backbone.requires_grad_(False)
        mixtures = inject_mixtures(backbone, cfg.adapter_dim, expandable, cfg.rd_dim, cfg.window, cfg.eps)
        self.mixtures = mixtures  # plain list: the modules live at backbone.blocks.N.mlp.pet_modules.sema
        self.expandable = sorted(expandable)
        # one full-size classifier for the whole stream; logits are sliced to the seen classes
        self.classifier = nn.Linear(backbone.num_features, n_classes)
        nn.init.zeros_(self.classifier.bias)
        self.known = 0  # first label of the current experience: older logits are masked in the CE
        self.expansions: list[list[int]] = []  # blocks expanded at each experience
        self._detect_log: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))[:, : self.n_seen]

    @contextmanager
    def capturing(self) -> Iterator[list[AdapterMixture]]:
        """Keep the RD inputs (token means of ``r``) of the expandable blocks during the enclosed forwards."""
        mixes = [self.mixtures[b] for b in self.expandable]
        for m in mixes:
            m.capture = True
        try:
            yield mixes
        finally:
            for m in mixes:
                m.capture, m.captured = False, None

    @torch.no_grad()
    def novelty(self, x: Tensor) -> dict[int, list[float]]:
        """Mean z-score of each RD of each expandable block on transformed inputs ``x`` (what detection sees)."""
        with self.capturing() as mixes:
            self.backbone(x)
            return {b: [rd.z_score(rd.loss(m.captured)).mean().item() for rd in m.descriptors]
                    for b, m in zip(self.expandable, mixes)}

    # ------------------------------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self.known = min(exp.classes)
        if len(self.mixtures[0]) == 0:  # the first experience: one adapter per block
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ctx.seed_for("sema/init"))
                for m in self.mixtures:
                    m.add(self.classifier.weight.device)

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        self._detect_log = {}
        if not self.expansions:  # experience 0 trains every adapter, router and the classifier, then the RDs
            self.expansions.append([])
            self._set_trainable([*self.mixtures], adapters=True)
            yield Phase("func", epochs=self.cfg.epochs)
            self._set_trainable([self.mixtures[b] for b in self.expandable], descriptors=True)
            yield Phase("rd", epochs=self.cfg.rd_epochs)
            self._set_trainable([])
            self.expansions[-1] = list(range(len(self.mixtures)))  # every block got its first adapter
            return
        expanded: list[int] = []
        self.expansions.append(expanded)
        # Official rule (models/sema.py::_detect_outlier + SEMAModules.forward): every expandable block that has not
        # grown in this experience stays eligible, shallower ones too; after an expansion the scan CONTINUES over the
        # rest of the pass with the new module in place, and passes repeat until one adds nothing.
        pass_ = 0
        while True:
            added = False
            for block in self._detect_pass(exp, ctx, expanded, pass_):
                added = True
                expanded.append(block)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(ctx.seed_for(f"sema/expand{block}"))
                    self.mixtures[block].add(self.classifier.weight.device)
                self._set_trainable([self.mixtures[block]], adapters=True, newest_only=True)
                yield Phase(f"func{block}", epochs=self.cfg.epochs)
                self._set_trainable([self.mixtures[block]], descriptors=True, newest_only=True)
                yield Phase(f"rd{block}", epochs=self.cfg.rd_epochs)
                self._set_trainable([])
            pass_ += 1
            if not added or len(expanded) == len(self.expandable):
                break
        if not expanded:
            self._set_trainable([])
            yield Phase("classifier", epochs=self.cfg.epochs)

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self._set_trainable([])
        adapters = [m.adapters for m in self.mixtures]
        routers = [m.router for m in self.mixtures]
        ctx.record("sema/adapters_per_block", [len(m) for m in self.mixtures])
        ctx.record("sema/expanded_blocks", list(self.expansions[-1]))
        ctx.record("sema/added_params", _n_params(adapters + routers))
        ctx.record("sema/rd_params", _n_params([m.descriptors for m in self.mixtures]))
        if self._detect_log:
            ctx.record("sema/detect_z", self._detect_log)

    # ------------------------------------------------------------------------------------------ detection
    def _detect_pass(self, exp: Experience, ctx: RunContext, grown: list[int], pass_: int) -> Iterator[int]:
        """One detection pass over the experience; yields each block to expand, resuming the scan after it trains.

        The eligible blocks are the expandable ones not in ``grown`` (updated by the caller between yields). Each
        global batch contributes per-RD sums of z and a sample count, summed over ranks, so every rank takes the
        same decisions at the same batch. With ``detect_on=batch`` (official code) the shallowest eligible block
        whose every RD has a batch-mean z above the threshold expands at that batch and the scan goes on with the
        next batch; with ``all`` the means over the whole pass decide once, at its end.
        """
        loader = ctx.loader(exp.train, train=True, batch_size=self.cfg.detect_batch, tag=f"sema/detect{pass_}")
        sums: dict[int, Tensor] = {}  # per block: per-RD z sums over the batches it was eligible for, then count
        log = self._detect_log.setdefault(f"round{pass_}", {})
        for x, _ in loader:
            candidates = [b for b in self.expandable if b not in grown]
            if not candidates:
                break
            batch = self._batch_z_sums(ctx, self.train_transform(x.to(ctx.device)), candidates)
            for b, t in batch.items():
                sums[b] = t if b not in sums or sums[b].numel() != t.numel() else sums[b] + t
            if self.cfg.detect_on == "batch":
                found = self._decide(batch, candidates)
                if found is not None:
                    log[f"expand{found}"] = round_z(batch[found])
                    yield found
        for b, t in sums.items():
            log[str(b)] = round_z(t)
        if self.cfg.detect_on == "all":
            candidates = [b for b in self.expandable if b not in grown and b in sums]
            found = self._decide(sums, candidates)
            if found is not None:
                yield found

    @torch.no_grad()
    def _batch_z_sums(self, ctx: RunContext, x: Tensor, candidates: list[int]) -> dict[int, Tensor]:
        """Per candidate block: the z sums of its RDs on ``x`` and the sample count, summed over ranks."""
        was_training = self.training
        self.to(ctx.device).eval()  # the official pass runs the model in eval mode (no window updates)
        try:
            with self.capturing():
                self.backbone(x)
                parts = [torch.stack([rd.z_score(rd.loss(self.mixtures[b].captured)).double().sum()
                                      for rd in self.mixtures[b].descriptors]).cpu() for b in candidates]
        finally:
            self.train(was_training)
        sizes = [p.numel() for p in parts]
        flat = ctx.dist.all_reduce_sum(torch.cat([*parts, torch.tensor([float(len(x))], dtype=torch.float64)]))
        out, start = {}, 0
        for b, k in zip(candidates, sizes):
            out[b] = torch.cat([flat[start:start + k], flat[-1:]])
            start += k
        return out

    def _decide(self, sums: dict[int, Tensor], candidates: list[int]) -> int | None:
        """The shallowest candidate whose most familiar RD (min over its RDs) has a mean z above the threshold."""
        for b in candidates:
            t = sums[b]
            count = t[-1].item()
            if count > 0 and (t[:-1] / count).min().item() > self.cfg.threshold:
                return b
        return None

    # ------------------------------------------------------------------------------------------ training
    def _set_trainable(self, mixtures: list[AdapterMixture], adapters: bool = False, descriptors: bool = False,
                       newest_only: bool = False) -> None:
        """Freeze everything, then unfreeze the named parts; the classifier trains in every functional phase."""
        for m in self.mixtures:
            m.requires_grad_(False)
        self.classifier.requires_grad_(not descriptors)
        for m in mixtures:
            pick = (lambda ml: ml[-1:]) if newest_only else (lambda ml: ml)
            if adapters:
                for mod in [*pick(m.adapters), *pick(m.router)]:
                    mod.requires_grad_(True)
            if descriptors:
                for mod in pick(m.descriptors):
                    mod.requires_grad_(True)

    def _rd_phase(self) -> bool:
        return self.phase.name.startswith("rd")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self._rd_phase():
            return self._rd_step(x)
        if self.phase.name == "classifier":
            with torch.no_grad():  # nothing below the classifier trains
                feats = self.features(x)
        else:
            feats = self.features(x)
        logits = self.classifier(feats)[:, : self.n_seen]
        if self.known > 0:  # old-class logits are masked: CE over the current experience's classes
            logits = logits.masked_fill(torch.arange(logits.shape[1], device=logits.device) < self.known, -math.inf)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _rd_step(self, x: Tensor) -> Tensor:
        """Train the RDs being fitted on detached block features; their losses fill the windows (all ranks)."""
        with torch.no_grad(), self.capturing() as mixes:
            self.features(x)
            feats = [m.captured for m in mixes]
        total = x.new_zeros(())
        for mix, feat in zip(mixes, feats):
            for rd in mix.descriptors:
                if not rd.enc.weight.requires_grad:
                    continue
                losses = rd.loss(feat)  # (B_rank,)
                total = total + losses.mean()
                rd.push(self._gather_global(losses.detach()))
        self.log("train/rd_loss", total, prog_bar=True, on_step=True, on_epoch=False)
        return total

    def _gather_global(self, t: Tensor) -> Tensor:
        """All ranks' values in global batch order (rank r holds positions r, r + world, ... of the batch)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return t
        gathered = self.all_gather(t)  # (world, B_rank)
        return gathered.transpose(0, 1).reshape(-1)

    def configure_optimizers(self) -> Any:
        lr = self.cfg.rd_lr if self._rd_phase() else self.cfg.lr
        opt = torch.optim.SGD(self.trainable_parameters(), lr=lr, momentum=self.cfg.momentum,
                              weight_decay=self.cfg.weight_decay)
        epochs = max(1, int(self.phase.epochs or self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        return {**super().cl_structure(), "adapters_per_block": [len(m) for m in self.mixtures],
                "expansions": [list(e) for e in self.expansions], "known": self.known}

    def regrow(self, structure: dict[str, Any]) -> None:
        super().regrow(structure)
        for m, k in zip(self.mixtures, structure["adapters_per_block"]):
            while len(m) < int(k):
                m.add(self.classifier.weight.device)
        self.expansions = [list(e) for e in structure["expansions"]]
        self.known = int(structure["known"])
