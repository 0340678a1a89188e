"""``split_fmnist``: Fashion-MNIST from local gzipped idx files (70,000 28x28 grey images, 10 classes).

Looked up in ``data.root``, ``data.root/fashion-mnist``, ``data.root/FashionMNIST/raw`` and the Debian package's
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder, TensorSource, class_incremental

FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic, dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def find_fmnist(root: str | Path) -> Path:
    root = Path(root)
    candidates = [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_ROOT]
    for c in candidates:
        if all((c / f).is_file() for f in FMNIST_FILES.values()):
            return c
    raise DataError(
        f"Fashion-MNIST not found under data.root='{root}' (looked in {', '.join(str(c) for c in candidates)}); "
        "install it with `apt-get install dataset-fashion-mnist` or put the four *-idx?-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist in data.root"
    )


def load_fmnist(root: str | Path) -> tuple[TensorSource, TensorSource]:
    """Train (60,000) and test (10,000) sources, uint8 images (N, 1, 28, 28) kept as they are on disk."""
    folder = find_fmnist(root)
    arrays = {k: read_idx(folder / f) for k, f in FMNIST_FILES.items()}
    train = TensorSource(torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1), arrays["train_labels"])
    test = TensorSource(torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1), arrays["test_labels"])
    return train, test


@register_scenario("split_fmnist")
class SplitFMNIST(ScenarioBuilder):
    description = "Fashion-MNIST (local idx files), 10 classes, 60k/10k (default 5 x 2 classes)"

    @dataclass
    class Config(ScenarioConfig):
        name: str = opt("split_fmnist", "registered scenario name")
        image_size: int = opt(28, "images are resized to this size", ge=8)
        train_per_class: int | None = opt(None, "keep the first N training images of each class (smaller runs)")

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        train, test = load_fmnist(data.root)
        if cfg.train_per_class:
            keep = np.sort(np.concatenate([np.flatnonzero(train.targets == c)[: cfg.train_per_class]
                                           for c in range(10)]))
            train = TensorSource(train.images[keep], train.targets[keep])
        return class_incremental(cfg.name, train, test, cfg, image_size=cfg.image_size, channels=1,
                                 mean=FMNIST_MEAN, std=FMNIST_STD, augment="crop", class_names=FMNIST_CLASSES)
