"""LoRA: a low-rank delta ``s * B A x`` added to a Linear's output; ``B`` starts at zero (identity at init).

* :class:`LoRA` on any Linear (``LoRASpec(target="attn.proj")``, ``"mlp.fc1"``, ...).
* :class:`KVLoRA` on timm's fused ``qkv`` Linear (``LoRASpec(target="attn.qkv", slices="kv")``, LAE's ``KVLoRA``):
  only the K and V thirds of the output get ``s_k B_k A_k x`` and ``s_v B_v A_v x``; Q is untouched.

Both sit in a :class:`~cl.peft.inject.ParallelWrapper`, so ``y = W x + b + delta(x)``: the same as adding
``s * B A`` to ``W`` (LAE adds it to the weight; this computes it on the activations, equal up to rounding).
Init: A kaiming-uniform(a=sqrt(5)), B zeros; scales learnable (init 1) as in LAE, or ``none``/``fixed``.

Reference: Hu et al., LoRA, ICLR'22; LAE (Gao et al., ICCV'23) for KVLoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cl.peft.adapter import Scale
from cl.peft.inject import PETSpec

__all__ = ["LoRA", "KVLoRA", "LoRASpec"]


class LoRA(nn.Module):
    """``s * (x @ A^T) @ B^T`` with A (rank, in), B (out, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int = 5, scale: str = "learnable",
                 scale_value: float = 1.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = Scale(scale, scale_value)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale((x @ self.lora_A.t()) @ self.lora_B.t())


class KVLoRA(nn.Module):
    """LoRA on the K and V slices of a fused ``qkv`` Linear of output ``3 * dim``; the Q slice gets zeros."""

    def __init__(self, in_features: int, dim: int, rank: int = 5, scale: str = "learnable",
                 scale_value: float = 1.0) -> None:
        super().__init__()
        self.dim = dim
        self.k = LoRA(in_features, dim, rank, scale, scale_value)
        self.v = LoRA(in_features, dim, rank, scale, scale_value)

    def forward(self, x: Tensor) -> Tensor:
        dk, dv = self.k(x), self.v(x)  # (..., dim) each
        return torch.cat([torch.zeros_like(dk), dk, dv], dim=-1)  # (..., 3*dim), timm's q|k|v layout


@dataclass
class LoRASpec(PETSpec):
    """LoRA on ``blocks.N.<target>`` (a Linear). ``slices="kv"`` on ``attn.qkv`` gives LAE's KVLoRA.

    Attributes:
        rank: the rank r. target: the Linear's path inside a block. slices: ``all`` or ``kv`` (fused qkv only).
        scale / scale_value: ``none`` | ``fixed`` | ``learnable`` and its (initial) value.
    """

    rank: int = 5
    target_path: str = "attn.qkv"
    slices: str = "kv"
    scale: str = "learnable"
    scale_value: float = 1.0

    def __post_init__(self) -> None:
        if self.slices not in ("all", "kv"):
            raise ValueError(f"LoRA slices must be all|kv, got '{self.slices}'")

    def target(self, block: int) -> str:
        return f"blocks.{block}.{self.target_path}"

    def build(self, base_layer: nn.Module) -> nn.Module:
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"LoRA wraps a Linear, got {type(base_layer).__name__} at '{self.target_path}'")
        if self.slices == "kv":
            if base_layer.out_features % 3:
                raise ValueError(f"slices=kv needs a fused qkv Linear (out = 3*dim), got out={base_layer.out_features}")
            return KVLoRA(base_layer.in_features, base_layer.out_features // 3, self.rank, self.scale,
                          self.scale_value)
        return LoRA(base_layer.in_features, base_layer.out_features, self.rank, self.scale, self.scale_value)
