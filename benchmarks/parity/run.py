"""Run rows of the parity table: the official code and ours, one seed after the other, on the shared setup.

    python -m benchmarks.parity.run --rows slca sema --seeds 0 1 2   # results/<row>/{official,ours}_seed<s>.json
    python -m benchmarks.parity.table                               # the table into benchmarks/parity/README.md

Each row is defined in ``benchmarks/parity/official/<strategy>.py`` (``ROWS``: our overrides and the official
runner's arguments). The official side runs in a subprocess of ``--python`` (default: the harness's virtual
environment ``benchmarks/parity/.cache/venv``, which adds the official code's extra packages from
``requirements-official.txt`` to this Python's); both sides get the same thread count, and their wall times are
measured the same way (the whole subprocess, start-up included).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.parity.common import (
    CACHE,
    HERE,
    OFFICIAL,
    SEEDS,
    RunResult,
    make_setup,
    run_ours,
    thread_env,
    write_npz,
)

VENV = CACHE / "venv"
REQUIREMENTS = HERE / "requirements-official.txt"


def all_rows() -> dict[str, tuple[str, dict]]:
    """row name -> (strategy module name, row spec), from every ``official/<name>.py`` that exists."""
    rows: dict[str, tuple[str, dict]] = {}
    for name in OFFICIAL:
        if not (HERE / "official" / f"{name}.py").exists():
            continue
        mod = importlib.import_module(f"benchmarks.parity.official.{name}")
        for row, spec in mod.ROWS.items():
            rows[row] = (name, spec)
    return rows


def ensure_venv() -> Path:
    """The harness's virtual environment (this Python's packages + the official code's extras)."""
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    stamp = VENV / ".requirements"
    want = REQUIREMENTS.read_text() if REQUIREMENTS.exists() else ""
    if want.strip() and (not stamp.exists() or stamp.read_text() != want):
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(want)
    return py


def run_official(name: str, row: str, spec: dict, setup_npz: Path, seed: int, threads: int,
                 python: str) -> RunResult:
    script = HERE / "official" / f"{name}.py"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [python, str(script), "--row", row, "--setup", str(setup_npz), "--seed", str(seed), "--out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(argv, env=thread_env(threads), capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"official {row} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
        res = RunResult(**json.loads(out.read_text()))
    res.wall_s = round(wall, 2)
    res.command = f"python benchmarks/parity/official/{name}.py --row {row} --setup SETUP.npz --seed {seed}"
    return res


def main(argv: list[str] | None = None) -> None:
    rows = all_rows()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(rows), help=f"rows to run (known: {', '.join(rows)})")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--sides", nargs="+", default=["official", "ours"], choices=["official", "ours"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each run (both sides alike)")
    ap.add_argument("--python", default=None, help="interpreter of the official side (default: the harness venv)")
    args = ap.parse_args(argv)
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(rows)}")
    python = args.python or str(ensure_venv()) if "official" in args.sides else ""
    for seed in args.seeds:
        setup_npz = write_npz(make_setup(seed))
        for row in args.rows:
            name, spec = rows[row]
            for side in args.sides:
                if side == "official":
                    res = run_official(name, row, spec, setup_npz, seed, args.threads, python)
                else:
                    res = run_ours(row, setup_npz, seed, spec["ours"], threads=args.threads)
                path = res.save()
                print(f"{row:>14} {side:>8} seed {seed}: acc {' '.join(f'{a:5.1f}' for a in res.acc)} | last "
                      f"{res.last:5.1f} avg-inc {res.avg_inc:5.1f} | {res.wall_s:6.1f} s -> {path.name}", flush=True)


if __name__ == "__main__":
    main()
