"""``split_digits``: the embedded default stream, scikit-learn's bundled 8x8 digits (1,797 images, no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cl.config import DataConfig, ScenarioConfig, opt
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder, TensorSource, class_incremental

DIGITS_MEAN, DIGITS_STD = (0.3051,), (0.3870,)  # of the 8x8 images scaled to [0, 1]


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[TensorSource, TensorSource]:
    """Deterministic stratified train/test split of the digits, images as float tensors in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
    idx = np.arange(len(d.target))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    return TensorSource(images[tr], d.target[tr]), TensorSource(images[te], d.target[te])


@register_scenario("split_digits")
class SplitDigits(ScenarioBuilder):
    description = "scikit-learn digits, 10 classes, 1,347 train / 450 test, embedded (default 5 x 2 classes)"

    @dataclass
    class Config(ScenarioConfig):
        name: str = opt("split_digits", "registered scenario name")
        image_size: int = opt(16, "images are upsampled from 8x8 to this size", ge=8)
        test_fraction: float = opt(0.25, "fraction of each class held out for testing", gt=0)
        invert_last: bool = opt(False, "invert the colours of the last experience (a shifted domain)")

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        train, test = load_digits_split(cfg.test_fraction)
        sc = class_incremental(cfg.name, train, test, cfg, image_size=cfg.image_size, channels=1,
                               mean=DIGITS_MEAN, std=DIGITS_STD, augment="crop",
                               class_names=[str(i) for i in range(10)])
        if cfg.invert_last:
            sc.meta["shifted_experiences"] = [len(sc) - 1]
            last = sc.experiences[-1]
            for part in (last.train, last.test):
                src = part.source
                inverted = TensorSource(1.0 - src.images, src.targets)
                part.source = inverted
        return sc


