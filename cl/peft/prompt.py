"""Prompt pools with learnable keys (L2P, DualPrompt) and the two ways to feed their prompts to a stock timm ViT.

* :class:`PromptPool`: ``M`` prompts of any shape and ``M`` keys (M, D), both uniform(-1, 1) as the official
  PyTorch ports (JH-LEE-KR/l2p-pytorch@f7bc994 ``prompt.py``, JH-LEE-KR/dualprompt-pytorch@7eb457d ``prompt.py``).
  The query (B, D) (the frozen ViT's final-norm [CLS] without prompts) and the keys are l2-normalised
  (``x * rsqrt(max(sum x^2, 1e-12))``, their ``l2_normalize``); the top-k keys by cosine similarity are chosen per
  sample, or with ``batchwise`` the ``k`` ids chosen most often in the batch are given to every sample (their
  "majority vote", padding and ``torch.topk`` tie order included), or ``forced`` ids are used (DualPrompt's task-id
  E-prompt at training). The pull (key-matching) term is ``sum(selected_key_norm * query_norm) / B``; the
  strategies *subtract* ``coeff`` times it from the loss, as the official ``loss - coeff * reduce_sim``.
* :class:`PromptInput`: prompt tuning at the input. Wraps the layer at ``patch_drop`` (the identity after
  ``_pos_embed`` in timm's ``VisionTransformer.forward_features``) and inserts fed (B, T, D) tokens after the
  prefix (class) tokens: ``[CLS, prompts, patches]``, the official L2P layout. The strategy adds the position
  embedding (L2P's ``resize_pos_embed`` gives every prompt token the class token's position embedding).
* :class:`FedPrefix`: prefix tuning with per-sample key/value tokens, the active module of a
  :class:`~cl.peft.prefix.PrefixAttention` (reused, not rewritten): fed (B, L, heads*head_dim) keys and values
  are prepended (position 0, before [CLS]) to every head's keys and values, with no compensation, as DualPrompt's
  ``PreT_Attention``.

Fed modules hold no parameters: a strategy computes the tokens from its pool (so gradients reach the pool) and
calls :func:`feed` before the prompted forward; the tokens are dropped after one use (no graph is kept alive and
the model stays deep-copyable). A wrapper whose module is not active (``active_adapters(vit, [])``) is the
unmodified layer, bit for bit, which is how the query forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from cl.peft.inject import PETSpec, PETWrapper
from cl.peft.prefix import AttentionPrefixSpec

__all__ = ["l2_normalize", "PromptPool", "PromptInput", "PromptInputSpec", "FedPrefix", "FedPrefixSpec", "feed"]


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` with the official ports' guard ``rsqrt(max(sum x^2, eps))``."""
    square_sum = (x * x).sum(dim=dim, keepdim=True)
    return x * torch.rsqrt(torch.clamp(square_sum, min=eps))


def majority_vote(idx: Tensor, pool_size: int, top_k: int) -> Tensor:
    """The ``top_k`` prompt ids chosen most often in ``idx`` (B, k), as (top_k,), in the official ports' way.

    ``torch.unique`` (sorted) counts every chosen id; fewer than ``pool_size`` distinct ids are padded with the
    smallest chosen id and a count of 0 (a port of ``jnp.unique(size=...)``); ``torch.topk`` on the counts picks
    the winners, so ties fall as ``torch.topk`` orders them, as in the official code.
    """
    prompt_id, id_counts = torch.unique(idx, return_counts=True, sorted=True)
    if prompt_id.shape[0] < pool_size:
        pad = pool_size - prompt_id.shape[0]
        prompt_id = torch.cat([prompt_id, torch.full((pad,), int(idx.min()), device=idx.device, dtype=idx.dtype)])
        id_counts = torch.cat([id_counts, torch.zeros(pad, device=idx.device, dtype=id_counts.dtype)])
    _, major = torch.topk(id_counts, k=top_k)
    return prompt_id[major]


class PromptPool(nn.Module):
    """``size`` prompts of shape ``prompt_shape`` and ``size`` keys of width ``key_dim``, uniform(-1, 1).

    Args:
        size: pool size M.
        key_dim: query/key width D.
        prompt_shape: the shape of one prompt (L2P: (L, D); DualPrompt's prefix E-prompt: (layers, 2, L, D)).
        init: ``uniform`` (U(-1, 1), the official default) or ``zero`` for the prompts.
        key_init: the same for the keys.
    """

    def __init__(self, size: int, key_dim: int, prompt_shape: tuple[int, ...], init: str = "uniform",
                 key_init: str = "uniform") -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"prompt pool size must be >= 1, got {size}")
        self.size = size
        self.prompt = nn.Parameter(self._init(torch.empty(size, *prompt_shape), init))
        self.key = nn.Parameter(self._init(torch.empty(size, key_dim), key_init))

    @staticmethod
    def _init(t: Tensor, how: str) -> Tensor:
        if how == "uniform":
            return nn.init.uniform_(t, -1.0, 1.0)
        if how == "zero":
            return nn.init.zeros_(t)
        raise ValueError(f"prompt init must be uniform|zero, got '{how}'")

    def similarity(self, query: Tensor) -> Tensor:
        """Cosine similarity (B, M) of the queries (B, D) with every key."""
        return l2_normalize(query) @ l2_normalize(self.key).t()

    def select(self, query: Tensor, top_k: int, batchwise: bool = False, forced: Tensor | None = None) -> Tensor:
        """Prompt ids (B, top_k): the nearest keys, the batch's majority vote, or ``forced`` (B, top_k) as given."""
        if forced is not None:
            return forced
        with torch.no_grad():
            _, idx = torch.topk(self.similarity(query), k=top_k, dim=1)  # (B, k)
            if batchwise:
                idx = majority_vote(idx, self.size, top_k).expand(query.shape[0], -1).contiguous()
        return idx

    def pull(self, query: Tensor, idx: Tensor) -> Tensor:
        """The key-matching term ``sum_b sum_k cos(q_b, key_{idx[b, k]}) / B`` (the official ``reduce_sim``)."""
        q = l2_normalize(query).unsqueeze(1)  # (B, 1, D)
        keys = l2_normalize(self.key)[idx]  # (B, k, D)
        return (keys * q).sum() / query.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, prompt_shape={tuple(self.prompt.shape[1:])}, key_dim={self.key.shape[1]}"


class _Fed(nn.Module):
    """Holds tokens fed for the next forward pass; they are read once and dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._tokens: tuple[Tensor, ...] | None = None

    def feed(self, *tokens: Tensor) -> None:
        self._tokens = tokens

    def take(self) -> tuple[Tensor, ...]:
        t, self._tokens = self._tokens, None
        if t is None:
            raise RuntimeError(f"{type(self).__name__}: no prompt was fed for this forward pass (call feed first)")
        return t


class PromptInput(PETWrapper):
    """Insert fed (B, T, D) prompt tokens after the ``n_prefix`` class tokens of the wrapped layer's output."""

    def __init__(self, base_layer: nn.Module, n_prefix: int = 1) -> None:
        super().__init__(base_layer)
        self.n_prefix = n_prefix

    def forward(self, x: Tensor) -> Tensor:
        x = self.base_layer(x)
        if not self.active:
            return x
        (module,) = self.active_modules()
        (prompts,) = module.take()  # (B, T, D)
        s = self.n_prefix
        return torch.cat([x[:, :s], prompts.to(x.dtype), x[:, s:]], dim=1)


class FedPrefix(_Fed):
    """Per-sample prefix keys/values for :class:`PrefixAttention`: fed (B, L, heads*head_dim) each, position 0."""

    position: int = 0

    def tokens(self) -> tuple[Tensor, Tensor]:
        k, v = self.take()
        return k, v

    def insert(self, t: Tensor, tokens: Tensor) -> Tensor:
        """Prepend (B, L, h*hd) tokens to (B, h, N, hd) keys or values: (B, h, L+N, hd)."""
        b, h, _, hd = t.shape
        p = tokens.reshape(b, -1, h, hd).permute(0, 2, 1, 3)
        return torch.cat([p.to(t.dtype), t], dim=2)

    def compensate(self, attn: Tensor) -> Tensor:
        return attn  # plain prefix tuning (DualPrompt's PreT_Attention): no LAE compensation


@dataclass
class PromptInputSpec(PETSpec):
    """Prompt tuning at the input of a timm ViT: wraps ``patch_drop`` (the block index is ignored)."""

    wrapper: ClassVar[type[PETWrapper]] = PromptInput

    def target(self, block: int) -> str:
        return "patch_drop"

    def make_wrapper(self, base_layer: nn.Module, tap: object) -> PETWrapper:
        return PromptInput(base_layer)

    def build(self, base_layer: nn.Module) -> nn.Module:
        return _Fed()


@dataclass
class FedPrefixSpec(AttentionPrefixSpec):
    """Fed per-sample prefixes in ``blocks.N.attn`` (a timm ``Attention``), reusing :class:`PrefixAttention`."""

    def build(self, base_layer: nn.Module) -> nn.Module:
        self.attention_width(base_layer)  # the same clear error as LAE's prefix for a wrong target
        return FedPrefix()


def feed(wrapper: PETWrapper, name: str, *tokens: Tensor) -> None:
    """Give module ``name`` of ``wrapper`` its tokens for the next forward pass."""
    wrapper.pet_modules[name].feed(*tokens)
