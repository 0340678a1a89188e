"""``l2p``: Learning to Prompt, a key-query prompt pool on a frozen pre-trained ViT (CVPR'22).

Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy, Pfister. "Learning to Prompt for Continual Learning", CVPR 2022
(arXiv 2112.08654). Follows the PyTorch port the papers' numbers are usually taken from,
JH-LEE-KR/l2p-pytorch@f7bc994 (``prompt.py``, ``vision_transformer.py``, ``engine.py``, ``main.py``,
``configs/cifar100_l2p.py``):

* **Query**: a forward of the same frozen ViT *without* prompts (the official ``original_model``, a second copy of
  the same pre-trained weights, all frozen): the final-norm [CLS] token (B, D), under ``no_grad``.
* **Pool** (:class:`cl.peft.PromptPool`): ``pool_size`` 10 prompts of ``prompt_length`` 5 tokens (D wide) and 10
  keys (D), all uniform(-1, 1) (``prompt_init``/``prompt_key_init`` 'uniform'). Selection: the ``top_k`` 5 keys of
  highest cosine similarity with the query; with ``batchwise_prompt`` (official: on, at training AND at test time)
  the 5 ids chosen most often in the batch are used for every sample of the batch (``majority_vote``).
* **Prompt tuning at the input**: the selected prompts (B, k*L, D), each token plus the class token's position
  embedding (the port's ``resize_pos_embed`` expands the [CLS] position to the prompt positions), are inserted after
  [CLS]: ``[CLS, prompts, patches]`` (:class:`cl.peft.PromptInput` at ``patch_drop``).
* **Head** (``head_type='prompt'``): one ``Linear(D, n_classes)`` for the whole stream (timm init: trunc-normal
  std 0.02, bias 0) on the mean of the prompt tokens' outputs after the final norm; ``token`` uses [CLS] instead.
* **Loss**: cross-entropy with every logit outside the current experience's classes set to -inf (``train_mask``),
  minus ``pull_coeff`` (0.1) times the key-matching term ``sum(cos(q, k_selected)) / B`` (``pull_constraint``).
* **Optimiser**: Adam (betas 0.9/0.999, eps 1e-8, weight decay 0), constant ``lr = 0.03 * batch / 256``
  (0.001875 at batch 16, the port's ``unscale_lr`` scaling by the per-device batch), re-created at every experience
  (``reinit_optimizer``), gradient norm clipped at 1.0 (``clip_grad``); 5 epochs per experience on CIFAR-100.
  Trainable: the pool (prompts and keys) and the head; patch embedding, blocks, norms, [CLS] and positions frozen.
* **Inputs**: raw [0, 1] (``datasets.py``: RandomResizedCrop(scale 0.05-1) + flip + ``ToTensor``, no
  normalisation), ``input_convention = "unit"``; the official loader keeps the last partial batch.

Deviations (docs/strategies/l2p.md): the query uses the prompted model's own frozen weights instead of a second
copy (the same values, half the memory); ``forward`` returns logits over the seen classes only (the official
evaluation takes the argmax over all classes of the stream, untrained rows included); under DDP the batch-wise vote
is taken per rank on its local batch, as the official code does per GPU (so a DDP run selects as a single process
with that per-device batch would, and the vote never needs a collective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig, opt
from cl.errors import ConfigError
from cl.peft import active_adapters, inject
from cl.peft.prompt import PromptInputSpec, PromptPool, feed
from cl.registry import register_strategy
from cl.strategy import CLStrategy

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience

PROMPT = "prompt"
BATCHWISE = ("always", "train", "never")


class PromptPoolStrategy(CLStrategy):
    """What L2P and DualPrompt share: the frozen query, the whole-stream head with the training mask, the pull
    term, one Adam per experience with gradient-norm clipping (both official ports use the same ``engine.py``)."""

    input_convention = "unit"
    drop_last = False  # the official DataLoader keeps the last partial batch
    fpf_refusal = ("prompt-pool methods keep no replay buffer and their backbone is frozen; FPF's buffer "
                   "fine-tuning of sensitive backbone modules does not apply")

    def __init__(self, cfg: Any, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        depth = len(getattr(backbone, "blocks", []))
        if not depth or not hasattr(backbone, "pos_embed"):
            raise ConfigError(f"strategy={cfg.name} needs a timm VisionTransformer backbone (got "
                              f"{type(backbone).__name__})")
        self.depth = depth
        backbone.requires_grad_(False)
        self.head = nn.Linear(backbone.num_features, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.head_init_std)  # timm init_weights_vit_timm
        nn.init.zeros_(self.head.bias)
        self.current: list[int] = []  # classes of the current experience (the training mask)

    # ------------------------------------------------------------------ CL hooks
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        super().on_experience_start(exp, ctx)
        self.current = sorted(int(c) for c in exp.classes)

    # ------------------------------------------------------------------ model
    def batchwise(self) -> bool:
        """Whether this forward selects prompts by the batch's majority vote (``batchwise_prompt``)."""
        mode = self.cfg.batchwise_prompt
        return mode == "always" or (mode == "train" and self.training)

    def query(self, x: Tensor) -> Tensor:
        """The frozen ViT's final-norm [CLS] without any prompt (B, D): the official ``original_model`` output."""
        with torch.no_grad(), active_adapters(self.backbone, []):
            return self.backbone(x)

    def prompted(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """(logits over the whole stream (B, n_classes), pull term) for a batch."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.prompted(x)[0][:, : self.n_seen]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits, pull = self.prompted(x)
        if self.cfg.train_mask:  # the official "trick": only the current experience's classes compete
            keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            keep[self.current] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        else:
            logits = logits[:, : self.n_seen]
        loss = F.cross_entropy(logits, y) - self.cfg.pull_coeff * pull
        self.log_train_loss(loss)
        return loss

    def configure_optimizers(self) -> Any:
        # a new Adam per experience (reinit_optimizer): each fit calls this once
        return torch.optim.Adam(self.trainable_parameters(), lr=self.cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=self.cfg.weight_decay)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # the official engine clips the total gradient norm at clip_grad (1.0) every step
        clip = self.cfg.clip_grad if gradient_clip_val is None else gradient_clip_val
        if clip and clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict:
        return {**super().cl_structure(), "current": list(self.current)}

    def regrow(self, structure: dict) -> None:
        super().regrow(structure)
        self.current = [int(c) for c in structure.get("current", [])]


@register_strategy("l2p")
class L2P(PromptPoolStrategy):
    """A pool of input prompts chosen by key-query matching on a frozen ViT (CVPR'22)."""

    description = "frozen ViT + prompt pool with learnable keys, top-k by the frozen query, input prompts (CVPR'22)"
    contract_overrides = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16", "strategy.epochs=1",
                          "strategy.pool_size=4", "strategy.top_k=2", "strategy.prompt_length=2", "strategy.lr=0.01"]

    @dataclass
    class Config(StrategyConfig):
        name: str = opt("l2p", "registered strategy name")
        lr: float = opt(1.875e-3, "Adam learning rate, constant (paper: 0.03 * 16 / 256)", gt=0)
        weight_decay: float = opt(0.0, "Adam weight decay (paper: 0)", ge=0)
        epochs: int | None = opt(5, "epochs per experience (paper: 5 on CIFAR-100)", ge=1)
        pool_size: int = opt(10, "prompts in the pool (paper: 10)", ge=1)
        prompt_length: int = opt(5, "tokens per prompt (paper: 5)", ge=1)
        top_k: int = opt(5, "prompts selected per input (paper: 5)", ge=1)
        batchwise_prompt: str = opt("always", "batch majority vote of the prompt ids: always (official: training "
                                    "and test), train, never (per-sample top-k)", choices=BATCHWISE)
        pull_coeff: float = opt(0.1, "weight of the key-matching term subtracted from the loss (paper: 0.1)", ge=0)
        train_mask: bool = opt(True, "mask the logits of classes outside the current experience in training")
        head_type: str = opt("prompt", "classifier input: prompt (mean of the prompt tokens, paper) | token ([CLS])",
                             choices=("prompt", "token"))
        prompt_init: str = opt("uniform", "init of prompts and keys: uniform (U(-1,1), paper) | zero",
                               choices=("uniform", "zero"))
        clip_grad: float = opt(1.0, "gradient norm clip (paper: 1.0; 0 = off)", ge=0)
        head_init_std: float = opt(0.02, "trunc-normal std of the head (timm's init)", gt=0)

        def validate(self) -> None:
            if self.top_k > self.pool_size:
                raise ConfigError(f"strategy.top_k={self.top_k} must be <= strategy.pool_size={self.pool_size}")

    def __init__(self, cfg: Config, backbone: nn.Module, n_classes: int) -> None:
        super().__init__(cfg, backbone, n_classes)
        d = backbone.num_features
        self.pool = PromptPool(cfg.pool_size, d, (cfg.prompt_length, d), init=cfg.prompt_init,
                               key_init=cfg.prompt_init)
        (self._input,) = inject(backbone, [0], PromptInputSpec(), name=PROMPT).keys()
        self.input_wrapper().n_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.last_idx: Tensor | None = None  # prompt ids of the last forward (tests, diagnostics)

    def input_wrapper(self) -> nn.Module:
        return self.backbone.get_submodule(self._input)

    def prompt_pos(self) -> Tensor:
        """Position embedding of the prompt tokens: the class token's (the port's ``resize_pos_embed``)."""
        vit = self.backbone
        if getattr(vit, "no_embed_class", False) or getattr(vit, "cls_token", None) is None:
            return vit.pos_embed.new_zeros(1, 1, vit.pos_embed.shape[-1])
        return vit.pos_embed[:, :1]

    def prompted(self, x: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query(x)
        idx = self.pool.select(q, self.cfg.top_k, batchwise=self.batchwise())  # (B, k)
        self.last_idx = idx
        prompts = self.pool.prompt[idx].flatten(1, 2) + self.prompt_pos()  # (B, k*L, D)
        feed(self.input_wrapper(), PROMPT, prompts)
        tokens = self.backbone.forward_features(x)  # (B, 1 + k*L + N, D), after the final norm
        s, t = self.input_wrapper().n_prefix, prompts.shape[1]
        f = tokens[:, s:s + t].mean(dim=1) if self.cfg.head_type == "prompt" else tokens[:, 0]
        f = self.backbone.fc_norm(f)
        return self.head(f), self.pool.pull(q, idx)
