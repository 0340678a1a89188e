"""Injection of parameter-efficient (PET) modules into an unmodified model by module path (peft style).

A *wrapper* replaces the layer at a module path, keeps the original as ``base_layer`` and holds its PET modules in
a ``ModuleDict`` called ``pet_modules``, keyed by an adapter name (``"default"``, LAE's ``"online"`` and
``"offline"``, ...). Every PET parameter therefore has ``pet_modules.`` in its name, which is how
:func:`mark_only_pet_trainable`, :func:`pet_parameters` and :func:`pet_state_dict` find them. Which names a wrapper
uses in its forward pass is its ``active`` list (:func:`set_active`, :func:`active_adapters`).

Wrappers:

* :class:`ParallelWrapper`: ``y = base(x) + sum_k m_k(u)``, ``u`` = the layer's input, or with a *tap* the input of
  another layer of the block (SEMA's adapter reads the raw residual ``r`` that enters ``norm2``, not ``LN2(r)``).
  Adapters parallel to a sub-block and LoRA deltas on a Linear both use it.
* :class:`SequentialWrapper`: ``y = h + m(h)`` with ``h = base(x)`` (Houlsby-style serial adapter).
* ``PrefixAttention`` (:mod:`cl.peft.prefix`): an attention forward that reuses timm's ``qkv`` and ``proj``.

timm ViT paths: ``blocks.N.attn``, ``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp``,
``blocks.N.norm1``, ``blocks.N.norm2``. A :class:`PETSpec` says which path to wrap for block N and builds the module.

Example::

    created = inject(vit, [0, 1, 2], AdapterSpec(width=5), name="online")   # {path: Adapter}
    mark_only_pet_trainable(vit, ["online"])
    copy_adapter(vit, "online", "offline")                                  # frozen deep copy
    with active_adapters(vit, "offline"):
        logits_offline = head(vit(x))
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "PET_KEY", "PETSpec", "PETWrapper", "ParallelWrapper", "SequentialWrapper", "InputTap", "inject", "remove",
    "wrappers", "is_pet_name", "pet_parameters", "pet_named_parameters", "mark_only_pet_trainable", "pet_state_dict",
    "load_pet_state_dict", "set_active", "active_adapters", "copy_adapter", "ema_update_", "adapter_names",
    "params_to_buffers_",
]

#: the attribute that holds PET modules in every wrapper; it appears in every PET parameter's name
PET_KEY = "pet_modules"


def is_pet_name(name: str, adapter: str | None = None) -> bool:
    """Whether a parameter/state-dict name belongs to a PET module (of adapter ``adapter`` if given)."""
    key = f"{PET_KEY}." if adapter is None else f"{PET_KEY}.{adapter}."
    return name.startswith(key) or f".{key}" in name


class PETWrapper(nn.Module):
    """Base wrapper: ``base_layer`` (the original layer, untouched) plus named PET modules."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.pet_modules = nn.ModuleDict()
        self.active: list[str] = []

    def add(self, name: str, module: nn.Module, activate: bool = True) -> None:
        if name in self.pet_modules:
            raise ValueError(f"PET module '{name}' already exists in {type(self).__name__}")
        self.pet_modules[name] = module
        if activate:
            self.active.append(name)

    def active_modules(self) -> list[nn.Module]:
        return [self.pet_modules[n] for n in self.active]

    def extra_repr(self) -> str:
        return f"active={self.active}"


class InputTap(nn.Module):
    """Transparent wrapper that remembers its input for one forward pass (read once by the wrapper it feeds)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.captured: Tensor | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.captured = x
        return self.base_layer(x, *args, **kwargs)

    def pop(self) -> Tensor:
        x, self.captured = self.captured, None  # do not keep the graph alive (and keep the model deep-copyable)
        if x is None:
            raise RuntimeError("InputTap: the tapped layer did not run before the wrapper that reads it")
        return x


class ParallelWrapper(PETWrapper):
    """``y = base(x) + sum over active modules of m(u)``; ``u = x``, or the tapped input of another layer."""

    def __init__(self, base_layer: nn.Module, tap: InputTap | None = None) -> None:
        super().__init__(base_layer)
        # a plain attribute, not a submodule: the tap lives at its own path in the model already
        object.__setattr__(self, "_tap", tap)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(x, *args, **kwargs)
        u = self._tap.pop() if self._tap is not None else x
        for m in self.active_modules():
            out = out + m(u)
        return out


class SequentialWrapper(PETWrapper):
    """``y = h + m(h)`` for each active module in order, ``h = base(x)``."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        h = self.base_layer(x, *args, **kwargs)
        for m in self.active_modules():
            h = h + m(h)
        return h


class PETSpec:
    """What to inject: the wrapped path per block, the wrapper class, an optional tap, and the module builder.

    Subclasses (``AdapterSpec``, ``LoRASpec``, ``PrefixSpec``) are dataclasses; another method (SEMA's mixture) can
    subclass one and override :meth:`build` to put its own module in the same place.
    """

    wrapper: ClassVar[type[PETWrapper]] = ParallelWrapper

    def target(self, block: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def tap(self, block: int) -> str | None:
        """Path of the layer whose input the module reads instead of the wrapped layer's input (or None)."""
        return None

    def build(self, base_layer: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_wrapper(self, base_layer: nn.Module, tap: InputTap | None) -> PETWrapper:
        if self.wrapper is ParallelWrapper:
            return ParallelWrapper(base_layer, tap)
        if tap is not None:
            raise ValueError(f"{type(self).__name__}: a tap only works with a ParallelWrapper")
        return self.wrapper(base_layer)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def inject(model: nn.Module, blocks: Iterable[int], spec: PETSpec, name: str = "default",
           activate: bool = True) -> dict[str, nn.Module]:
    """Add one PET module named ``name`` at ``spec.target(b)`` for every block index ``b``.

    The layer at the path is wrapped once (a second ``inject`` at the same path adds to the same wrapper).
    Returns ``{wrapped path: created module}``. Parameters already in ``model`` keep their ``requires_grad``;
    the new modules are trainable (use :func:`mark_only_pet_trainable` to freeze the rest).
    """
    created: dict[str, nn.Module] = {}
    for b in blocks:
        path = spec.target(int(b))
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(spec).__name__}: model has no module '{path}' (block {b})") from None
        tap_path = spec.tap(int(b))
        tap = None
        if tap_path is not None:
            tap = model.get_submodule(tap_path)
            if not isinstance(tap, InputTap):
                tap = InputTap(tap)
                _set_submodule(model, tap_path, tap)
        if isinstance(layer, spec.wrapper) and getattr(layer, "_tap", None) is tap:
            wrapper = layer
        else:
            wrapper = spec.make_wrapper(layer, tap)
            _set_submodule(model, path, wrapper)
        module = spec.build(wrapper.base_layer)
        dev = _device_of(wrapper.base_layer)
        if dev is not None:
            module.to(dev)
        wrapper.add(name, module, activate=activate)
        created[path] = module
    return created


def wrappers(model: nn.Module) -> Iterator[tuple[str, PETWrapper]]:
    """All PET wrappers of ``model`` as ``(path, wrapper)``."""
    for path, m in model.named_modules():
        if isinstance(m, PETWrapper):
            yield path, m


def adapter_names(model: nn.Module) -> list[str]:
    """Adapter names present anywhere in ``model``, in first-seen order."""
    seen: dict[str, None] = {}
    for _, w in wrappers(model):
        seen.update(dict.fromkeys(w.pet_modules.keys()))
    return list(seen)


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Delete PET module ``name`` (all if None); a wrapper left empty is replaced by its ``base_layer``."""
    for path, w in list(wrappers(model)):
        names = list(w.pet_modules.keys()) if name is None else [name] if name in w.pet_modules else []
        for n in names:
            del w.pet_modules[n]
            if n in w.active:
                w.active.remove(n)
        if len(w.pet_modules) == 0:
            _set_submodule(model, path, w.base_layer)
    # taps no wrapper reads any more go too
    used = {id(w._tap) for _, w in wrappers(model) if getattr(w, "_tap", None) is not None}
    for path, m in list(model.named_modules()):
        if isinstance(m, InputTap) and id(m) not in used:
            _set_submodule(model, path, m.base_layer)
    return model


def pet_named_parameters(model: nn.Module, names: Iterable[str] | str | None = None) -> list[tuple[str, nn.Parameter]]:
    if isinstance(names, str):
        names = [names]
    keep = (lambda n: is_pet_name(n)) if names is None else (lambda n: any(is_pet_name(n, a) for a in names))
    return [(n, p) for n, p in model.named_parameters() if keep(n)]


def pet_parameters(model: nn.Module, names: Iterable[str] | str | None = None) -> list[nn.Parameter]:
    """PET parameters of the adapters ``names`` (all adapters if None)."""
    return [p for _, p in pet_named_parameters(model, names)]


def mark_only_pet_trainable(model: nn.Module, names: Iterable[str] | str | None = None) -> None:
    """``requires_grad=True`` on the PET parameters of ``names`` (all adapters if None), False on everything else."""
    model.requires_grad_(False)
    for p in pet_parameters(model, names):
        p.requires_grad_(True)


def pet_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The PET entries of ``model.state_dict()`` (of adapter ``name`` if given), keys unchanged."""
    return {k: v for k, v in model.state_dict().items() if is_pet_name(k, name)}


def load_pet_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load PET entries saved by :func:`pet_state_dict` into a model with the same injected modules."""
    own = pet_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"PET state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)


def set_active(model: nn.Module, names: Iterable[str] | str) -> None:
    """Make ``names`` the active adapters of every wrapper (each wrapper activates those it has)."""
    names = [names] if isinstance(names, str) else list(names)
    for _, w in wrappers(model):
        w.active = [n for n in names if n in w.pet_modules]


@contextmanager
def active_adapters(model: nn.Module, names: Iterable[str] | str) -> Iterator[None]:
    """Temporarily switch the active adapters (e.g. evaluate the offline expert), restoring them on exit."""
    saved = {path: list(w.active) for path, w in wrappers(model)}
    set_active(model, names)
    try:
        yield
    finally:
        for path, w in wrappers(model):
            w.active = saved.get(path, [])


def params_to_buffers_(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a persistent buffer of the same name (same state-dict keys).

    For state that must not train but does change, such as an EMA copy: buffers are saved, moved and loaded like
    parameters, are never handed to an optimizer or to DDP's gradient reduction, and a "frozen parameters stay
    unchanged" check does not apply to them.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach().clone(), persistent=True)
    return module


def copy_adapter(model: nn.Module, src: str, dst: str, trainable: bool = False,
                 as_buffers: bool = False) -> dict[str, nn.Module]:
    """Add a deep copy of adapter ``src`` as ``dst`` in every wrapper that has ``src`` (not activated).

    ``trainable`` sets ``requires_grad`` of the copy; ``as_buffers`` stores its tensors as buffers instead
    (:func:`params_to_buffers_`; LAE's offline expert, which follows the online one by EMA).
    """
    created = {}
    for path, w in wrappers(model):
        if src in w.pet_modules:
            if dst in w.pet_modules:
                raise ValueError(f"adapter '{dst}' already exists at {path}")
            m = copy.deepcopy(w.pet_modules[src]).requires_grad_(trainable)
            if as_buffers:
                params_to_buffers_(m)
            w.add(dst, m, activate=False)
            created[path] = m
    return created


@torch.no_grad()
def ema_update_(model: nn.Module, src: str, dst: str, decay: float) -> None:
    """``theta_dst <- decay * theta_dst + (1 - decay) * theta_src`` over the whole state dict of each module.

    Floating-point entries only (integer buffers are copied). This is timm ``ModelEmaV2``'s update, which LAE uses.
    """
    for _, w in wrappers(model):
        if src not in w.pet_modules or dst not in w.pet_modules:
            continue
        s_state = w.pet_modules[src].state_dict(keep_vars=True)
        for k, d in w.pet_modules[dst].state_dict(keep_vars=True).items():
            s = s_state[k].detach()
            if d.dtype.is_floating_point:
                d.data.mul_(decay).add_(s, alpha=1.0 - decay)
            else:
                d.data.copy_(s)
