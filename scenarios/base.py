"""Scenario types shared by every builder: class orders, PyCIL splits, experiences, batch transforms.

A :class:`Scenario` holds index views into one source data set per split (never a copy of the images), the class
order and the per-experience classes; labels are renumbered to their position in the class order (as the official
SLCA/SEMA/PyCIL code does), so experience ``i`` of a class-incremental stream owns a contiguous label range.
``Scenario.benchmark`` builds the equivalent Avalanche benchmark (``nc_benchmark`` with the same fixed class order
and per-experience class counts; ``dataset_benchmark`` with one dataset per experience for domain streams and
streams imported from Avalanche) for users who want Avalanche's own stream objects and strategies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.config import DataConfig, ScenarioConfig
from cl.errors import ConfigError


class ImageSource(Protocol):
    """A map-style image data set with integer ``targets``. Sources backed by one tensor also offer ``batch``."""

    targets: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Tensor: ...


class TensorSource:
    """Images held in one tensor (N, C, H, W): uint8 (0..255) or float in [0, 1]. Batches are gathered by index."""

    def __init__(self, images: Tensor, targets: Sequence[int] | np.ndarray) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.images) != len(self.targets):
            raise ValueError("images and targets differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def _to_float(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, i: int) -> Tensor:
        return self._to_float(self.images[i])

    def batch(self, indices: Tensor) -> Tensor:
        return self._to_float(self.images[indices])


@dataclass
class ExperienceData:
    """A view of one split of one experience: ``source[indices]`` with renumbered ``targets``."""

    source: Any
    indices: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Experience:
    index: int
    classes: list[int]  # renumbered labels (positions in the class order)
    train: ExperienceData
    test: ExperienceData
    task_label: int = 0
    name: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class Scenario:
    """A finished stream. ``kind`` is ``class``, ``task`` or ``domain`` incremental."""

    name: str
    experiences: list[Experience]
    n_classes: int
    class_order: list[int]  # original label ids in stream order (label k is class_order[k])
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kind: str = "class"
    augment: str = "crop_flip"  # train augmentation family: none | crop | crop_flip
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experiences)

    def fingerprint(self) -> str:
        """sha256 over the class order and every experience's classes and sample indices (DDP check, provenance)."""
        h = hashlib.sha256()
        h.update(np.asarray(self.class_order, dtype=np.int64).tobytes())
        for e in self.experiences:
            for arr in (np.asarray(e.classes), e.train.indices, e.test.indices):
                h.update(np.asarray(arr, dtype=np.int64).tobytes())
        return h.hexdigest()

    def experience_hashes(self) -> list[str]:
        out = []
        for e in self.experiences:
            h = hashlib.sha256()
            for arr in (np.asarray(e.classes), e.train.indices, e.test.indices):
                h.update(np.asarray(arr, dtype=np.int64).tobytes())
            out.append(h.hexdigest()[:16])
        return out

    @cached_property
    def benchmark(self) -> Any:
        """The equivalent Avalanche benchmark (built on first use; Avalanche is slow to import)."""
        from avalanche.benchmarks import nc_benchmark

        if self.kind == "domain" or len({id(e.train.source) for e in self.experiences}) > 1:
            # one dataset per experience (domains, or streams imported from Avalanche): labels as they are
            from avalanche.benchmarks import dataset_benchmark

            return dataset_benchmark([_ExperienceView(e.train) for e in self.experiences],
                                     [_ExperienceView(e.test) for e in self.experiences])
        train, test = self.experiences[0].train.source, self.experiences[0].test.source
        return nc_benchmark(
            _AvalancheView(train), _AvalancheView(test), n_experiences=len(self.experiences),
            task_labels=self.kind == "task", shuffle=False, fixed_class_order=list(self.class_order),
            per_exp_classes={i: e.n_classes for i, e in enumerate(self.experiences)},
            class_ids_from_zero_from_first_exp=True,
        )

    def transforms(self, convention: str) -> tuple[nn.Module, nn.Module]:
        """(train, eval) batch transforms producing the strategy's input convention."""
        return (BatchTransform(self, convention, train=True), BatchTransform(self, convention, train=False))


class _AvalancheView(torch.utils.data.Dataset):
    """Exposes a source as (image, label) items with ``targets``, the form Avalanche's generators accept."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.targets = [int(t) for t in source.targets]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.source[i]
        return (x.float().div_(255.0) if x.dtype == torch.uint8 else x), self.targets[i]


class _ExperienceView(torch.utils.data.Dataset):
    """One experience's split as (image in [0, 1], renumbered label) items with ``targets`` (a view, no copy)."""

    def __init__(self, data: ExperienceData) -> None:
        self.data = data
        self.targets = [int(t) for t in data.targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.data.source[int(self.data.indices[i])]
        return (x.float().div_(255.0) if x.dtype == torch.uint8 else x), self.targets[i]


CONVENTIONS = ("normalized", "unit", "pm1")


class BatchTransform(nn.Module):
    """Resize to the scenario's image size, augment (train only), and map to the input convention.

    Works on whole batches already on the accelerator: ``normalized`` = (x - mean) / std, ``unit`` = raw [0, 1]
    (LAE, SEMA), ``pm1`` = [-1, 1] (PRD). Random augmentation draws from torch's global generator, which
    :func:`cl.utils.seed_everything` seeds identically on every rank.
    """

    def __init__(self, scenario: Scenario, convention: str, train: bool) -> None:
        super().__init__()
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown input convention '{convention}' (choose one of {', '.join(CONVENTIONS)})")
        self.size = scenario.image_size
        self.convention = convention
        self.train_mode = train
        self.augment = scenario.augment if train else "none"
        self.register_buffer("mean", torch.tensor(scenario.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(scenario.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:  # file-backed sources ship uint8 from the loader workers (1 byte per pixel)
            x = x.float().div_(255.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.augment != "none":
            x = random_crop(x, pad=max(1, self.size // 8))
            if self.augment == "crop_flip":
                flip = torch.rand(x.shape[0], device=x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.convention == "normalized":
            return (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.convention == "pm1":
            return x * 2.0 - 1.0
        return x


def random_crop(x: Tensor, pad: int, fill: float = 0.0) -> Tensor:
    """Pad by ``pad`` and crop back at a random offset per sample (vectorised with one gather)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h))  # (B, H)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w))  # (B, W)
    xp = xp.gather(2, rows.view(b, 1, h, 1).expand(b, xp.shape[1], h, xp.shape[3]))
    return xp.gather(3, cols.view(b, 1, 1, w).expand(b, xp.shape[1], h, w))


# --------------------------------------------------------------------------------------------- class orders, splits


def pycil_permutation(n_classes: int, seed: int) -> list[int]:
    """PyCIL/PILOT order: seed NumPy's legacy global RNG and draw ``np.random.permutation`` (SLCA, SEMA)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return [int(c) for c in np.random.permutation(n_classes)]
    finally:
        np.random.set_state(state)


def resolve_class_order(cfg: ScenarioConfig, classes: Sequence[int]) -> list[int]:
    classes = sorted(int(c) for c in classes)
    if cfg.class_order == "natural":
        return classes
    if cfg.class_order == "permutation":
        return [classes[i] for i in pycil_permutation(len(classes), cfg.order_seed)]
    order = [int(c) for c in (cfg.order or [])]
    if sorted(order) != classes:
        missing = sorted(set(classes) - set(order))
        extra = sorted(set(order) - set(classes))
        raise ConfigError(
            f"scenario.order must list every class exactly once (missing {missing[:10]}, unknown or repeated "
            f"{extra[:10] or 'duplicates'})"
        )
    return order


def split_sizes(n_classes: int, cfg: ScenarioConfig) -> list[int]:
    """Classes per experience: PyCIL init/increment with a smaller last task, or an equal split."""
    if cfg.init_classes is not None:
        inc = cfg.increment or cfg.init_classes
        if cfg.init_classes > n_classes:
            raise ConfigError(f"scenario.init_classes={cfg.init_classes} exceeds the {n_classes} classes")
        sizes = [cfg.init_classes]
        while sum(sizes) < n_classes:
            sizes.append(min(inc, n_classes - sum(sizes)))
        return sizes
    n = cfg.n_experiences or 1
    if n > n_classes:
        raise ConfigError(f"scenario.n_experiences={n} exceeds the {n_classes} classes")
    if n_classes % n:
        raise ConfigError(
            f"scenario.n_experiences={n} does not divide the {n_classes} classes; set scenario.init_classes and "
            "scenario.increment for an uneven split"
        )
    return [n_classes // n] * n


def class_incremental(
    name: str, train: Any, test: Any, cfg: ScenarioConfig, *, image_size: int, channels: int,
    mean: tuple[float, ...], std: tuple[float, ...], augment: str = "crop_flip",
    class_names: list[str] | None = None, classes: Sequence[int] | None = None, meta: dict | None = None,
) -> Scenario:
    """Split two sources into a class-incremental (or, with ``task_labels``, task-incremental) stream."""
    all_classes = sorted(set(int(c) for c in (classes if classes is not None else np.unique(train.targets))))
    order = resolve_class_order(cfg, all_classes)
    sizes = split_sizes(len(order), cfg)
    remap = np.full(max(max(all_classes), int(np.max(train.targets)), int(np.max(test.targets))) + 1, -1)
    remap[np.asarray(order)] = np.arange(len(order))
    exps, start = [], 0
    tr_new, te_new = remap[train.targets], remap[test.targets]
    for i, size in enumerate(sizes):
        labels = list(range(start, start + size))
        tr_idx = np.flatnonzero((tr_new >= start) & (tr_new < start + size))
        te_idx = np.flatnonzero((te_new >= start) & (te_new < start + size))
        exps.append(Experience(
            index=i, classes=labels, task_label=i if cfg.task_labels else 0, name=f"exp{i}",
            train=ExperienceData(train, tr_idx, tr_new[tr_idx]), test=ExperienceData(test, te_idx, te_new[te_idx]),
        ))
        start += size
    names = [class_names[c] for c in order] if class_names else None
    return Scenario(name=name, experiences=exps, n_classes=len(order), class_order=order, image_size=image_size,
                    channels=channels, mean=mean, std=std, kind="task" if cfg.task_labels else "class",
                    augment=augment if cfg.augment else "none", class_names=names, meta=meta or {})


class ScenarioBuilder:
    """Base of registered scenario builders: a ``Config`` dataclass and ``build``."""

    Config: ClassVar[type[ScenarioConfig]] = ScenarioConfig
    description: ClassVar[str] = ""

    def build(self, cfg: ScenarioConfig, data: DataConfig) -> Scenario:  # pragma: no cover - abstract
        raise NotImplementedError
