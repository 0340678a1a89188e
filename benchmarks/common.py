"""Pieces shared by the benchmarks: the identical ``nn.Module`` for every engine, a plain PyTorch loop and
Avalanche's reference strategies run on a :class:`~scenarios.base.Scenario` built by ``cl``.

Both reference engines see exactly the samples of the ``cl`` stream (same class order, same renumbered labels,
same per-experience train/test indices) and the scenario's *evaluation* batch transform (resize + input
convention, no augmentation), so accuracies are comparable with a ``cl`` run that uses ``scenario.augment=false``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cl  # noqa: F401  (import cl before scenarios: scenarios.base imports cl.config)
from scenarios.base import Experience, ExperienceData, Scenario


def build_model(backbone_cfg: Any, scenario: Scenario, head_classes: int | None = None) -> nn.Module:
    """``cl``'s backbone followed by one linear head over all classes of the stream (plain loop, Avalanche)."""
    from cl.backbones import build_backbone

    backbone = build_backbone(backbone_cfg, (scenario.channels, scenario.image_size, scenario.image_size))
    return nn.Sequential(backbone, nn.Linear(backbone.num_features, head_classes or scenario.n_classes))


def count_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def gather(data: ExperienceData, positions: Tensor) -> Tensor:
    """Raw float images of ``data`` at ``positions`` (one indexing op, as ``cl``'s loaders do)."""
    idx = torch.as_tensor(np.asarray(data.indices), dtype=torch.long)[positions]
    return data.source.batch(idx)


def transformed_tensors(data: ExperienceData, transform: nn.Module, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """The whole view as (images after ``transform``, labels); used to feed Avalanche tensor datasets."""
    n = len(data)
    xs = [transform(gather(data, torch.arange(i, min(n, i + chunk)))) for i in range(0, n, chunk)]
    return torch.cat(xs), torch.as_tensor(np.asarray(data.targets), dtype=torch.long)


# ------------------------------------------------------------------------------------------------ plain PyTorch
def plain_loop(model: nn.Module, scenario: Scenario, *, epochs: int, batch_size: int, lr: float,
               momentum: float = 0.9, eval_batch_size: int = 256, seed: int = 0,
               on_experience: Callable[[Experience], None] | None = None) -> dict[str, Any]:
    """Sequential fine-tuning the way one writes it by hand: per experience a fresh SGD, ``epochs`` passes over
    shuffled full batches (the last incomplete batch dropped, as ``cl`` does), then accuracy on every seen test
    experience. Batches are gathered from the source tensor and transformed exactly as ``cl`` does.
    ``on_experience(exp)`` runs before each experience's optimizer is made (grow a head there).
    """
    train_tf, _ = scenario.transforms("normalized")
    g = torch.Generator().manual_seed(seed)
    matrix: list[list[float]] = []
    for exp in scenario.experiences:
        if on_experience is not None:
            on_experience(exp)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        targets = torch.as_tensor(np.asarray(exp.train.targets), dtype=torch.long)
        n = len(exp.train)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for b in range(n // batch_size):
                pos = order[b * batch_size:(b + 1) * batch_size]
                x, y = train_tf(gather(exp.train, pos)), targets[pos]
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        matrix.append(plain_eval(model, scenario, exp.index, eval_batch_size))
    return {"accuracy_matrix": matrix}


@torch.no_grad()
def plain_eval(model: nn.Module, scenario: Scenario, upto: int, batch_size: int) -> list[float]:
    _, eval_tf = scenario.transforms("normalized")
    model.eval()
    n_seen = max(max(e.classes) for e in scenario.experiences[: upto + 1]) + 1
    row = []
    for exp in scenario.experiences[: upto + 1]:
        correct, n = 0, len(exp.test)
        targets = torch.as_tensor(np.asarray(exp.test.targets), dtype=torch.long)
        for i in range(0, n, batch_size):
            pos = torch.arange(i, min(n, i + batch_size))
            logits = model(eval_tf(gather(exp.test, pos)))[:, :n_seen]
            correct += int((logits.argmax(1) == targets[pos]).sum())
        row.append(correct / max(1, n))
    model.train()
    return row


# ------------------------------------------------------------------------------------------------ Avalanche
class WithTransforms(nn.Module):
    """``net`` behind the scenario's batch transforms: ``train_tf`` in training mode, ``eval_tf`` in eval mode.

    Gives Avalanche the same per-batch input pipeline as ``cl`` (resize, augmentation, input convention) while its
    data sets hold raw [0, 1] images. The transforms have buffers only, so the parameters are those of ``net``.
    """

    def __init__(self, net: nn.Module, train_tf: nn.Module, eval_tf: nn.Module) -> None:
        super().__init__()
        self.net, self.train_tf, self.eval_tf = net, train_tf, eval_tf

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.train_tf(x) if self.training else self.eval_tf(x))


def avalanche_benchmark(scenario: Scenario, train_limit: int | None = None) -> Any:
    """An Avalanche ``tensors_benchmark`` holding the stream's raw [0, 1] images (same samples, same labels).

    ``train_limit`` keeps a random subset of that many training samples per experience (smoke tests only).
    """
    from avalanche.benchmarks import tensors_benchmark

    identity = nn.Identity()
    train = [transformed_tensors(e.train, identity) for e in scenario.experiences]
    if train_limit is not None:
        g = torch.Generator().manual_seed(0)
        train = [(x[k], y[k]) for x, y in train for k in [torch.randperm(len(y), generator=g)[:train_limit]]]
    test = [transformed_tensors(e.test, identity) for e in scenario.experiences]
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * len(train),
                             complete_test_set_only=False)


def run_avalanche(kind: str, model: nn.Module, scenario: Scenario, *, epochs: int, batch_size: int, lr: float,
                  momentum: float = 0.9, eval_batch_size: int = 256, convention: str = "normalized",
                  weight_decay: float = 0.0, ewc_lambda: float = 100.0, lwf_alpha: float = 1.0,
                  lwf_temperature: float = 2.0, train_limit: int | None = None) -> dict[str, Any]:
    """Train Avalanche's ``Naive``/``EWC``/``LwF`` on the stream as a user would: accuracy and forgetting metrics
    on, no console logger; evaluate on the seen test experiences after each experience.

    ``model`` is wrapped in the scenario's batch transforms for ``convention`` (:class:`WithTransforms`).
    Returns the accuracy matrix R[i][j] (from Avalanche's own per-experience accuracy metric) and the wall time.
    """
    import warnings

    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training import EWC, LwF, Naive
    from avalanche.training.plugins import EvaluationPlugin

    t0 = time.perf_counter()
    bench = avalanche_benchmark(scenario, train_limit)
    model = WithTransforms(model, *scenario.transforms(convention))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                     forgetting_metrics(experience=True, stream=True), loggers=[])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    common = dict(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=batch_size,
                  train_epochs=epochs, eval_mb_size=eval_batch_size, device="cpu", evaluator=evaluator)
    if kind == "naive":
        strategy = Naive(**common)
    elif kind == "ewc":
        strategy = EWC(ewc_lambda=ewc_lambda, **common)
    elif kind == "lwf":
        strategy = LwF(alpha=lwf_alpha, temperature=lwf_temperature, **common)
    else:
        raise ValueError(f"unknown Avalanche strategy '{kind}' (naive | ewc | lwf)")
    matrix: list[list[float]] = []
    n = len(bench.train_stream)
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        res = strategy.eval(bench.test_stream[: i + 1])
        row = []
        for j in range(i + 1):
            key = next(k for k in res if k.startswith("Top1_Acc_Exp/eval_phase/test_stream") and
                       k.endswith(f"Exp{j:03d}"))
            row.append(float(res[key]))
        matrix.append(row)
    wall = time.perf_counter() - t0
    assert len(matrix) == n
    return {"accuracy_matrix": matrix, "wall_s": wall}
