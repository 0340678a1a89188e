"""Prefix tuning: learned key/value tokens prepended (after the CLS position) to every head's keys and values.

:class:`PrefixAttention` wraps timm's ``Attention`` at ``blocks.N.attn`` and recomputes attention with the original
``qkv`` and ``proj`` layers (and ``q_norm``/``k_norm``/``norm`` when the model has them): the base model is not
modified. With no active prefix it calls the original layer, so the model is bit-identical to the unwrapped one.

**Compensation** (LAE's adaptation-speed calibration for prefixes): after the softmax, with ``lam`` = the attention
mass on the prefix positions, the prefix weights are divided by ``lam`` (clamped at 1e-12). The prefix weights then
sum to one per query and the output is ``(1 - lam) * Attn_orig + Attn_prefix``, where ``Attn_orig`` is ordinary
attention over the real tokens and ``Attn_prefix`` attention over the prefix tokens alone.

**Identity at initialisation is impossible for a prefix**: any prefix takes mass ``lam > 0`` from the real tokens,
so the output is ``(1 - lam) * Attn_orig + (lam or 1) * Attn_prefix``, not ``Attn_orig``, whatever the value tokens
are. LAE initialises the tokens uniform(0, 0.01), so the prefix is *near* identity. What holds exactly (tested):
the wrapper without an active prefix reproduces the original attention bit for bit; the output decomposes exactly as
above; as the prefix logits go to -inf (``lam -> 0``) the uncompensated output tends to the original.

Reference: Li & Liang, Prefix-Tuning, ACL'21; LAE (Gao et al., ICCV'23), whose ``Prefix`` this follows: length 10,
position 1 (after CLS), uniform(0, 0.01) tokens times a learnable scale (init 1), compensation on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from cl.peft.adapter import Scale
from cl.peft.inject import PETSpec, PETWrapper

__all__ = ["AttentionPrefixSpec", "Prefix", "PrefixAttention", "PrefixSpec"]


class Prefix(nn.Module):
    """``length`` key and value tokens of width ``dim`` (= heads x head_dim), each scaled by a :class:`Scale`."""

    def __init__(self, dim: int, length: int = 10, position: int = 1, compensation: bool = True,
                 scale: str = "learnable", init_range: float = 0.01) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        self.length, self.position, self.compensation = length, position, compensation
        self.key = nn.Parameter(torch.empty(length, dim).uniform_(0.0, init_range))
        self.value = nn.Parameter(torch.empty(length, dim).uniform_(0.0, init_range))
        self.key_scale = Scale(scale)
        self.value_scale = Scale(scale)

    def tokens(self) -> tuple[Tensor, Tensor]:
        return self.key_scale(self.key), self.value_scale(self.value)  # (L, dim) each

    def insert(self, t: Tensor, tokens: Tensor) -> Tensor:
        """Insert (L, heads*hd) tokens into (B, heads, N, hd) keys/values at ``position``."""
        b, h, _, hd = t.shape
        p = tokens.reshape(self.length, h, hd).permute(1, 0, 2).unsqueeze(0).expand(b, -1, -1, -1)
        s = min(self.position, t.shape[2])
        return torch.cat([t[:, :, :s], p.to(t.dtype), t[:, :, s:]], dim=2)

    def compensate(self, attn: Tensor) -> Tensor:
        """Divide the prefix weights (B, h, N, N+L)[..., s:s+L] by their sum ``lam`` (no-op without compensation)."""
        if not self.compensation:
            return attn
        s, t = self.position, self.position + self.length
        lam = attn[..., s:t].sum(dim=-1, keepdim=True)
        return torch.cat([attn[..., :s], attn[..., s:t] / lam.clamp(min=1e-12), attn[..., t:]], dim=-1)


class PrefixAttention(PETWrapper):
    """timm ``Attention`` with the active :class:`Prefix` (at most one) inserted into its keys and values."""

    def attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(post-softmax, post-compensation attention (B, h, N, N+L), values (B, h, N+L, hd)) for input x."""
        a = self.base_layer
        (prefix,) = self.active_modules()
        b, n, _ = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, hd)
        q, k = a.q_norm(q), a.k_norm(k)
        pk, pv = prefix.tokens()
        k, v = prefix.insert(k, pk), prefix.insert(v, pv)  # (B, h, N+L, hd)
        attn = (q * a.scale) @ k.transpose(-2, -1)
        attn = a.attn_drop(attn.softmax(dim=-1))
        return prefix.compensate(attn), v

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        a = self.base_layer
        if not self.active:
            return a(x, attn_mask=attn_mask, is_causal=is_causal)
        if len(self.active) > 1:
            raise RuntimeError(f"PrefixAttention: one active prefix at a time, got {self.active}")
        if attn_mask is not None or is_causal:
            raise NotImplementedError("PrefixAttention does not support attention masks")
        b, n, _ = x.shape
        gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
        attn, v = self.attention(x)
        out = (attn @ v).transpose(1, 2).reshape(b, n, a.num_heads * a.head_dim)  # (B, N, h*hd)
        out = getattr(a, "norm", nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return a.proj_drop(a.proj(out))


class AttentionPrefixSpec(PETSpec):
    """Base of every spec whose module sits in ``blocks.N.attn`` (a timm ``Attention``) behind
    :class:`PrefixAttention`: LAE's :class:`PrefixSpec`, the fed prefixes of L2P/DualPrompt, CODA-Prompt's pool."""

    wrapper: ClassVar[type[PETWrapper]] = PrefixAttention

    def target(self, block: int) -> str:
        return f"blocks.{block}.attn"

    @staticmethod
    def attention_width(base_layer: nn.Module) -> int:
        """The width of the prefix tokens (heads x head dim) of a plain timm ``Attention``; a clear error otherwise."""
        if isinstance(base_layer, PETWrapper) or not all(hasattr(base_layer, a) for a in ("qkv", "proj", "num_heads")):
            raise ValueError(f"a prefix needs a plain timm Attention at blocks.N.attn, got {type(base_layer).__name__}")
        return base_layer.num_heads * base_layer.head_dim


@dataclass
class PrefixSpec(AttentionPrefixSpec):
    """Prefix tokens in ``blocks.N.attn`` (a timm ``Attention``). LAE: length 10, position 1, compensation on."""

    length: int = 10
    position: int = 1
    compensation: bool = True
    scale: str = "learnable"
    init_range: float = 0.01

    def build(self, base_layer: nn.Module) -> nn.Module:
        return Prefix(self.attention_width(base_layer), self.length, self.position, self.compensation, self.scale,
                      self.init_range)
