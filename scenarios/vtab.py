"""``split_vtab``: the VTAB subset used by ADAM/PILOT and SEMA (5 VTAB data sets x 10 classes = 50 classes).

Reads the distributed ``vtab/train/<class>`` and ``vtab/test/<class>`` folders; class folders are taken in sorted
order, which in the distributed copy groups the classes of each source data set (natural order, as SEMA runs it).
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
    "sema": {"init_classes": 10, "increment": 10, "class_order": "natural", "note": "5 x 10, natural order"},
}


@register_scenario("split_vtab")
class SplitVTAB(ScenarioBuilder):
    description = "VTAB subset of PILOT/SEMA, 50 classes from 5 data sets (train/ and test/ folders), 5 x 10"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_vtab", "registered scenario name")
        n_experiences: int | None = opt(5, "number of experiences (ignored when init_classes is set)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("vtab")
        folder = dataset_folder(data, spec)
        if not (folder / "train").is_dir():
            raise DataError(f"{spec['title']}: missing folder '{folder / 'train'}'; {where_to_get(spec)}")
        kind, names, train, test = train_test_or_raw(folder, spec, 0.2, 0)
        verify_total(spec, train, folder, cfg.verify, "train")
        return build_from_items(cfg, spec, folder, kind, train, test, names, self.reports)
