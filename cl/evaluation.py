"""Evaluation outside ``Trainer.test``: a lean no-grad loop over rank shards, counts summed across ranks.

For each evaluation pass (``strategy.eval_passes()``) and each experience it counts correct class-incremental
predictions (argmax over every seen class) and correct task-incremental ones (argmax within the experience's own
classes). Samples are split across ranks without padding, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cl.data.loaders import make_loader
from cl.distributed import Dist
from scenarios.base import Experience


@dataclass
class PassCounts:
    correct: list[int]
    total: list[int]
    correct_til: list[int]
    #: main pass only, class-incremental streams: [j][k] = test samples of experience j predicted as a class of
    #: experience k (old vs new classes: the recency bias of a class-incremental learner, row by row)
    exp_confusion: list[list[int]] | None = None

    def acc(self, j: int) -> float:
        return self.correct[j] / self.total[j] if self.total[j] else float("nan")


@torch.no_grad()
def evaluate(model: torch.nn.Module, experiences: list[Experience], dist: Dist, device: torch.device,
             batch_size: int = 256, num_workers: int | None = None,
             on_experience: Callable[[], None] | None = None) -> dict[str, PassCounts]:
    """Counts per pass and experience, summed over ranks; ``on_experience`` is called after each experience."""
    was_training = model.training
    model.eval()
    model.to(device)
    passes = model.eval_passes()
    n_seen = int(getattr(model, "n_seen", 0))
    counts = torch.zeros(len(passes), len(experiences), 3, dtype=torch.long)  # (pass, exp, [correct, total, til])
    n_exp = len(experiences)
    conf = torch.zeros(n_exp, n_exp, dtype=torch.long)  # main pass: (true experience, predicted experience)
    labels = [c for e in experiences for c in e.classes]
    disjoint = bool(labels) and len(labels) == len(set(labels))  # not for domain streams (shared classes)
    owner = torch.full((max(labels, default=0) + 1,), -1, dtype=torch.long, device=device)
    for j, e in enumerate(experiences):
        owner[torch.as_tensor(e.classes, dtype=torch.long, device=device)] = j
    for j, exp in enumerate(experiences):
        cls = torch.as_tensor(exp.classes, device=device)
        loader = make_loader(exp.test, batch_size, train=False, rank=dist.rank, world=dist.world_size,
                             num_workers=num_workers)
        for x, y in loader:
            x, y = model.eval_transform(x.to(device)), y.to(device)
            for p, fn in enumerate(passes.values()):
                logits = fn(x)
                k = min(n_seen, logits.shape[1]) if n_seen else logits.shape[1]
                pred = logits[:, :k].argmax(1) if k > 0 else torch.full_like(y, -1)
                counts[p, j, 0] += int((pred == y).sum())
                if p == 0 and disjoint:
                    o = owner[pred[(pred >= 0) & (pred < len(owner))]]
                    conf[j] += torch.bincount(o[o >= 0], minlength=n_exp).cpu()
                counts[p, j, 1] += len(y)
                known = cls[cls < logits.shape[1]]
                if len(known):
                    til = known[logits[:, known].argmax(1)]
                    counts[p, j, 2] += int((til == y).sum())
        if on_experience is not None:
            on_experience()
    counts = dist.all_reduce_sum(counts)
    conf = dist.all_reduce_sum(conf)
    model.train(was_training)
    return {name: PassCounts(counts[p, :, 0].tolist(), counts[p, :, 1].tolist(), counts[p, :, 2].tolist(),
                             conf.tolist() if p == 0 and disjoint else None)
            for p, name in enumerate(passes)}
