"""Several runs from one command: ``seed=1,2,3`` and ``strategy.lr=0.1,0.01`` (grids), or ``sweep=FILE``.

A sweep file is YAML: either a mapping ``key: [values]`` (the grid of all combinations) or a list of mappings
``{key: value}`` (one run each). Every run gets its own run directory: the seed is already part of the path, and
any other swept key is added to ``run.name`` (e.g. ``strategy.lr=0.1``) unless the sweep sets ``run.name``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from cl.errors import ConfigError

PATH_KEYS = ("seed", "strategy", "strategy.name", "scenario", "scenario.name")


def _split_values(value: str) -> list[str]:
    if value.startswith("[") or value.startswith("{") or "," not in value:
        return [value]
    return [v for v in value.split(",") if v != ""]


def expand(overrides: list[str], sweep_file: str | None = None) -> list[list[str]]:
    """The override lists of every run (one list when nothing is swept)."""
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    for item in overrides:
        if "=" not in item:
            fixed.append(item)  # build_config reports it
            continue
        key, value = item.split("=", 1)
        values = _split_values(value)
        if len(values) > 1:
            axes.append((key, values))
        else:
            fixed.append(item)
    combos: list[list[tuple[str, str]]] = [list(zip([k for k, _ in axes], vals))
                                          for vals in itertools.product(*[v for _, v in axes])]
    if sweep_file:
        combos = [a + b for a in combos for b in _load_sweep(sweep_file)]
    if combos == [[]]:
        return [fixed]
    runs = []
    for combo in combos:
        keys = {k for k, _ in combo}
        named = [f"{k}={v}" for k, v in combo if k not in PATH_KEYS]
        extra = [] if "run.name" in keys or "run.dir" in keys or not named else [f"run.name={'_'.join(named)}"]
        runs.append(fixed + [f"{k}={v}" for k, v in combo] + extra)
    return runs


def _load_sweep(path: str) -> list[list[tuple[str, str]]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"sweep file '{path}' is not valid YAML") from None
    if isinstance(data, dict):
        keys = list(data)
        vals = [v if isinstance(v, list) else [v] for v in data.values()]
        return [[(k, _fmt(x)) for k, x in zip(keys, combo)] for combo in itertools.product(*vals)]
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        return [[(k, _fmt(v)) for k, v in d.items()] for d in data]
    raise ConfigError(f"sweep file '{path}' must be a mapping of key: [values] or a list of mappings")


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)
