"""``split_imagenet_r``: ImageNet-R (200 ImageNet classes rendered as art, cartoons, ...; 30,000 images).

Three train/test splits, named by ``scenario.split`` (numbers are not comparable across them, common.md §3):

* ``l2p`` (default): LAE's shipped lists ``train_list.txt`` / ``val_list.txt`` (``<path> <label>`` lines, paths
  relative to ``data.root``) when they are in ``data.root`` or in ``imagenet-r/``: the official split, every
  listed file must exist. Without them, per class a seeded 80/20 split of the sorted files (``RandomState
  (split_seed)``), the L2P recipe; the L2P code shuffles with an unseeded RNG, so its exact lists cannot be
  re-derived (deviation, reported by ``cl data check`` and documented in docs/data.md).
* ``coda``: CODA-Prompt's shipped lists ``imagenet-r_train.yaml`` / ``imagenet-r_test.yaml`` (its
  ``dataloaders/splits``; keys ``data`` and ``targets``) when they are in ``data.root`` or ``imagenet-r/``.
  Without them, one seeded 80/20 split of the whole sorted file list (CODA-Prompt's recipe: 24,000 / 6,000).
* ``pilot``: the pre-split ``imagenet-r/train`` and ``imagenet-r/test`` folders distributed with PILOT/SLCA
  (SLCA and SEMA use these).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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
    lae_orders,
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
PROTOCOLS.update(lae_orders("imagenet_r", PROTOCOLS["lae"]))


def lae_lists(folder: Path) -> tuple[Path, Path] | None:
    """LAE's ``train_list.txt`` / ``val_list.txt`` in ``data.root`` or in the ImageNet-R folder, if present."""
    for base in (folder.parent, folder):
        if (base / "train_list.txt").is_file() and (base / "val_list.txt").is_file():
            return base / "train_list.txt", base / "val_list.txt"
    return None


def coda_lists(folder: Path) -> tuple[Path, Path] | None:
    """CODA-Prompt's ``imagenet-r_train.yaml`` / ``imagenet-r_test.yaml`` in ``data.root`` or ``imagenet-r/``."""
    for base in (folder.parent, folder):
        if (base / "imagenet-r_train.yaml").is_file() and (base / "imagenet-r_test.yaml").is_file():
            return base / "imagenet-r_train.yaml", base / "imagenet-r_test.yaml"
    return None


def _relative(folder: Path, listed: str) -> str:
    """A listed path made relative to the ImageNet-R folder (lists prefix it with their own data root)."""
    parts = listed.replace("\\", "/").split("/")
    if folder.name in parts:
        parts = parts[len(parts) - parts[::-1].index(folder.name):]
    return "/".join(parts)


def read_coda_lists(folder: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names, train items, test items) of CODA-Prompt's YAML lists; every listed file must exist."""
    import yaml

    lists = coda_lists(folder)
    assert lists is not None
    parts, names = [], {}
    for path in lists:
        try:
            content = yaml.safe_load(path.read_text()) or {}
            data, targets = list(content["data"]), [int(t) for t in content["targets"]]
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"ImageNet-R: '{path}' is not a CODA-Prompt split (keys data, targets): {err}") from None
        if len(data) != len(targets):
            raise DataError(f"ImageNet-R: '{path}' lists {len(data)} files but {len(targets)} targets")
        items = []
        for listed, label in zip(data, targets):
            rel = _relative(folder, str(listed))
            if not (folder / rel).is_file():
                raise DataError(f"ImageNet-R: missing file '{folder / rel}' (listed in '{path}')")
            names.setdefault(label, rel.split("/")[-2] if "/" in rel else str(label))
            items.append((rel, label))
        parts.append(items)
    return [names.get(i, str(i)) for i in range(max(names) + 1)], parts[0], parts[1]


def read_lae_lists(folder: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names, train items, test items) of LAE's lists; paths made relative to ``folder``; files must exist."""
    lists = lae_lists(folder)
    assert lists is not None
    parts = []
    names: dict[int, str] = {}
    for path in lists:
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataError(f"ImageNet-R: '{path}' line {n} is not '<path> <label>': {line!r}")
            rel = _relative(folder, fields[0])
            if not (folder / rel).is_file():
                raise DataError(f"ImageNet-R: missing file '{folder / rel}' (listed in '{path}' line {n})")
            label = int(fields[1])
            names.setdefault(label, rel.split("/")[-2] if "/" in rel else str(label))
            items.append((rel, label))
        parts.append(items)
    n_classes = max(names) + 1
    return [names.get(i, str(i)) for i in range(n_classes)], parts[0], parts[1]


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
        elif cfg.split == "l2p" and lae_lists(folder) is not None:
            names, train, test = read_lae_lists(folder)
            return build_from_items(cfg, spec, folder, "l2p-lists", train, test, names, self.reports)
        elif cfg.split == "coda" and coda_lists(folder) is not None:
            names, train, test = read_coda_lists(folder)
            return build_from_items(cfg, spec, folder, "coda-lists", train, test, names, self.reports)
        else:
            if (folder / "train").is_dir():
                raise DataError(f"ImageNet-R: '{folder}' is a pre-split copy (it has train/); use "
                                "scenario.split=pilot, or unpack the raw imagenet-r.tar for l2p/coda")
            names, items = scan_class_folders(folder, folder, None, spec)
            verify_total(spec, items, folder, cfg.verify)
            train, test = derive_split(items, 0.2, cfg.split_seed, per_class=cfg.split == "l2p")
        key = cfg.split if cfg.split_seed == 0 else f"{cfg.split}-seed{cfg.split_seed}"
        return build_from_items(cfg, spec, folder, key, train, test, names, self.reports)
