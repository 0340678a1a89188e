"""``split_cub200``: CUB-200-2011 (200 bird species, 5,994 train / 5,794 test images, the official split).

Reads the official archive's layout (``CUB_200_2011/images/`` with ``images.txt``, ``image_class_labels.txt`` and
``train_test_split.txt``: the split is shipped, so every listed file must exist) or the pre-split
``cub/train/<class>`` and ``cub/test/<class>`` folders of the SLCA/PILOT preparation (the same official split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import FileScenarioConfig, apply_protocol, build_from_items, dataset_folder, train_test_or_raw
from scenarios.verify import SplitReport, load_spec, require_file, verify_total

PROTOCOLS: dict[str, dict[str, Any]] = {
    "slca": {"init_classes": 20, "increment": 20, "class_order": "permutation", "order_seed": 1993,
             "note": "10 x 20, PyCIL seed-1993 order"},
}


def _read_pairs(path: Path, spec: dict[str, Any]) -> dict[int, str]:
    """``<id> <value>`` lines of the CUB metadata files."""
    out = {}
    for n, line in enumerate(require_file(path, "CUB metadata", spec).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{spec['title']}: '{path}' line {n} is malformed: {line!r}")
        out[int(parts[0])] = parts[1].strip()
    return out


def read_official(folder: Path, spec: dict[str, Any]
                  ) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names, train items, test items) from the official metadata; every listed image must exist."""
    images = _read_pairs(folder / "images.txt", spec)
    labels = _read_pairs(folder / "image_class_labels.txt", spec)
    is_train = _read_pairs(folder / "train_test_split.txt", spec)
    classes = (_read_pairs(folder / "classes.txt", spec) if (folder / "classes.txt").is_file() else {})
    train, test = [], []
    for img_id, rel in sorted(images.items()):
        if img_id not in labels or img_id not in is_train:
            raise DataError(f"{spec['title']}: image id {img_id} ('{rel}') has no label or split entry in '{folder}'")
        path = folder / "images" / rel
        if not path.is_file():
            raise DataError(f"{spec['title']}: missing file '{path}' (listed in '{folder / 'images.txt'}')")
        item = (f"images/{rel}", int(labels[img_id]) - 1)
        (train if is_train[img_id] == "1" else test).append(item)
    n = max(lab for _, lab in train + test) + 1
    names = [classes.get(i + 1, str(i)) for i in range(n)]
    return names, train, test


@register_scenario("split_cub200")
class SplitCUB200(ScenarioBuilder):
    description = "CUB-200-2011 (official split), 200 classes, 5,994/5,794 images (SLCA: 10 x 20)"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_cub200", "registered scenario name")
        n_experiences: int | None = opt(10, "number of experiences (ignored when init_classes is set)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("cub200")
        folder = dataset_folder(data, spec)
        if (folder / "images.txt").is_file() or (folder / "images").is_dir():
            names, train, test = read_official(folder, spec)
            kind = "official"
        else:
            kind, names, train, test = train_test_or_raw(folder, spec, 0.5, 0)
            if kind != "folders":
                raise DataError(f"{spec['title']}: '{folder}' has neither images.txt (official layout) nor "
                                "train/ and test/ folders")
        verify_total(spec, train + test, folder, cfg.verify)
        return build_from_items(cfg, spec, folder, kind, train, test, names, self.reports)
