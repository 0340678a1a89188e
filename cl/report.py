"""``cl report`` (compare runs: a table and a Markdown/HTML report with plots) and ``cl eval`` (evaluate a checkpoint).

::

    cl report runs/                        # every run directory below runs/, seeds grouped (mean ± std)
    cl report RUN_A RUN_B --out report/    # report.md, report.html, summary.csv, runs.csv, plots/*.png
    cl eval RUN_DIR                        # the final model on its own stream -> RUN_DIR/eval/<scenario>/
    cl eval RUN_DIR scenario=split_fmnist data.root=/usr/share/datasets/fashion-mnist

The numbers come from each run's ``metrics.json`` (see :mod:`cl.results`); nothing is recomputed except the
per-experience forgetting in the plots, from the same accuracy matrix.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cl.cli import command, split_args
from cl.errors import UserError
from cl.results import COMPARE_COLUMNS, RunGroup, compare, find_runs, group_runs, load_run

__all__ = ["build_report", "evaluate_run", "format_cell", "cmd_report", "cmd_eval"]

_TITLES = {"last_acc": "last acc (%)", "avg_inc_acc": "avg inc acc (%)", "forgetting": "forgetting (pp)",
           "time_s": "train time (s)", "flops": "train FLOPs", "params_added": "params added"}


# --------------------------------------------------------------------------------------------------- formatting
def _fmt_one(col: str, v: float) -> str:
    if col in ("last_acc", "avg_inc_acc", "forgetting"):
        return f"{100 * v:.2f}"
    if col == "time_s":
        return f"{v:.1f}"
    if col == "flops":
        return f"{v:.3g}"
    return f"{v:,.0f}"


def format_cell(col: str, mean: float, std: float, n: int) -> str:
    """``mean ± std`` for a seed group (accuracies in %), the plain value for one run, ``n/a`` if unknown."""
    if mean is None or math.isnan(mean):
        return "n/a"
    if n > 1 and not math.isnan(std):
        return f"{_fmt_one(col, mean)} ± {_fmt_one(col, std)}"
    return _fmt_one(col, mean)


def _display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as strings: one row per group, ``mean ± std`` cells."""
    rows = []
    for _, r in table.iterrows():
        row = {"group": r["group"], "scenario": r["scenario"], "runs": int(r["n_runs"]), "seeds": r["seeds"]}
        for col in COMPARE_COLUMNS:
            row[_TITLES[col]] = format_cell(col, r[f"{col}_mean"], r[f"{col}_std"], int(r["n_runs"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _print_table(shown: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if shown["scenario"].nunique() <= 1:  # said in the title instead
        title += f" on {shown['scenario'].iloc[0]}" if len(shown) else ""
        shown = shown.drop(columns=["scenario"])
    t = Table(title=title)
    for col in shown.columns:
        left = col in ("group", "scenario", "seeds")
        t.add_column(col, justify="left" if left else "right", no_wrap=not left, overflow="fold")
    for _, r in shown.iterrows():
        t.add_row(*[str(v) for v in r.tolist()])
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(t)


def _markdown_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in r.tolist()) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- report
def _group_plots(g: RunGroup, out: Path) -> dict[str, str]:
    """Heatmap, accuracy over time and forgetting of the group's mean matrix; returns {kind: relative path}."""
    from cl.plots import plot_accuracy_over_time, plot_forgetting, plot_matrix

    mat = g.mean_matrix()
    suffix = f" (mean of {len(g.runs)} seeds)" if len(g.runs) > 1 else ""
    files = {}
    for kind, fn, title in (("matrix", plot_matrix, f"accuracy matrix: {g.label}{suffix}"),
                            ("over_time", plot_accuracy_over_time, f"accuracy per experience: {g.label}{suffix}"),
                            ("forgetting", plot_forgetting, f"forgetting per experience: {g.label}{suffix}")):
        rel = f"plots/{g.slug()}_{kind}.png"
        fn(mat, title=title, path=out / rel)
        files[kind] = rel
    confusions = [(r.metrics.get("experiences") or [{}])[-1].get("exp_confusion") for r in g.runs]
    if confusions and all(c is not None for c in confusions) and len({len(c) for c in confusions}) == 1:
        from cl.plots import plot_exp_confusion

        shares = [np.asarray(c, float) / np.maximum(np.asarray(c, float).sum(1, keepdims=True), 1) for c in confusions]
        rel = f"plots/{g.slug()}_confusion.png"
        plot_exp_confusion(np.mean(shares, 0), title=f"old vs new classes after the last experience: {g.label}{suffix}",
                           path=out / rel)
        files["confusion"] = rel
    return files


def build_report(paths: list[str | os.PathLike], out: str | os.PathLike = "report",
                 formats: tuple[str, ...] = ("md", "html")) -> dict[str, Any]:
    """Load the runs under ``paths``, group seeds, write the report into ``out``; return the tables and files.

    Returns ``{"runs": [RunResults], "table": compare DataFrame, "shown": formatted DataFrame, "files": [Path]}``.
    """
    from cl.plots import plot_compare

    runs = [load_run(p) for p in find_runs(paths)]
    table = compare(runs)
    shown = _display_table(table)
    groups = group_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    plots = {g.label: _group_plots(g, out) for g in groups}
    plot_compare(table["group"].tolist(), table["last_acc_mean"].tolist(), table["last_acc_std"].tolist(),
                 metric="last_acc", path=out / "plots" / "compare_last_acc.png")
    files += sorted((out / "plots").glob("*.png"))
    table.to_csv(out / "summary.csv", index=False)
    pd.concat([r.summary() for r in runs], ignore_index=True).to_csv(out / "runs.csv", index=False)
    files += [out / "summary.csv", out / "runs.csv"]
    if "md" in formats:
        (out / "report.md").write_text(_markdown(shown, groups, plots))
        files.append(out / "report.md")
    if "html" in formats:
        (out / "report.html").write_text(_html(shown, groups, plots))
        files.append(out / "report.html")
    return {"runs": runs, "table": table, "shown": shown, "files": files}


_NOTE = ("Accuracies and forgetting in %, mean ± sample std over the seeds of a group (runs whose configs differ "
         "only by seed). Train time sums the experiences' training wall time; FLOPs and parameters added appear "
         "where the run recorded them.")


def _markdown(shown: pd.DataFrame, groups: list[RunGroup], plots: dict[str, dict[str, str]]) -> str:
    parts = ["# cl report", "", _markdown_table(shown), "", _NOTE, "",
             "![last accuracy per group](plots/compare_last_acc.png)", ""]
    for g in groups:
        p = plots[g.label]
        parts += [f"## {g.label}", "", "Runs: " + ", ".join(f"`{r.run_dir}`" for r in g.runs), "",
                  f"![accuracy matrix]({p['matrix']})", f"![accuracy per experience]({p['over_time']})",
                  f"![forgetting per experience]({p['forgetting']})",
                  *([f"![old vs new classes]({p['confusion']})"] if "confusion" in p else []), ""]
    return "\n".join(parts)


def _html(shown: pd.DataFrame, groups: list[RunGroup], plots: dict[str, dict[str, str]]) -> str:
    body = ["<h1>cl report</h1>", shown.to_html(index=False, escape=True), f"<p>{html.escape(_NOTE)}</p>",
            '<img src="plots/compare_last_acc.png" alt="last accuracy per group">']
    for g in groups:
        p = plots[g.label]
        body += [f"<h2>{html.escape(g.label)}</h2>",
                 "<p>Runs: " + ", ".join(f"<code>{html.escape(str(r.run_dir))}</code>" for r in g.runs) + "</p>"]
        body += [f'<img src="{p[k]}" alt="{k}">' for k in ("matrix", "over_time", "forgetting", "confusion") if k in p]
    return ("<!doctype html>\n<html><head><meta charset='utf-8'><title>cl report</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{padding:4px 8px;"
            "border:1px solid #ccc;text-align:right} img{max-width:48%;margin:4px}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _flag_value(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """``--name VALUE`` or ``--name=VALUE`` taken out of ``args``."""
    rest, value, i = [], None, 0
    while i < len(args):
        a = args[i]
        if a == name:
            if i + 1 >= len(args):
                raise UserError(f"{name} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


@command("report")
def cmd_report(args: list[str]) -> int:
    out, args = _flag_value(args, "--out")
    fmt, args = _flag_value(args, "--format")
    if not args or any(a in ("-h", "--help") for a in args):
        print("usage: cl report RUN_DIR|FOLDER [...] [--out DIR (default report/)] [--format md|html|both]")
        return 0 if args else 2
    unknown = [a for a in args if a.startswith("--")]
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}'; see `cl report --help`")
    formats = {"md": ("md",), "html": ("html",), "both": ("md", "html"), None: ("md", "html")}.get(fmt)
    if formats is None:
        raise UserError(f"--format must be md, html or both, not '{fmt}'")
    res = build_report(args, out or "report", formats)
    _print_table(res["shown"], f"{len(res['runs'])} run(s) in {len(res['table'])} group(s)")
    print(f"report written to {Path(out or 'report') / ('report.md' if 'md' in formats else 'report.html')}")
    return 0


# --------------------------------------------------------------------------------------------------- eval
def _eval_config(run_dir: Path, overrides: list[str]) -> Any:
    """The run's ``config.yaml`` with ``overrides``; scenario keys the new scenario lacks are dropped."""
    from cl.config import build_config, parse_overrides
    from cl.registry import SCENARIOS

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    data = yaml.safe_load(cfg_path.read_text()) or {}
    parsed = parse_overrides(overrides)
    new = [o.split("=", 1)[1] for o in parsed if o.startswith("scenario.name=")]
    if new and new[-1] != data.get("scenario", {}).get("name"):
        # A different scenario: keep the shared keys (n_experiences, order, image_size so the backbone gets the
        # input size it was built for) and drop the old scenario's own ones (test_fraction, shift, ...).
        fields = {f.name for f in dataclasses.fields(SCENARIOS.get(new[-1]).Config)}
        data["scenario"] = {k: v for k, v in data.get("scenario", {}).items() if k in fields}
    # one process, no new files besides the eval metrics
    forced = ["trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto", "run.checkpoint=false"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return build_config(str(path), [*parsed, *forced])


def evaluate_run(run_dir: str | os.PathLike, overrides: list[str] | None = None,
                 out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``RUN_DIR/checkpoints/last.ckpt`` on every experience of the (possibly overridden) stream.

    Writes ``metrics.json`` (``accuracy_matrix`` with one row: the final model on every experience, per-pass
    accuracies, sample-weighted ``acc``) and ``accuracy_matrix.csv`` into ``out`` (default
    ``RUN_DIR/eval/<scenario>``), atomically. Returns the metrics dict (plus ``"out"``: the folder).
    """
    import torch

    from cl.distributed import Dist
    from cl.evaluation import evaluate
    from cl.runner import build_scenario, build_strategy, load_checkpoint, quiet_lightning, restore_model
    from cl.utils import atomic_write_json, atomic_write_text

    quiet_lightning()
    run_dir = Path(run_dir)
    cfg = _eval_config(run_dir, list(overrides or []))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"no checkpoint '{ckpt}' (was the run made with run.checkpoint=false, or not finished?)")
    state = load_checkpoint(ckpt)
    scenario = build_scenario(cfg)
    model = build_strategy(cfg, scenario)
    try:
        restore_model(model, state)
    except (RuntimeError, KeyError, ValueError, IndexError) as err:
        raise UserError(f"checkpoint '{ckpt}' does not fit strategy '{cfg.strategy.name}' built for scenario "
                        f"'{cfg.scenario.name}' ({scenario.n_classes} classes, {scenario.image_size} px): "
                        f"{str(err).splitlines()[0][:200]}") from None
    accel = str(cfg.trainer.accelerator)
    device = torch.device("cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    same_stream = state.get("fingerprint") == scenario.fingerprint()
    results = evaluate(model, scenario.experiences, Dist(device=device), device, int(cfg.data.eval_batch_size))
    main = results["main"]
    n_seen = int(getattr(model, "n_seen", 0))
    notes = []
    if not same_stream:
        notes.append("evaluated on a different stream than it was trained on: accuracies are meaningful only if "
                     "the label spaces match (label k means the same class in both streams)")
    beyond = [e.index for e in scenario.experiences if max(e.classes) >= n_seen > 0]
    if beyond:
        notes.append(f"experiences {beyond} hold labels the model never saw (it knows {n_seen} classes): "
                     "their accuracy counts those samples as errors")
    total = sum(main.total)
    metrics: dict[str, Any] = {
        "kind": "eval", "run_dir": str(run_dir), "checkpoint": str(ckpt),
        "strategy": str(cfg.strategy.name), "scenario": str(cfg.scenario.name), "seed": int(cfg.seed),
        "trained_on": _trained_scenario(run_dir), "same_stream": same_stream,
        "n_experiences": len(scenario), "n_seen_classes": n_seen,
        "acc": (sum(main.correct) / total) if total else None,
        "accuracy_matrix": [[_clean(main.acc(j)) for j in range(len(scenario))]],
        "correct": [main.correct], "total": [main.total],
        "til_accuracy_matrix": [[_clean(main.correct_til[j] / main.total[j] if main.total[j] else float("nan"))
                                 for j in range(len(scenario))]],
        "passes": {name: [_clean(c.acc(j)) for j in range(len(scenario))] for name, c in results.items()},
        "overrides": list(overrides or []), "notes": notes,
    }
    folder = Path(out) if out else run_dir / "eval" / str(cfg.scenario.name)
    atomic_write_json(folder / "metrics.json", metrics)
    atomic_write_text(folder / "accuracy_matrix.csv",
                      "trained\\evaluated," + ",".join(f"exp{j}" for j in range(len(scenario))) + "\n"
                      + "final," + ",".join("" if v is None else f"{v:.6f}" for v in metrics["accuracy_matrix"][0])
                      + "\n")
    metrics["out"] = str(folder)
    return metrics


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else round(float(v), 6)


def _trained_scenario(run_dir: Path) -> str | None:
    try:
        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("scenario", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


@command("eval")
def cmd_eval(args: list[str]) -> int:
    out, args = _flag_value(args, "--out")
    if not args or args[0] in ("-h", "--help"):
        print("usage: cl eval RUN_DIR [scenario=NAME data.root=PATH key=value ...] [--out DIR]")
        return 0 if args else 2
    config, overrides, flags = split_args(args[1:])
    if config is not None or flags:
        raise UserError("cl eval takes RUN_DIR and key=value overrides (the config is RUN_DIR/config.yaml)")
    m = evaluate_run(args[0], overrides, out)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{m['strategy']} (trained on {m['trained_on']}) evaluated on {m['scenario']}: accuracy (%)")
    t.add_column("pass")
    for j in range(m["n_experiences"]):
        t.add_column(f"exp{j}", justify="right")
    for name, accs in m["passes"].items():
        t.add_row(name, *["n/a" if v is None else f"{100 * v:.1f}" for v in accs])
    Console().print(t)
    acc = "n/a" if m["acc"] is None else f"{100 * m['acc']:.2f}%"
    print(f"accuracy over all samples: {acc}")
    for note in m["notes"]:
        print(f"note: {note}")
    print(f"written to {m['out']}/metrics.json")
    return 0
