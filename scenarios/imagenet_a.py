"""``split_imagenet_a``: ImageNet-A (200 ImageNet classes, 7,500 natural adversarial images).

Reads the pre-split ``imagenet-a/train`` and ``imagenet-a/test`` folders of the PILOT distribution (SEMA's data)
when they exist; otherwise the raw ``imagenet-a.tar`` layout (``imagenet-a/<wnid>/``) split here per class 80/20
with ``RandomState(split_seed)`` (derived, hashed; not the PILOT lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl.config import DataConfig, opt
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import FileScenarioConfig, apply_protocol, build_from_items, dataset_folder, train_test_or_raw
from scenarios.verify import SplitReport, load_spec, verify_total

PROTOCOLS: dict[str, dict[str, Any]] = {
    "sema": {"init_classes": 10, "increment": 10, "class_order": "natural", "note": "20 x 10, natural order"},
}


@register_scenario("split_imagenet_a")
class SplitImageNetA(ScenarioBuilder):
    description = "ImageNet-A, 200 classes, 7.5k images (PILOT train/test folders or raw + derived split)"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_imagenet_a", "registered scenario name")
        n_experiences: int | None = opt(20, "number of experiences (ignored when init_classes is set)", ge=1)
        split_seed: int = opt(0, "seed of the derived per-class 80/20 split (raw layout only)", ge=0)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("imagenet_a")
        folder = dataset_folder(data, spec)
        kind, names, train, test = train_test_or_raw(folder, spec, 0.2, cfg.split_seed)
        verify_total(spec, train + test, folder, cfg.verify)
        return build_from_items(cfg, spec, folder, kind, train, test, names, self.reports)
