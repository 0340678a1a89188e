"""Bottleneck adapter: ``s * Up(act(Down(u)))``, zero-initialised up projection (an identity at initialisation).

Placements on a timm ViT block (``x <- x + attn(LN1(x)); x <- x + mlp(LN2(x))``):

* ``AdapterSpec(placement="attn")`` (LAE): parallel to attention on ``u = LN1(x)``,
  ``x <- x + attn(u) + s * A(u)``; wraps ``blocks.N.attn``.
* ``AdapterSpec(placement="mlp", input="residual", activation="relu", scale="none")`` (SEMA): parallel to the MLP on
  the raw post-attention residual ``r``, ``x <- r + mlp(LN2(r)) + A(r)``; wraps ``blocks.N.mlp`` and taps the input
  of ``blocks.N.norm2``.
* ``placement="mlp"`` with ``input="normed"``: AdaptFormer-style, on ``LN2(r)``.
* ``mode="sequential"``: ``h <- h + A(h)`` after the sub-block's output.

References: Houlsby et al., ICML'19 (adapters); LAE (Gao et al., ICCV'23); SEMA (Wang et al., CVPR'25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from cl.peft.inject import ParallelWrapper, PETSpec, PETWrapper, SequentialWrapper

__all__ = ["Scale", "Adapter", "AdapterSpec", "io_dims"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Scale(nn.Module):
    """Output scale of a PET module: ``none`` (x1), ``fixed`` (a constant) or ``learnable`` (a scalar parameter)."""

    def __init__(self, mode: str = "learnable", value: float = 1.0) -> None:
        super().__init__()
        if mode not in ("none", "fixed", "learnable"):
            raise ValueError(f"scale must be none|fixed|learnable, got '{mode}'")
        self.mode = mode
        if mode == "learnable":
            self.scale = nn.Parameter(torch.tensor(float(value)))
        else:
            self.value = 1.0 if mode == "none" else float(value)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "learnable":
            return x * self.scale
        return x if self.mode == "none" else x * self.value

    def extra_repr(self) -> str:
        return self.mode if self.mode != "fixed" else f"fixed={self.value}"


class Adapter(nn.Module):
    """``s * Up(act(Down(u)))``.

    Args:
        in_dim: input width. out_dim: output width (default ``in_dim``).
        width: bottleneck units: an ``int`` is the number of units (LAE's 5, SEMA's 16), a ``float`` a ratio of
            ``in_dim`` (0.25 -> in_dim // 4).
        activation: ``gelu`` or ``relu``. scale / scale_value: see :class:`Scale`.

    Down: kaiming-uniform(a=sqrt(5)) weight (nn.Linear's default), zero bias. Up: weight and bias zero, so the
    output is exactly zero at initialisation.
    """

    def __init__(self, in_dim: int, width: int | float, out_dim: int | None = None, activation: str = "gelu",
                 scale: str = "learnable", scale_value: float = 1.0) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ValueError(f"adapter width must be a positive int (units) or float (ratio), got {width!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"adapter activation must be one of {sorted(_ACTIVATIONS)}, got '{activation}'")
        hidden = width if isinstance(width, int) else max(1, round(width * in_dim))
        self.down = nn.Linear(in_dim, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden, out_dim or in_dim)
        self.scale = Scale(scale, scale_value)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, u: Tensor) -> Tensor:
        return self.scale(self.up(self.act(self.down(u))))


def io_dims(layer: nn.Module) -> tuple[int, int]:
    """(input, output) width of a Linear, a timm ``Attention`` (qkv/proj) or ``Mlp`` (fc1/fc2)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if hasattr(layer, "qkv") and hasattr(layer, "proj"):
        return layer.qkv.in_features, layer.proj.out_features
    if hasattr(layer, "fc1") and hasattr(layer, "fc2"):
        return layer.fc1.in_features, layer.fc2.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[0], layer.normalized_shape[0]
    raise ValueError(f"cannot infer the width of {type(layer).__name__}; wrap a Linear, Attention or Mlp")


@dataclass
class AdapterSpec(PETSpec):
    """Where and what bottleneck adapter to inject (see the module docstring for the placements).

    Attributes:
        width: int = units, float = ratio of the model width. activation: ``gelu`` | ``relu``.
        scale: ``none`` | ``fixed`` | ``learnable``; scale_value: its (initial) value.
        placement: ``attn`` or ``mlp`` (the sub-block the adapter sits beside or after).
        mode: ``parallel`` or ``sequential``.
        input: for parallel adapters, ``normed`` (the sub-block's own input, LN output) or ``residual`` (the
            un-normalised residual stream that enters the block's norm: ``norm1`` for attn, ``norm2`` for mlp).
    """

    width: int | float = 5
    activation: str = "gelu"
    scale: str = "learnable"
    scale_value: float = 1.0
    placement: str = "attn"
    mode: str = "parallel"
    input: str = "normed"

    wrapper: ClassVar[type[PETWrapper]] = ParallelWrapper

    def __post_init__(self) -> None:
        if self.placement not in ("attn", "mlp"):
            raise ValueError(f"adapter placement must be attn|mlp, got '{self.placement}'")
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"adapter mode must be parallel|sequential, got '{self.mode}'")
        if self.input not in ("normed", "residual"):
            raise ValueError(f"adapter input must be normed|residual, got '{self.input}'")
        if self.mode == "sequential" and self.input == "residual":
            raise ValueError("a sequential adapter reads the sub-block output; input=residual needs mode=parallel")
        self.wrapper = ParallelWrapper if self.mode == "parallel" else SequentialWrapper

    def target(self, block: int) -> str:
        return f"blocks.{block}.{self.placement}"

    def tap(self, block: int) -> str | None:
        if self.input != "residual":
            return None
        return f"blocks.{block}.{'norm1' if self.placement == 'attn' else 'norm2'}"

    def build(self, base_layer: nn.Module) -> nn.Module:
        d_in, d_out = io_dims(base_layer)
        if self.mode == "sequential":
            d_in = d_out
        return Adapter(d_in, self.width, d_out, self.activation, self.scale, self.scale_value)
