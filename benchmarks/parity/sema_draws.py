"""SEMA's draw-to-draw spread on ONE class order: several torch seeds, the same count on both sides.

    python -m benchmarks.parity.sema_draws --order 0 --seeds 0 1 2 3 4 5 --threads 1

The parity seed ``s`` of the table sets both the class order (the setup of seed ``s``) and the torch seed (initial
weights of adapters, RDs, routers and classifier, and the loader shuffles). Here the class order stays fixed (the
setup of ``--order``) and only the torch seed varies: the official runner's ``--seed`` (their
``trainer._set_random``) and our ``seed=``. ``official/sema.py --check-run`` showed that for one draw the two codes
take the same decisions and end with the same weights, so what differs between two runs of the same order is the
draw; this measures how far apart draws land on each side. Results: ``results/sema/draws_order<o>/`` (one
:class:`~benchmarks.parity.common.RunResult` per side and torch seed; a sub-folder, so the table ignores it).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.parity.common import RESULTS, RunResult, make_setup, run_ours, write_npz
from benchmarks.parity.official.sema import ROWS


def summary(results: dict[str, list[RunResult]]) -> dict[str, dict[str, float]]:
    """Per side: mean, std (ddof 1), min and max of last and average incremental accuracy over the draws."""
    out: dict[str, dict[str, float]] = {}
    for side, runs in results.items():
        last = np.array([r.last for r in runs])
        avg = np.array([r.avg_inc for r in runs])
        out[side] = {"n": len(runs), "last_mean": float(last.mean()), "last_std": float(last.std(ddof=1)),
                     "last_min": float(last.min()), "last_max": float(last.max()),
                     "avg_inc_mean": float(avg.mean()), "avg_inc_std": float(avg.std(ddof=1))}
    return out


def run_draws(row: str, spec: dict, order: int, seeds: list[int], sides: list[str], threads: int,
              python: str) -> Path:
    """Run the missing (side, torch seed) runs of ``row`` on class order ``order`` into
    ``results/<row>/draws_order<order>/`` (kept runs are reused) and print a line per run; returns the folder."""
    from benchmarks.parity.run import run_official

    setup_npz = write_npz(make_setup(order))
    root = RESULTS / row / f"draws_order{order}"
    for seed in seeds:
        for side in sides:
            path = root / f"{side}_seed{seed}.json"
            if path.exists():
                continue
            if side == "official":
                res = run_official(row, row, spec, setup_npz, seed, threads, python)
            else:
                res = run_ours(row, setup_npz, seed, spec["ours"], threads=threads)
            res.extra["class_order_seed"] = order
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(res), indent=1) + "\n")
            print(f"order {order} torch seed {seed} {side:>8}: acc {' '.join(f'{a:5.1f}' for a in res.acc)}"
                  f" | last {res.last:5.1f} avg-inc {res.avg_inc:5.1f}", flush=True)
    return root


def print_summary(results: dict[str, list[RunResult]]) -> None:
    for side, s in summary(results).items():
        print(f"{side:>8} over {s['n']} draws: last {s['last_mean']:.1f} ± {s['last_std']:.1f} "
              f"[{s['last_min']:.1f}, {s['last_max']:.1f}], avg-inc {s['avg_inc_mean']:.1f} ± {s['avg_inc_std']:.1f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", type=int, default=0, help="class order (the setup of this parity seed)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5], help="torch seeds, both sides")
    ap.add_argument("--sides", nargs="+", default=["official", "ours"], choices=["official", "ours"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the official side (SEMA needs no "
                    "package beyond this project's)")
    args = ap.parse_args(argv)
    root = run_draws("sema", ROWS["sema"], args.order, args.seeds, args.sides, args.threads, args.python)
    print_summary({side: [RunResult.load(p) for p in sorted(root.glob(f"{side}_seed*.json"))]
                   for side in args.sides})


if __name__ == "__main__":
    main()
