"""Forgetting-prioritised fine-tuning (FPF): the pieces shared by the FPF add-on and ``kfpf``.

Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023 (arXiv 2304.04158). The paper finds
that a few modules (in a ResNet: the BatchNorm layers and the classifier) change sharply between tasks and carry
most of the forgetting; FPF fine-tunes only those on a small replay buffer. No official code exists; see
``docs/strategies/kfpf.md`` for what is our own choice.

* :func:`resolve_modules` turns ``fpf.modules`` (``auto``, type names, name globs) into module names.
* :class:`selective_finetuning` freezes everything outside the selection, **including** the running statistics
  of BatchNorm layers outside it, and restores trainability, train/eval modes and BN settings on exit.
* :func:`run_fpf` runs one FPF call: SGD on the selected parameters over buffer mini-batches.
* :class:`TrainingDynamics` computes the paper's per-module change ``C_m = ||theta_m - theta_m'||_1 / |theta_m|``
  within an experience (epoch to epoch) and across experiences, and our sensitivity score (cross / within).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cl.errors import ConfigError

if TYPE_CHECKING:
    from cl.components.buffer import ReservoirBuffer

__all__ = ["FPFResult", "TrainingDynamics", "default_modules", "head_name", "resolve_modules", "run_fpf",
           "selective_finetuning", "broadcast_module_state", "broadcast_bn_buffers"]

HEAD_ATTRS = ("classifier", "head", "fc")
TYPE_ALIASES: dict[str, type] = {"BatchNorm": _BatchNorm, "LayerNorm": nn.LayerNorm, "GroupNorm": nn.GroupNorm,
                                 "Linear": nn.Linear, "Conv2d": nn.Conv2d}


# ------------------------------------------------------------------------------------------------ module selection
def head_name(model: nn.Module) -> str | None:
    """The classifier of a strategy: its ``classifier``/``head``/``fc`` attribute, else the last ``nn.Linear``."""
    for attr in HEAD_ATTRS:
        if isinstance(getattr(model, attr, None), nn.Module):
            return attr
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _is_norm_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and any(True for _ in m.parameters(recurse=False))


def default_modules(model: nn.Module, domain: bool = False) -> list[str]:
    """The paper's sensitive modules for this architecture.

    ResNet/CNN (any BatchNorm present): every BatchNorm layer + the classifier; for domain-incremental streams also
    the first convolution [unverified, recalled from the paper]. ViT (no BatchNorm, LayerNorms present): every
    LayerNorm + the classifier (our extrapolation: LayerNorm is the ViT's normalisation layer and, like BN's affine
    part, a small per-channel scale and shift); for domain-IL also the patch embedding (its first convolution).
    A backbone with neither (MLP): the classifier only.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not names:
        names = [n for n, m in model.named_modules() if _is_norm_layer(m)]
    head = head_name(model)
    if head is not None:
        names.append(head)
    if domain:
        first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            names.insert(0, first)
    return _drop_nested(model, names)


def _drop_nested(model: nn.Module, names: list[str]) -> list[str]:
    """Unique names, without those inside another selected module (their parameters are already covered)."""
    out: list[str] = []
    for n in dict.fromkeys(names):
        if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names):
            out.append(n)
    return out


def _type_matches(m: nn.Module, entry: str) -> bool:
    alias = TYPE_ALIASES.get(entry)
    if alias is not None and isinstance(m, alias):
        return True
    return any(c.__name__ == entry for c in type(m).__mro__)


def resolve_modules(model: nn.Module, spec: list[str] | tuple[str, ...], domain: bool = False) -> list[str]:
    """Module names selected by ``spec``; every entry must select something.

    Entries: ``auto`` (:func:`default_modules`), ``head`` (the classifier), ``first_conv`` / ``last_conv`` (the
    first / last ``Conv2d`` in registration order), ``type:NAME`` or a bare class name (``BatchNorm`` matches every
    BatchNorm variant, ``LayerNorm``, ``Conv2d``, ...), ``name:GLOB`` or a bare glob on module names
    (``backbone.conv1``, ``backbone.layer4.*``).
    """
    named = dict(model.named_modules())
    class_names = {c.__name__ for m in named.values() for c in type(m).__mro__} | set(TYPE_ALIASES)
    out: list[str] = []
    for raw in spec:
        entry = str(raw).strip()
        if entry == "auto":
            hits = default_modules(model, domain)
        elif entry == "head":
            h = head_name(model)
            hits = [h] if h is not None else []
        elif entry == "first_conv":
            hits = [n for n, m in named.items() if isinstance(m, nn.Conv2d)][:1]
        elif entry == "last_conv":
            hits = [n for n, m in named.items() if isinstance(m, nn.Conv2d)][-1:]
        elif entry.startswith("type:") or (entry in class_names and not entry.startswith("name:")):
            t = entry.removeprefix("type:")
            hits = [n for n, m in named.items() if n and _type_matches(m, t)]
        else:
            pattern = entry.removeprefix("name:")
            hits = [n for n in named if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join([n for n in named if n][:6])
            raise ConfigError(f"fpf.modules entry '{entry}' selects no module of this model; use auto, head, "
                              "first_conv, last_conv, a type (BatchNorm, LayerNorm, Conv2d) or a name glob "
                              f"(e.g. {sample})")
        out += hits
    return _drop_nested(model, out)


def _selected(model: nn.Module, names: list[str]) -> tuple[list[nn.Parameter], set[nn.Module]]:
    """Parameters of the selected modules and every module inside them."""
    named = dict(model.named_modules())
    params: dict[int, nn.Parameter] = {}
    inside: set[nn.Module] = set()
    for n in names:
        mod = named[n]
        for m in mod.modules():
            inside.add(m)
        for p in mod.parameters():
            params[id(p)] = p
    return list(params.values()), inside


class selective_finetuning:  # noqa: N801 - used as a context manager, reads like ``torch.no_grad``
    """Train only the modules ``names`` of ``model`` inside the ``with`` block; everything else is frozen.

    On entry: ``requires_grad`` is true exactly for the selected parameters; the model is in train mode; BatchNorm
    layers *outside* the selection do not update their running statistics: with ``frozen_bn="eval"`` they are put
    in eval mode (normalise with their running statistics, as at test time), with ``"batch_stats"`` they normalise
    with batch statistics but with momentum 0, and their ``num_batches_tracked`` is restored on exit. Selected
    BatchNorm layers train normally (affine parameters and running statistics re-estimated on the buffer).
    On exit: ``requires_grad`` flags, train/eval modes and BN momenta are restored. ``as`` gives the parameters.
    """

    def __init__(self, model: nn.Module, names: list[str], frozen_bn: str = "eval") -> None:
        if frozen_bn not in ("eval", "batch_stats"):
            raise ConfigError(f"fpf.frozen_bn='{frozen_bn}' must be eval or batch_stats")
        self.model, self.names, self.frozen_bn = model, list(names), frozen_bn
        self.params, self.inside = _selected(model, self.names)

    def __enter__(self) -> list[nn.Parameter]:
        m = self.model
        self._flags = [(p, p.requires_grad) for p in m.parameters()]
        self._modes = [(mod, mod.training) for mod in m.modules()]
        self._bn: list[tuple[_BatchNorm, float | None, Tensor | None]] = []
        for p in m.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        m.train()
        for mod in m.modules():
            if isinstance(mod, _BatchNorm) and mod not in self.inside:
                tracked = mod.num_batches_tracked.clone() if mod.num_batches_tracked is not None else None
                self._bn.append((mod, mod.momentum, tracked))
                if self.frozen_bn == "eval":
                    mod.eval()
                else:
                    mod.momentum = 0.0
        return self.params

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for mod, training in self._modes:
            mod.training = training
        for mod, momentum, tracked in self._bn:
            mod.momentum = momentum
            if tracked is not None:
                mod.num_batches_tracked.copy_(tracked)


# ------------------------------------------------------------------------------------------------ one FPF call
@dataclass
class FPFResult:
    iters: int
    loss_first: float
    loss_last: float
    fwd_flops: int  # per iteration, measured on the first one
    bwd_flops: int
    samples: int  # buffer samples processed (all iterations)
    n_params: int  # trainable parameters during the call


def fpf_loss(logits: Tensor, batch: dict[str, Tensor], variant: str, alpha: float) -> Tensor:
    """``ce``: cross-entropy on buffer labels. ``kd``: plus ``alpha`` * MSE to the logits stored at insertion,
    over each sample's valid columns only (classes seen when it was stored) [unverified form, DER-style]."""
    loss = F.cross_entropy(logits, batch["y"])
    if variant == "kd":
        stored, width = batch["logits"], batch["logit_width"]
        k = min(logits.shape[1], stored.shape[1])
        valid = torch.arange(k, device=logits.device).view(1, -1) < width.view(-1, 1)  # (B, k)
        diff = (logits[:, :k] - stored[:, :k]).pow(2) * valid
        loss = loss + alpha * diff.sum() / valid.sum().clamp_min(1)
    return loss


def run_fpf(model: nn.Module, buffer: ReservoirBuffer, names: list[str], *, iters: int, lr: float,
            batch_size: int, transform: nn.Module, call_tag: Any, momentum: float = 0.0, variant: str = "ce",
            alpha: float = 0.0, frozen_bn: str = "eval") -> FPFResult:
    """One FPF call: ``iters`` SGD steps on the selected modules over buffer mini-batches.

    Every rank runs the same call on the same (whole, identically seeded) buffer batches, so DDP ranks stay equal
    and the result equals a single-process run; the selected modules' state is then broadcast from rank 0 to remove
    any floating-point drift. Gradients come from ``torch.autograd.grad`` on the selected parameters, so a DDP
    wrapper around ``model`` (k-FPF triggers inside ``Trainer.fit``) never sees this backward pass.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if buffer.is_empty():
        return FPFResult(0, float("nan"), float("nan"), 0, 0, 0, 0)
    device = buffer.x.device
    gen = buffer.generator("fpf", call_tag)
    fwd = bwd = samples = 0
    first = last = float("nan")
    with selective_finetuning(model, names, frozen_bn) as params:
        velocity = [torch.zeros_like(p) for p in params]
        for it in range(iters):
            batch = buffer.get(buffer.sample_indices(batch_size, gen))
            x = transform(batch["x"].to(device))
            if it == 0:  # measure FLOPs once per call (shapes are fixed within it)
                with FlopCounterMode(display=False) as fc:
                    loss = fpf_loss(model(x), batch, variant, alpha)
                fwd = fc.get_total_flops()
                with FlopCounterMode(display=False) as fc:
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                bwd = fc.get_total_flops()
            else:
                loss = fpf_loss(model(x), batch, variant, alpha)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g, v in zip(params, grads, velocity):
                    if g is None:
                        continue
                    v.mul_(momentum).add_(g)
                    p.add_(v, alpha=-lr)
            last = float(loss.detach())
            first = last if it == 0 else first
            samples += len(batch["y"])
        n_params = sum(p.numel() for p in params)
    broadcast_module_state(model, names)
    return FPFResult(iters, first, last, int(fwd), int(bwd), samples, n_params)


def _dist_active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _broadcast(tensors: list[Tensor]) -> None:
    nccl = tdist.get_backend() == "nccl"
    for t in tensors:
        buf = t.detach().cuda().clone() if nccl else t.detach().cpu().clone()
        tdist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def broadcast_module_state(model: nn.Module, names: list[str]) -> None:
    """Copy parameters and buffers of the named modules from rank 0 to every rank (no-op in one process)."""
    if not _dist_active():
        return
    named = dict(model.named_modules())
    tensors: list[Tensor] = []
    for n in names:
        tensors += list(named[n].parameters()) + [b for b in named[n].buffers()]
    _broadcast(tensors)


def broadcast_bn_buffers(model: nn.Module) -> None:
    """Make BatchNorm running statistics equal on every rank (each rank's last forward updated its own copy)."""
    if not _dist_active():
        return
    _broadcast([b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()])


# ------------------------------------------------------------------------------------------------ training dynamics
def unit_tensors(model: nn.Module) -> dict[str, list[Tensor]]:
    """Detached CPU copies of every module's own parameters; BatchNorm running statistics as ``<name>#running``."""
    out: dict[str, list[Tensor]] = {}
    for name, m in model.named_modules():
        own = [p.detach().float().cpu().clone() for p in m.parameters(recurse=False)]
        if own:
            out[name or "<root>"] = own
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            out[f"{name}#running"] = [m.running_mean.detach().float().cpu().clone(),
                                      m.running_var.detach().float().cpu().clone()]
    return out


def l1_change(before: dict[str, list[Tensor]], after: dict[str, list[Tensor]]) -> dict[str, float]:
    """``C_m = ||after_m - before_m||_1 / |theta_m|`` for every unit present in both with the same shapes."""
    out: dict[str, float] = {}
    for name, new in after.items():
        old = before.get(name)
        if old is None or len(old) != len(new) or any(a.shape != b.shape for a, b in zip(old, new)):
            continue  # a unit that did not exist (a new head) or grew has no comparable previous state
        total = sum(float((a - b).abs().sum()) for a, b in zip(old, new))
        count = sum(a.numel() for a in new)
        out[name] = total / max(1, count)
    return out


class TrainingDynamics:
    """Per-module change within experiences (epoch to epoch) and across experiences (same epoch index: the last).

    ``score_m = cross_m / within_m``: how much more a module moves when the task changes than while it is learned
    (our reading of the paper's sensitivity score, whose formula could not be checked; see the docs).
    """

    def __init__(self) -> None:
        self.prev_end: dict[str, list[Tensor]] | None = None  # end of the previous experience
        self.prev_epoch: dict[str, list[Tensor]] | None = None
        self.within_sum: dict[str, float] = {}
        self.within_n: dict[str, int] = {}

    def experience_start(self, model: nn.Module) -> None:
        self.prev_epoch = unit_tensors(model)
        self.within_sum, self.within_n = {}, {}

    def epoch_end(self, model: nn.Module) -> None:
        now = unit_tensors(model)
        if self.prev_epoch is not None:
            for k, v in l1_change(self.prev_epoch, now).items():
                self.within_sum[k] = self.within_sum.get(k, 0.0) + v
                self.within_n[k] = self.within_n.get(k, 0) + 1
        self.prev_epoch = now

    def experience_end(self, model: nn.Module) -> dict[str, Any]:
        """Cross-task change vs the previous experience's end, mean within-task change, score, top modules."""
        now = unit_tensors(model)
        within = {k: self.within_sum[k] / self.within_n[k] for k in self.within_sum}
        out: dict[str, Any] = {"within": _rounded(within)}
        if self.prev_end is not None:
            cross = l1_change(self.prev_end, now)
            score = {k: cross[k] / within[k] for k in cross if within.get(k, 0.0) > 0}
            out["cross"] = _rounded(cross)
            out["score"] = _rounded(score)
            out["top_cross"] = sorted(cross, key=cross.get, reverse=True)[:10]
        self.prev_end = now
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"prev_end": self.prev_end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev_end = state.get("prev_end")


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: float(f"{v:.6g}") for k, v in d.items()}


# ------------------------------------------------------------------------------------------------ one call in a run
def fpf_call(ctx: Any, model: nn.Module, buffer: ReservoirBuffer, *, tag: Any, variant: str = "ce",
             alpha: float = 0.0, step: int | None = None) -> dict[str, Any]:
    """One FPF call configured by ``ctx.cfg.fpf``; accounts its FLOPs and appends a summary to ``fpf/calls``.

    With ``fpf.measure`` the seen experiences are evaluated right before and after the call (``old_acc`` covers the
    experiences before the current one).
    """
    from cl.callbacks.flops import account

    f = ctx.cfg.fpf
    names = resolve_modules(model, list(f.modules), domain=ctx.scenario.kind == "domain")
    before = _seen_acc(model, ctx) if f.measure else None
    res = run_fpf(model, buffer, names, iters=f.iters, lr=f.lr, batch_size=f.batch_size,
                  transform=model.train_transform, call_tag=tag, momentum=f.momentum, variant=variant,
                  alpha=alpha, frozen_bn=f.frozen_bn)
    account("fpf", res.fwd_flops, res.bwd_flops, res.iters, res.samples)
    info: dict[str, Any] = {"exp": int(ctx.exp_index), "iters": res.iters, "buffer": len(buffer),
                            "loss_first": round(res.loss_first, 6), "loss_last": round(res.loss_last, 6),
                            "trainable_params": res.n_params, "n_modules": len(names)}
    if step is not None:
        info["step"] = int(step)
    if before is not None:
        after = _seen_acc(model, ctx)
        info.update({f"{k}_before": v for k, v in before.items()})
        info.update({f"{k}_after": v for k, v in after.items()})
    calls = ctx.records.get(ctx.exp_index, {}).get("fpf/calls", [])
    ctx.record("fpf/calls", [*calls, info])
    ctx.record("fpf/modules", names)
    return info


def _seen_acc(model: nn.Module, ctx: Any) -> dict[str, float]:
    """Accuracy on the current and earlier experiences' test data: all of them (seen) and the earlier ones (old)."""
    from cl.evaluation import evaluate

    exps = ctx.scenario.experiences[: ctx.exp_index + 1]
    res = evaluate(model, exps, ctx.dist, ctx.device, ctx.cfg.data.eval_batch_size)["main"]
    k = len(exps) - 1
    out = {"seen_acc": round(sum(res.correct) / max(1, sum(res.total)), 6)}
    if k > 0:
        out["old_acc"] = round(sum(res.correct[:k]) / max(1, sum(res.total[:k])), 6)
    return out
