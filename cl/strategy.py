"""The strategy contract: a ``LightningModule`` plus the continual-learning hooks the runner calls.

A strategy is one file in ``strategies/``, registered with ``@register_strategy("name")``. The runner
(:mod:`cl.runner`) drives it; every DDP rank runs the same loop, so anything a hook does collectively meets its peers::

    for exp in scenario.experiences:
        strategy.on_experience_start(exp, ctx)      # grow heads / adapters: the ONLY place the parameter set changes
        for phase in strategy.phases(exp, ctx):     # one Trainer.fit per phase; code between yields may run
            trainer.fit(strategy, phase data)       #   collectives (SEMA's expansion test), change requires_grad...
        strategy.on_experience_end(exp, ctx)        # post-hoc steps: statistics, alignment, teacher snapshot, FPF
        evaluate(strategy.eval_passes(), seen experiences)
        checkpoint(strategy.cl_structure(), strategy.state_dict(), strategy.extra_state())

Contract:

* ``forward(x)`` returns logits over every class seen so far, in the scenario's renumbered label space.
  ``x`` is already transformed to ``input_convention`` (the runner applies the scenario's batch transforms in
  ``on_after_batch_transfer`` and in evaluation).
* **CL state is explicit.** Tensors live in parameters or buffers, so ``state_dict`` carries them. The shape of
  what grew (head sizes, adapters per block) is ``cl_structure()``, plain Python data; ``regrow(structure)``
  rebuilds it in a fresh model *before* weights load, so a checkpoint restores into the same architecture.
  Anything else (counters, a cached optimizer) goes in ``extra_state()`` as tensors or plain Python values, so
  checkpoints load with ``torch.load(weights_only=True)``.
* **DDP.** Reduce sums and counts (``ctx.dist.all_reduce_sum``), never means; decide on statistics every rank
  shares, or on rank 0 and ``ctx.dist.broadcast``; seed post-hoc sampling identically on every rank
  (``ctx.generator(tag)``). ``cl_state_tensors()`` is hashed on every rank by the tests to prove it matches.
* ``eval_passes()`` names extra predictors to report beside the main one (LAE's experts, SLCA before/after
  alignment); the accuracy matrix always uses ``"main"``.
* ``training_step`` is written for automatic optimisation (return the loss). The runner may take the step itself
  in manual optimisation, in the same order and with the same numbers (:mod:`cl.fast_step`); overriding
  ``optimizer_step``, ``optimizer_zero_grad`` or ``configure_gradient_clipping`` keeps a strategy's fits automatic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import StrategyConfig

if TYPE_CHECKING:
    from cl.runner import RunContext
    from scenarios.base import Experience, ExperienceData


@dataclass
class Phase:
    """One ``Trainer.fit`` inside an experience.

    ``data`` defaults to the experience's training data; ``epochs`` to the strategy's ``epochs`` (or
    ``trainer.max_epochs``). ``name`` is visible to ``configure_optimizers`` and ``training_step`` as
    ``self.phase``.
    """

    name: str = "train"
    epochs: int | None = None
    data: ExperienceData | None = None
    batch_size: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


class CLStrategy(pl.LightningModule):
    """Base class of every strategy. Subclasses override the hooks they need; each default is documented.

    Args:
        cfg: the strategy's own config dataclass (``Config``).
        backbone: a feature extractor with ``num_features``; strategies add their classifier.
        n_classes: the number of classes in the whole stream (some methods size heads up front).
    """

    Config: ClassVar[type[StrategyConfig]] = StrategyConfig
    #: which input convention the paper uses: ``normalized`` (mean/std), ``unit`` ([0, 1]) or ``pm1`` ([-1, 1])
    input_convention: ClassVar[str] = "normalized"
    #: whether the official training loader drops the last incomplete batch (``data.drop_last=null`` follows it)
    drop_last: ClassVar[bool] = True
    #: how FPF (``fpf.enabled=true``) applies: ``None`` = supported; a string = the reason it is refused
    fpf_refusal: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    #: overrides that make a tiny, fast run of this strategy for the shared contract test (tests/test_contract.py)
    contract_overrides: ClassVar[list[str]] = []
    #: allowed |last_acc(1 process) - last_acc(2 processes)| in the contract test; > 0 because float reductions
    #: differ between one and two processes and tiny runs amplify that (BatchNorm models differ more)
    contract_ddp_tolerance: ClassVar[float] = 0.05
    #: False for strategies that legitimately train no parameter (``ncm``); the contract test then skips its
    #: "some trainable parameter changes" assertion
    trains_parameters: ClassVar[bool] = True
    #: whether the code between ``phases()`` yields reads only the config, the experience and what earlier code set
    #: (requires_grad, phase data), not what the earlier phases' fits trained. A resume inside phase k then skips
    #: the fits of phases 0..k-1; False (SEMA's expansion test reads the trained model) re-runs them instead.
    phases_replayable: ClassVar[bool] = True

    def __init__(self, cfg: StrategyConfig, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.n_total_classes = n_classes
        self.n_seen = 0  # classes seen so far (labels 0..n_seen-1)
        self.exp_index = -1
        self.phase: Phase = Phase()
        self.train_transform: nn.Module = nn.Identity()
        self.eval_transform: nn.Module = nn.Identity()

    #: attributes Lightning sets around every hook call (twice per call, ~25 times a training step): plain values,
    #: never modules, parameters or tensors, so ``nn.Module.__setattr__``'s registry checks can be skipped
    _PLAIN_ATTRS: ClassVar[frozenset[str]] = frozenset({"_current_fx_name"})

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ costs ~2.5 us (isinstance checks against Parameter/Module/Tensor); object's ~0.4 us:
        # ~60 us of a ~1.7 ms MLP step on one CPU core (benchmarks/README.md, "Engine overhead")
        if name in CLStrategy._PLAIN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ CL hooks (called by the runner)
    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        """Grow for the new classes. Default: remember the experience and the number of seen classes."""
        self.exp_index = exp.index
        self.n_seen = max(self.n_seen, max(exp.classes) + 1)
        self.__dict__.pop("_batch_cache", None)  # the last evaluation batch and its features (see batch_cached)

    def phases(self, exp: Experience, ctx: RunContext) -> Iterator[Phase]:
        """The training phases of an experience. Default: one phase of ``cfg.epochs`` epochs on its data."""
        yield Phase("train", epochs=self.cfg.epochs)

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        """Post-hoc steps after training an experience. Default: nothing."""

    def eval_passes(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """Predictors to evaluate, name -> logits function. ``main`` feeds the accuracy matrix."""
        return {"main": self}

    # ------------------------------------------------------------------ CL state
    def cl_structure(self) -> dict[str, Any]:
        """Plain-data description of everything that grew; the default records the seen classes."""
        return {"n_seen": self.n_seen, "exp_index": self.exp_index}

    def regrow(self, structure: dict[str, Any]) -> None:
        """Rebuild grown modules from :meth:`cl_structure` output, before ``load_state_dict``."""
        self.n_seen = int(structure["n_seen"])
        self.exp_index = int(structure["exp_index"])

    def extra_state(self) -> dict[str, Any]:
        """State outside ``state_dict`` (tensors or plain Python values only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def cl_state_tensors(self) -> dict[str, Tensor]:
        """Every tensor of CL state (hashed across ranks in tests, sized in metrics). Default: the state dict."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def batch_cached(self, key: str, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn(x)``, reused when the same batch asks again under ``key`` during no-grad evaluation.

        The evaluation runs every pass of :meth:`eval_passes` on each batch one after the other; passes that share
        a backbone forward (SLCA's aligned and unaligned heads, LAE's experts and their ensemble, APER's feature
        halves) call it through here so the backbone runs once per batch and branch. The key holds the batch
        tensor itself and its in-place version counter (an address alone could be reused by the next batch), so
        another batch, an in-place change, training mode or autograd always recompute.
        """
        cache = self.__dict__.setdefault("_batch_cache", {})
        if self.training or torch.is_grad_enabled():
            cache.clear()
            return fn(x)
        hit = cache.get(key)
        if hit is not None and hit[0] is x and hit[1] == x._version:
            return hit[2]
        if hit is not None and hit[0] is not x:
            cache.clear()  # a new batch: drop every entry of the previous one
        out = fn(x)
        cache[key] = (x, x._version, out)
        return out

    # ------------------------------------------------------------------ Lightning plumbing with sane defaults
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        trainer = getattr(self, "_trainer", None)  # inside fit, the trainer's stage decides (module mode may lag)
        training = trainer.training if trainer is not None else self.training
        return self.train_transform(x) if training else self.eval_transform(x), y

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log_train_loss(loss)
        return loss

    def log_train_loss(self, loss: Tensor, name: str = "train/loss") -> None:
        """``self.log`` the step loss, but only when a logger or the progress bar will show it.

        ``self.log`` costs about a millisecond of Python per step, ~20% of a small MLP's step on 2 CPU cores
        (benchmarks/README.md); with ``trainer.logger=none`` and no progress bar nothing would read the value.
        """
        trainer = self._trainer
        if trainer is None or trainer.loggers or trainer.progress_bar_callback is not None:
            self.log(name, loss, prog_bar=True, on_step=True, on_epoch=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.trainable_parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                               weight_decay=self.cfg.weight_decay)


class IncrementalClassifier(nn.Module):
    """One linear head per experience, outputs concatenated in experience order (SLCA, LAE, finetune).

    ``grow(n)`` appends a head for ``n`` new classes; ``freeze_old`` keeps earlier heads fixed.
    """

    def __init__(self, in_features: int, bias: bool = True, init_std: float | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.bias = bias
        self.init_std = init_std
        self.heads = nn.ModuleList()

    @property
    def sizes(self) -> list[int]:
        return [h.out_features for h in self.heads]

    @property
    def n_classes(self) -> int:
        return sum(self.sizes)

    def grow(self, n_new: int, freeze_old: bool = False) -> nn.Linear:
        head = nn.Linear(self.in_features, n_new, bias=self.bias)
        if self.init_std is not None:
            nn.init.trunc_normal_(head.weight, std=self.init_std)
            if self.bias:
                nn.init.zeros_(head.bias)
        if len(self.heads):
            head.to(self.heads[0].weight.device)
        if freeze_old:
            for h in self.heads:
                h.requires_grad_(False)
        self.heads.append(head)
        return head

    def regrow(self, sizes: list[int]) -> None:
        self.heads = nn.ModuleList()
        for n in sizes:
            self.grow(int(n))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([h(x) for h in self.heads], dim=1)
