"""k-FPF, ER, DER++ and the FPF add-on on the k-FPF CPU setting, several seeds each; the table of
``docs/strategies/kfpf.md`` and ``benchmarks/README.md``.

The setting is ``configs/kfpf/cpu.yaml`` (split digits at 16 px, 5 x 2 classes, the width-8 CNN, 10 epochs per
experience, batch 32, plain SGD lr 0.05, buffer 100) and its siblings ``configs/er/cpu.yaml``,
``configs/derpp/cpu.yaml`` and ``configs/kfpf/cpu_finetune.yaml``. Each row is one ``cl train`` command line (shown
in the table), run once per seed in a subprocess; accuracy is class-incremental over all seen test samples, FLOPs
are the FLOPs callback's ``compute/cumulative_flops`` after the last experience (training and FPF calls).

    python benchmarks/kfpf_cpu.py                 # 5 seeds of every row (~10 min on 2 cores), tables -> stdout
    python benchmarks/kfpf_cpu.py --write         # ... and into the two documents (between their markers)
    python benchmarks/kfpf_cpu.py --seeds 0 --only er "k-FPF-CE"
    python benchmarks/kfpf_cpu.py --quick         # smoke test: seed 0, 1 epoch of 2 batches per experience

Runs are cached under ``benchmarks/kfpf_cpu_cache/`` (git-ignored) by a hash of the command line, the config
files it reads and the source of ``strategies/``, ``cl/components/`` and ``cl/callbacks/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "kfpf_cpu_cache"
MARK_START, MARK_END = "<!-- kfpf-cpu:start -->", "<!-- kfpf-cpu:end -->"
DOCS = [REPO / "docs" / "strategies" / "kfpf.md", REPO / "benchmarks" / "README.md"]

#: (label, arguments after ``cl train``); the first ``er`` row is the FLOPs reference
ROWS: list[tuple[str, str]] = [
    ("finetune (lower bound)", "config=configs/kfpf/cpu_finetune.yaml"),
    ("er", "config=configs/er/cpu.yaml"),
    ("derpp", "config=configs/derpp/cpu.yaml"),
    ("k-FPF-CE", "config=configs/kfpf/cpu.yaml"),
    ("k-FPF-KD", "config=configs/kfpf/cpu.yaml strategy.variant=kd"),
    ("finetune + FPF", "config=configs/kfpf/cpu_finetune.yaml fpf.enabled=true"),
    ("er + FPF", "config=configs/er/cpu.yaml fpf.enabled=true"),
    ("derpp + FPF", "config=configs/derpp/cpu.yaml fpf.enabled=true"),
    ("k-FPF-CE, paper modules only (BN + head)", "config=configs/kfpf/cpu.yaml fpf.modules=[auto]"),
    ("k-FPF-CE, previous preset (BN + head, 20 it., lr 0.05)",
     "config=configs/kfpf/cpu.yaml fpf.modules=[auto] fpf.iters=20 fpf.lr=0.05"),
]


def source_digest(args: str) -> str:
    """Hash of the command line, the config files it names (and what they extend) and the relevant sources."""
    h = hashlib.sha256(args.encode())
    files = []
    for tok in shlex.split(args):
        if tok.startswith("config="):
            path = REPO / tok.split("=", 1)[1]
            files += [path, *path.parent.glob("*.yaml")]  # ``extends:`` stays within the folder here
    for folder in ("strategies", "cl/components", "cl/callbacks"):
        files += sorted((REPO / folder).glob("*.py"))
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


QUICK = "strategy.epochs=1 trainer.limit_train_batches=2"  # --quick: checks the plumbing, not results


def run(label: str, args: str, seed: int, rerun: bool, cache: Path = CACHE) -> dict[str, Any]:
    folder = cache / f"{source_digest(args)}-seed{seed}"
    metrics = folder / "metrics.json"
    if rerun or not metrics.is_file():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "cl", "train", *shlex.split(args), f"seed={seed}", f"run.dir={folder}",
               "run.overwrite=true", "run.checkpoint=false", "trainer.logger=none"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{label} seed {seed} failed:\n{proc.stderr[-2000:]}")
        print(f"[{time.strftime('%H:%M:%S')}] {label}, seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    m = json.loads(metrics.read_text())
    last = m["records"][str(m["n_experiences"] - 1)]
    seen = [sum(c[: i + 1]) / sum(t[: i + 1]) for i, (c, t) in enumerate(zip(m["correct"], m["total"]))]
    return {"label": label, "seed": seed, "last": m["last_acc"], "inc": m["avg_inc_acc"], "fgt": m["forgetting"],
            "flops": last["compute/cumulative_flops"], "seen": seen}


def ms(values: list[float], scale: float = 100.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def tables(results: list[dict[str, Any]], seeds: list[int]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    ref = statistics.mean(r["flops"] for r in by["er"]) if "er" in by else None
    lines = [f"Made by `python benchmarks/kfpf_cpu.py --seeds {' '.join(map(str, seeds))}` "
             f"({time.strftime('%Y-%m-%d')}, 2 CPU cores); mean ± std over seeds {', '.join(map(str, seeds))}.", "",
             "| run | `cl train ...` | last acc % | avg inc acc % | forgetting % | training GFLOPs | FLOPs vs `er` |",
             "|---|---|---|---|---|---|---|"]
    for label, args in ROWS:
        rs = by.get(label)
        if not rs:
            continue
        fl = statistics.mean(r["flops"] for r in rs)
        ratio = f"{fl / ref:.2f}x" if ref else "–"
        lines.append(f"| {label} | `{args}` | {ms([r['last'] for r in rs])} | {ms([r['inc'] for r in rs])} | "
                     f"{ms([r['fgt'] for r in rs])} | {fl / 1e9:.2f} | {ratio} |")
    n = max(len(r["seen"]) for r in results)
    lines += ["", "Accuracy on all seen classes after each experience (%, mean over seeds):", "",
              "| run | " + " | ".join(f"exp {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
    for label, _ in ROWS:
        rs = by.get(label)
        if rs:
            cols = [100 * statistics.mean(r["seen"][i] for r in rs) for i in range(n)]
            lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def write(block: str, docs: list[Path] = DOCS) -> None:
    for doc in docs:
        text = doc.read_text()
        if MARK_START not in text:
            raise SystemExit(f"{doc}: no {MARK_START} marker; add the two markers where the table goes")
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        doc.write_text(f"{head}{MARK_START}\n\n{block}\n\n{MARK_END}{tail}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--only", nargs="+", default=None, help="row labels")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--rerun", action="store_true", help="ignore cached runs")
    p.add_argument("--write", action="store_true", help="write the tables into the documents")
    p.add_argument("--docs", type=Path, nargs="+", default=DOCS, help="documents for --write (default: the two)")
    p.add_argument("--cache", type=Path, default=CACHE, help="cache folder")
    p.add_argument("--quick", action="store_true", help=f"seed 0 and `{QUICK}` on every row: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    unknown = sorted(set(args.only or []) - {label for label, _ in ROWS})
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {unknown}; the rows are {[label for label, _ in ROWS]}")
    rows = [(label, f"{a} {QUICK}" if args.quick else a) for label, a in ROWS if not args.only or label in args.only]
    jobs = [(label, a, s) for s in args.seeds for label, a in rows]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(lambda j: run(*j, args.rerun, args.cache), jobs))
    block = tables(results, args.seeds)
    print(block)
    if args.write:
        write(block, args.docs)
    return results


if __name__ == "__main__":
    main()
