"""``pacs_domains``: PACS as a domain-incremental stream (k-FPF's Seq-PACS): 7 classes, 4 domains.

Layout ``pacs/<domain>/<class>/<image>`` (the PACS "kfold" images; ``PACS/kfold`` is also found). Default domain
order sketch -> cartoon -> art_painting -> photo (k-FPF, [unverified] in specs/kfpf.md). Each domain's images are
split per class 80/20 with ``RandomState(split_seed)`` (derived and hashed; the official PACS lists are for domain
generalisation, not for this setting).
"""

from __future__ import annotations

from dataclasses import dataclass

from cl.config import DataConfig, opt
from cl.errors import DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder
from scenarios.domain import domain_incremental, resolve_domain_order
from scenarios.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileScenarioConfig,
    dataset_folder,
    derive_split,
    file_sources,
    scan_class_folders,
)
from scenarios.verify import SplitReport, load_spec, require_dir, verify_split, where_to_get

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
KFPF_ORDER = ["sketch", "cartoon", "art_painting", "photo"]


@register_scenario("pacs_domains")
class PACSDomains(ScenarioBuilder):
    description = "PACS domain-incremental (k-FPF): 4 domains sketch->cartoon->art_painting->photo, 7 classes"
    protocols = {"kfpf": {"domains": KFPF_ORDER, "note": "the default; 4 experiences of 7 classes"}}

    @dataclass
    class Config(FileScenarioConfig):
        name: str = opt("pacs_domains", "registered scenario name")
        image_size: int = opt(64, "images are resized to this size when decoded", ge=8)
        n_experiences: int | None = opt(None, "ignored: one experience per domain", ge=1)
        domains: list[str] = opt(default_factory=lambda: list(KFPF_ORDER), help="domains in stream order")
        split_seed: int = opt(0, "seed of the derived per-class 80/20 split of each domain", ge=0)

    def __init__(self) -> None:
        self.reports: list[SplitReport] = []

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        spec = load_spec("pacs")
        folder = dataset_folder(data, spec)
        doms = resolve_domain_order(PACS_DOMAINS, cfg.domains)
        parts = []
        for d in doms:
            sub = require_dir(folder / d, f"images of domain '{d}'", spec)
            names, items = scan_class_folders(sub, folder, PACS_CLASSES, spec)
            want = spec["domain_images"].get(d)
            if cfg.verify == "full" and want is not None and len(items) != want:
                raise DataError(f"{spec['title']}: domain folder '{sub}' has {len(items)} images, expected {want}; "
                                f"{where_to_get(spec)}; for a deliberately reduced copy set scenario.verify=layout")
            train, test = derive_split(items, 0.2, cfg.split_seed)
            for part, its in (("train", train), ("test", test)):
                self.reports.append(verify_split(spec, f"{d}/{part}", its, folder, cfg.verify))
            parts.append((d, *file_sources(cfg, folder, train, test)[:2]))
        return domain_incremental(cfg.name, parts, cfg, augment="none" if cfg.pipeline == "paper" else "crop_flip",
                                  n_classes=len(PACS_CLASSES), image_size=cfg.image_size,
                                  channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, class_names=PACS_CLASSES,
                                  meta={"data_folder": str(folder)})
