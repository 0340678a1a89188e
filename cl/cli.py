"""The ``cl`` command line: ``cl train config=PATH key=value ...``, ``cl list``, ``cl --help``.

A user mistake (bad key, type, value, name, missing file or data) prints one line and exits with code 2; no
traceback. Other subcommands register themselves in :data:`COMMANDS`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from cl.errors import Preempted, UserError

USAGE = """usage: cl [-v] <command> [config=PATH] [key=value ...]     (-v: also show library warnings)

commands:
  train     run a continual-learning stream:  cl train config=configs/quickstart.yaml seed=1
  list      registered strategies, scenarios and backbones
  data      data sets: `cl data list`, `cl data check scenario=NAME data.root=PATH`
  pretrain  pre-train a small backbone locally:  cl pretrain config=configs/pretrain/vit_fmnist.yaml
  resume    continue a run from its directory:  cl resume RUN_DIR
  eval      evaluate a run's checkpoint:  cl eval RUN_DIR [scenario=... data.root=...]
  report    compare runs:  cl report RUN_DIR [RUN_DIR ...]
  slurm     write / submit a Slurm job:  cl slurm config=... slurm.nodes=2 [--dry-run]

`cl train --help` lists every config key with its default and help (add strategy=NAME for its own keys).
"""

COMMANDS: dict[str, Callable[[list[str]], int]] = {}


def command(name: str) -> Callable[[Callable[[list[str]], int]], Callable[[list[str]], int]]:
    def deco(fn: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        COMMANDS[name] = fn
        return fn

    return deco


def split_args(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(config path, overrides, flags) from ``config=PATH key=value --flag`` arguments."""
    config, overrides, flags = None, [], []
    for a in args:
        if a.startswith("--"):
            flags.append(a)
        elif a.startswith("config="):
            config = a.split("=", 1)[1]
        else:
            overrides.append(a)
    return config, overrides, flags


def print_config_help(overrides: list[str], config: str | None = None) -> None:
    """Every key with its default and help; with ``config=`` (and overrides) also the value this run would use."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cl.config import _imports, build_config, describe, parse_overrides
    from cl.registry import import_modules

    names = {}
    items = parse_overrides([o for o in overrides if "=" in o])
    cfg = build_config(config, items) if config else None  # a mistake in the file is the usual one-line error
    import_modules(cfg.imports if cfg is not None else _imports({}, items))
    for item in items:
        key, value = item.split("=", 1)
        if key.endswith(".name") and key.count(".") == 1:
            names[key.split(".")[0]] = value
    if cfg is not None:
        names = {sec: str(cfg[sec].name) for sec in ("strategy", "scenario", "backbone")}
    sel = {"strategy": "finetune", "scenario": "split_digits", "backbone": "mlp", **names}
    title = f"cl train keys (strategy={sel['strategy']}, scenario={sel['scenario']}, backbone={sel['backbone']})"
    table = Table(title=title + (f" with {config}" if config else ""))
    for col in ("key", "default", *(["value"] if cfg is not None else []), "help"):
        table.add_column(col)
    for key, default, help_ in describe(names=sel):
        key, default, help_ = escape(key), escape(default), escape(help_)  # "[0, 1]" in help is not markup
        if cfg is None:
            table.add_row(key, default, help_)
            continue
        value = OmegaConf.select(cfg, key)
        shown = OmegaConf.to_yaml(value).strip() if isinstance(value, (DictConfig, ListConfig)) else (
            value if isinstance(value, str) else repr(value))
        table.add_row(key, default, escape(shown) if escape(shown) != default else "", help_)
    Console().print(table)
    print("Order: defaults < config=FILE < key=value. `strategy=NAME` also brings that strategy's keys."
          + (" The value column is empty where it equals the default." if cfg is not None else ""))


@command("train")
def cmd_train(args: list[str]) -> int:
    from cl.config import build_config
    from cl.runner import RunAlreadyFinished, train
    from cl.sweep import expand

    config, overrides, flags = split_args(args)
    if "--help" in flags or "-h" in args:
        print_config_help([o for o in overrides if o != "-h"], config)
        return 0
    sweep_file = next((o.split("=", 1)[1] for o in overrides if o.startswith("sweep=")), None)
    runs = expand([o for o in overrides if not o.startswith("sweep=")], sweep_file)
    configs = [build_config(config, run) for run in runs]  # every mistake surfaces before the first run starts
    for k, (cfg, run) in enumerate(zip(configs, runs)):
        if len(runs) > 1:
            print(f"[run {k + 1}/{len(runs)}] {' '.join(run)}")
        argv = ["train", *([f"config={config}"] if config else []), *run]
        try:
            results = train(cfg, argv=argv)
        except RunAlreadyFinished as done:
            print(str(done))
            continue
        if int(os.environ.get("RANK", "0")) == 0:
            print_results(results)
    return 0


def print_results(results: object) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results.metrics  # type: ignore[attr-defined]
    console = Console()
    mat = Table(title="accuracy matrix R[i][j] (%): after training i (rows), on experience j (columns)")
    mat.add_column("trained")
    n = m["n_experiences"]
    for j in range(n):
        mat.add_column(f"exp{j}", justify="right")
    for i, row in enumerate(m["accuracy_matrix"]):
        mat.add_row(f"exp{i}", *["" if v is None else f"{100 * v:.1f}" for v in row])
    console.print(mat)
    summ = Table(title="summary")
    summ.add_column("metric")
    summ.add_column("value", justify="right")
    for key in ("last_acc", "avg_acc", "avg_inc_acc", "forgetting", "stream_forgetting", "bwt", "fwt",
                "til_last_acc"):
        v = m.get(key)
        summ.add_row(key, "n/a" if v is None else f"{100 * v:.2f}")
    console.print(summ)
    console.print(f"run directory: {results.run_dir}")  # type: ignore[attr-defined]


@command("list")
def cmd_list(args: list[str]) -> int:
    """Registered entries with a one-line description and where each comes from (``imports=...`` adds yours)."""
    from cl.config import _imports, parse_overrides
    from cl.registry import BACKBONES, SCENARIOS, STRATEGIES, import_modules

    config, overrides, _ = split_args(args)
    file_cfg = {}
    if config:
        from cl.config import load_yaml, resolve_config_path

        file_cfg = load_yaml(resolve_config_path(config))
    import_modules(_imports(file_cfg, parse_overrides(overrides)))
    for title, reg in (("strategies", STRATEGIES), ("scenarios", SCENARIOS), ("backbones", BACKBONES)):
        print(f"{title}:")
        for name, entry in reg.items():
            doc = getattr(entry, "description", "") or (entry.__doc__ or "").strip().splitlines()[0:1]
            doc = doc if isinstance(doc, str) else "".join(doc)
            origin = reg.origin(name)
            print(f"  {name:<22} {doc}" + ("" if origin == "built-in" else f"  [{origin}]"))
    from cl.config import preset_names

    print("presets (config=NAME, from any folder):")
    print("  " + " ".join(preset_names()))
    print("Entries without a [source] are built in. Yours: imports=[module], an installed package's "
          "'cl.plugins' entry point, or an import path as the name (strategy=module:Class).")
    return 0


@command("resume")
def cmd_resume(args: list[str]) -> int:
    from pathlib import Path

    if not args:
        raise UserError("usage: cl resume RUN_DIR [key=value ...]")
    run_dir = Path(args[0])
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)")
    return cmd_train([f"config={run_dir / 'config.yaml'}", f"run.dir={run_dir}", "resume=auto", *args[1:]])


def _load_plugins() -> None:
    """Subcommands defined in other modules register themselves on import."""
    import importlib

    for mod in ("cl.data_cli", "cl.pretrain", "cl.report", "cl.cluster"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verbose = any(a in ("-v", "--verbose") for a in args)
    args = [a for a in args if a not in ("-v", "--verbose")]
    if verbose:
        os.environ["CL_VERBOSE"] = "1"  # DDP ranks re-run the command without the flag: they read this
    from cl.progress import configure_warnings

    configure_warnings()
    _load_plugins()
    if not args:
        print(USAGE)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        from cl.errors import closest

        print(f"cl: unknown command '{name}'{closest(name, COMMANDS)}; see `cl --help`", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name](rest)
    except UserError as err:
        print(f"cl {name}: error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cl {name}: {stop}", file=sys.stderr)
        return 128 + stop.signum  # what a shell reports for that signal; schedulers requeue or resume on it
    except KeyboardInterrupt:
        print(f"cl {name}: interrupted; `cl resume RUN_DIR` continues from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
