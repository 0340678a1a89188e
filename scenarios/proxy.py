"""``proxy_fmnist``: a CPU-sized proxy of "pre-train on a large source, then learn a class-incremental stream".

Fashion-MNIST's 60,000 training images are split once, deterministically, into two disjoint halves (per class, a
fixed-seed permutation; the first 3,000 images of each class go to SOURCE, the other 3,000 to STREAM):

* SOURCE (30,000 images) is only for pre-training (:func:`source_half`, used by ``cl pretrain``);
* STREAM feeds the continual stream: at most ``scenario.train_per_class`` images per class (default 500) for
  training, the official 10,000 test images for testing, class-incremental (default 5 x 2 classes).

The classes overlap between pre-training and the stream (as ImageNet-21k pre-training overlaps Split CIFAR-100);
the images never do (tested in tests/test_pretrain.py). The stream then ends with one shifted-domain experience
(``scenario.shift``), listed in ``scenario.meta["shifted_experiences"]``:

* ``digits`` (default): scikit-learn's embedded 8x8 digits, resized to 28 px, colours inverted (white strokes
  become dark on a light ground), as 10 NEW classes with labels 10..19 (1,347 train / 450 test images). Both the
  data set and the polarity differ from the source: a real shift for a backbone pre-trained on Fashion-MNIST.
* ``fmnist_inverted``: Fashion-MNIST images with inverted colours and rotated by 90 degrees, as 10 NEW classes
  10..19 (the same garments in a new domain; training images are STREAM-half images not used by the earlier
  experiences, test images the official test set, transformed).
* ``none``: no shifted experience.

All images of the stream live in one tensor source per split (uint8, 28x28), so views of different experiences
can be concatenated (``joint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import ConfigError
from cl.registry import register_scenario
from scenarios.base import Experience, ExperienceData, Scenario, ScenarioBuilder, TensorSource, class_incremental
from scenarios.digits import load_digits_split
from scenarios.fmnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, load_fmnist

#: seed of the fixed SOURCE/STREAM split (never change it: the committed backbone was pre-trained on SOURCE)
PROXY_SPLIT_SEED = 20240531
SHIFTS = ("digits", "fmnist_inverted", "none")


def proxy_split(targets: np.ndarray, seed: int = PROXY_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(source, stream) positions into Fashion-MNIST's training set; per class half and half, disjoint.

    The stream positions are returned in their per-class permuted order (class by class), so taking the first
    ``k`` of a class gives a random, fixed subset of it.
    """
    rng = np.random.default_rng(seed)
    source, stream = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        perm = idx[rng.permutation(len(idx))]
        half = len(perm) // 2
        source.append(perm[:half])
        stream.append(perm[half:])
    return np.sort(np.concatenate(source)), np.concatenate(stream)


def source_half(root: str, n_images: int | None = None) -> TensorSource:
    """The SOURCE half of Fashion-MNIST's training set (for pre-training), optionally a class-balanced subset."""
    train, _ = load_fmnist(root)
    src, _ = proxy_split(train.targets)
    if n_images is not None and n_images < len(src):
        per_class = max(1, n_images // 10)
        src = np.sort(np.concatenate([src[train.targets[src] == c][:per_class] for c in range(10)]))
    return TensorSource(train.images[src], train.targets[src])


def stream_half(root: str) -> TensorSource:
    """The STREAM half (the continual stream draws its training images from it; pre-training never sees it)."""
    train, _ = load_fmnist(root)
    _, stream = proxy_split(train.targets)
    return TensorSource(train.images[stream], train.targets[stream])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _digits_shift(size: int = 28) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Inverted sklearn digits at ``size`` px, uint8: (train images, labels, test images, labels)."""
    tr, te = load_digits_split()
    out = []
    for s in (tr, te):
        x = F.interpolate(s.images.float(), size=(size, size), mode="bilinear", align_corners=False)
        out += [_to_uint8(1.0 - x), s.targets]
    return out[0], out[1], out[2], out[3]


def _fmnist_shift(images: torch.Tensor) -> torch.Tensor:
    """Invert the colours and rotate by 90 degrees (uint8 in, uint8 out)."""
    return torch.rot90(255 - images, k=1, dims=(-2, -1)).contiguous()


@register_scenario("proxy_fmnist")
class ProxyFMNIST(ScenarioBuilder):
    description = ("Fashion-MNIST STREAM half (disjoint from the pre-training SOURCE half), 5 x 2 classes, then a "
                   "shifted experience (inverted digits as 10 new classes)")

    @dataclass
    class Config(ScenarioConfig):
        name: str = opt("proxy_fmnist", "registered scenario name")
        image_size: int = opt(32, "images are resized to this size (32 = the pre-trained ViT's size)", ge=8)
        train_per_class: int = opt(500, "training images per class taken from the STREAM half (max 3000)", ge=1)
        shift: str = opt("digits", "last, shifted experience: digits | fmnist_inverted | none", choices=SHIFTS)
        test_per_class: int | None = opt(None, "cap on official test images per class (null = all 1000; quick runs)",
                                         ge=1)

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        if cfg.train_per_class > 3000:
            raise ConfigError(f"scenario.train_per_class={cfg.train_per_class} exceeds the 3000 STREAM images "
                              "per class")
        train, test = load_fmnist(data.root)
        _, stream = proxy_split(train.targets)
        per_class = [stream[train.targets[stream] == c] for c in range(10)]
        keep = np.sort(np.concatenate([p[: cfg.train_per_class] for p in per_class]))
        tr_img, tr_lab = [train.images[keep]], [train.targets[keep]]
        if cfg.test_per_class:  # a fixed, class-balanced subset of the official test set (same for every run)
            rng = np.random.default_rng(PROXY_SPLIT_SEED + 1)
            sub = np.sort(np.concatenate([rng.permutation(np.flatnonzero(test.targets == c))[: cfg.test_per_class]
                                          for c in range(10)]))
            test = TensorSource(test.images[sub], test.targets[sub])
        te_img, te_lab = [test.images], [test.targets]
        if cfg.shift == "digits":
            a, b, c, d = _digits_shift(28)
            tr_img.append(a), tr_lab.append(b + 10), te_img.append(c), te_lab.append(d + 10)
        elif cfg.shift == "fmnist_inverted":
            n = min(cfg.train_per_class, 3000 - cfg.train_per_class)
            if n < 1:
                raise ConfigError("scenario.shift=fmnist_inverted needs unused STREAM images: set "
                                  "scenario.train_per_class below 3000")
            extra = np.sort(np.concatenate([p[cfg.train_per_class: cfg.train_per_class + n] for p in per_class]))
            tr_img.append(_fmnist_shift(train.images[extra])), tr_lab.append(train.targets[extra] + 10)
            te_img.append(_fmnist_shift(test.images)), te_lab.append(test.targets + 10)
        train_src = TensorSource(torch.cat(tr_img), np.concatenate(tr_lab))
        test_src = TensorSource(torch.cat(te_img), np.concatenate(te_lab))
        names = list(FMNIST_CLASSES)
        sc = class_incremental(cfg.name, train_src, test_src, cfg, image_size=cfg.image_size, channels=1,
                               mean=FMNIST_MEAN, std=FMNIST_STD, augment="crop", class_names=names,
                               classes=range(10))
        sc.meta.update({"split_seed": PROXY_SPLIT_SEED, "shift": cfg.shift, "shifted_experiences": []})
        if cfg.shift == "none":
            return sc
        # the shifted experience: original labels 10..19 become 10..19 (after the FMNIST classes, natural order)
        start = sc.n_classes
        shifted_names = ([f"inverted digit {i}" for i in range(10)] if cfg.shift == "digits"
                         else [f"inverted rotated {n}" for n in FMNIST_CLASSES])
        tr_idx = np.flatnonzero(train_src.targets >= 10)
        te_idx = np.flatnonzero(test_src.targets >= 10)
        i = len(sc.experiences)
        sc.experiences.append(Experience(
            index=i, classes=list(range(start, start + 10)), task_label=i if cfg.task_labels else 0,
            name=f"exp{i}_{cfg.shift}",
            train=ExperienceData(train_src, tr_idx, train_src.targets[tr_idx] - 10 + start),
            test=ExperienceData(test_src, te_idx, test_src.targets[te_idx] - 10 + start),
        ))
        sc.class_order = sc.class_order + list(range(10, 20))
        sc.n_classes = start + 10
        sc.class_names = (sc.class_names or []) + shifted_names
        sc.meta["shifted_experiences"] = [i]
        return sc
