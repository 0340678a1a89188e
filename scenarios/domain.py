"""Domain-incremental streams: every experience is one domain and uses the same label set (``kind="domain"``).

Used by ``domainnet_domains`` and ``pacs_domains``. Each domain has its own train and test sources; labels are the
original class ids (no renumbering: the class order is the natural one and every experience lists all classes),
so the strategy's classifier has its full size after the first experience and evaluation on any domain scores
all classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cl.config import ScenarioConfig
from cl.errors import ConfigError
from scenarios.base import Experience, ExperienceData, Scenario


def resolve_domain_order(all_domains: Sequence[str], requested: Sequence[str] | None) -> list[str]:
    """The domains in stream order: ``requested`` (names, validated) or ``all_domains`` as given."""
    if not requested:
        return list(all_domains)
    unknown = [d for d in requested if d not in all_domains]
    if unknown:
        raise ConfigError(f"scenario.domains: unknown domain(s) {unknown} (choose from {', '.join(all_domains)})")
    if len(set(requested)) != len(requested):
        raise ConfigError(f"scenario.domains lists a domain twice: {list(requested)}")
    return list(requested)


def domain_incremental(name: str, domains: Sequence[tuple[str, Any, Any]], cfg: ScenarioConfig, *,
                       n_classes: int, image_size: int, channels: int, mean: tuple[float, ...],
                       std: tuple[float, ...], augment: str = "crop_flip", class_names: list[str] | None = None,
                       meta: dict | None = None) -> Scenario:
    """One experience per ``(domain name, train source, test source)``; every experience has all classes.

    Args:
        name: scenario name.
        domains: the domains in stream order with their train and test sources (original labels 0..C-1).
        cfg: the scenario config (``task_labels`` gives each domain its task label).
        n_classes: the size of the shared label set.
    """
    classes = list(range(n_classes))
    exps = []
    for i, (dom, train, test) in enumerate(domains):
        tr_idx, te_idx = np.arange(len(train)), np.arange(len(test))
        exps.append(Experience(
            index=i, classes=classes, task_label=i if cfg.task_labels else 0, name=dom,
            train=ExperienceData(train, tr_idx, np.asarray(train.targets, dtype=np.int64)),
            test=ExperienceData(test, te_idx, np.asarray(test.targets, dtype=np.int64)),
        ))
    info = {"domains": [d for d, _, _ in domains], **(meta or {})}
    return Scenario(name=name, experiences=exps, n_classes=n_classes, class_order=classes, image_size=image_size,
                    channels=channels, mean=mean, std=std, kind="domain", augment=augment if cfg.augment else "none",
                    class_names=class_names, meta=info)
