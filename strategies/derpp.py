"""``derpp``: Dark Experience Replay++ (logit matching plus label replay), mammoth style.

Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020
(arXiv 2004.07211). Every step: CE on the current batch; plus ``alpha`` * MSE between the logits of one replayed
batch and the logits stored when those samples entered the buffer; plus ``beta`` * CE on a second, independently
drawn replayed batch. The current batch enters the reservoir with its (augmented-input) logits, as in mammoth.

Stored logits have the width of the classes seen at insertion time (mammoth's single head has every class from the
start, ours grows): the MSE compares each sample's valid columns only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.config import StrategyConfig, opt
from cl.registry import register_strategy
from strategies.er import ReplayBase


@register_strategy("derpp")
class DERpp(ReplayBase):
    """DER++: CE + alpha * logit MSE on replay + beta * CE on replay."""

    description = "DER++: replay with stored-logit MSE (alpha) and label CE (beta) (mammoth derpp)"
    contract_overrides = ["backbone=mlp", "strategy.buffer_size=64", "strategy.epochs=1"]
    store_logits = True

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("derpp", "registered strategy name")
        lr: float = opt(0.03, "SGD learning rate (mammoth best for seq-cifar10, buffer 500)", gt=0)
        momentum: float = opt(0.0, "SGD momentum (mammoth uses none)", ge=0)
        buffer_size: int = opt(500, "reservoir buffer capacity (samples)", ge=1)
        minibatch_size: int | None = opt(None, "global replay batch size; null = data.batch_size", ge=1)
        alpha: float = opt(0.2, "weight of the MSE to stored logits (mammoth best, buffer 500)", ge=0)
        beta: float = opt(0.5, "weight of the CE on replayed labels (mammoth best, buffer 500)", ge=0)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, raw = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        n = self.replay_n()
        rep = self.replay_batch(n, "derpp/a")
        if rep is not None:
            out = self(rep["x"])
            k = min(out.shape[1], rep["logits"].shape[1])
            valid = torch.arange(k, device=out.device).view(1, -1) < rep["logit_width"].view(-1, 1)
            mse = ((out[:, :k] - rep["logits"][:, :k]).pow(2) * valid).sum() / valid.sum().clamp_min(1)
            rep2 = self.replay_batch(n, "derpp/b")
            assert rep2 is not None
            loss = loss + self.cfg.alpha * mse + self.cfg.beta * F.cross_entropy(self(rep2["x"]), rep2["y"])
        self.replay_buffer.add(raw, y, task=self.exp_index, logits=logits.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss
