"""Make the parity table from ``benchmarks/parity/results/`` and write it into ``benchmarks/parity/README.md``.

    python -m benchmarks.parity.table            # rewrite the table between the README's markers
    python -m benchmarks.parity.table --print    # print it only

Per row: accuracy on the seen classes after each experience (mean ± std over the seeds both sides have), last and
average incremental accuracy, their differences (ours - official), and the wall time of each side. Rows with an
``adapters`` record (SEMA) also show the adapters per block after each experience, per seed, for both sides.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.parity.common import HERE, RESULTS, RunResult

README = HERE / "README.md"
BEGIN, END = "<!-- parity-table:begin -->", "<!-- parity-table:end -->"


def load_results(root: Path = RESULTS) -> dict[str, dict[str, dict[int, RunResult]]]:
    """row -> side -> seed -> result."""
    out: dict[str, dict[str, dict[int, RunResult]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(root.glob("*/*_seed*.json")):
        res = RunResult.load(path)
        out[res.row][res.side][res.seed] = res
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def _curve(res: RunResult, metric: str) -> list[float]:
    return res.acc if metric == "acc" else list(res.extra[metric])


def row_lines(row: str, sides: dict[str, dict[int, RunResult]], metric: str = "acc") -> list[str]:
    """Official, ours and their difference for one row; ``metric`` = ``acc`` or an ``extra`` curve (``til_acc``)."""
    seeds = sorted(set(sides.get("official", {})) & set(sides.get("ours", {})))
    if not seeds:
        return [f"| {row} | (only {', '.join(sides)} ran) |" + " |" * 9]
    if metric != "acc":
        row = f"{row} (task-IL)"
    n_exp = min(len(_curve(sides[s][k], metric)) for s in ("official", "ours") for k in seeds)
    lines = []
    stats: dict[str, dict[str, list[float]]] = {}
    for side in ("official", "ours"):
        runs = [sides[side][k] for k in seeds]
        curves = [_curve(r, metric) for r in runs]
        per_exp = [_ms([c[t] for c in curves]) for t in range(n_exp)]
        stats[side] = {"last": [c[n_exp - 1] for c in curves], "avg": [float(np.mean(c[:n_exp])) for c in curves],
                       "wall": [r.wall_s for r in runs]}
        st = stats[side]
        lines.append(f"| {row} | {side} | " + " | ".join(per_exp) + f" | {_ms(st['last'])} | {_ms(st['avg'])} | "
                     f"{np.mean(st['wall']):.0f} |")
    d_last = np.mean(stats["ours"]["last"]) - np.mean(stats["official"]["last"])
    d_avg = np.mean(stats["ours"]["avg"]) - np.mean(stats["official"]["avg"])
    ratio = np.mean(stats["ours"]["wall"]) / max(1e-9, np.mean(stats["official"]["wall"]))
    ok = "✓" if abs(d_last) <= 2 and abs(d_avg) <= 2 else "✗"
    lines.append(f"| {row} | ours − official ({len(seeds)} seeds) {ok} |" + " |" * n_exp +
                 f" **{d_last:+.1f}** | **{d_avg:+.1f}** | {ratio:.2f}x |")
    return lines


def adapter_lines(results: dict[str, dict[str, dict[int, RunResult]]]) -> list[str]:
    lines = []
    for row, sides in results.items():
        for side in ("official", "ours"):
            for seed, res in sorted(sides.get(side, {}).items()):
                if "adapters" in res.extra:
                    pattern = " → ".join("[" + ",".join(str(a) for a in exp) + "]" for exp in res.extra["adapters"])
                    lines.append(f"| {row} | {side} | {seed} | {pattern} |")
    if not lines:
        return []
    return ["", "Adapters per expandable block after each experience:", "",
            "| row | side | seed | adapters per block, experience 1 → 5 |", "|---|---|---|---|", *lines]


def make_table(results: dict[str, dict[str, dict[int, RunResult]]]) -> str:
    n_exp = max((len(r.acc) for sides in results.values() for runs in sides.values() for r in runs.values()),
                default=5)
    head = ("| row | side | " + " | ".join(f"after exp {t + 1}" for t in range(n_exp)) +
            " | last | avg-inc | wall s |")
    sep = "|---|---|" + "---|" * n_exp + "---|---|---|"
    lines = [head, sep]
    for row in sorted(results):
        lines += row_lines(row, results[row])
        runs = [r for side in results[row].values() for r in side.values()]
        if runs and all("til_acc" in r.extra for r in runs):  # PRD's headline is task-incremental
            lines += row_lines(row, results[row], "til_acc")
    lines += adapter_lines(results)
    return "\n".join(lines)


def write_readme(table: str, path: Path = README) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} lacks the markers {BEGIN} / {END}")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    path.write_text(f"{before}{BEGIN}\n{table}\n{END}{after}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--print", action="store_true", help="print the table, do not write the README")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    table = make_table(load_results(args.results))
    if args.print:
        print(table)
    else:
        write_readme(table)
        print(f"wrote the table into {README}")


if __name__ == "__main__":
    main()
