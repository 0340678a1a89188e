"""The GPU check: one short script for a machine with one GPU, printing one table.

1. **ViT-B/16 training step, bf16**: images per second of a plain PyTorch loop (timm ViT-B/16 + linear head, AdamW,
   ``torch.autocast(bfloat16)``) and of ``cl``'s engine (``cl train strategy=finetune`` on the same model, batch and
   precision, ``trainer.precision=bf16-mixed``), both on generated 224 px images already in memory (random
   initialisation: speed does not depend on the weights, and nothing is downloaded).
2. **Data loading vs that need**: ``benchmarks/data_loading.py``'s two loaders on generated JPEGs with 0, 4 and
   ``cpus`` workers: images per second against the training step's rate.
3. **One experience of SLCA, LAE and SEMA** (their paper presets' strategy keys, ViT-B/16 at 224 px, bf16, one
   epoch on generated images of 10 classes): seconds per experience including their post-hoc steps.

    bash benchmarks/gpu/run.sh            # on the GPU machine; < 8 minutes
    python benchmarks/gpu/check.py --smoke   # the same code path on a CPU with tiny sizes (tests use it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: per-strategy keys of one experience (the paper presets' optimisers, 1 epoch, no class-alignment shortcuts)
STRATEGIES = {
    "slca": ["strategy=slca", "strategy.epochs=1", "strategy.milestones=[]", "strategy.ca_epochs=1"],
    "lae": ["strategy=lae", "strategy.epochs=1", "strategy.num_freeze_epochs=0"],
    "sema": ["strategy=sema", "strategy.epochs=1", "strategy.rd_epochs=1"],
}


def synthetic_npz(path: Path, n_per_class: int, classes: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = n_per_class * classes
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(classes), n_per_class)
    np.savez(path, train_x=x, train_y=y, test_x=x[: max(classes, n // 4)], test_y=y[: max(classes, n // 4)],
             mean=np.asarray([0.5, 0.5, 0.5]), std=np.asarray([0.25, 0.25, 0.25]))
    return path


def plain_step_rate(model_name: str, size: int, batch: int, steps: int, device: str, bf16: bool) -> float:
    """Images per second of a plain training loop (after 3 warm-up steps)."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=10, img_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - start)


def cl_run(args: argparse.Namespace, npz: Path, keys: list[str], out: Path) -> dict:
    """One ``cl train`` in a subprocess; returns its metrics.json."""
    argv = [sys.executable, "-m", "cl", "train", "scenario=npz", f"scenario.path={npz}", "scenario.n_experiences=1",
            "scenario.augment=false", "backbone=timm", f"backbone.model={args.model}",
            f"backbone.img_size={args.size}", f"data.batch_size={args.batch}", f"data.eval_batch_size={args.batch}",
            f"trainer.accelerator={args.accelerator}", f"trainer.precision={args.precision}",
            "trainer.enable_progress_bar=false", "trainer.logger=none", "run.checkpoint=false", f"run.dir={out}",
            *keys]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cl train failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the code path only)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    args.model = "vit_base_patch16_224" if not args.smoke else "vit_tiny_patch16_224"
    args.size, args.batch = (224, 128) if not args.smoke else (32, 8)
    args.accelerator = "gpu" if gpu else "cpu"
    args.precision = "bf16-mixed" if gpu else "32-true"
    per_class, steps = (100, 30) if not args.smoke else (2, 2)
    device = "cuda" if gpu else "cpu"
    rows: list[tuple[str, str]] = []
    numbers: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        npz = synthetic_npz(tmp_path / "data.npz", per_class, 10, args.size)
        plain = plain_step_rate(args.model, args.size, args.batch, steps, device, gpu)
        numbers["plain_img_s"] = plain
        rows.append((f"plain loop, {args.model} training step ({args.precision})", f"{plain:.0f} img/s"))
        m = cl_run(args, npz, ["strategy=finetune", "strategy.epochs=2"], tmp_path / "engine")
        # the first epoch includes start-up and compilation of kernels; the train time covers both epochs
        seen = 2 * per_class * 10
        ours = seen / m["experiences"][0]["train_time_s"]
        numbers["cl_img_s"] = ours
        rows.append(("cl engine, same model, batch and precision (2 epochs incl. warm-up)",
                     f"{ours:.0f} img/s ({ours / plain:.2f}x plain)"))

        from benchmarks import data_loading

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        folder = tmp_path / "jpegs"
        items = data_loading.make_jpegs(folder, 512 if not args.smoke else 16)
        for w in sorted({0, min(4, cpus), cpus} if not args.smoke else {0}):
            rate = data_loading.epoch_rate(data_loading.ours(folder, items, w, 64 if not args.smoke else 4), 1)
            numbers[f"loader_{w}w_img_s"] = rate
            rows.append((f"cl file loader, RandomResizedCrop(224) + flip, {w} workers",
                         f"{rate:.0f} img/s ({rate / plain:.2f}x the step's need)"))
        for name, keys in STRATEGIES.items():
            start = time.perf_counter()
            cl_run(args, npz, keys, tmp_path / name)
            numbers[f"{name}_s"] = time.perf_counter() - start
            rows.append((f"{name}: one experience (10 classes, {per_class * 10} images, 1 epoch, post-hoc steps)",
                         f"{numbers[f'{name}_s']:.0f} s"))
    device_name = torch.cuda.get_device_name(0) if gpu else "CPU (smoke mode)" if args.smoke else "CPU"
    print(f"\nGPU check on {device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| measurement | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
