"""``dualprompt``: a shared G-prompt in shallow blocks and task-specific E-prompts in deeper ones (ECCV'22).

Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, Perot, Dy, Pfister. "DualPrompt: Complementary Prompting for
Rehearsal-free Continual Learning", ECCV 2022 (arXiv 2204.04799). Follows the PyTorch port JH-LEE-KR/
dualprompt-pytorch@7eb457d (``prompt.py`` ``EPrompt``, ``attention.py`` ``PreT_Attention``,
``vision_transformer.py``, ``engine.py``, ``configs/cifar100_dualprompt.py``, ``configs/imr_dualprompt.py``):

* **G-prompt**: one prefix per block in ``g_layers`` ([0, 1]), ``g_length`` (5) key and ``g_length`` value tokens,
  uniform(-1, 1), shared by every experience and trained throughout (a :class:`cl.peft.Prefix` at position 0, no
  compensation, no scale).
* **E-prompts**: a :class:`cl.peft.PromptPool` of ``pool_size`` (10) entries, each a prefix of ``e_length`` (5;
  ImageNet-R 20) key and value tokens for every block in ``e_layers`` ([2, 3, 4]), and its key (D), all
  uniform(-1, 1). At training the entry of the current task is used, ids ``[t*top_k, (t+1)*top_k)``
  (``use_prompt_mask``; the query decides once they run past the pool); at test time the ``top_k`` (1) keys nearest
  the frozen query (final-norm [CLS] without prompts), with ``batchwise_prompt`` the batch's majority vote (on for
  CIFAR-100, off for ImageNet-R in the official configs). ``shared_prompt_pool``: at the start of experience ``t``
  the E-prompt of ``t-1`` is copied into entry ``t`` (keys are not copied: ``shared_prompt_key`` off).
* **Prefix tuning** (``PreT_Attention``): keys and values are prepended before [CLS] in each head of those blocks
  (:class:`cl.peft.PrefixAttention` with fed per-sample prefixes, :class:`cl.peft.FedPrefix`).
* **Head** (``head_type='token'``): one ``Linear(D, n_classes)`` (trunc-normal 0.02, bias 0) on the final-norm
  [CLS]. **Loss**: cross-entropy with logits outside the current classes at -inf (``train_mask``) minus
  ``pull_coeff`` (1.0) times ``sum(cos(q, key_selected)) / B``, the key of the task's E-prompt at training.
* **Optimiser**: as L2P (the same ``engine.py``): a new Adam per experience (0.9/0.999, eps 1e-8, wd 0), constant
  ``lr = base * batch / 256`` (CIFAR-100 0.03 * 24 / 256, ImageNet-R 0.005 * 24 / 256), gradient norm clip 1.0,
  5 epochs CIFAR-100, 50 ImageNet-R. Inputs raw [0, 1].

**The official E-prompt layout** (``official_kv_reshape``): the port gathers the prefixes as
``(layers, 2, B, k, L, heads, hd)`` and *reshapes* (not permutes) them to ``(layers, B, 2, k*L, heads, hd)``
(JH-LEE-KR/dualprompt-pytorch issue #8): with a batch-wise selection (every row the same entry) the first half of
the batch gets the entry's key tokens as both keys and values and the second half its value tokens as both; with
per-sample selection (ImageNet-R) sample ``b`` also gets the tokens selected for samples ``2b mod B`` and
``2b+1 mod B``. Off by default (keys are keys, values are values); on reproduces the port for the parity check.

Deviations (docs/strategies/dualprompt.md): as L2P (query from the same frozen weights, logits over the seen
classes, the vote per rank on its local batch under DDP, as the port per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.peft import PrefixSpec, inject
from cl.peft.prompt import FedPrefixSpec, PromptPool, feed
from cl.registry import register_strategy
from strategies.l2p import BATCHWISE, PromptPoolStrategy

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

G_PROMPT, E_PROMPT = "g_prompt", "e_prompt"


@register_strategy("dualprompt")
class DualPrompt(PromptPoolStrategy):
    """G-prompt (shared, shallow) + E-prompts (task-specific, chosen by the query), prefix tuning (ECCV'22)."""

    description = "frozen ViT + shared G-prefix (blocks 0-1) + task E-prefixes chosen by key-query (ECCV'22)"
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=3", "scenario.image_size=16", "strategy.epochs=1",
                          "strategy.g_layers=[0]", "strategy.e_layers=[1,2]", "strategy.pool_size=4",
                          "strategy.g_length=2", "strategy.e_length=2", "strategy.lr=0.01"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("dualprompt", "registered strategy name")
        lr: float = opt(2.8125e-3, "Adam learning rate, constant (paper: 0.03*24/256 CIFAR-100, 0.005*24/256 "
                        "ImageNet-R)", gt=0)
        weight_decay: float = opt(0.0, "Adam weight decay (paper: 0)", ge=0)
        epochs: int | None = opt(5, "epochs per experience (paper: 5 CIFAR-100, 50 ImageNet-R)", ge=1)
        g_layers: list[int] = opt(default_factory=lambda: [0, 1], help="blocks with the G-prompt prefix (paper: 0, 1)")
        g_length: int = opt(5, "G-prompt key (and value) tokens per block (paper: 5)", ge=1)
        e_layers: list[int] = opt(default_factory=lambda: [2, 3, 4], help="blocks with E-prompt prefixes (paper: 2-4)")
        e_length: int = opt(5, "E-prompt key (and value) tokens per block (paper: 5 CIFAR-100, 20 ImageNet-R)", ge=1)
        pool_size: int = opt(10, "E-prompts in the pool (paper: 10)", ge=1)
        top_k: int = opt(1, "E-prompts selected per input (paper: 1)", ge=1)
        batchwise_prompt: str = opt("always", "batch majority vote of the E-prompt ids: always (CIFAR-100 config), "
                                    "train, never (ImageNet-R config)", choices=BATCHWISE)
        task_prompt_train: bool = opt(True, "train the current task's E-prompt (use_prompt_mask, paper: on)")
        shared_prompt_pool: bool = opt(True, "initialise the new task's E-prompt from the previous one (paper: on)")
        pull_coeff: float = opt(1.0, "weight of the key-matching term subtracted from the loss (paper: 1.0)", ge=0)
        train_mask: bool = opt(True, "mask the logits of classes outside the current experience in training")
        official_kv_reshape: bool = opt(False, "reproduce the port's E-prefix reshape (keys/values mixed, issue #8)")
        clip_grad: float = opt(1.0, "gradient norm clip (paper: 1.0; 0 = off)", ge=0)
        head_init_std: float = opt(0.02, "trunc-normal std of the head (timm's init)", gt=0)

        def validate(self) -> None:
            if self.top_k > self.pool_size:
                raise ConfigError(f"strategy.top_k={self.top_k} must be <= strategy.pool_size={self.pool_size}")
            g, e = [int(b) for b in self.g_layers], [int(b) for b in self.e_layers]
            if not e or any(b < 0 for b in g + e) or set(g) & set(e):
                raise ConfigError(f"strategy.g_layers={g} and strategy.e_layers={e} must be disjoint block indices "
                                  "(e_layers non-empty)")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        self.g_layers, self.e_layers = [int(b) for b in cfg.g_layers], sorted(int(b) for b in cfg.e_layers)
        bad = [b for b in self.g_layers + self.e_layers if b >= self.depth]
        if bad:
            raise ConfigError(f"strategy.g_layers/e_layers: blocks {bad} do not exist in a {self.depth}-block "
                              "backbone")
        d = backbone.num_features
        for m in inject(backbone, self.g_layers, PrefixSpec(length=cfg.g_length, position=0, compensation=False,
                                                            scale="none"), name=G_PROMPT).values():
            nn.init.uniform_(m.key, -1.0, 1.0)  # the port's g_prompt: uniform(-1, 1), keys and values
            nn.init.uniform_(m.value, -1.0, 1.0)
        self.e_paths = list(inject(backbone, self.e_layers, FedPrefixSpec(), name=E_PROMPT).keys())
        # entry m: (layers, key|value, L, D), the port's (layers, 2, pool, L, heads, hd) with the pool axis first
        self.pool = PromptPool(cfg.pool_size, d, (len(self.e_layers), 2, cfg.e_length, d))
        self.last_idx: Tensor | None = None

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        k, t = self.cfg.top_k, exp.index
        if self.cfg.shared_prompt_pool and t > 0 and (t + 1) * k <= self.cfg.pool_size:
            with torch.no_grad():  # the port's "transfer previous learned prompt params to the new prompt"
                self.pool.prompt[t * k:(t + 1) * k] = self.pool.prompt[(t - 1) * k:t * k]

    # ------------------------------------------------------------------ model
    def task_ids(self, batch: int, device: torch.device) -> Tensor | None:
        """The current task's E-prompt ids (B, top_k) at training, None where the query decides."""
        k, t = self.cfg.top_k, self.exp_index
        if not (self.training and self.cfg.task_prompt_train) or t < 0 or (t + 1) * k > self.cfg.pool_size:
            return None
        return torch.arange(t * k, (t + 1) * k, device=device).unsqueeze(0).expand(batch, -1)

    def e_prefixes(self, idx: Tensor) -> Tensor:
        """Per-block prefixes (layers, B, 2, k*L, D) of the selected entries ``idx`` (B, k)."""
        b, k = idx.shape
        layers, _, length, d = self.pool.prompt.shape[1:]
        raw = self.pool.prompt[idx].permute(2, 3, 0, 1, 4, 5)  # (layers, 2, B, k, L, D), the port's gather
        if not self.cfg.official_kv_reshape:
            raw = raw.permute(0, 2, 1, 3, 4, 5)  # (layers, B, 2, k, L, D): keys stay keys
        return raw.reshape(layers, b, 2, k * length, d)

    def prompted(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query(x)
        idx = self.pool.select(q, self.cfg.top_k, batchwise=self.batchwise(),
                               forced=self.task_ids(x.shape[0], x.device))
        self.last_idx = idx
        prefixes = self.e_prefixes(idx)
        for i, path in enumerate(self.e_paths):
            feed(self.backbone.get_submodule(path), E_PROMPT, prefixes[i, :, 0], prefixes[i, :, 1])
        f = self.backbone(x)  # final-norm [CLS] with the G- and E-prefixes
        return self.head(f), self.pool.pull(q, idx)
