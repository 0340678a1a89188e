"""File-backed image sources and the shared pieces of the folder-based scenario builders.

:class:`FileListSource` decodes one image per ``__getitem__`` with PIL (in DataLoader workers, ``data.num_workers``)
and resizes it to the scenario's size, so the data set is never held in memory. It deliberately has no ``batch``
method: the loader then uses per-item access. :func:`build_from_items` turns checked file lists into a
class-incremental :class:`~scenarios.base.Scenario`; :class:`FileScenarioConfig` holds the keys every file-backed
scenario shares (``image_size``, ``verify``, ``protocol``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import ConfigError, DataError
from scenarios.base import Scenario, class_incremental
from scenarios.verify import SplitReport, verify_split, where_to_get

IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def paper_transform(size: int, train: bool, scale: Sequence[float] = (0.08, 1.0)) -> Any:
    """The papers' torchvision pipeline on a PIL image, ending in a uint8 tensor (3, S, S).

    Train: ``RandomResizedCrop(S, scale)`` (bilinear, antialiased) + horizontal flip (SLCA on ImageNet-R, LAE,
    SEMA with ``scale=(0.05, 1)``). Test: ``Resize(S * 256 / 224)`` + ``CenterCrop(S)``. Normalisation is left to
    the batch transform on the accelerator (the strategy's input convention), so workers ship 1 byte per pixel.
    """
    from torchvision.transforms import v2

    if train:
        steps = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.PILToTensor()])


class FileListSource:
    """Images listed by path, decoded lazily in DataLoader workers.

    With ``transform`` (a torchvision pipeline on the PIL image, :func:`paper_transform`) ``source[i]`` is what it
    returns: the papers' crops and flips run per image in the workers. Without it (``scenario.pipeline=resize``)
    the image is squashed to (S, S) and returned as a float tensor in [0, 1]; crops, flips and the input convention
    then run on whole batches in :class:`scenarios.base.BatchTransform`.

    Args:
        folder: the data set folder the paths are relative to.
        files: relative paths (``/`` separated).
        targets: original integer labels, one per file.
        image_size: the side S of every returned image.
        transform: optional per-image pipeline (PIL RGB image -> tensor (3, S, S)).
    """

    def __init__(self, folder: Path, files: Sequence[str], targets: Sequence[int] | np.ndarray,
                 image_size: int, transform: Any = None) -> None:
        self.folder = Path(folder)
        self.files = list(files)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.image_size = int(image_size)
        self.transform = transform
        if len(self.files) != len(self.targets):
            raise ValueError("files and targets differ in length")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        path = self.folder / self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.transform is not None:
                    return self.transform(im)
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image '{path}': {err}") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted by their relative path."""
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file()),
                  key=lambda p: p.relative_to(folder).as_posix())


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(folder: Path, base: Path, classes: Sequence[str] | None = None,
                       spec: dict[str, Any] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path relative to ``base``, label)]) of an ImageFolder-style ``folder/<class>/<image>``.

    Labels are positions in ``classes`` (default: the sorted sub-folder names). A class folder without images
    is an error naming the folder.
    """
    names = list(classes) if classes is not None else class_folders(folder)
    items: list[tuple[str, int]] = []
    title = spec["title"] if spec else "data set"
    for label, name in enumerate(names):
        sub = folder / name
        if not sub.is_dir():
            hint = f"; {where_to_get(spec)}" if spec else ""
            raise DataError(f"{title}: missing class folder '{sub}'{hint}")
        files = list_images(sub)
        if not files:
            raise DataError(f"{title}: class folder '{sub}' contains no images")
        items.extend((f.relative_to(base).as_posix(), label) for f in files)
    return names, items


def derive_split(items: Sequence[tuple[str, int]], test_fraction: float, seed: int,
                 per_class: bool = True) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A deterministic train/test split of a sorted file list.

    ``per_class``: within each class, a ``RandomState(seed)`` permutation of its sorted files; the first
    ``floor(n * (1 - test_fraction))`` train. Otherwise one permutation of the whole list (CODA-Prompt style).
    Both keep the original order inside each part, so the file-list hash depends only on the files and the seed.
    """
    items = list(items)
    rng = np.random.RandomState(seed)
    train_idx: list[int] = []
    if per_class:
        labels = np.asarray([lab for _, lab in items])
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            perm = idx[rng.permutation(len(idx))]
            train_idx.extend(perm[: int(len(idx) * (1 - test_fraction) + 1e-9)].tolist())
    else:
        perm = rng.permutation(len(items))
        train_idx = perm[: int(len(items) * (1 - test_fraction) + 1e-9)].tolist()
    is_train = np.zeros(len(items), dtype=bool)
    is_train[train_idx] = True
    return [it for it, t in zip(items, is_train) if t], [it for it, t in zip(items, is_train) if not t]


@dataclass
class FileScenarioConfig(ScenarioConfig):
    """Keys shared by the file-backed scenarios."""

    image_size: int = opt(224, "images are resized to this size when decoded", ge=8)
    verify: str = opt("full", "full: check counts and file-list hashes | layout: folders and files only "
                      "(reduced copies)", choices=("full", "layout"))
    protocol: str | None = opt(None, "named paper protocol (`cl data list`); fills the split keys left at their "
                               "defaults")
    pipeline: str = opt("paper", "paper: RandomResizedCrop + flip per image in the loader workers, Resize + "
                        "CenterCrop at test | resize: squash to image_size, crop/flip on the batch",
                        choices=("paper", "resize"))
    crop_scale: list[float] = opt(default_factory=lambda: [0.08, 1.0],
                                  help="RandomResizedCrop scale range of the paper pipeline (SEMA: [0.05, 1.0])")


def file_sources(cfg: FileScenarioConfig, folder: Path, train: Sequence[tuple[str, int]],
                 test: Sequence[tuple[str, int]]) -> tuple[FileListSource, FileListSource, str]:
    """(train source, test source, batch augmentation) for ``cfg.pipeline``: with ``paper`` the workers augment
    and the batch transform only maps to the input convention (``augment="none"``)."""
    paper = cfg.pipeline == "paper"
    if paper and (len(cfg.crop_scale) != 2 or not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1):
        raise ConfigError(f"scenario.crop_scale={list(cfg.crop_scale)} must be [low, high] with 0 < low <= high <= 1")
    tf_train = paper_transform(cfg.image_size, True, cfg.crop_scale) if paper else None
    tf_test = paper_transform(cfg.image_size, False) if paper else None
    tr = FileListSource(folder, [p for p, _ in train], [lab for _, lab in train], cfg.image_size, tf_train)
    te = FileListSource(folder, [p for p, _ in test], [lab for _, lab in test], cfg.image_size, tf_test)
    return tr, te, "none" if paper else "crop_flip"


def apply_protocol(cfg: Any, protocols: dict[str, dict[str, Any]]) -> Any:
    """Fill the keys a named protocol sets, where the user left them at the Config's default.

    A key given explicitly (a value different from the default) wins over the protocol, so
    ``scenario.protocol=slca scenario.increment=5`` changes only the increment.
    """
    name = getattr(cfg, "protocol", None)
    if not name:
        return cfg
    if name not in protocols:
        raise ConfigError(f"unknown scenario.protocol '{name}' for {cfg.name} (choose one of "
                          f"{', '.join(sorted(protocols))})")
    defaults = type(cfg)()
    changes = {}
    for key, value in protocols[name].items():
        if key == "note":
            continue
        if getattr(cfg, key) == getattr(defaults, key):
            changes[key] = value
    return dataclasses.replace(cfg, **changes)


def _short(v: Any) -> str:
    if isinstance(v, list) and len(v) > 6:
        return f"[{', '.join(map(str, v[:5]))}, ... ({len(v)})]"
    return str(v)


def lae_orders(dataset: str, base: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """LAE's class orders 2 and 3 (``scenarios/splits/lae_orders.json``) as protocols ``lae_order2``/``lae_order3``."""
    import json

    from scenarios.verify import SPLITS_DIR

    orders = json.loads((SPLITS_DIR / "lae_orders.json").read_text())[dataset]
    return {f"lae_{k}": {**{key: v for key, v in base.items() if key not in ("class_order", "note")},
                         "class_order": "explicit", "order": list(v), "note": f"LAE class {k[:5]} {k[5:]}"}
            for k, v in orders.items()}


def describe_protocols(protocols: dict[str, dict[str, Any]]) -> list[str]:
    """One line per protocol for ``cl data list``."""
    out = []
    for name, p in protocols.items():
        keys = ", ".join(f"{k}={_short(v)}" for k, v in p.items() if k != "note")
        out.append(f"{name}: {keys}" + (f" ({p['note']})" if p.get("note") else ""))
    return out


def build_from_items(cfg: FileScenarioConfig, spec: dict[str, Any], folder: Path, split_key: str,
                     train: list[tuple[str, int]], test: list[tuple[str, int]], class_names: list[str],
                     reports: list[SplitReport] | None = None, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD, augment: str = "crop_flip") -> Scenario:
    """Verify both file lists, then build the class-incremental stream over two :class:`FileListSource`."""
    prefix = f"{split_key}/" if split_key else ""
    reps = [verify_split(spec, f"{prefix}train", train, folder, cfg.verify),
            verify_split(spec, f"{prefix}test", test, folder, cfg.verify)]
    if reports is not None:
        reports.extend(reps)
    tr, te, batch_augment = file_sources(cfg, folder, train, test)
    augment = augment if batch_augment != "none" else "none"
    sc = class_incremental(cfg.name, tr, te, cfg, image_size=cfg.image_size, channels=3, mean=mean, std=std,
                           augment=augment, class_names=class_names, classes=range(len(class_names)),
                           meta={"data_folder": str(folder), "split": split_key or "official",
                                 "file_lists": {r.split: r.status for r in reps}})
    return sc


def train_test_or_raw(folder: Path, spec: dict[str, Any], test_fraction: float, seed: int
                      ) -> tuple[str, list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """A pre-split copy (``folder/train/<class>``, ``folder/test/<class>``) or raw class folders split here.

    Returns (split name ``folders`` | ``derived``, class names, train items, test items).
    """
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        from scenarios.verify import require_dir

        require_dir(folder / "train", "training images, one sub-folder per class", spec)
        require_dir(folder / "test", "test images, one sub-folder per class", spec)
        names = class_folders(folder / "train")
        test_names = class_folders(folder / "test")
        if names != test_names:
            only = sorted(set(names) ^ set(test_names))[:5]
            raise DataError(f"{spec['title']}: '{folder}/train' and '{folder}/test' have different class folders "
                            f"(e.g. {only})")
        _, train = scan_class_folders(folder / "train", folder, names, spec)
        _, test = scan_class_folders(folder / "test", folder, names, spec)
        return "folders", names, train, test
    names, items = scan_class_folders(folder, folder, None, spec)
    if not names:
        raise DataError(f"{spec['title']}: no class folders under '{folder}'; {where_to_get(spec)}")
    train, test = derive_split(items, test_fraction, seed)
    return "derived", names, train, test


def dataset_folder(data: DataConfig, spec: dict[str, Any]) -> Path:
    """``data.root/<folder>``, where ``<folder>`` is the first of the spec's folder names that exists."""
    from scenarios.verify import data_root

    root = data_root(data.root)
    names = spec["folders"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{spec['title']} not found: missing folder '{root / names[0]}' (data.root='{root}'); "
                    f"{where_to_get(spec)}")
