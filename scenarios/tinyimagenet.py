"""``split_tinyimagenet``: Tiny ImageNet (200 classes, 64 px; 100,000 train / 10,000 val used as test).

Reads the official ``tiny-imagenet-200.zip`` layout: ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and
``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``. Seq-TinyImageNet of mammoth (k-FPF) uses 10 x 20
in natural (``wnids.txt``) order with mean/std normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import FileScenarioConfig, apply_protocol, build_from_items, dataset_folder, list_images
from scenarios.verify import SplitReport, load_spec, require_dir, require_file

TINY_MEAN, TINY_STD = (0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)  # mammoth's seq-tinyimg
PROTOCOLS: dict[str, dict[str, Any]] = {
    "kfpf": {"n_experiences": 10, "class_order": "natural", "image_size": 64,
             "note": "seq-TinyImageNet (mammoth): 10 x 20, natural order"},
}


@register_scenario("split_tinyimagenet")
class SplitTinyImageNet(ScenarioBuilder):
    description = "Tiny ImageNet, 200 classes, 100k train / 10k val, 64 px (k-FPF: 10 x 20)"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_tinyimagenet", "registered scenario name")
        image_size: int = opt(64, "images are resized to this size when decoded", ge=8)
        n_experiences: int | None = opt(10, "number of experiences (ignored when init_classes is set)", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("tinyimagenet")
        folder = dataset_folder(data, spec)
        wnids_file = require_file(folder / "wnids.txt", "the 200 class ids", spec)
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        require_dir(folder / "train", "training images", spec)
        train = []
        for w in wnids:
            sub = require_dir(folder / "train" / w / "images", f"training images of class {w}", spec)
            files = list_images(sub)
            if not files:
                raise DataError(f"{spec['title']}: class folder '{sub}' contains no images")
            train += [(f.relative_to(folder).as_posix(), index[w]) for f in files]
        ann = require_file(folder / "val" / "val_annotations.txt", "labels of the validation images", spec)
        test = []
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise DataError(f"{spec['title']}: '{ann}' line {n} names no known class: {line!r}")
            rel = f"val/images/{parts[0]}"
            if not (folder / rel).is_file():
                raise DataError(f"{spec['title']}: missing file '{folder / rel}' (listed in '{ann}' line {n})")
            test.append((rel, index[parts[1]]))
        test.sort()
        return build_from_items(cfg, spec, folder, "official", train, test, wnids, self.reports, mean=TINY_MEAN,
                                std=TINY_STD)
