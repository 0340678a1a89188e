"""``split_cifar100`` and ``split_cifar10``: torchvision's CIFAR from a local copy (the pickled python version).

The data is read with ``torchvision.datasets.CIFAR100`` / ``CIFAR10`` and ``download=False`` from ``data.root``
(``data.root/cifar-100-python/`` or ``data.root/cifar-10-batches-py/``). Nothing is downloaded at run time; a
missing copy is a :class:`~cl.errors.DataError` that says how to get it. With ``scenario.verify=full`` (default)
every file's md5 must match the one torchvision publishes; ``scenario.verify=layout`` accepts a reduced copy in the
same format (tests build one).

Images stay uint8 (N, 3, 32, 32) in memory; ``scenario.image_size=224`` resizes whole batches on the accelerator
(:class:`scenarios.base.BatchTransform`), which is how the ViT papers (SLCA, LAE, SEMA) feed CIFAR-100.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder, TensorSource, class_incremental
from scenarios.folder import apply_protocol, lae_orders
from scenarios.verify import SplitReport, data_root, file_list_hash, md5_file

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)  # SLCA's normalisation
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)  # mammoth's seq-cifar10

CIFAR100_PROTOCOLS: dict[str, dict[str, Any]] = {
    "slca": {"init_classes": 10, "increment": 10, "class_order": "permutation", "order_seed": 1993,
             "image_size": 224, "note": "10 x 10, PyCIL seed-1993 order; SLCA normalises with CIFAR mean/std"},
    "sema": {"init_classes": 10, "increment": 10, "class_order": "permutation", "order_seed": 1993,
             "image_size": 224, "note": "10 x 10, seed-1993 order; raw [0, 1] inputs"},
    "lae": {"n_experiences": 10, "class_order": "natural", "image_size": 224,
            "note": "10 x 10, order 1 = natural; LAE's orders 2 and 3 via class_order=explicit"},
    "lae20": {"n_experiences": 20, "class_order": "natural", "image_size": 224, "note": "20 x 5"},
    "prd": {"n_experiences": 20, "class_order": "natural", "image_size": 32, "task_labels": True,
            "note": "20 x 5 at 32 px, task-IL"},
}
CIFAR100_PROTOCOLS.update(lae_orders("cifar100", CIFAR100_PROTOCOLS["lae"]))
CIFAR10_PROTOCOLS: dict[str, dict[str, Any]] = {
    "kfpf": {"n_experiences": 5, "class_order": "natural", "image_size": 32,
             "note": "seq-CIFAR-10 (mammoth): 5 x 2, natural order"},
}

HOW_TO_GET = ("download it once where there is internet with `python -c \"import torchvision; "
              "torchvision.datasets.{cls}('{root}', download=True)\"` and copy '{folder}' into data.root")


def _torchvision_cls(which: str) -> Any:
    import torchvision

    return torchvision.datasets.CIFAR100 if which == "cifar100" else torchvision.datasets.CIFAR10


def check_cifar(root: Path, which: str, verify: str = "full") -> tuple[Path, list[SplitReport]]:
    """Check the pickled copy: folder, every file, and (``full``) torchvision's md5 of each file.

    Returns the folder holding ``cifar-100-python`` (or ``cifar-10-batches-py``) and one report per file.
    """
    cls = _torchvision_cls(which)
    folder = cls.base_folder
    how = HOW_TO_GET.format(cls=cls.__name__, root=root, folder=folder)
    candidates = [root, root / which]
    base = next((c for c in candidates if (c / folder).is_dir()), None)
    if base is None:
        raise DataError(f"{cls.__name__} not found: missing folder '{root / folder}' (data.root='{root}'); {how}")
    reports = []
    for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = base / folder / name
        if not path.is_file():
            raise DataError(f"{cls.__name__}: missing file '{path}'; {how}")
        if verify == "full":
            have = md5_file(path)
            if have != md5:
                raise DataError(f"{cls.__name__}: '{path}' differs from torchvision's copy (md5 {have} != {md5}); "
                                f"{how}; for a deliberately reduced copy set scenario.verify=layout")
            reports.append(SplitReport(name, 0, 0, have, "ok", ["md5 as published by torchvision"]))
        else:
            reports.append(SplitReport(name, 0, 0, md5_file(path), "layout only"))
    return base, reports


def _load_meta_unchecked(self: Any) -> None:
    """torchvision's ``_load_meta`` without the md5 check (reduced copies in ``verify=layout`` mode)."""
    with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    self.classes = meta[self.meta["key"]]
    self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


def load_cifar(root: str | Path, which: str, verify: str = "full",
               reports: list[SplitReport] | None = None) -> tuple[TensorSource, TensorSource, list[str]]:
    """Train and test sources (uint8 (N, 3, 32, 32)) and the class names, read by torchvision."""
    base, reps = check_cifar(data_root(root), which, verify)
    cls = _torchvision_cls(which)
    if verify != "full":  # a reduced copy: the same torchvision reader without its md5 check
        cls = type(f"Unchecked{cls.__name__}", (cls,), {"_check_integrity": lambda self: True,
                                                         "_load_meta": _load_meta_unchecked})
    try:
        train = cls(str(base), train=True, download=False)
        test = cls(str(base), train=False, download=False)
    except (RuntimeError, OSError, KeyError, ValueError) as err:  # a corrupt pickle
        raise DataError(f"{cls.__name__}: cannot read the copy in '{base / cls.base_folder}': {err}") from None
    out = []
    for ds in (train, test):
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        out.append(TensorSource(images, np.asarray(ds.targets, dtype=np.int64)))
    if reports is not None:
        for name, src in (("train", out[0]), ("test", out[1])):
            items = [(f"{name}/{i}", int(t)) for i, t in enumerate(src.targets)]
            reps.append(SplitReport(name, len(src), len(np.unique(src.targets)), file_list_hash(items),
                                    "ok" if verify == "full" else "layout only"))
        reports.extend(reps)
    return out[0], out[1], list(train.classes)


@dataclass
class CifarConfig(ScenarioConfig):
    image_size: int = opt(32, "32 (native) or 224 for ViTs (resized per batch on the accelerator)", ge=8)
    verify: str = opt("full", "full: md5 of every file as published by torchvision | layout: files only",
                      choices=("full", "layout"))
    protocol: str | None = opt(None, "named paper protocol (`cl data list`); fills the split keys left at their "
                               "defaults")


@register_scenario("split_cifar100")
class SplitCIFAR100(ScenarioBuilder):
    description = "CIFAR-100 (torchvision, local), 100 classes, 50k/10k, 32 px (image_size=224 for ViTs)"
    protocols = CIFAR100_PROTOCOLS
    dataset = "cifar100"

    @dataclass
    class Config(CifarConfig):
        name: str = opt("split_cifar100", "registered scenario name")
        n_experiences: int | None = opt(10, "number of experiences (ignored when init_classes is set)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        train, test, names = load_cifar(data.root, self.dataset, cfg.verify, self.reports)
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if self.dataset == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)
        n = 100 if self.dataset == "cifar100" else 10
        return class_incremental(cfg.name, train, test, cfg, image_size=cfg.image_size, channels=3, mean=mean,
                                 std=std, augment="crop_flip", class_names=names, classes=range(n),
                                 meta={"protocol": cfg.protocol})


@register_scenario("split_cifar10")
class SplitCIFAR10(SplitCIFAR100):
    description = "sequential CIFAR-10 (torchvision, local), 10 classes, 50k/10k, 32 px (k-FPF: 5 x 2)"
    protocols = CIFAR10_PROTOCOLS
    dataset = "cifar10"

    @dataclass
    class Config(CifarConfig):
        name: str = opt("split_cifar10", "registered scenario name")
        n_experiences: int | None = opt(5, "number of experiences (ignored when init_classes is set)", ge=1)
