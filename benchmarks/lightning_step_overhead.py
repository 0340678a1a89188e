"""What one training step costs in Lightning's loop itself, against the plain loop, on the overhead-bound MLP.

The smallest possible ``LightningModule`` (784-128-128-10 MLP, SGD with momentum, batches of 64 already in memory,
no logger, callbacks, progress bar or checkpointing) is trained by ``pl.Trainer.fit`` in three ways, and by a plain
loop:

* ``auto``: automatic optimisation (what every ``cl`` strategy uses: Lightning's closure, ``optimizer_step``,
  precision-plugin and strategy wrappers);
* ``manual``: ``automatic_optimization = False``, ``self.optimizers()`` (Lightning's optimizer wrapper, which keeps
  mixed precision and DDP) and ``manual_backward``: what a manual step in ``CLStrategy`` would have to keep;
* ``manual-raw``: manual, with the raw ``torch.optim`` optimizer and ``loss.backward()`` (no precision plugin, no
  backward hooks: the floor of any step that still runs inside Lightning's loop).

Each variant runs a short fit (5 steps) and a long one (905 steps) in one process; the per-step cost is their
difference over 900 steps, the best of ``--repeats`` (interleaved), in process CPU time, so construction and fit
setup do not count.

    python benchmarks/lightning_step_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCH = 64
SHORT, LONG = 5, 905


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class _Batches(torch.utils.data.Dataset):
    def __init__(self, x: Tensor, y: Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i * BATCH:(i + 1) * BATCH], self.y[i * BATCH:(i + 1) * BATCH]


class _Module(pl.LightningModule):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.net, self.mode = _net(), mode
        self.automatic_optimization = mode == "auto"

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.mode == "manual":
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
        elif self.mode == "manual-raw":
            opt = self.optimizers(use_pl_optimizer=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(LONG * BATCH, 784, generator=g), torch.randint(0, 10, (LONG * BATCH,), generator=g)

    def loader(n: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_Batches(x, y, n), batch_size=None)

    def plain(n: int) -> None:
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for xb, yb in loader(n):
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def lightning(mode: str) -> Callable[[int], None]:
        def fit(n: int) -> None:
            trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                                 enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                 limit_val_batches=0)
            trainer.fit(_Module(mode), train_dataloaders=loader(n))
        return fit

    variants = {"plain": plain, **{m: lightning(m) for m in ("auto", "manual", "manual-raw")}}
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            for n in (SHORT, LONG):
                c0 = time.process_time()
                fn(n)
                times.setdefault((name, n), []).append(time.process_time() - c0)
    per_step = {name: (min(times[(name, LONG)]) - min(times[(name, SHORT)])) / (LONG - SHORT) * 1e3
                for name in variants}
    print(f"| loop | CPU ms per step (best of {args.repeats}) | over plain, ms | ratio to plain |")
    print("|---|---|---|---|")
    for name, ms in per_step.items():
        print(f"| {name} | {ms:.3f} | {ms - per_step['plain']:+.3f} | {ms / per_step['plain']:.2f} |")


if __name__ == "__main__":
    main()
