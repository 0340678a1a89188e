"""Run directories as pandas tables: load ``metrics.json`` (and ``config.yaml``), group seeds, compare runs.

A run directory is what ``cl train`` writes (``metrics.json``, ``config.yaml``, ``checkpoints/``...). This module
turns it into a :class:`RunResults` with DataFrames and turns several of them into a comparison table in which runs
that differ only by their seed form one group (mean ± std)::

    from cl.results import load_run, find_runs, compare
    runs = [load_run(d) for d in find_runs(["runs/"])]
    table = compare(runs)            # one row per group: last_acc_mean, last_acc_std, ...

Numbers stay fractions in [0, 1] in the DataFrames; the CLI and the reports print percentages.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cl.errors import UserError

__all__ = ["RunResults", "RunGroup", "load_run", "from_metrics", "find_runs", "group_runs", "compare",
           "SUMMARY_KEYS", "COMPARE_COLUMNS"]

#: summary numbers of ``metrics.json`` (fractions; ``None`` where undefined)
SUMMARY_KEYS = ("last_acc", "avg_acc", "avg_inc_acc", "forgetting", "bwt", "fwt", "til_last_acc")
#: the columns of :func:`compare` (each gets ``_mean`` and ``_std``)
COMPARE_COLUMNS = ("last_acc", "avg_inc_acc", "forgetting", "time_s", "flops", "params_added")
# keys that never make two runs different experiments (where they ran, how they printed, resume bookkeeping)
_IGNORED_KEYS = {"seed", "resume", "run.root", "run.dir", "run.overwrite", "run.checkpoint", "data.root",
                 "data.num_workers", "trainer.enable_progress_bar", "trainer.logger", "trainer.log_every_n_steps",
                 "trainer.devices", "trainer.num_nodes", "trainer.strategy", "trainer.accelerator"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


@dataclass
class RunResults:
    """One run: the raw ``metrics.json`` dict, the flattened config and the tables derived from them."""

    run_dir: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # flattened ``config.yaml`` ("strategy.lr": 0.05), or {}

    # ------------------------------------------------------------------------------------------- identity
    @property
    def strategy(self) -> str:
        return str(self.metrics.get("strategy") or self.config.get("strategy.name") or "?")

    @property
    def scenario(self) -> str:
        return str(self.metrics.get("scenario") or self.config.get("scenario.name") or "?")

    @property
    def seed(self) -> int | None:
        s = self.metrics.get("seed", self.config.get("seed"))
        return None if s is None else int(s)

    def group_key(self) -> tuple:
        """What must be equal for two runs to differ only by seed: the config without seed and run bookkeeping."""
        if self.config:
            items = {k: v for k, v in self.config.items() if k not in _IGNORED_KEYS}
        else:  # no config.yaml (a hand-made or copied metrics.json): strategy and scenario are all we know
            items = {"strategy.name": self.strategy, "scenario.name": self.scenario}
        return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in items.items()))

    # ------------------------------------------------------------------------------------------- tables
    @property
    def n_experiences(self) -> int:
        return int(self.metrics.get("n_experiences") or len(self.metrics.get("accuracy_matrix", [])))

    def matrix_array(self) -> np.ndarray:
        """``R[i][j]`` as floats, NaN where not evaluated; shape (rows done, n_experiences)."""
        rows = self.metrics.get("accuracy_matrix", [])
        n = max([self.n_experiences] + [len(r) for r in rows])
        out = np.full((len(rows), n), np.nan)
        for i, row in enumerate(rows):
            out[i, : len(row)] = [_num(v) for v in row]
        return out

    def matrix(self) -> pd.DataFrame:
        """The accuracy matrix: index ``after exp i`` (rows follow training), columns ``exp j`` (evaluated on)."""
        r = self.matrix_array()
        return pd.DataFrame(r, index=pd.Index([f"after exp{i}" for i in range(r.shape[0])], name="trained"),
                            columns=pd.Index([f"exp{j}" for j in range(r.shape[1])], name="evaluated"))

    def summary(self) -> pd.DataFrame:
        """One row: strategy, scenario, seed, the summary metrics, total train time, FLOPs and parameters added."""
        row: dict[str, Any] = {"strategy": self.strategy, "scenario": self.scenario, "seed": self.seed}
        row.update({k: _num(self.metrics.get(k)) for k in SUMMARY_KEYS})
        row.update({"time_s": self.train_time_s(), "flops": self.flops(), "params_added": self.params_added(),
                    "run_dir": str(self.run_dir)})
        return pd.DataFrame([row])

    def experiences(self) -> pd.DataFrame:
        """One row per experience: classes, time, memory, state size, seen accuracy per eval pass, ``extra`` keys.

        Per-pass accuracies on each evaluated experience are in :meth:`passes` (long format).
        """
        rows = []
        for e in self.metrics.get("experiences", []):
            row: dict[str, Any] = {k: e.get(k) for k in ("index", "classes", "train_time_s", "peak_memory_mb",
                                                          "cl_state_bytes")}
            for name, acc in (e.get("passes_seen_acc") or {}).items():
                row[f"seen_acc/{name}"] = acc
            for k, v in (e.get("extra") or {}).items():
                row[k] = v
            rows.append(row)
        df = pd.DataFrame(rows)
        return df.set_index("index") if "index" in df else df

    def passes(self) -> pd.DataFrame:
        """Long format: one row per (trained experience, eval pass, evaluated experience) with its accuracy."""
        rows = [{"trained": e.get("index", i), "pass": name, "evaluated": j, "acc": _num(a)}
                for i, e in enumerate(self.metrics.get("experiences", []))
                for name, accs in (e.get("passes") or {}).items() for j, a in enumerate(accs)]
        return pd.DataFrame(rows, columns=["trained", "pass", "evaluated", "acc"])

    def pass_names(self) -> list[str]:
        """Evaluation passes (``main`` first), e.g. SLCA's ``unaligned``, LAE's ``online``/``offline``."""
        names = {n: None for e in self.metrics.get("experiences", []) for n in (e.get("passes") or {})}
        return sorted(names, key=lambda n: (n != "main", n))

    def pass_matrix(self, name: str = "main") -> pd.DataFrame:
        """The accuracy matrix of one evaluation pass (the ``main`` one equals :meth:`matrix`)."""
        if name not in self.pass_names():
            raise UserError(f"run '{self.run_dir}' has no evaluation pass '{name}' (it has {self.pass_names()})")
        exps = self.metrics.get("experiences", [])
        n = max([self.n_experiences] + [len((e.get("passes") or {}).get(name, [])) for e in exps])
        r = np.full((len(exps), n), np.nan)
        for i, e in enumerate(exps):
            accs = (e.get("passes") or {}).get(name, [])
            r[i, : len(accs)] = [_num(a) for a in accs]
        return pd.DataFrame(r, index=pd.Index([f"after exp{i}" for i in range(len(exps))], name="trained"),
                            columns=pd.Index([f"exp{j}" for j in range(n)], name="evaluated"))

    def seen_acc_by_pass(self) -> pd.DataFrame:
        """Accuracy over all seen experiences after each experience, one column per evaluation pass."""
        rows = [{"pass": name, "trained": e.get("index", i), "acc": _num(acc)}
                for i, e in enumerate(self.metrics.get("experiences", []))
                for name, acc in (e.get("passes_seen_acc") or {}).items()]
        if not rows:
            return pd.DataFrame()
        df = pd.DataFrame(rows).pivot(index="trained", columns="pass", values="acc")
        return df[[n for n in self.pass_names() if n in df.columns]]

    def extra(self, key: str) -> list[Any]:
        """The values one ``ctx.record`` key took per experience (``None`` where an experience lacks it)."""
        return [(e.get("extra") or {}).get(key) for e in self.metrics.get("experiences", [])]

    def extra_frame(self, key: str, prefix: str = "") -> pd.DataFrame:
        """One recorded key per experience as a table; list values become columns ``<prefix>0, <prefix>1, ...``.

        For example SEMA's ``sema/adapters_per_block`` gives experiences × blocks, PRD's ``prd/proto_norms``
        experiences × prototypes.
        """
        values = self.extra(key)
        if all(v is None for v in values):
            raise UserError(f"run '{self.run_dir}' recorded no '{key}' (recorded keys: {self.extra_keys()})")
        rows = [dict(enumerate(v)) if isinstance(v, (list, tuple)) else {0: v} for v in values]
        df = pd.DataFrame(rows, index=pd.Index(range(len(values)), name="experience"))
        df.columns = [f"{prefix}{c}" for c in df.columns] if prefix else (
            df.columns if len(df.columns) > 1 else [key])
        return df

    def extra_keys(self) -> list[str]:
        """Every key the run recorded with ``ctx.record`` (in ``experiences[i].extra``)."""
        return sorted({k for e in self.metrics.get("experiences", []) for k in (e.get("extra") or {})})

    # ------------------------------------------------------------------------------------------- costs
    def train_time_s(self) -> float:
        """Sum of the experiences' training wall time (hooks and fits; evaluation excluded)."""
        times = [e.get("train_time_s") for e in self.metrics.get("experiences", [])]
        return float(sum(t for t in times if t is not None)) if times else float("nan")

    def flops(self) -> float:
        """Training FLOPs of the whole run where a compute-accounting callback recorded them, else NaN.

        The last experience's ``*cumulative_flops`` if recorded (it survives a resume), else the sum over
        experiences of ``*total_flops``, else of every ``extra`` key that contains ``flops``.
        """
        extras = [e.get("extra") or {} for e in self.metrics.get("experiences", [])]
        for suffix in ("cumulative_flops", "total_flops"):
            keys = sorted({k for x in extras for k in x if k.endswith(suffix)})
            if keys and suffix == "cumulative_flops":
                return float(sum(extras[-1].get(k, 0) for k in keys))
            if keys:
                return float(sum(x.get(k, 0) for x in extras for k in keys))
        vals = [v for x in extras for k, v in x.items() if "flops" in k.lower() and isinstance(v, (int, float))]
        return float(sum(vals)) if vals else float("nan")

    def params_added(self) -> float:
        """Parameters the strategy added over the stream, where it records them (``extra`` keys containing
        ``added_params`` or ``params_added``: the running total at the last experience, as SEMA records it)."""
        for x in reversed([e.get("extra") or {} for e in self.metrics.get("experiences", [])]):
            vals = [v for k, v in x.items() if ("added_params" in k or "params_added" in k)
                    and isinstance(v, (int, float))]
            if vals:
                return float(sum(vals))
        return float("nan")

    # ------------------------------------------------------------------------------------------- plots
    def plot_matrix(self, path: str | os.PathLike | None = None, **kw: Any) -> Any:
        from cl.plots import plot_matrix

        return plot_matrix(self.matrix_array(), title=kw.pop("title", f"{self.strategy} on {self.scenario}"),
                           path=path, **kw)

    def plot_accuracy_over_time(self, path: str | os.PathLike | None = None, **kw: Any) -> Any:
        from cl.plots import plot_accuracy_over_time

        return plot_accuracy_over_time(self.matrix_array(), title=kw.pop("title", self.strategy), path=path, **kw)

    def plot_forgetting(self, path: str | os.PathLike | None = None, **kw: Any) -> Any:
        from cl.plots import plot_forgetting

        return plot_forgetting(self.matrix_array(), title=kw.pop("title", self.strategy), path=path, **kw)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: is '{path.parent}' a run directory (written by `cl train`)?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{path}' is not valid JSON ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "re-run or remove that run") from None
    if not isinstance(data, dict) or not isinstance(data.get("accuracy_matrix"), list):
        raise UserError(f"'{path}' is not a cl metrics file (no 'accuracy_matrix' list); re-run or remove that run")
    rows = data["accuracy_matrix"]
    if not all(isinstance(r, list) and all(v is None or isinstance(v, (int, float)) for v in r) for r in rows):
        raise UserError(f"'{path}' has a malformed 'accuracy_matrix' (rows of numbers or null expected)")
    if not isinstance(data.get("experiences", []), list):
        raise UserError(f"'{path}' has a malformed 'experiences' entry (a list expected)")
    return data


def load_run(run_dir: str | os.PathLike) -> RunResults:
    """Load a run directory. A missing or malformed ``metrics.json`` is a :class:`UserError` naming the file."""
    d = Path(run_dir)
    metrics = _read_json(d / "metrics.json")
    config: dict[str, Any] = {}
    cfg_path = d / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"'{cfg_path}' is not valid YAML; fix or remove it") from None
        if isinstance(loaded, dict):
            config = _flatten(loaded)
    return RunResults(d, metrics, config)


def from_metrics(metrics: dict[str, Any], run_dir: str | os.PathLike) -> RunResults:
    """A :class:`RunResults` from an in-memory metrics dict (what ``cl.train`` returns), config read if present."""
    d = Path(run_dir)
    try:
        config = load_run(d).config if (d / "config.yaml").is_file() else {}
    except UserError:
        config = {}
    return RunResults(d, metrics, config)


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories among ``paths``: each path that holds ``metrics.json``, or every folder below it that does.

    A path that is neither is an error naming it; a path given explicitly as a run directory is kept even if its
    ``metrics.json`` is missing only when it has a ``config.yaml`` (so :func:`load_run` reports what is wrong).
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"'{p}' does not exist")
        if p.is_file():
            raise UserError(f"'{p}' is a file; give a run directory or a folder of runs")
        if (p / "metrics.json").exists() or (p / "config.yaml").is_file():
            found.append(p)
            continue
        below = sorted(m.parent for m in p.rglob("metrics.json") if not _is_eval_output(m))
        if not below:
            raise UserError(f"no run directory (with metrics.json) in '{p}'")
        found.extend(below)
    out, seen = [], set()
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def _is_eval_output(path: Path) -> bool:
    """``cl eval`` writes metrics.json files too (``RUN_DIR/eval/<scenario>/``); they are not runs."""
    if path.parent.parent.name == "eval" and (path.parent.parent.parent / "metrics.json").is_file():
        return True
    try:
        with path.open() as f:
            head = f.read(200)
    except OSError:
        return False
    return '"kind": "eval"' in head


@dataclass
class RunGroup:
    """Runs that differ only by seed."""

    label: str
    runs: list[RunResults]

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def mean_matrix(self) -> np.ndarray:
        """Cell-wise mean accuracy matrix over the group's runs (NaN-aware; shapes padded to the largest)."""
        mats = [r.matrix_array() for r in self.runs]
        rows, cols = max(m.shape[0] for m in mats), max(m.shape[1] for m in mats)
        stack = np.full((len(mats), rows, cols), np.nan)
        for k, m in enumerate(mats):
            stack[k, : m.shape[0], : m.shape[1]] = m
        with warnings.catch_warnings():  # an all-NaN cell (never evaluated) stays NaN without a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(stack, axis=0)

    def slug(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.label)[:60]
        digest = hashlib.sha1(repr(self.runs[0].group_key()).encode()).hexdigest()[:6]
        return f"{safe}_{digest}"


def group_runs(runs: list[RunResults]) -> list[RunGroup]:
    """Group runs whose configs differ only by seed (and run bookkeeping), in first-seen order.

    A group is labelled ``strategy`` (``strategy/run.name`` when a run name is set); groups that would share a
    label get the config keys that tell them apart, e.g. ``finetune [strategy.lr=0.1]``.
    """
    groups: dict[tuple, list[RunResults]] = {}
    for r in runs:
        groups.setdefault(r.group_key(), []).append(r)
    labels = {}
    for key, rs in groups.items():
        base = rs[0].strategy
        name = rs[0].config.get("run.name")
        labels[key] = f"{base}/{name}" if name else base
        if len({r.scenario for r in runs}) > 1:
            labels[key] += f" @ {rs[0].scenario}"
    out = []
    for key, rs in groups.items():
        same = [k for k in groups if labels[k] == labels[key]]
        label = labels[key]
        if len(same) > 1:
            mine, others = dict(key), [dict(k) for k in same if k != key]
            diff = sorted(k for k in mine if any(o.get(k) != mine[k] for o in others))
            label += " [" + ", ".join(f"{k}={json.loads(mine[k])}" for k in diff[:4]) + "]"
        out.append(RunGroup(label, sorted(rs, key=lambda r: (r.seed is None, r.seed or 0))))
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def compare(runs: list[RunResults]) -> pd.DataFrame:
    """One row per seed group: ``n_runs``, ``seeds`` and ``<col>_mean`` / ``<col>_std`` for :data:`COMPARE_COLUMNS`.

    ``std`` is the sample standard deviation (ddof=1) over the group's seeds; 0 for a single run; NaN where no
    run of the group knows the value (e.g. FLOPs without compute accounting).
    """
    rows = []
    for g in group_runs(runs):
        summaries = pd.concat([r.summary() for r in g.runs], ignore_index=True)
        row: dict[str, Any] = {"group": g.label, "strategy": g.runs[0].strategy, "scenario": g.runs[0].scenario,
                               "n_runs": len(g.runs), "seeds": ",".join(str(s) for s in g.seeds)}
        for col in COMPARE_COLUMNS:
            row[f"{col}_mean"], row[f"{col}_std"] = _mean_std(summaries[col].astype(float).tolist())
        rows.append(row)
    return pd.DataFrame(rows)
