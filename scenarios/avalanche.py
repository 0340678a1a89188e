"""``avalanche``: any Avalanche benchmark as a stream.

    cl train scenario=avalanche scenario.factory=avalanche.benchmarks.classic:SplitFMNIST \\
        'scenario.kwargs={n_experiences: 5, dataset_root: /data, seed: 0}'

``scenario.factory`` is ``module:callable`` (Avalanche's classic benchmarks, its generators, or your own function)
called with ``scenario.kwargs``; it returns a benchmark with a ``train_stream`` and a ``test_stream`` of equal length.

* **Kinds**: with ``scenario.kind=auto``, experiences with different task labels make a task-incremental stream,
  experiences that all hold the same classes a domain-incremental one, disjoint classes a class-incremental one.
* **Labels**: class- and task-incremental labels are renumbered to their position in the stream's class order (our
  convention: experience ``i`` owns a contiguous label range; for task streams each (task, class) pair gets its own
  label). Domain streams keep the original ids. The map is in ``Scenario.meta["labels"]`` and the run's
  ``provenance.json``.
* **Transforms**: Avalanche's own transforms are *replaced*: samples are read as raw [0, 1] tensors, and the
  scenario's batch transform (resize to ``scenario.image_size``, our crop/flip augmentation with
  ``scenario.augment``, the strategy's input convention with ``scenario.mean``/``std``) runs on the batch as for
  every other scenario, so Avalanche's normalisation is never applied twice.
* **Lazy**: each experience stays Avalanche's own dataset view; nothing is copied. Samples are read one by one
  (DataLoader workers with ``data.num_workers``).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import ConfigError
from cl.registry import is_import_path, load_object, register_scenario
from scenarios.base import Experience, ExperienceData, Scenario, ScenarioBuilder

STATS_SAMPLES = 2000  # training images averaged for mean/std when the config gives none


def to_unit_tensor(x: Any) -> torch.Tensor:
    """A PIL image, array or tensor as a float (C, H, W) tensor in [0, 1] (uint8 data divided by 255)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        if t.ndim == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)
    else:  # PIL
        from torchvision.transforms.functional import pil_to_tensor

        t = pil_to_tensor(x)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


class AvalancheSource:
    """One Avalanche experience dataset read as raw [0, 1] tensors (its transforms replaced), with ``targets``."""

    def __init__(self, dataset: Any) -> None:
        try:
            self.dataset = dataset.replace_current_transform_group(to_unit_tensor)
        except AttributeError:  # a plain torch dataset: items as they come
            self.dataset = dataset
        self.targets = np.asarray([int(t) for t in dataset.targets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_unit_tensor(self.dataset[i][0])


def _task_label(exp: Any) -> int:
    labels = list(getattr(exp, "task_labels", [0]))
    return int(labels[0]) if labels else 0


def _classes(exp: Any, source: AvalancheSource) -> list[int]:
    listed = getattr(exp, "classes_in_this_experience", None)
    return [int(c) for c in listed] if listed is not None else sorted(set(source.targets.tolist()))


def detect_kind(class_sets: list[list[int]], tasks: list[int]) -> str:
    """task (several task labels), domain (every experience the same classes), class (disjoint classes)."""
    if len(set(tasks)) > 1:
        return "task"
    sets = [set(c) for c in class_sets]
    if all(s == sets[0] for s in sets):
        return "domain"
    if sum(len(s) for s in sets) == len(set().union(*sets)):
        return "class"
    raise ConfigError("scenario=avalanche: experiences share some classes but not all (a new-instances or mixed "
                      "stream); set scenario.kind=domain to treat every experience as holding every class")


@register_scenario("avalanche")
class AvalancheBenchmark(ScenarioBuilder):
    description = "any Avalanche benchmark: scenario.factory=module:callable scenario.kwargs={...}"

    @dataclass
    class Config(ScenarioConfig):
        name: str = opt("avalanche", "registered scenario name")
        factory: str | None = opt(None, "module:callable returning an Avalanche benchmark "
                                        "(avalanche.benchmarks.classic:SplitFMNIST, or your own)")
        kwargs: dict[str, Any] = opt(default_factory=dict, help="keyword arguments of the factory "
                                                                "({n_experiences: 5, dataset_root: PATH})")
        kind: str = opt("auto", "auto | class | task | domain (auto: from task labels and class sets)",
                        choices=("auto", "class", "task", "domain"))
        image_size: int | None = opt(None, "resize to this size (null: the benchmark's own)", ge=1)
        mean: list[float] | None = opt(None, "per-channel mean for the normalized convention (null: measured on "
                                             f"up to {STATS_SAMPLES} training images)")
        std: list[float] | None = opt(None, "per-channel std (null: measured with mean)")

        @staticmethod
        def validate(cfg: Any) -> None:
            if not cfg.factory:
                raise ConfigError("scenario=avalanche needs scenario.factory=module:callable "
                                  "(for example avalanche.benchmarks.classic:SplitFMNIST)")
            if not is_import_path(cfg.factory):
                raise ConfigError(f"scenario.factory '{cfg.factory}' is not of the form module:callable")

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        factory = load_object(cfg.factory, "scenario.factory")
        if not callable(factory):
            raise ConfigError(f"scenario.factory '{cfg.factory}' is not callable")
        kwargs = dict(cfg.kwargs or {})
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as err:
            raise ConfigError(f"scenario.kwargs do not fit {cfg.factory}: {err}") from None
        except ValueError:  # no signature (a builtin): let the call decide
            pass
        with warnings.catch_warnings():  # Avalanche warns about its own deprecations on import and build
            warnings.simplefilter("ignore")
            try:
                bench = factory(**kwargs)
            except Exception as err:  # noqa: BLE001 - missing files, bad arguments: one line naming the factory
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"scenario.factory {cfg.factory} failed: {type(err).__name__}: {msg}") from None
        return from_benchmark(bench, cfg, name=f"avalanche:{cfg.factory.split(':')[-1]}")


def from_benchmark(bench: Any, cfg: AvalancheBenchmark.Config, name: str = "avalanche") -> Scenario:
    """Our :class:`Scenario` over an Avalanche benchmark's streams (lazy views, labels in our convention)."""
    train_stream, test_stream = list(bench.train_stream), list(bench.test_stream)
    if len(train_stream) != len(test_stream):
        raise ConfigError(f"scenario=avalanche: the benchmark has {len(train_stream)} training and "
                          f"{len(test_stream)} test experiences; one test experience per training one is needed")
    trains = [AvalancheSource(e.dataset) for e in train_stream]
    tests = [AvalancheSource(e.dataset) for e in test_stream]
    class_sets = [_classes(e, s) for e, s in zip(train_stream, trains)]
    tasks = [_task_label(e) for e in train_stream]
    kind = detect_kind(class_sets, tasks) if cfg.kind == "auto" else cfg.kind
    exps: list[Experience] = []
    if kind == "domain":
        n_classes = 1 + max(max(max(c) for c in class_sets), *(int(s.targets.max()) for s in tests))
        order = list(range(n_classes))
        labels: dict[str, Any] = {"renumbered": False}
        for i, (tr, te) in enumerate(zip(trains, tests)):
            exps.append(Experience(index=i, classes=order, task_label=tasks[i], name=f"exp{i}",
                                   train=ExperienceData(tr, np.arange(len(tr)), tr.targets),
                                   test=ExperienceData(te, np.arange(len(te)), te.targets)))
    else:
        order, start, per_exp = [], 0, []
        for i, (tr, te, cls) in enumerate(zip(trains, tests, class_sets)):
            remap = {c: start + k for k, c in enumerate(cls)}
            for split, src in (("train", tr), ("test", te)):
                stray = set(np.unique(src.targets).tolist()) - set(remap)
                if stray:
                    raise ConfigError(f"scenario=avalanche: {split} experience {i} holds classes {sorted(stray)} "
                                      f"outside its classes_in_this_experience {cls}")
            exps.append(Experience(
                index=i, classes=list(range(start, start + len(cls))), task_label=tasks[i], name=f"exp{i}",
                train=ExperienceData(tr, np.arange(len(tr)), np.asarray([remap[c] for c in tr.targets], np.int64)),
                test=ExperienceData(te, np.arange(len(te)), np.asarray([remap[c] for c in te.targets], np.int64))))
            order += cls
            per_exp.append({"task": tasks[i], "original": cls, "labels": [start, start + len(cls)]})
            start += len(cls)
        n_classes = start
        labels = {"renumbered": True, "experiences": per_exp}
    first = trains[0][0]
    channels, size = int(first.shape[0]), int(cfg.image_size or first.shape[-1])
    mean, std = _stats(trains, channels) if cfg.mean is None or cfg.std is None else (cfg.mean, cfg.std)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"scenario.mean/std need {channels} values (one per channel)")
    return Scenario(name=name, experiences=exps, n_classes=n_classes, class_order=order, image_size=size,
                    channels=channels, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                    kind=kind, augment="crop" if cfg.augment else "none",  # no flips: digits, text
                    meta={"factory": cfg.factory, "labels": labels})


def _stats(sources: list[AvalancheSource], channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over up to ``STATS_SAMPLES`` training images spread evenly over the experiences."""
    per = max(1, STATS_SAMPLES // len(sources))
    xs = [src[int(k)] for src in sources for k in np.linspace(0, len(src) - 1, min(per, len(src))).astype(int)]
    x = torch.stack(xs).transpose(0, 1).reshape(channels, -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-6).tolist()
