"""DomainNet (345 classes, six domains) from the official images and per-domain train/test lists.

* ``split_domainnet``: class-incremental over the union of the chosen domains, as LAE uses it (5 x 69 classes).
* ``domainnet_domains``: domain-incremental, one experience per domain, every experience has all 345 classes.

The official ``<domain>_train.txt`` / ``<domain>_test.txt`` lists (``<domain>/<class>/<file> <label>``) define the
split; every listed file must exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.domain import domain_incremental, resolve_domain_order
from scenarios.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileScenarioConfig,
    apply_protocol,
    build_from_items,
    dataset_folder,
    file_sources,
    lae_orders,
)
from scenarios.verify import SplitReport, load_spec, require_file, verify_split

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
PROTOCOLS: dict[str, dict[str, Any]] = {
    "lae": {"n_experiences": 5, "class_order": "natural", "note": "5 x 69 classes over all six domains"},
}
PROTOCOLS.update(lae_orders("domainnet", PROTOCOLS["lae"]))


def read_list(folder: Path, domain: str, part: str, spec: dict[str, Any]) -> list[tuple[str, int]]:
    """Items of ``<domain>_<part>.txt``; a missing list or listed file is a DataError naming it."""
    path = require_file(folder / f"{domain}_{part}.txt", f"the official {part} list of domain '{domain}'", spec)
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{spec['title']}: '{path}' line {n} is not '<path> <label>': {line!r}")
        rel = parts[0]
        if not (folder / rel).is_file():
            raise DataError(f"{spec['title']}: missing file '{folder / rel}' (listed in '{path}' line {n})")
        items.append((rel, int(parts[1])))
    if not items:
        raise DataError(f"{spec['title']}: '{path}' lists no images")
    return items


def class_names_of(items: list[tuple[str, int]], n: int) -> list[str]:
    names = [str(i) for i in range(n)]
    for rel, lab in items:
        parts = rel.split("/")
        if len(parts) >= 3 and 0 <= lab < n:
            names[lab] = parts[-2]
    return names


@dataclass
class DomainNetConfig(FileScenarioConfig):
    domains: list[str] | None = opt(None, "domains to use, in stream order (null = clipart infograph painting "
                                    "quickdraw real sketch)")
    n_classes: int = opt(345, "size of the label set (345 in DomainNet)", ge=1)


@register_scenario("split_domainnet")
class SplitDomainNet(ScenarioBuilder):
    description = "DomainNet class-incremental over all domains (LAE), 345 classes, default 5 x 69"
    protocols = PROTOCOLS

    @dataclass
    class Config(DomainNetConfig):
        name: str = opt("split_domainnet", "registered scenario name")

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        cfg = apply_protocol(cfg, self.protocols)
        spec = load_spec("domainnet")
        folder = dataset_folder(data, spec)
        doms = resolve_domain_order(DOMAINS, cfg.domains)
        train = [it for d in doms for it in read_list(folder, d, "train", spec)]
        test = [it for d in doms for it in read_list(folder, d, "test", spec)]
        names = class_names_of(train, cfg.n_classes)
        key = "official" if list(doms) == list(DOMAINS) else "official-" + "-".join(doms)
        return build_from_items(cfg, spec, folder, key, train, test, names, self.reports)


@register_scenario("domainnet_domains")
class DomainNetDomains(ScenarioBuilder):
    description = "DomainNet domain-incremental: one experience per domain, all 345 classes in each"

    protocols: dict[str, dict[str, Any]] = {}

    @dataclass
    class Config(DomainNetConfig):
        name: str = opt("domainnet_domains", "registered scenario name")
        n_experiences: int | None = opt(None, "ignored: one experience per domain", ge=1)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        spec = load_spec("domainnet")
        folder = dataset_folder(data, spec)
        doms = resolve_domain_order(DOMAINS, cfg.domains)
        parts, all_train = [], []
        for d in doms:
            tr, te = read_list(folder, d, "train", spec), read_list(folder, d, "test", spec)
            for part, items in (("train", tr), ("test", te)):
                self.reports.append(verify_split(spec, f"{d}/{part}", items, folder, cfg.verify))
            bad = [lab for _, lab in tr + te if not 0 <= lab < cfg.n_classes]
            if bad:
                raise DataError(f"{spec['title']}: domain '{d}' has label {bad[0]} outside 0..{cfg.n_classes - 1}")
            parts.append((d, *file_sources(cfg, folder, tr, te)[:2]))
            all_train += tr
        return domain_incremental(cfg.name, parts, cfg, augment="none" if cfg.pipeline == "paper" else "crop_flip",
                                  n_classes=cfg.n_classes, image_size=cfg.image_size,
                                  channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  class_names=class_names_of(all_train, cfg.n_classes),
                                  meta={"data_folder": str(folder)})
