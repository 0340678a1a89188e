"""The config tree: defaults, then the ``config=`` YAML file, then ``key=value`` overrides (OmegaConf dotlist).

Every section is a dataclass whose fields carry a type, a default and one line of help (``metadata["help"]``).
``strategy``, ``scenario`` and ``backbone`` take the dataclass of the registered entry named by their ``name`` key,
so ``strategy=slca`` brings SLCA's own keys and defaults, and a misspelled SLCA key is an error. Validation happens
here, when the config is built, never deep inside training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from cl.errors import ConfigError, closest

SHORTCUT_SECTIONS = ("strategy", "scenario", "backbone")


def opt(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None, gt: float | None = None,
        choices: tuple[Any, ...] | None = None, default_factory: Any = dataclasses.MISSING, path: bool = False) -> Any:
    """A dataclass field with help text and simple value constraints checked by :func:`validate`.

    ``path=True`` marks a file or folder the run reads: a relative value written in a config file resolves against
    that file's folder when it exists there, else against the working directory (:func:`build_config`).
    """
    meta = {"help": help, "ge": ge, "gt": gt, "choices": choices, "path": path}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StrategyConfig:
    """Keys every strategy has. Strategies subclass this and add their own."""

    name: str = opt("finetune", "registered strategy name (`cl list`)")
    lr: float = opt(0.01, "learning rate of the main parameter group", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0)
    weight_decay: float = opt(0.0, "weight decay", ge=0)
    epochs: int | None = opt(None, "epochs per experience; null means trainer.max_epochs", ge=1)
    input_convention: str | None = opt(
        None, "inputs the model sees: normalized (scenario mean/std) | unit ([0, 1]) | pm1 ([-1, 1]); null = the "
        "strategy's paper convention (`cl train --help strategy=NAME` names it)",
        choices=(None, "normalized", "unit", "pm1"))


@dataclass
class ScenarioConfig:
    """Keys every scenario has. Scenario builders subclass this and add their own."""

    name: str = opt("split_digits", "registered scenario name (`cl list`)")
    n_experiences: int | None = opt(5, "number of experiences (ignored when init_classes is set)", ge=1)
    init_classes: int | None = opt(None, "classes in the first experience (PyCIL init_cls); null = equal split", ge=1)
    increment: int | None = opt(None, "classes per later experience (PyCIL increment)", ge=1)
    class_order: str = opt("natural", "natural | permutation (seeded, PyCIL) | explicit (use scenario.order)",
                           choices=("natural", "permutation", "explicit"))
    order: list[int] | None = opt(None, "explicit class order when class_order=explicit")
    order_seed: int = opt(1993, "seed of the NumPy legacy permutation (PyCIL/SLCA/SEMA use 1993)")
    task_labels: bool = opt(False, "give each experience its own task label (task-incremental evaluation)")
    augment: bool = opt(True, "random training augmentation (crop/flip as the scenario defines)")


@dataclass
class BackboneConfig:
    """Keys every backbone has."""

    name: str = opt("mlp", "registered backbone name or timm:<model> (`cl list`)")
    pretrained: bool = opt(False, "load pretrained weights (timm download; fails fast offline)")
    checkpoint: str | None = opt(None, "path to a local state dict / `cl pretrain` checkpoint to load", path=True)


@dataclass
class DataConfig:
    root: str = opt("data", "root folder of local data sets (env CL_DATA_ROOT overrides the default)", path=True)
    batch_size: int = opt(32, "global training batch size (split evenly across DDP ranks)", ge=1)
    eval_batch_size: int = opt(256, "evaluation batch size per rank", ge=1)
    num_workers: int | None = opt(None, "DataLoader workers per rank for file-backed data sets, training and "
                                  "evaluation (null: the rank's share of the CPUs, at most 8; tensor data sets use "
                                  "none)", ge=0)
    drop_last: bool | None = opt(None, "drop the last incomplete training batch; null = what the strategy's "
                                       "official code does (LAE drops it; SLCA, SEMA, PRD keep it)")


@dataclass
class TrainerConfig:
    """Arguments passed to every ``pytorch_lightning.Trainer`` the runner creates (one per training phase)."""

    accelerator: str = opt("auto", "cpu | gpu | auto")
    devices: Any = opt("auto", "devices per node: a number, a list of GPU ids, auto or -1 (auto = the launcher's "
                               "processes per node under torchrun/srun; else 1, or with trainer.strategy=ddp every "
                               "visible GPU; -1 = every GPU, or every CPU core)")
    num_nodes: int = opt(1, "number of nodes", ge=1)
    strategy: str = opt("auto", "auto | ddp | ddp_find_unused_parameters_true")
    precision: str = opt("32-true", "Lightning precision: 32-true | bf16-mixed | 16-mixed")
    max_epochs: int = opt(1, "default epochs per experience (a strategy's own `epochs` key wins)", ge=1)
    deterministic: bool = opt(False, "torch deterministic algorithms")
    enable_progress_bar: bool = opt(True, "show the training progress bar")
    limit_train_batches: float | None = opt(None, "cap on training batches per epoch (int count or fraction)")
    gradient_clip_val: float | None = opt(None, "gradient clipping value")
    sync_batchnorm: bool = opt(False, "synchronise BatchNorm statistics across DDP ranks")
    log_every_n_steps: int = opt(50, "training-loss logging interval", ge=1)
    logger: Any = opt("csv", "csv | tensorboard | wandb | mlflow | none | module:Class | {class: NAME, arg: value}, "
                             "or a list of them (cl/loggers.py); any other pytorch_lightning.Trainer argument is a "
                             "trainer.<name> key too")


#: Trainer arguments the runner owns, and what to use instead
RUNNER_TRAINER_ARGS = {
    "callbacks": "use the top-level callbacks=[module:Class]",
    "enable_checkpointing": "the runner checkpoints at experience boundaries (run.checkpoint)",
    "use_distributed_sampler": "the runner shards batches across ranks itself",
    "limit_val_batches": "evaluation runs outside Lightning, after each experience",
    "val_check_interval": "evaluation runs outside Lightning, after each experience",
    "check_val_every_n_epoch": "evaluation runs outside Lightning, after each experience",
    "num_sanity_val_steps": "evaluation runs outside Lightning, after each experience",
    "default_root_dir": "set run.dir or run.root",
}


def _trainer_config_cls(file_cfg: dict, overrides: list[str]) -> type:
    """``TrainerConfig``, extended by the other ``pytorch_lightning.Trainer`` arguments this config sets
    (``trainer.accumulate_grad_batches=4``); a name that is neither is an unknown key, with suggestions."""
    import inspect

    import pytorch_lightning as pl

    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    node = file_cfg.get("trainer")
    asked = list(node) if isinstance(node, dict) else []
    asked += [item.split("=", 1)[0].split(".")[1] for item in overrides if item.startswith("trainer.")]
    extra = [k for k in dict.fromkeys(asked) if k not in known]
    if not extra:
        return TrainerConfig
    params = [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"]
    fields = []
    for name in extra:
        if name in RUNNER_TRAINER_ARGS:
            raise ConfigError(f"trainer.{name} is not available: {RUNNER_TRAINER_ARGS[name]}")
        if name not in params:
            raise ConfigError(f"unknown config key 'trainer.{name}'{closest(name, sorted(known | set(params)))}; "
                              "trainer.* takes the keys `cl train --help` lists and pytorch_lightning.Trainer's "
                              "arguments")
        fields.append((name, Any, opt(None, "a pytorch_lightning.Trainer argument")))
    return dataclasses.make_dataclass("TrainerConfig", fields, bases=(TrainerConfig,))


def trainer_extra_args(trainer_cfg: DictConfig) -> dict[str, Any]:
    """The ``pytorch_lightning.Trainer`` arguments a config sets beyond :class:`TrainerConfig`'s own keys."""
    known = {f.name for f in dataclasses.fields(TrainerConfig)}
    out = {k: v for k, v in trainer_cfg.items() if k not in known}
    return {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in out.items()}


@dataclass
class RunConfig:
    root: str = opt("runs", "parent of run directories: <root>/<scenario>/<strategy>/seed<N>")
    dir: str | None = opt(None, "explicit run directory (overrides root/name)")
    name: str | None = opt(None, "extra name component: <root>/<scenario>/<strategy>/<name>/seed<N>")
    overwrite: bool = opt(False, "allow replacing a finished run in the same directory")
    checkpoint: bool = opt(True, "write a checkpoint at every experience boundary")
    checkpoint_every_n_steps: int | None = opt(
        None, "also write checkpoints/step.ckpt every N optimizer steps (newest only), so resume=auto continues "
        "inside an experience; null = only on SIGUSR1/SIGTERM", ge=1)
    eval_unseen: bool = opt(False, "also evaluate unseen experiences (needed for forward transfer, fwt)")
    fast_step: bool = opt(True, "take each optimizer step in a manual-optimisation step with automatic "
                                "optimisation's order where nothing in the fit needs Lightning's automatic loop (same "
                                "numbers, less per-step overhead; cl/fast_step.py); false = always automatic")


@dataclass
class FPFConfig:
    """Forgetting-prioritised fine-tuning: the add-on (``fpf.enabled``) and every FPF call of ``kfpf``.

    See cl/components/fpf.py and docs/strategies/kfpf.md.
    """

    enabled: bool = opt(False, "run FPF on the replay buffer after each experience (add-on to the strategy)")
    modules: list[str] = opt(default_factory=lambda: ["auto"],
                             help="sensitive modules: auto | head | first_conv | last_conv | a type (BatchNorm) | "
                                  "a name glob")
    iters: int = opt(100, "optimizer steps per FPF call", ge=1)
    lr: float = opt(0.05, "FPF learning rate (plain SGD on the selected modules)", gt=0)
    momentum: float = opt(0.0, "FPF SGD momentum (buffers reset at every call)", ge=0)
    batch_size: int = opt(32, "buffer batch size during FPF", ge=1)
    buffer_size: int = opt(200, "replay buffer capacity when the strategy has none", ge=1)
    frozen_bn: str = opt("eval", "BatchNorm outside the selection: eval (running stats) | batch_stats (momentum 0)",
                         choices=("eval", "batch_stats"))
    dynamics: str = opt("auto", "per-module training dynamics in metrics.json: auto (with FPF/kfpf) | on | off",
                        choices=("auto", "on", "off"))
    measure: bool = opt(False, "evaluate seen experiences right before and after every FPF call (diagnostic)")


@dataclass
class RootConfig:
    imports: list[str] = opt(default_factory=list, help="your modules to import first, so their decorators "
                             "register strategies, scenarios, backbones and callbacks: [mylab.methods]")
    seed: int = opt(0, "seeds Python, NumPy and torch on every rank")
    resume: str = opt("never", "never | auto: continue an unfinished run in the run directory",
                      choices=("never", "auto"))
    strategy: Any = None
    scenario: Any = None
    backbone: Any = None
    data: DataConfig = opt(default_factory=DataConfig)
    trainer: TrainerConfig = opt(default_factory=TrainerConfig)
    run: RunConfig = opt(default_factory=RunConfig)
    fpf: FPFConfig = opt(default_factory=FPFConfig)
    callbacks: list[Any] = opt(default_factory=list, help="extra callbacks by import path, each `module:Class` or "
                               "{class: module:Class, <init arg>: value}: Lightning callbacks join every Trainer, "
                               "cl.callbacks.CLCallback ones the experience loop")


def _entry_config_cls(section: str, name: str) -> type:
    from cl.registry import BACKBONES, SCENARIOS, STRATEGIES

    reg = {"strategy": STRATEGIES, "scenario": SCENARIOS, "backbone": BACKBONES}[section]
    if section == "backbone" and str(name).startswith("timm:"):
        name = "timm"
    entry = reg.get(name)
    cfg_cls = getattr(entry, "Config", None)
    base = {"strategy": StrategyConfig, "scenario": ScenarioConfig, "backbone": BackboneConfig}[section]
    return cfg_cls if cfg_cls is not None else base


_SCALAR = re.compile(r"^[A-Za-z_][\w.]*$")


def parse_overrides(items: list[str]) -> list[str]:
    """Check ``key=value`` items and expand the ``strategy=NAME`` style shortcuts to ``strategy.name=NAME``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example seed=1)")
        key, value = item.split("=", 1)
        if not _SCALAR.match(key):
            raise ConfigError(f"override '{item}': '{key}' is not a valid config key")
        if key in SHORTCUT_SECTIONS:
            key = f"{key}.name"
        out.append(f"{key}={value}")
    return out


#: where packaged presets live: the checkout's ``configs/`` (source and editable installs), then the copy a wheel
#: carries inside the package (setup.py maps configs/ and assets/ to ``cl/_presets/``, keeping their relative layout)
_HERE = Path(__file__).resolve().parent
PRESET_DIRS = (_HERE.parent / "configs", _HERE / "_presets" / "configs")


def resolve_config_path(arg: str | os.PathLike) -> Path:
    """A ``config=`` argument as a file: a path (with or without ``.yaml``), else a packaged preset (``slca/cpu``)."""
    p = Path(arg)
    candidates = [p, p.with_name(p.name + ".yaml")]
    if not p.is_absolute():
        for base in PRESET_DIRS:
            candidates += [base / p, base / (str(p) + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file '{arg}' does not exist (nor is it a packaged preset; `cl list` names them)")


def preset_names() -> list[str]:
    """Packaged presets by the name ``config=`` takes (``quickstart``, ``slca/cpu``, ...)."""
    base = next((b for b in PRESET_DIRS if b.is_dir()), None)
    return sorted(str(f.relative_to(base).with_suffix("")) for f in base.rglob("*.yaml")) if base else []


def load_yaml(path: str | os.PathLike, bases: dict[str, Path] | None = None) -> dict:
    """Read a config file into a plain dict, expanding the section shortcuts (``strategy: slca``).

    ``bases`` (when given) receives, for every dotted key, the folder of the file that set it last (``extends:``
    parents first), so relative paths resolve against the file they were written in.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must contain a mapping of keys, not {type(data).__name__}")
    for sec in SHORTCUT_SECTIONS:
        if isinstance(data.get(sec), str):
            data[sec] = {"name": data[sec]}
    base = data.pop("extends", None)
    own = data
    if base is not None:
        parent = load_yaml((p.parent / base) if not Path(base).is_absolute() else base, bases)
        data = _deep_merge(parent, data)
    if bases is not None:
        folder = p.resolve().parent
        bases.update({key: folder for key in _leaf_keys(own)})
    return data


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _resolve_file_paths(file_cfg: dict, bases: dict[str, Path], schema: DictConfig) -> None:
    """Relative ``path=True`` values from config files: against the file's folder when the target exists there,
    else left relative (the working directory). The config written to the run records the resolved path."""
    for sec in schema:
        node = schema[sec]
        cls = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if cls is None or not dataclasses.is_dataclass(cls) or not isinstance(file_cfg.get(sec), dict):
            continue
        for f in dataclasses.fields(cls):
            value = file_cfg[sec].get(f.name)
            key = f"{sec}.{f.name}"
            if not f.metadata.get("path") or not isinstance(value, str) or key not in bases:
                continue
            if value and not Path(value).expanduser().is_absolute() and (bases[key] / value).exists():
                file_cfg[sec][f.name] = str((bases[key] / value).resolve())


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    if isinstance(b.get("strategy"), dict) and "name" in b["strategy"] and isinstance(a.get("strategy"), dict):
        if a["strategy"].get("name") != b["strategy"]["name"]:  # a different strategy drops the parent's keys
            out["strategy"] = dict(b["strategy"])
    return out


def _selected_name(section: str, file_cfg: dict, overrides: list[str], default: str) -> str:
    name = (file_cfg.get(section) or {}).get("name", default)
    for item in overrides:
        key, value = item.split("=", 1)
        if key == f"{section}.name":
            name = value
    return str(name)


def _imports(file_cfg: dict, overrides: list[str]) -> list[str]:
    """The ``imports`` list from the file, replaced by a command-line ``imports=`` (a name or a [list])."""
    value: Any = file_cfg.get("imports")
    for i, item in enumerate(overrides):
        key, raw = item.split("=", 1)
        if key == "imports":
            if not raw.strip().startswith("["):
                raw = f"[{raw}]"
                overrides[i] = f"imports={raw}"
            try:
                value = OmegaConf.to_container(OmegaConf.from_dotlist([f"imports={raw}"]))["imports"]
            except OmegaConfBaseException:
                raise ConfigError(f"invalid value for 'imports': {raw} (a module name or [a.b, c.d])") from None
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
        file_cfg["imports"] = value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"invalid value for 'imports': {value!r} (a list of module names)")
    return value


def build_config(config_path: str | None = None, overrides: list[str] | None = None,
                 root_cls: type = RootConfig) -> DictConfig:
    """Build, merge and validate the config. Raises :class:`ConfigError` with one readable line on any mistake."""
    from cl.registry import import_modules

    overrides = parse_overrides(list(overrides or []))
    bases: dict[str, Path] = {}
    file_cfg = load_yaml(resolve_config_path(config_path), bases) if config_path else {}
    import_modules(_imports(file_cfg, overrides))  # before any name is looked up: they register entries
    schema = OmegaConf.structured(root_cls)
    OmegaConf.set_struct(schema, False)
    defaults = {"strategy": "finetune", "scenario": "split_digits", "backbone": "mlp"}
    for sec, default in defaults.items():
        if sec in schema:
            name = _selected_name(sec, file_cfg, overrides, default)
            cls = _entry_config_cls(sec, name)
            node = OmegaConf.structured(cls)
            node.name = name
            schema[sec] = node
            _drop_foreign_file_keys(file_cfg, sec, name, default, cls, config_path)
    if "trainer" in schema:
        schema.trainer = OmegaConf.structured(_trainer_config_cls(file_cfg, overrides))
    _resolve_file_paths(file_cfg, bases, schema)
    OmegaConf.set_struct(schema, True)
    _open_free_form_dicts(schema)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(file_cfg))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise ConfigError(_unknown_key_message(err, schema)) from None
    except ValidationError as err:
        key = err.full_key or "?"
        raise ConfigError(f"invalid value for '{key}': {_first_line(err.msg)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {_first_line(str(err))}") from None
    validate(cfg)
    if "callbacks" in cfg:
        for spec in cfg.callbacks:
            callback_spec(spec)
    if "trainer" in cfg and "logger" in cfg.trainer:
        from cl.loggers import logger_specs

        logger_specs(cfg.trainer.logger)
    return cfg


def callback_spec(spec: Any) -> tuple[type, dict[str, Any]]:
    """(class, init kwargs) of one ``callbacks`` item, checked: an importable Lightning or CL callback class whose
    signature accepts the kwargs. Raises :class:`ConfigError` naming the item."""
    import inspect

    import pytorch_lightning as pl

    from cl.callbacks.base import CLCallback
    from cl.registry import is_import_path, load_object

    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        path, kwargs = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("class"), str):
        kwargs = {k: v for k, v in spec.items() if k != "class"}
        path = spec["class"]
    else:
        raise ConfigError(f"invalid callbacks item {spec!r}: give module:Class or {{class: module:Class, arg: value}}")
    if not is_import_path(path):
        raise ConfigError(f"callbacks: '{path}' is not an import path of the form module:Class")
    cls = load_object(path, "callback")
    if not (isinstance(cls, type) and issubclass(cls, (pl.Callback, CLCallback))):
        raise ConfigError(f"callbacks: '{path}' is not a pytorch_lightning.Callback or cl CLCallback subclass")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"callbacks: '{path}' does not accept {sorted(kwargs)}: {err}") from None
    return cls, kwargs


def _open_free_form_dicts(schema: DictConfig) -> None:
    """Fields typed ``dict[str, Any]`` (``scenario.kwargs``) take any key: the callee checks them, not the schema."""
    for sec in schema:
        node = schema[sec]
        if not isinstance(node, DictConfig):
            continue
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig) and OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)


def _drop_foreign_file_keys(file_cfg: dict, section: str, name: str, default: str, cls: type,
                            config_path: str | None) -> None:
    """The command line picked another entry than the file (``backbone=resnet18_cifar`` over a file's ``cnn``): the
    file's keys that the new entry does not declare (``backbone.width``) belonged to the replaced one; drop them, with
    a note, as ``extends:`` does for a different strategy. Keys both declare (``strategy.lr``) are kept."""
    node = file_cfg.get(section)
    if not isinstance(node, dict) or str(node.get("name", default)) == name:
        return
    known = {f.name for f in dataclasses.fields(cls)}
    foreign = [k for k in node if k not in known]
    for k in foreign:
        del node[k]
    if foreign:
        keys = ", ".join(f"{section}.{k}" for k in foreign)
        logging.getLogger("cl.config").warning(
            "note: %s from %s do%s not apply to %s '%s' chosen on the command line; ignored", keys,
            config_path or "the config file", "es" if len(foreign) == 1 else "", section, name)


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg else "invalid"


def _unknown_key_message(err: OmegaConfBaseException, schema: DictConfig) -> str:
    full = getattr(err, "full_key", None) or ""
    if not full:
        m = re.search(r"Key '([^']+)'", str(err))
        full = m.group(1) if m else "?"
    parent_path, _, leaf = full.rpartition(".")
    node = OmegaConf.select(schema, parent_path) if parent_path else schema
    known = [f"{parent_path}.{k}" if parent_path else k for k in (node.keys() if isinstance(node, DictConfig) else [])]
    return f"unknown config key '{full}'{closest(full, known)}; `cl train --help` lists the keys"


def validate(cfg: DictConfig) -> None:
    """Check value constraints declared with :func:`opt` and each section's own ``validate`` method."""
    for section, node in cfg.items():
        if not isinstance(node, DictConfig):
            continue
        obj_type = OmegaConf.get_type(node)
        if obj_type is None or not dataclasses.is_dataclass(obj_type):
            continue
        for f in dataclasses.fields(obj_type):
            value = node.get(f.name)
            meta = f.metadata
            if value is None or isinstance(value, (DictConfig, ListConfig)):
                continue
            where = f"{section}.{f.name}"
            if meta.get("gt") is not None and isinstance(value, (int, float)) and not value > meta["gt"]:
                raise ConfigError(f"invalid value for '{where}': {value} (must be > {meta['gt']})")
            if meta.get("ge") is not None and isinstance(value, (int, float)) and not value >= meta["ge"]:
                raise ConfigError(f"invalid value for '{where}': {value} (must be >= {meta['ge']})")
            if meta.get("choices") and value not in meta["choices"]:
                allowed = ", ".join(map(str, meta["choices"]))
                raise ConfigError(f"invalid value for '{where}': '{value}' (choose one of {allowed})")
        check = getattr(obj_type, "validate", None)
        if callable(check):
            check(OmegaConf.to_object(node))


def section(cfg: DictConfig, name: str) -> Any:
    """The typed dataclass instance of one section (e.g. the strategy's own Config)."""
    return OmegaConf.to_object(cfg[name])


def describe(root_cls: type = RootConfig, names: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(key, default, help) rows for ``cl train --help``; ``names`` selects the strategy/scenario/backbone."""
    names = names or {"strategy": "finetune", "scenario": "split_digits", "backbone": "mlp"}
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        inst = cls()
        for f in dataclasses.fields(cls):
            value = getattr(inst, f.name)
            key = f"{prefix}{f.name}"
            if f.name in SHORTCUT_SECTIONS and prefix == "" and f.name in names:
                walk(_entry_config_cls(f.name, names[f.name]), f"{key}.")
            elif dataclasses.is_dataclass(value):
                walk(type(value), f"{key}.")
            else:
                rows.append((key, repr(value) if not isinstance(value, str) else value, f.metadata.get("help", "")))

    walk(root_cls, "")
    return rows
