"""``coda_prompt``: attention-weighted prompt components, new ones per experience, old ones frozen (CVPR'23).

Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, Arbelle, Panda, Feris, Kira. "CODA-Prompt: COntinual Decomposed
Attention-based Prompting for Rehearsal-Free Continual Learning", CVPR 2023 (arXiv 2211.13218). Follows the official
code (GT-RIPL/CODA-Prompt@6417d4f: ``models/zoo.py`` ``CodaPrompt``/``ViTZoo``, ``models/vit.py``,
``learners/prompt.py``, ``learners/default.py``, ``configs/*_prompt.yaml``, ``experiments/*.sh``):

* **Query**: a forward of the same frozen ViT *without* prompts, under ``no_grad``; ``q`` = the final-norm [CLS]
  token (B, D).
* **Components** at every prompted block ``l`` (``blocks``, 0-4): keys ``K`` (M, D), attention vectors ``A`` (M, D),
  prompt components ``P`` (M, L, D), M = ``pool_size`` (100), L = ``prompt_length`` (8). The weight of component
  ``m`` is the cosine similarity of the attended query with its key, ``alpha_m = cos(q * A_m, K_m)``, and the prompt
  is ``sum_m alpha_m P_m`` (B, L, D): its first L/2 tokens are prefix keys, the last L/2 prefix values, prepended
  (before [CLS]) to every head's keys and values (prefix tuning, no attention compensation).
* **Growth**: every experience adds ``pool_size // n_experiences`` components per block (10 of 100 on 10 tasks),
  initialised by classical Gram-Schmidt: standard-normal draws made orthogonal to every earlier component (and to
  each other), then unit-normalised; ``P`` is orthogonalised flattened to (M, L*D). Earlier components, keys and
  attention vectors are frozen (the official code slices ``K[:s].detach()``; here they are separate parameters with
  ``requires_grad=False``). Evaluation uses every component so far.
* **Loss**: cross-entropy over the seen classes with the logits of earlier experiences' classes set to -inf (the
  ``Prompt.update_model`` heuristic), plus the orthogonality penalty
  ``ortho_mu * sum_l [mean((K K^T - I)^2) + mean((A A^T - I)^2) + mean((P P^T - I)^2)]`` over all components so far.
  The published runs use ``ortho_mu = 0`` ("with updated code, now can be 0", ``experiments/*.sh``).
* **Classifier**: one ``nn.Linear(D, n_classes)`` for the whole stream (PyTorch's default init), logits sliced to the
  seen classes; earlier classes' rows get no gradient through the masked logits.
* **Optimiser**: a fresh Adam per experience (lr 0.001, betas (0.9, 0.999), weight decay 0) over the prompt
  parameters and the classifier; the official ``CosineSchedule`` per epoch as it runs: their own ``_LRScheduler``
  (``utils/schedulers.py``) resets ``last_epoch`` to -1 after its initial step, so the first ``scheduler.step()``
  gives the base rate again and epoch ``e`` runs at ``lr * cos(99 pi max(e - 1, 0) / (200 (E-1)))``: factors 1, 1,
  0.93, 0.71, 0.39 over 5 epochs (the formula read literally would end at 0.016; measured in the parity replay,
  ``benchmarks/parity/official/coda_prompt.py --check-run``). Batch 128, 20 epochs CIFAR-100 (10 tasks), 50
  ImageNet-R (10 tasks).
* **Inputs**: raw [0, 1] (``dataloaders/utils.py`` normalises with mean 0 and std 1), ``input_convention = "unit"``.

DDP: the components are ordinary parameters (DDP's gradient all-reduce keeps them identical); the Gram-Schmidt
draws use ``ctx.generator("coda_init/<block>")``, the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.peft import AttentionPrefixSpec, active_adapters, inject
from cl.registry import register_strategy
from cl.strategy import CLStrategy

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

CODA = "coda"


def gram_schmidt(old: Tensor, n_new: int, generator: torch.Generator | None = None) -> Tensor:
    """``n_new`` unit rows orthogonal to the rows of ``old`` (S, D) and to each other (classical Gram-Schmidt).

    As the official ``CodaPrompt.gram_schmidt``: each new vector is a standard-normal draw minus its projections on
    every earlier vector (old rows and the new rows before it, not yet normalised), redrawn if an earlier vector is
    ~0; the new rows are normalised at the end. Needs ``S + n_new <= D``.
    """
    s, d = old.shape
    if s + n_new > d:
        raise ValueError(f"cannot make {s + n_new} orthogonal vectors in {d} dimensions")
    basis = [u for u in old.double()]
    new: list[Tensor] = []
    for _ in range(n_new):
        v = torch.randn(d, generator=generator, dtype=torch.float64)
        u = v.clone()
        for b in basis:
            u -= (v @ b) / (b @ b) * b
        basis.append(u)
        new.append(u)
    out = torch.stack(new) if new else old.new_zeros(0, d, dtype=torch.float64)
    return (out / out.norm(dim=1, keepdim=True)).to(old.dtype)


def ortho_penalty(t: Tensor) -> Tensor:
    """``mean((t t^T - I)^2)`` of an (M, D) matrix: 0 when its rows are orthonormal (official ``ortho_penalty``)."""
    return ((t @ t.T - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)) ** 2).mean()


class CodaPool(nn.Module):
    """One block's prompt components: keys, attention vectors and prompts in chunks (one per experience).

    Used as a prefix in :class:`cl.peft.PrefixAttention`: set :attr:`query` (B, D) before the backbone forward;
    :meth:`tokens` then returns the attention-weighted prompt split into (B, L/2, dim) keys and values.
    """

    position: ClassVar[int] = 0  # prepended before [CLS], as the official Attention's torch.cat((pk, k))

    def __init__(self, dim: int, key_dim: int, length: int) -> None:
        super().__init__()
        if length < 2 or length % 2:
            raise ValueError(f"CODA prompt length must be even and >= 2 (key and value halves), got {length}")
        self.dim, self.key_dim, self.length = dim, key_dim, length
        self.keys = nn.ParameterList()  # chunk i: (M_i, key_dim)
        self.attn = nn.ParameterList()  # chunk i: (M_i, key_dim)
        self.prompts = nn.ParameterList()  # chunk i: (M_i, length, dim)
        self.query: Tensor | None = None

    @property
    def sizes(self) -> list[int]:
        return [int(k.shape[0]) for k in self.keys]

    def grow(self, n: int, generator: torch.Generator | None = None) -> None:
        """Add ``n`` Gram-Schmidt components orthogonal to every earlier one; freeze the earlier chunks."""
        for p in self.parameters():
            p.requires_grad_(False)
        dev = self.keys[0].device if len(self.keys) else torch.device("cpu")
        k, a, p = self.all_components()
        flat = p.reshape(p.shape[0], self.length * self.dim)
        new_p = gram_schmidt(flat.detach().cpu(), n, generator).reshape(n, self.length, self.dim)
        new_k = gram_schmidt(k.detach().cpu(), n, generator)
        new_a = gram_schmidt(a.detach().cpu(), n, generator)
        self.prompts.append(nn.Parameter(new_p.to(dev)))
        self.keys.append(nn.Parameter(new_k.to(dev)))
        self.attn.append(nn.Parameter(new_a.to(dev)))

    def regrow(self, sizes: list[int]) -> None:
        """Empty chunks of the given sizes (values come from the state dict), all but the last frozen."""
        for n in sizes:
            for pl in (self.keys, self.attn):
                pl.append(nn.Parameter(torch.zeros(int(n), self.key_dim)))
            self.prompts.append(nn.Parameter(torch.zeros(int(n), self.length, self.dim)))
        for i, chunk in enumerate(zip(self.keys, self.attn, self.prompts)):
            for t in chunk:
                t.requires_grad_(i == len(self.keys) - 1)

    def all_components(self) -> tuple[Tensor, Tensor, Tensor]:
        """(K (M, Dk), A (M, Dk), P (M, L, D)) over every chunk (empty tensors before the first)."""
        if not len(self.keys):
            z = torch.zeros(0, self.key_dim)
            return z, z, torch.zeros(0, self.length, self.dim)
        return torch.cat(list(self.keys)), torch.cat(list(self.attn)), torch.cat(list(self.prompts))

    def weights(self, q: Tensor) -> Tensor:
        """alpha (B, M): cosine similarity of the attended query ``q * A_m`` with key ``K_m``."""
        k, a, _ = self.all_components()
        aq = torch.einsum("bd,kd->bkd", q, a)  # (B, M, Dk)
        return torch.einsum("bkd,kd->bk", F.normalize(aq, dim=2), F.normalize(k, dim=1))

    def prompt(self, q: Tensor) -> Tensor:
        """The attention-weighted prompt (B, L, D) for queries ``q`` (B, Dk)."""
        _, _, p = self.all_components()
        return torch.einsum("bk,kld->bld", self.weights(q), p)

    def ortho_loss(self) -> Tensor:
        k, a, p = self.all_components()
        return ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p.reshape(p.shape[0], self.length * self.dim))

    # -------------------------------------------------------------- the prefix interface of PrefixAttention
    def tokens(self) -> tuple[Tensor, Tensor]:
        if self.query is None:
            raise RuntimeError("CodaPool: set .query before a prompted forward")
        p = self.prompt(self.query)
        half = self.length // 2
        return p[:, :half], p[:, half:]  # (B, L/2, D) keys, values

    def insert(self, t: Tensor, tokens: Tensor) -> Tensor:
        """Prepend per-sample (B, L/2, heads*hd) tokens to (B, heads, N, hd) keys/values."""
        b, h, _, hd = t.shape
        p = tokens.reshape(b, -1, h, hd).permute(0, 2, 1, 3)
        return torch.cat([p.to(t.dtype), t], dim=2)

    def compensate(self, attn: Tensor) -> Tensor:
        return attn  # plain prefix tuning: no LAE compensation

    def extra_repr(self) -> str:
        return f"dim={self.dim}, length={self.length}, chunks={self.sizes}"


@dataclass
class CodaSpec(AttentionPrefixSpec):
    """A :class:`CodaPool` inside ``blocks.N.attn`` (a timm ``Attention``), wrapped by ``PrefixAttention``."""

    length: int = 8

    def build(self, base_layer: nn.Module) -> nn.Module:
        dim = self.attention_width(base_layer)
        return CodaPool(dim, dim, self.length)


@register_strategy("coda_prompt")
class CodaPrompt(CLStrategy):
    """Attention-weighted prompt components on a frozen ViT; new components per experience (CVPR'23)."""

    description = "frozen ViT + attention-weighted prefix components, new per experience, old frozen (CVPR'23)"
    input_convention = "unit"
    fpf_refusal = ("CODA-Prompt keeps no replay buffer and its backbone is frozen; FPF's buffer fine-tuning of "
                   "backbone modules does not apply")
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16", "strategy.epochs=2",
                          "strategy.blocks=[0,1]", "strategy.pool_size=20", "strategy.prompt_length=4",
                          "strategy.ortho_mu=0.1", "strategy.lr=0.01"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("coda_prompt", "registered strategy name")
        lr: float = opt(0.001, "Adam learning rate (paper: 0.001)", gt=0)
        betas: list[float] = opt(default_factory=lambda: [0.9, 0.999], help="Adam betas (official: momentum, 0.999)")
        weight_decay: float = opt(0.0, "Adam weight decay (paper: 0)", ge=0)
        epochs: int | None = opt(20, "epochs per experience (paper: 20 CIFAR-100, 50 ImageNet-R)", ge=1)
        schedule: str = opt("cosine", "lr schedule per epoch: cosine (the official CosineSchedule) | constant",
                            choices=("cosine", "constant"))
        pool_size: int = opt(100, "prompt components per block over the whole stream (paper: 100)", ge=1)
        prompt_length: int = opt(8, "prompt tokens per component: L/2 prefix keys + L/2 values (paper: 8)", ge=2)
        blocks: list[int] = opt(default_factory=lambda: [0, 1, 2, 3, 4], help="ViT blocks that get prompts")
        ortho_mu: float = opt(0.0, "weight of the orthogonality penalty (published runs: 0.0)", ge=0)

        def validate(self) -> None:
            if self.prompt_length % 2:
                raise ConfigError(f"strategy.prompt_length={self.prompt_length} must be even (key and value halves)")
            if not self.blocks or any(int(b) < 0 for b in self.blocks):
                raise ConfigError(f"strategy.blocks={list(self.blocks)} must be a non-empty list of block indices")
            if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
                raise ConfigError(f"strategy.betas={list(self.betas)} must be two numbers in [0, 1)")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        depth = len(getattr(backbone, "blocks", []))
        if not depth:
            raise ConfigError("strategy=coda_prompt needs a timm ViT backbone with `blocks` "
                              f"(got {type(backbone).__name__})")
        bad = [int(b) for b in cfg.blocks if int(b) >= depth]
        if bad:
            raise ConfigError(f"strategy.blocks={list(cfg.blocks)}: blocks {bad} do not exist in a {depth}-block "
                              "backbone")
        dim = int(backbone.num_features)
        if cfg.pool_size > dim:
            raise ConfigError(f"strategy.pool_size={cfg.pool_size} exceeds the ViT width {dim}: Gram-Schmidt cannot "
                              "make the keys orthogonal (use pool_size <= width)")
        backbone.requires_grad_(False)
        self.blocks = sorted({int(b) for b in cfg.blocks})
        created = inject(backbone, self.blocks, CodaSpec(length=int(cfg.prompt_length)), name=CODA)
        self.pools: list[CodaPool] = list(created.values())  # plain list: the modules live inside the backbone
        self.classifier = nn.Linear(dim, n_classes)
        self.known = 0  # first label of the current experience: older classes' logits are masked in training

    # ------------------------------------------------------------------ CL hooks
    def components_per_experience(self, ctx: RunContext) -> int:
        n_exp = len(ctx.scenario.experiences)
        per = self.cfg.pool_size // n_exp
        if per < 1:
            raise ConfigError(f"strategy.pool_size={self.cfg.pool_size} gives no component per experience for "
                              f"{n_exp} experiences")
        return per

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        self.known = self.n_seen
        super().on_experience_start(exp, ctx)
        per = self.components_per_experience(ctx)
        for b, pool in zip(self.blocks, self.pools):
            pool.grow(per, ctx.generator(f"coda_init/{b}"))

    # ------------------------------------------------------------------ model
    def query(self, x: Tensor) -> Tensor:
        """The frozen ViT's [CLS] feature without prompts (no gradient), as ``ViTZoo.forward``."""
        with torch.no_grad(), active_adapters(self.backbone, []):
            return self.backbone(x)

    def prompted_features(self, x: Tensor) -> Tensor:
        q = self.query(x)
        for pool in self.pools:
            pool.query = q
        try:
            return self.backbone(x)
        finally:
            for pool in self.pools:
                pool.query = None

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.prompted_features(x))[:, : self.n_seen]

    def ortho_loss(self) -> Tensor:
        return sum((pool.ortho_loss() for pool in self.pools), torch.zeros((), device=self.classifier.weight.device))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.known > 0:  # the official heuristic: CE over the current experience's classes only
            old = torch.arange(logits.shape[1], device=logits.device) < self.known
            logits = logits.masked_fill(old, -math.inf)
        loss = F.cross_entropy(logits, y)
        if self.cfg.ortho_mu > 0:
            loss = loss + self.cfg.ortho_mu * self.ortho_loss()
        self.log_train_loss(loss)
        return loss

    def lr_factor(self, epoch: int, epochs: int) -> float:
        """The official ``CosineSchedule`` as it runs: cos(99 pi (e - 1) / (200 (E - 1))) at epoch e >= 1, 1.0 at
        epoch 0 (their ``_LRScheduler`` starts one step behind, see the module docstring; 1.0 throughout when
        E = 1)."""
        if self.cfg.schedule == "constant" or epochs <= 1:
            return 1.0
        return math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (epochs - 1)))

    def configure_optimizers(self) -> Any:
        # a fresh Adam per experience (learn_batch re-inits it) over the prompts and the classifier
        params = [p for pool in self.pools for p in pool.parameters() if p.requires_grad]
        params += list(self.classifier.parameters())
        opt_ = torch.optim.Adam(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas), weight_decay=self.cfg.weight_decay)
        epochs = max(1, int(self.phase.epochs or self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt_, lambda e: self.lr_factor(e, epochs))
        return {"optimizer": opt_, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        return {**super().cl_structure(), "chunks": self.pools[0].sizes, "known": self.known}

    def regrow(self, structure: dict[str, Any]) -> None:
        super().regrow(structure)
        dev = self.classifier.weight.device
        for pool in self.pools:
            if not len(pool.keys):
                pool.regrow([int(n) for n in structure["chunks"]])
                pool.to(dev)
        self.known = int(structure["known"])
