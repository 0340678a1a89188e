"""Engine overhead: ``cl`` (the Runner, one Lightning Trainer per phase) vs a plain PyTorch loop vs Avalanche.

Same stream (split Fashion-MNIST, 5 experiences of 2 classes, natural class order, no augmentation), same model
(``cl``'s backbone + one linear head per experience, as ``strategy=finetune`` grows it; ``--plain-heads single``
gives the plain loop one 10-way head instead, and Avalanche always has that), same epochs, batch size, optimizer
(SGD, lr 0.01, momentum 0.9); each engine trains every experience and then evaluates on every seen test
experience. Two models: a small CNN (compute-bound) and a tiny MLP (overhead-bound). Each timed run is a fresh
subprocess (imports excluded from the time, data loading included), engines interleaved in rotating order so that
load from other processes spreads over all of them. Prints a table of median wall and CPU times and ratios to
the plain loop, and JSON with every run.

    python benchmarks/engine_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("plain", "ours", "avalanche")
MODELS = {"cnn": ["backbone=cnn", "backbone.width=32"], "mlp": ["backbone=mlp", "backbone.hidden=128"]}


def overrides(model: str, args: argparse.Namespace) -> list[str]:
    return [
        "scenario=split_fmnist", "scenario.n_experiences=5", "scenario.augment=false",
        f"scenario.train_per_class={args.train_per_class}" if args.train_per_class else "scenario.train_per_class=null",
        *MODELS[model], "strategy=finetune", f"strategy.lr={args.lr}", "strategy.momentum=0.9",
        f"strategy.epochs={args.epochs}", f"data.batch_size={args.batch_size}", "data.eval_batch_size=256",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
        "run.checkpoint=false", "run.overwrite=true", f"seed={args.seed}",
    ]


def growing_heads(backbone_cfg: Any, scenario: Any) -> Any:
    """The network ``strategy=finetune`` trains, for the plain loop: the backbone and one linear head per
    experience, outputs concatenated (``cl.strategy.IncrementalClassifier``); ``net.grow(exp)`` adds the head."""
    from torch import Tensor, nn

    from cl.backbones import build_backbone
    from cl.strategy import IncrementalClassifier

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            size = (scenario.channels, scenario.image_size, scenario.image_size)
            self.backbone = build_backbone(backbone_cfg, size)
            self.classifier = IncrementalClassifier(self.backbone.num_features)

        def grow(self, exp: Any) -> None:
            new = max(exp.classes) + 1 - self.classifier.n_classes
            if new > 0:
                self.classifier.grow(new)

        def forward(self, x: Tensor) -> Tensor:
            return self.classifier(self.backbone(x))

    return Net()


def worker(engine: str, model: str, args: argparse.Namespace) -> dict:
    """One timed run in this process; returns wall time and the accuracy matrix."""
    import torch

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.common import build_model, plain_loop, run_avalanche
    from cl import build_config, train
    from cl.config import section
    from cl.runner import build_scenario, quiet_lightning
    from cl.utils import seed_everything

    torch.set_num_threads(args.threads)
    quiet_lightning()
    if engine == "avalanche":
        import avalanche.training  # noqa: F401  (import outside the timed region, as for the others)
    if args.test_per_class:  # every engine evaluates on the same per-class subset of the test set
        import cl.runner as runner_mod
        from benchmarks.proxy.run import subsample_test

        original = runner_mod.build_scenario
        runner_mod.build_scenario = lambda c: subsample_test(original(c), args.test_per_class)
        build_scenario = runner_mod.build_scenario
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(None, overrides(model, args) + [f"run.dir={tmp}/run"])
        t0, c0 = time.perf_counter(), time.process_time()
        if engine == "ours":
            res = train(cfg)
            matrix = res.accuracy_matrix
        else:
            seed_everything(cfg.seed)
            scenario = build_scenario(cfg)
            kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.9)
            if engine == "plain" and args.plain_heads == "grow":
                net = growing_heads(section(cfg, "backbone"), scenario)
                out = plain_loop(net, scenario, seed=args.seed, on_experience=net.grow, **kw)
            else:
                net = build_model(section(cfg, "backbone"), scenario)
                out = (plain_loop(net, scenario, seed=args.seed, **kw) if engine == "plain"
                       else run_avalanche("naive", net, scenario, **kw))
            matrix = out["accuracy_matrix"]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    last = [v for v in matrix[-1] if v is not None]
    return {"engine": engine, "model": model, "wall_s": wall, "cpu_s": cpu, "last_acc": sum(last) / len(last)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})" if values else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--train-per-class", type=int, default=0, help="0 = all 6,000 training images per class")
    p.add_argument("--test-per-class", type=int, default=0, help="0 = all 1,000 test images per class")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plain-heads", choices=("grow", "single"), default="grow",
                   help="plain loop's classifier: 'grow' = one head per experience as strategy=finetune (the same "
                        "network as ours), 'single' = one 10-way head from the start (fewer, larger kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every run here")
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args)), flush=True)
        return

    passthrough = [f"--epochs={args.epochs}", f"--batch-size={args.batch_size}", f"--lr={args.lr}",
                   f"--train-per-class={args.train_per_class}",
                   f"--test-per-class={args.test_per_class}", f"--threads={args.threads}", f"--seed={args.seed}",
                   f"--plain-heads={args.plain_heads}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    runs: list[dict] = []
    for rep in range(args.repeats):
        for model in args.models:
            order = list(args.engines)
            order = order[rep % len(order):] + order[: rep % len(order)]  # rotate: no engine always goes first
            for engine in order:
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", engine, model,
                                      *passthrough], capture_output=True, text=True, env=env, cwd=REPO)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{engine}/{model} failed:\n{out.stderr[-3000:]}")
                r = json.loads(line[7:]) | {"rep": rep, "load1_before": load}
                runs.append(r)
                print(f"rep {rep} {model:4s} {engine:9s} {r['wall_s']:7.2f} s (cpu {r['cpu_s']:7.2f} s)  "
                      f"last_acc {r['last_acc']:.3f}  "
                      f"load {load:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1) + "\n")
    print("\n| model | engine | wall s (median, min-max) | wall ratio to plain (median, min-max) "
          "| CPU-time ratio to plain (median, min-max) | last acc |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        base = {r["rep"]: r["wall_s"] for r in runs if r["model"] == model and r["engine"] == "plain"}
        base_cpu = {r["rep"]: r["cpu_s"] for r in runs if r["model"] == model and r["engine"] == "plain"}
        for engine in args.engines:
            rs = [r for r in runs if r["model"] == model and r["engine"] == engine]
            walls = [r["wall_s"] for r in rs]
            ratios = [r["wall_s"] / base[r["rep"]] for r in rs if r["rep"] in base]
            cratios = [r["cpu_s"] / base_cpu[r["rep"]] for r in rs if r["rep"] in base_cpu]
            print(f"| {model} | {engine} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
                  f"{spread(ratios)} | {spread(cratios)} | {statistics.median(r['last_acc'] for r in rs):.3f} |")


if __name__ == "__main__":
    main()
