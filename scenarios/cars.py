"""``split_cars196``: Stanford Cars (196 classes; 8,144 train / 8,041 test), one folder per class.

The layout is the one the SLCA/PILOT data preparation produces: ``cars/train/<class>/`` and ``cars/test/<class>/``.
The torchvision ``StanfordCars`` layout (``.mat`` annotations) is not read: sort the images into class folders
first (docs/data.md). SLCA's protocol is 20/20 with the seed-1993 order, which leaves a last task of 16 classes
(9 x 20 + 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import FileScenarioConfig, apply_protocol, build_from_items, dataset_folder, train_test_or_raw
from scenarios.verify import SplitReport, load_spec, verify_total, where_to_get

PROTOCOLS: dict[str, dict[str, Any]] = {
    "slca": {"init_classes": 20, "increment": 20, "class_order": "permutation", "order_seed": 1993,
             "note": "9 x 20 + 16, PyCIL seed-1993 order"},
}


@register_scenario("split_cars196")
class SplitCars196(ScenarioBuilder):
    description = "Stanford Cars-196 (train/ and test/ class folders), default SLCA 20/20 -> 9 x 20 + 16"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_cars196", "registered scenario name")
        init_classes: int | None = opt(20, "classes in the first experience (PyCIL init_cls)", ge=1)
        increment: int | None = opt(20, "classes per later experience (PyCIL increment)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("cars196")
        folder = dataset_folder(data, spec)
        if not (folder / "train").is_dir():
            raise DataError(f"{spec['title']}: missing folder '{folder / 'train'}'; {where_to_get(spec)}")
        kind, names, train, test = train_test_or_raw(folder, spec, 0.2, 0)
        verify_total(spec, train + test, folder, cfg.verify)
        return build_from_items(cfg, spec, folder, kind, train, test, names, self.reports)
