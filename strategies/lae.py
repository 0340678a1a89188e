"""``lae``: Learning, Accumulation and Ensemble with a general parameter-efficient module (Adapter, LoRA, Prefix).

Gao, Cen, Zhang, Zhao, Wang, Zhang. "A Unified Continual Learning Framework with General Parameter-Efficient
Tuning", ICCV 2023 (arXiv 2303.10070). Follows the official code (gqk/LAE@1680e49) as
/work/shared/specs/lae.md describes it:

* **Learning**: a frozen pre-trained ViT with an *online* PET module in blocks ``strategy.blocks`` (0-4), injected by
  module path (:mod:`cl.peft`): ``adapter`` (width 5, GELU, learnable scale, parallel to attention on LN1's output),
  ``lora`` (rank 5 on the K and V slices of the fused qkv, learnable scales) or ``prefix`` (10 key/value tokens with
  the attention compensation). One linear head per experience (N(0, 0.001^2), zero bias), old heads frozen, local
  cross-entropy on the current experience's logits. One Adam optimizer per experience (weight decay 0, constant
  lr) over the new head and the online PET. The online PET is never re-initialised.
* **Adaptation-speed calibration**: from the second experience on, the online PET is frozen for the first
  ``num_freeze_epochs`` epochs (phase ``warmup``: only the new head trains), then trains with it (phase ``joint``).
  The two phases share ONE Adam optimizer (built by the first phase's ``configure_optimizers`` and returned again
  by the second), as the official code keeps one optimizer per task; the head's Adam moments carry over.
* **Accumulation**: at the start of the second experience an *offline* PET is created as an exact copy of the
  online one; after every optimizer step (warm-up epochs included) it moves by EMA:
  ``theta_off <- mu * theta_off + (1 - mu) * theta_on`` over the whole module state, ``mu = ema_decay``.
* **Ensemble**: evaluation runs the backbone twice (online, offline PET) with the SAME heads and predicts by the
  element-wise maximum of the two softmax vectors. Passes: ``main`` (ensemble), ``online``, ``offline``
  (the latter from the second experience on; before, the ensemble is the online expert).

Deviations (also in docs/strategies/lae.md): the offline PET's tensors are *buffers*, not parameters
(:func:`cl.peft.params_to_buffers_`): they are saved and restored like parameters, but never handed to an optimizer
or to DDP's gradient reduction, and they are CL state that changes during ``fit`` like BatchNorm's running
statistics. ``forward`` returns the ensemble's max-softmax probabilities (their argmax is the prediction), not
logits. Augmentation is the scenario's batch transform. LoRA adds ``s B A x`` to the qkv output instead of adding
``s B A`` to the weight (equal up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.peft import (
    AdapterSpec,
    LoRASpec,
    PETSpec,
    PrefixSpec,
    active_adapters,
    copy_adapter,
    ema_update_,
    inject,
    pet_parameters,
)
from cl.registry import register_strategy
from cl.strategy import CLStrategy, IncrementalClassifier, Phase

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

ONLINE, OFFLINE = "online", "offline"


def pet_spec(cfg: Any) -> PETSpec:
    """The :mod:`cl.peft` spec of LAE's PET module ``cfg.pet`` (adapter | lora | prefix)."""
    if cfg.pet == "adapter":
        return AdapterSpec(width=int(cfg.adapter_width), activation="gelu", scale="learnable", placement="attn")
    if cfg.pet == "lora":
        return LoRASpec(rank=int(cfg.lora_rank), target_path="attn.qkv", slices="kv", scale="learnable")
    return PrefixSpec(length=int(cfg.prefix_length), position=1, compensation=bool(cfg.prefix_compensation))


@register_strategy("lae")
class LAE(CLStrategy):
    """Online PET + new head learn, an EMA offline PET accumulates, two experts ensemble (ICCV'23)."""

    description = "frozen ViT + adapter/LoRA/prefix, EMA offline copy, max-softmax ensemble of two experts (ICCV'23)"
    input_convention = "unit"
    fpf_refusal = ("LAE keeps no replay buffer and its backbone is frozen; FPF's buffer fine-tuning of sensitive "
                   "backbone modules does not apply")
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16", "strategy.epochs=2",
                          "strategy.num_freeze_epochs=1", "strategy.blocks=[0,1]", "strategy.ema_decay=0.9",
                          "strategy.lr=0.01"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("lae", "registered strategy name")
        pet: str = opt("adapter", "PET module: adapter | lora | prefix", choices=("adapter", "lora", "prefix"))
        lr: float = opt(2.8125e-3, "Adam learning rate, constant (paper: 0.03*24/256 CIFAR, 0.005*24/256 others)",
                        gt=0)
        weight_decay: float = opt(0.0, "Adam weight decay (paper: 0)", ge=0)
        epochs: int | None = opt(5, "epochs per experience (paper: 5 CIFAR-100, 50 ImageNet-R/DomainNet)", ge=1)
        num_freeze_epochs: int = opt(3, "epochs with a frozen online PET (head warm-up) from the 2nd experience on "
                                     "(paper: 3 of 5 CIFAR, 30 of 50 others)", ge=0)
        ema_decay: float = opt(0.9999, "EMA decay mu of the offline PET per optimizer step (paper: 0.9999)", ge=0)
        blocks: list[int] = opt(default_factory=lambda: [0, 1, 2, 3, 4], help="ViT blocks that get a PET module")
        adapter_width: int = opt(5, "adapter bottleneck units (an integer, not a ratio)", ge=1)
        lora_rank: int = opt(5, "LoRA rank on the K and V slices of qkv", ge=1)
        prefix_length: int = opt(10, "prefix key/value tokens per block", ge=1)
        prefix_compensation: bool = opt(True, "LAE's prefix attention compensation (prefix weights / their mass)")
        head_init_std: float = opt(0.001, "std of the normal init of each new head (bias 0)", gt=0)

        def validate(self) -> None:
            if self.ema_decay > 1:
                raise ConfigError(f"strategy.ema_decay={self.ema_decay} must be in [0, 1]")
            if self.epochs is not None and self.num_freeze_epochs >= self.epochs:
                raise ConfigError(f"strategy.num_freeze_epochs={self.num_freeze_epochs} must be < strategy.epochs="
                                  f"{self.epochs} (the online PET must train after its warm-up)")
            if not self.blocks or any(int(b) < 0 for b in self.blocks):
                raise ConfigError(f"strategy.blocks={list(self.blocks)} must be a non-empty list of block indices")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        depth = len(getattr(backbone, "blocks", []))
        if not depth:
            raise ConfigError(f"strategy=lae needs a timm ViT backbone with `blocks` (got {type(backbone).__name__})")
        bad = [int(b) for b in cfg.blocks if int(b) >= depth]
        if bad:
            raise ConfigError(f"strategy.blocks={list(cfg.blocks)}: blocks {bad} do not exist in a {depth}-block "
                              "backbone")
        backbone.requires_grad_(False)
        inject(backbone, [int(b) for b in cfg.blocks], pet_spec(cfg), name=ONLINE)
        self.classifier = IncrementalClassifier(backbone.num_features, init_std=cfg.head_init_std)
        self.known = 0  # classes of the experiences before the current one (K_old)
        self.ema_steps = 0  # EMA updates in the current experience (diagnostics, tests)
        self._optimizer: torch.optim.Optimizer | None = None  # shared by the phases of one experience
        self.has_offline = False  # the offline PET exists from the start of the second experience

    def create_offline(self) -> None:
        """The offline PET: an exact copy of the online one, stored as buffers (EMA state, never trained)."""
        copy_adapter(self.backbone, ONLINE, OFFLINE, as_buffers=True)
        self.has_offline = True

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self.known = self.classifier.n_classes
        if self.n_seen > self.known:
            self.classifier.grow(self.n_seen - self.known, freeze_old=True)
        if self.known > 0 and not self.has_offline:  # start of the second experience: offline = exact copy
            self.create_offline()
        self._optimizer = None
        self.ema_steps = 0

    def total_epochs(self, ctx: RunContext) -> int:
        """Epochs per experience: ``strategy.epochs``, or ``trainer.max_epochs`` when it is null (as the base class)."""
        epochs = self.cfg.epochs if self.cfg.epochs is not None else int(ctx.cfg.trainer.max_epochs)
        if self.cfg.num_freeze_epochs >= epochs:
            raise ConfigError(f"strategy.num_freeze_epochs={self.cfg.num_freeze_epochs} must be < the epochs per "
                              f"experience ({epochs}; strategy.epochs or trainer.max_epochs): the online PET must "
                              "train after its warm-up")
        return epochs

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        epochs = self.total_epochs(ctx)
        freeze = self.cfg.num_freeze_epochs if self.known > 0 else 0
        if freeze > 0:
            self.set_pet_trainable(False)  # head warm-up: the online PET waits for the new head
            yield Phase("warmup", epochs=freeze)
        self.set_pet_trainable(True)
        yield Phase("joint", epochs=epochs - freeze)

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        self._optimizer = None
        ctx.record("ema_steps", self.ema_steps)

    def eval_passes(self) -> dict[str, Callable[[Tensor], Tensor]]:
        passes: dict[str, Callable[[Tensor], Tensor]] = {"main": self, ONLINE: self.online_logits}
        if self.has_offline:
            passes[OFFLINE] = self.offline_logits
        return passes

    # ------------------------------------------------------------------ model
    def set_pet_trainable(self, flag: bool) -> None:
        for p in pet_parameters(self.backbone, ONLINE):
            p.requires_grad_(flag)

    def expert_logits(self, x: Tensor, expert: str) -> Tensor:
        with active_adapters(self.backbone, expert):
            f = self.features(x)
        return self.classifier(f) if len(self.classifier.heads) else f.new_zeros(len(f), 0)

    def online_logits(self, x: Tensor) -> Tensor:
        # evaluation: the ensemble (main) and the online/offline passes share one backbone forward per expert
        return self.batch_cached(ONLINE, x, lambda b: self.expert_logits(b, ONLINE))

    def offline_logits(self, x: Tensor) -> Tensor:
        return self.batch_cached(OFFLINE, x, lambda b: self.expert_logits(b, OFFLINE))

    def forward(self, x: Tensor) -> Tensor:
        """The ensemble: max over the two experts of their softmax (the online expert alone before it exists)."""
        on = self.online_logits(x)
        if not self.has_offline or on.shape[1] == 0:
            return on.softmax(dim=1)
        return torch.maximum(on.softmax(dim=1), self.offline_logits(x).softmax(dim=1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        with active_adapters(self.backbone, ONLINE):
            logits = self.classifier.heads[-1](self.features(x))  # local CE: the current experience's slice
        target = torch.where(y >= self.known, y - self.known, torch.full_like(y, -100))
        loss = F.cross_entropy(logits, target)
        self.log_train_loss(loss)  # only when a logger or progress bar reads it (a ms per step otherwise)
        return loss

    def configure_optimizers(self) -> Any:
        # One Adam per experience over the new head and the online PET; the second phase gets the same object.
        if self._optimizer is None:
            params = list(self.classifier.heads[-1].parameters()) + pet_parameters(self.backbone, ONLINE)
            self._optimizer = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return self._optimizer

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.has_offline:  # accumulation after EVERY step, warm-up included (online PET constant there)
            ema_update_(self.backbone, ONLINE, OFFLINE, self.cfg.ema_decay)
            self.ema_steps += 1

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict:
        return {**super().cl_structure(), "heads": self.classifier.sizes, "offline": self.has_offline}

    def regrow(self, structure: dict) -> None:
        super().regrow(structure)
        self.classifier.regrow(structure["heads"])
        self.classifier.requires_grad_(False)
        if structure.get("offline") and not self.has_offline:
            self.create_offline()
        self.known = self.classifier.n_classes
