"""``split_mini_imagenet``: Mini-ImageNet (100 classes x 600 images, 84 px originals), as PRD uses it (64 px).

Reads the Ravi & Larochelle distribution: ``mini-imagenet/images/<file>.jpg`` and ``train.csv``, ``val.csv``,
``test.csv`` (``filename,label`` with a header). Continual learning merges the three few-shot class sets into
one 100-class set; the train/test split is derived here per class: a ``RandomState(split_seed)`` permutation of
each class's sorted files, 500 train and 100 test (derived and hashed; PRD's exact lists are not shipped).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import FileScenarioConfig, apply_protocol, build_from_items, dataset_folder, derive_split
from scenarios.verify import SplitReport, load_spec, require_dir, require_file, verify_total

MINI_MEAN, MINI_STD = (0.4729, 0.4487, 0.4030), (0.2833, 0.2752, 0.2886)
PROTOCOLS: dict[str, dict[str, Any]] = {
    "prd": {"n_experiences": 20, "class_order": "natural", "image_size": 64, "task_labels": True,
            "note": "20 x 5 at 64 px, task-IL"},
}


def read_csv_lists(folder: Path, spec: dict[str, Any]) -> tuple[list[str], list[tuple[str, int]]]:
    """(class wnids in sorted order, [(images/<file>, label)]) from the three CSV files; files must exist."""
    rows: list[tuple[str, str]] = []
    for part in ("train", "val", "test"):
        path = require_file(folder / f"{part}.csv", f"the {part} class list of the Ravi split", spec)
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header[:2]] != ["filename", "label"]:
                raise DataError(f"{spec['title']}: '{path}' must start with the header 'filename,label'")
            rows += [(r[0].strip(), r[1].strip()) for r in reader if r]
    wnids = sorted({w for _, w in rows})
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    for name, wnid in sorted(rows):
        if not (folder / "images" / name).is_file():
            raise DataError(f"{spec['title']}: missing file '{folder / 'images' / name}' (listed in the CSV files)")
        items.append((f"images/{name}", index[wnid]))
    return wnids, items


@register_scenario("split_mini_imagenet")
class SplitMiniImageNet(ScenarioBuilder):
    description = "Mini-ImageNet, 100 classes, 500/100 per class (derived split), 64 px (PRD: 20 x 5)"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_mini_imagenet", "registered scenario name")
        image_size: int = opt(64, "images are resized to this size when decoded", ge=8)
        n_experiences: int | None = opt(20, "number of experiences (ignored when init_classes is set)", ge=1)
        split_seed: int = opt(0, "seed of the derived per-class split", ge=0)
        test_per_class: int = opt(100, "test images per class (of 600)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("mini_imagenet")
        folder = dataset_folder(data, spec)
        require_dir(folder / "images", "the images of all 100 classes", spec)
        names, items = read_csv_lists(folder, spec)
        verify_total(spec, items, folder, cfg.verify)
        per_class = len(items) / max(1, len(names))
        train, test = derive_split(items, min(0.99, cfg.test_per_class / per_class), cfg.split_seed)
        key = "derived" if (cfg.split_seed, cfg.test_per_class) == (0, 100) else \
            f"derived-seed{cfg.split_seed}-test{cfg.test_per_class}"
        return build_from_items(cfg, spec, folder, key, train, test, names, self.reports, mean=MINI_MEAN,
                                std=MINI_STD)
