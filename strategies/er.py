"""``er``: experience replay with a reservoir buffer, mammoth style.

Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019 (arXiv 1902.10486); the form follows the
mammoth library's ``er`` (Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS 2020). Every
step: draw a replay mini-batch from the buffer, apply the training augmentation, concatenate it with the current
batch, one forward and one cross-entropy over the union; then offer the current batch (raw, not augmented) to the
reservoir. One growing head over all seen classes (heads concatenated, all trainable: the same function as
mammoth's single head restricted to seen classes, except that logits of unseen classes do not exist yet).

Under DDP the buffer is identical on every rank (:mod:`cl.components.buffer`), every rank draws the same global
replay batch (seeded by the step counter) and takes its shard ``rank::world``, as the data loader does with the
current batch; BatchNorm running statistics are made equal after each fit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from cl.components.buffer import ReservoirBuffer
from cl.components.fpf import broadcast_bn_buffers
from cl.config import StrategyConfig, opt
from cl.registry import register_strategy
from cl.strategy import CLStrategy, IncrementalClassifier

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


class ReplayBase(CLStrategy):
    """A growing head, a reservoir buffer (``replay_buffer``, lent to the FPF add-on) and a step counter."""

    store_logits = False

    def __init__(self, cfg: Any, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.classifier = IncrementalClassifier(backbone.num_features)
        self.replay_buffer = ReservoirBuffer(cfg.buffer_size, n_logits=n_classes if self.store_logits else 0)
        self.steps = 0  # optimizer steps over the whole run: seeds the replay draws, resumes with extra_state
        # the buffer is already identical on every rank: keep DDP from broadcasting it before every forward
        self._ddp_params_and_buffers_to_ignore = self.replay_buffer.ddp_ignore_names("replay_buffer")

    # ---------------------------------------------------------------------------------------------- CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        if self.n_seen > self.classifier.n_classes:
            self.classifier.grow(self.n_seen - self.classifier.n_classes)
        self.replay_buffer.seed = _seed_from("buffer", ctx.cfg.seed)  # same on every rank and after a resume
        sample = exp.train.source[int(exp.train.indices[0])]
        self.replay_buffer.allocate(tuple(sample.shape), ctx.device)  # before the first fit wraps the model in DDP

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        # ask the trainer, not self.training: Lightning prefetches the first batch of a fit before it calls train()
        if self._trainer is not None and self.trainer.training:
            return self.train_transform(x), y, x  # keep the raw batch for the buffer
        return self.eval_transform(x), y

    def replay_batch(self, n: int, tag: str) -> dict[str, Tensor] | None:
        """This rank's shard of a global replay batch of ``n`` (transformed), or None while the buffer is empty."""
        rank, world = _rank_world()
        idx = self.replay_buffer.sample_indices(n, self.replay_buffer.generator("replay", tag, self.steps),
                                                rank, world)
        if len(idx) == 0:
            return None
        batch = self.replay_buffer.get(idx)
        batch["x"] = self.train_transform(batch["x"])
        return batch

    def replay_n(self) -> int:
        """Global replay batch size: ``minibatch_size`` or the global training batch of this fit."""
        if self.cfg.minibatch_size:
            return int(self.cfg.minibatch_size)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(dm, "batch_size", 0) or 32)

    def compute_signature(self) -> int:
        """Replay samples per step: the FLOPs callback measures a step again when this changes."""
        return min(len(self.replay_buffer), self.replay_n())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1

    def on_train_end(self) -> None:
        broadcast_bn_buffers(self)

    # ---------------------------------------------------------------------------------------------- state
    def cl_structure(self) -> dict:
        return {**super().cl_structure(), "heads": self.classifier.sizes}

    def regrow(self, structure: dict) -> None:
        super().regrow(structure)
        self.classifier.regrow(structure["heads"])

    def extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.trainable_parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)


def _seed_from(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@register_strategy("er")
class ER(ReplayBase):
    """Experience replay (mammoth ``er``): CE on the concatenation of the current and a replayed batch."""

    description = "experience replay: reservoir buffer, replayed batch concatenated every step (mammoth er)"
    contract_overrides = ["backbone=mlp", "strategy.buffer_size=64", "strategy.epochs=1"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("er", "registered strategy name")
        lr: float = opt(0.1, "SGD learning rate (mammoth best for seq-cifar10, buffer 500)", gt=0)
        momentum: float = opt(0.0, "SGD momentum (mammoth uses none)", ge=0)
        buffer_size: int = opt(500, "reservoir buffer capacity (samples)", ge=1)
        minibatch_size: int | None = opt(None, "global replay batch size; null = data.batch_size", ge=1)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, raw = batch
        rep = self.replay_batch(self.replay_n(), "er")
        if rep is not None:
            x, y = torch.cat([x, rep["x"]]), torch.cat([y, rep["y"]])
        loss = F.cross_entropy(self(x), y)
        self.replay_buffer.add(raw, batch[1], task=self.exp_index)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss
