"""``split_imagenet_r``: ImageNet-R (200 ImageNet classes rendered as art, cartoons, ...; 30,000 images).

Three train/test splits, named by ``scenario.split`` (numbers are not comparable across them, common.md §3):

* ``l2p`` (default): per class, a seeded 80/20 split of the sorted files (``RandomState(split_seed)``), the recipe
  of the L2P/DualPrompt code that LAE uses. The official code shuffles with an unseeded global RNG, so its exact
  lists cannot be re-derived; ours are deterministic and hashed (deviation, documented in docs/data.md).
* ``coda``: one seeded 80/20 split of the whole sorted file list (CODA-Prompt's recipe: 24,000 / 6,000).
* ``pilot``: the pre-split ``imagenet-r/train`` and ``imagenet-r/test`` folders distributed with PILOT/SLCA
  (SLCA and SEMA use these).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.folder import (
    FileScenarioConfig,
    apply_protocol,
    build_from_items,
    dataset_folder,
    derive_split,
    scan_class_folders,
    train_test_or_raw,
)
from scenarios.verify import SplitReport, load_spec, verify_total

PROTOCOLS: dict[str, dict[str, Any]] = {
    "slca": {"split": "pilot", "init_classes": 20, "increment": 20, "class_order": "permutation",
             "order_seed": 1993, "note": "10 x 20, PyCIL seed-1993 order, ImageNet mean/std"},
    "sema5": {"split": "pilot", "init_classes": 40, "increment": 40, "class_order": "permutation",
              "order_seed": 1993, "note": "5 x 40"},
    "sema10": {"split": "pilot", "init_classes": 20, "increment": 20, "class_order": "permutation",
               "order_seed": 1993, "note": "10 x 20"},
    "sema20": {"split": "pilot", "init_classes": 10, "increment": 10, "class_order": "permutation",
               "order_seed": 1993, "note": "20 x 10"},
    "lae": {"split": "l2p", "n_experiences": 10, "class_order": "natural", "note": "10 x 20, L2P split"},
    "lae20": {"split": "l2p", "n_experiences": 20, "class_order": "natural", "note": "20 x 10, L2P split"},
    "coda": {"split": "coda", "n_experiences": 10, "class_order": "natural", "note": "10 x 20, CODA-P split"},
}


@register_scenario("split_imagenet_r")
class SplitImageNetR(ScenarioBuilder):
    description = "ImageNet-R, 200 classes, 30k images; scenario.split=l2p|coda|pilot (default 10 x 20)"
    protocols = PROTOCOLS

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("split_imagenet_r", "registered scenario name")
        n_experiences: int | None = opt(10, "number of experiences (ignored when init_classes is set)", ge=1)
        split: str = opt("l2p", "l2p (per-class seeded 80/20) | coda (global seeded 80/20) | pilot (train/ and "
                         "test/ folders)", choices=("l2p", "coda", "pilot"))
        split_seed: int = opt(0, "seed of the derived l2p/coda split", ge=0)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("imagenet_r")
        folder = dataset_folder(data, spec)
        if cfg.split == "pilot":
            if not (folder / "train").is_dir():
                raise DataError(f"ImageNet-R: split=pilot needs the pre-split folder '{folder / 'train'}' (and "
                                f"'{folder / 'test'}') of the PILOT distribution; or use scenario.split=l2p|coda "
                                "with the raw imagenet-r.tar")
            kind, names, train, test = train_test_or_raw(folder, spec, 0.2, cfg.split_seed)
        else:
            if (folder / "train").is_dir():
                raise DataError(f"ImageNet-R: '{folder}' is a pre-split copy (it has train/); use "
                                "scenario.split=pilot, or unpack the raw imagenet-r.tar for l2p/coda")
            names, items = scan_class_folders(folder, folder, None, spec)
            verify_total(spec, items, folder, cfg.verify)
            train, test = derive_split(items, 0.2, cfg.split_seed, per_class=cfg.split == "l2p")
        key = cfg.split if cfg.split_seed == 0 else f"{cfg.split}-seed{cfg.split_seed}"
        return build_from_items(cfg, spec, folder, key, train, test, names, self.reports)
