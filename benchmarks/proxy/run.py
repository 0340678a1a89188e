"""The proxy benchmark: every registered strategy, the ``joint`` upper bound and Avalanche's ``Naive``, ``EWC`` and
``LwF`` on the ``proxy_fmnist`` stream, several seeds each; writes a table into ``benchmarks/README.md`` and a plot.

Rows are grouped by backbone, as the papers use them:

* ``vit``: the ViT pre-trained on the SOURCE half of Fashion-MNIST (``assets/backbones/vit_p4_w64_d4_fmnist.pt``)
  for the pre-trained-model strategies (SLCA, LAE, SEMA, RanPAC, APER, L2P, DualPrompt, CODA-Prompt, ``ncm``), with
  ``finetune`` and ``joint`` as bounds;
* ``scratch``: a narrow CIFAR ResNet-18 trained from scratch for the rest (k-FPF, ER, DER++, PRD, ...), with
  ``finetune``, ``joint`` and the Avalanche references on the same model, data, epochs, batch size and optimizer.

Each ``cl`` row starts from the strategy's CPU preset ``configs/<name>/cpu.yaml`` (its ``strategy``, ``data``,
``trainer`` and ``fpf`` keys; the stream and backbone are those of the group) or, without a preset, from the
group's default keys (:data:`GROUPS`). Every run is cached under ``benchmarks/proxy/cache/`` by a hash of its
resolved config, the strategy's source file and the backbone checkpoint's bytes, so adding or changing a strategy
reruns only its rows.

    python benchmarks/proxy/run.py                  # the full table (3 seeds), ~30 min on 2 cores
    python benchmarks/proxy/run.py --quick          # one seed, 3 batches per epoch: a smoke test
    python benchmarks/proxy/run.py --only er kfpf --seeds 0
    python benchmarks/proxy/run.py --only l2p --groups vit --no-run --merge   # replace/insert rows, keep the rest
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
README = REPO / "benchmarks" / "README.md"
PLOT = REPO / "benchmarks" / "proxy" / "proxy_fmnist.png"
VIT_CKPT = "assets/backbones/vit_p4_w64_d4_fmnist.pt"
BENCH_VERSION = 1  # bump to invalidate every cached run
MARK_START, MARK_END = "<!-- proxy-table:start -->", "<!-- proxy-table:end -->"

#: the streams rows run on; ``digits`` is a seconds-long stand-in for tests
STREAMS: dict[str, list[str]] = {
    "proxy": ["scenario=proxy_fmnist", "scenario.n_experiences=5", "scenario.image_size=32",
              "scenario.train_per_class=200", "scenario.shift=digits"],
    "tiny": ["scenario=split_digits", "scenario.n_experiences=2", "scenario.image_size=32"],
    "digits": ["scenario=split_digits", "scenario.n_experiences=5", "scenario.image_size=32",
               "scenario.invert_last=true"],
}

#: test images kept per class (the first ones of each class in the official test set), per stream; None = all
TEST_PER_CLASS: dict[str, int | None] = {"proxy": 300, "tiny": None, "digits": None}

#: per backbone group: the backbone, and the keys of baselines / strategies without a preset (also used to set
#: the Avalanche references' epochs, batch size and learning rate)
GROUPS: dict[str, dict[str, Any]] = {
    "vit": {
        "title": "pre-trained ViT (vit_p4_w64_d4, SOURCE half of Fashion-MNIST)",
        "backbone": ["backbone=vit_p4_w64_d4", f"backbone.checkpoint={VIT_CKPT}"],
        "defaults": {"strategy.epochs": 2, "strategy.lr": 0.01, "strategy.momentum": 0.9, "data.batch_size": 32},
        "avalanche": [],
    },
    "scratch": {
        "title": "ResNet-18 (CIFAR stem, nf=8) from scratch",
        "backbone": ["backbone=resnet18_cifar", "backbone.nf=8"],
        "defaults": {"strategy.epochs": 2, "strategy.lr": 0.05, "strategy.momentum": 0.9, "data.batch_size": 32},
        "avalanche": ["naive", "ewc", "lwf"],
    },
}
#: strategies built on a pre-trained model; every other registered strategy goes to ``scratch``
PRETRAINED = {"slca", "lae", "sema", "ncm", "ranpac", "aper", "l2p", "dualprompt", "coda_prompt"}
#: baselines that appear in both groups
BASELINES = ("finetune", "joint")
#: Avalanche hyper-parameters (defaults of its examples on split MNIST-like streams)
AVALANCHE_KW = {"ewc": {"ewc_lambda": 100.0}, "lwf": {"lwf_alpha": 1.0, "lwf_temperature": 2.0}, "naive": {}}
#: FPF's extra modules on the ResNet: its last stage, the analogue of the CNN presets' ``last_conv`` (the last conv
#: of the width-8 CNN is its whole last stage; ``last_conv`` of a ResNet-18 would be a single conv of layer4)
FPF_RESNET = ["fpf.modules=[auto,backbone.layer4]"]
#: applied after the preset, stated in the README: caps that keep a preset within the ~30 min budget, and the
#: presets' CNN-specific FPF module choice translated to the group's ResNet
BENCH_OVERRIDES: dict[str, list[str]] = {
    "prd": ["strategy.epochs=3", "strategy.warmup_epochs=3"],
    "er": [*FPF_RESNET],
    "derpp": [*FPF_RESNET],
    "kfpf": [*FPF_RESNET],
}
#: ablation rows for the claims: label -> (strategy, extra overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "prd[lambda_d=0]": ("prd", ["strategy.lambda_d=0"]),
    "er[+fpf]": ("er", ["fpf.enabled=true"]),
    "derpp[+fpf]": ("derpp", ["fpf.enabled=true"]),
    "kfpf[fpf.iters=100]": ("kfpf", ["fpf.iters=100"]),
}
#: rows the claims need run first (a run cut short by the deadline still has them)
FIRST = ["vit/finetune", "vit/slca", "vit/lae", "vit/sema", "vit/ncm", "scratch/er", "scratch/kfpf",
         "scratch/er[+fpf]", "scratch/prd", "scratch/prd[lambda_d=0]", "scratch/finetune"]
COMMON = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
          "trainer.logger=none", "run.checkpoint=false", "run.overwrite=true"]

COLUMNS = ["group", "strategy", "last acc %", "avg inc acc %", "forgetting %", "wall s", "train GFLOPs",
           "trainable params", "added params", "seeds"]


@dataclass
class Row:
    group: str
    name: str  # row label: a strategy name, a variant name or avalanche:<kind>
    engine: str  # cl | avalanche
    strategy: str = ""  # the registered strategy (cl rows)
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ rows
def preset_overrides(name: str) -> tuple[str | None, list[str]]:
    """The preset's strategy/data/trainer/fpf keys as dotlist overrides (stream and backbone are the group's)."""
    from cl.config import load_yaml

    path = REPO / "configs" / name / "cpu.yaml"
    if not path.is_file():
        return None, []
    data = load_yaml(path)
    out: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            if prefix == "strategy.name":
                return
            out.append(f"{prefix}={node if isinstance(node, str) else json.dumps(node)}")

    for sec in ("strategy", "data", "trainer", "fpf"):
        if sec in data:
            walk(sec, data[sec])
    return str(path.relative_to(REPO)), out


def plan(only: list[str] | None, groups: list[str]) -> list[Row]:
    from cl.registry import STRATEGIES

    names = sorted(STRATEGIES.names())
    rows: list[Row] = []
    for group in groups:
        g = GROUPS[group]
        for name in names:
            in_group = name in BASELINES or (name in PRETRAINED) == (group == "vit")
            if not in_group or (only and name not in only):
                continue
            preset, keys = (None, []) if name in BASELINES else preset_overrides(name)
            if name in BASELINES:
                keys = [f"{k}={v}" for k, v in g["defaults"].items()]
            elif preset is None:  # the strategy's own defaults, with the group's epochs and batch size
                keys = [f"{k}={v}" for k, v in g["defaults"].items() if k in ("strategy.epochs", "data.batch_size")]
            keys = [f"strategy={name}", *keys, *BENCH_OVERRIDES.get(name, [])]
            rows.append(Row(group, name, "cl", name, preset, keys))
            for label, (base, extra) in VARIANTS.items():
                if base == name and (not only or label in only):
                    rows.append(Row(group, label, "cl", name, preset, keys + extra))
        for kind in g["avalanche"]:
            label = f"avalanche:{kind}"
            if not only or label in only or "avalanche" in only:
                rows.append(Row(group, label, "avalanche", kind))
    return rows


def group_backbone(group: str) -> list[str]:
    keys = list(GROUPS[group]["backbone"])
    if group == "vit" and not (REPO / VIT_CKPT).is_file():
        keys = [k for k in keys if not k.startswith("backbone.checkpoint=")]  # until the checkpoint lands
    return keys


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "-"


# ------------------------------------------------------------------------------------------------ running
def config_for(row: Row, seed: int, args: argparse.Namespace) -> Any:
    from cl.config import build_config

    keys = [*STREAMS[args.stream], *group_backbone(row.group), *COMMON]
    if row.engine == "cl":
        keys += row.overrides
    else:  # the Avalanche references take the group's finetune settings
        keys += ["strategy=finetune", *(f"{k}={v}" for k, v in GROUPS[row.group]["defaults"].items())]
    if args.quick:
        keys += [f"trainer.limit_train_batches={args.quick_batches}"]
    keys += [f"seed={seed}"]
    return build_config(None, keys)


def cache_key(row: Row, cfg: Any) -> str:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["run"].pop("dir", None)
    parts = [f"v{BENCH_VERSION}", row.engine, row.name, json.dumps(plain, sort_keys=True),
             f"test_per_class={TEST_PER_CLASS.get(str(plain['scenario']['name']))}"]
    if row.engine == "cl":
        parts.append(file_digest(REPO / "strategies" / f"{row.strategy}.py"))
    else:
        parts += [json.dumps(AVALANCHE_KW[row.name.split(":")[1]], sort_keys=True),
                  file_digest(REPO / "benchmarks" / "common.py")]
    ckpt = plain.get("backbone", {}).get("checkpoint")
    if ckpt:
        parts.append(file_digest(REPO / ckpt))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def subsample_test(scenario: Any, per_class: int | None) -> Any:
    """Keep the first ``per_class`` test images of every class (in the test view's order) in each experience."""
    import numpy as np

    from scenarios.base import ExperienceData

    if per_class is None:
        return scenario
    for exp in scenario.experiences:
        t = exp.test
        targets = np.asarray(t.targets)
        keep = np.sort(np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in np.unique(targets)]))
        exp.test = ExperienceData(t.source, np.asarray(t.indices)[keep], targets[keep])
    return scenario


@contextlib.contextmanager
def eval_subset(per_class: int | None) -> Any:
    """Patch ``cl.runner.build_scenario`` so runs evaluate on a fixed per-class subset of the test set."""
    import cl.runner as runner_mod

    original = runner_mod.build_scenario
    runner_mod.build_scenario = lambda cfg: subsample_test(original(cfg), per_class)
    try:
        yield
    finally:
        runner_mod.build_scenario = original


def run_cl(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """One in-process ``cl`` run; parameters counted against the model as built (captured in build_strategy)."""
    import torch

    import cl.runner as runner_mod

    cfg.run.dir = str(run_dir)
    captured: dict[str, Any] = {}
    original = runner_mod.build_strategy

    def capture(c: Any, scenario: Any) -> Any:
        model = original(c, scenario)
        captured["init"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        return model

    runner_mod.build_strategy = capture
    try:
        t0 = time.perf_counter()
        runner = runner_mod.Runner(cfg)
        res = runner.run()
        wall = time.perf_counter() - t0
    finally:
        runner_mod.build_strategy = original
    init = captured["init"]
    final = dict(runner.model.named_parameters())
    trainable = sum(p.numel() for k, p in final.items()
                    if k not in init or init[k].shape != p.shape or not torch.equal(init[k], p.detach().cpu()))
    added = sum(p.numel() for p in final.values()) - sum(p.numel() for p in init.values())
    m = res.metrics
    exps = m.get("experiences", [])
    flops = None
    if exps and "compute/cumulative_flops" in (exps[-1].get("extra") or {}):
        flops = float(exps[-1]["extra"]["compute/cumulative_flops"])
    return {"last_acc": m["last_acc"], "avg_inc_acc": m["avg_inc_acc"], "forgetting": m["forgetting"],
            "accuracy_matrix": m["accuracy_matrix"], "wall_s": wall, "flops": flops,
            "trainable_params": int(trainable), "added_params": int(added)}


def run_avalanche_row(row: Row, cfg: Any) -> dict[str, Any]:
    """An Avalanche reference with the group's finetune settings; quick mode keeps as many samples per experience
    as ``trainer.limit_train_batches`` batches hold."""
    import numpy as np

    import cl.runner as runner_mod
    from benchmarks.common import build_model, count_params, run_avalanche
    from cl.config import section
    from cl.metrics.accuracy import AccuracyMatrix
    from cl.utils import seed_everything

    seed_everything(cfg.seed)
    scenario = runner_mod.build_scenario(cfg)
    net = build_model(section(cfg, "backbone"), scenario)
    kind = row.name.split(":")[1]
    lim = cfg.trainer.limit_train_batches
    train_limit = int(lim) * int(cfg.data.batch_size) if lim is not None and float(lim) >= 1 else None
    out = run_avalanche(kind, net, scenario, epochs=int(cfg.strategy.epochs), batch_size=int(cfg.data.batch_size),
                        lr=float(cfg.strategy.lr), momentum=float(cfg.strategy.momentum),
                        eval_batch_size=int(cfg.data.eval_batch_size), train_limit=train_limit, **AVALANCHE_KW[kind])
    am = AccuracyMatrix(len(scenario))
    for i, accs in enumerate(out["accuracy_matrix"]):
        totals = [len(e.test) for e in scenario.experiences[: i + 1]]
        am.set_row(i, [int(round(a * t)) for a, t in zip(accs, totals)], totals)
    s = am.summary()
    matrix = [[None if np.isnan(v) else round(float(v), 6) for v in r] for r in am.matrix()]
    return {"last_acc": s["last_acc"], "avg_inc_acc": s["avg_inc_acc"], "forgetting": s["forgetting"],
            "accuracy_matrix": matrix, "wall_s": out["wall_s"], "flops": None,
            "trainable_params": count_params(net, trainable=True), "added_params": 0}


def latest_cached(cache: Path, row: Row, seed: int) -> Path | None:
    """The newest ``result.json`` of this row and seed under any key (for ``--no-run`` tables only)."""
    found = sorted((cache / row.group / row.name.replace(":", "_")).glob(f"seed{seed}-*/result.json"),
                   key=lambda f: f.stat().st_mtime)
    return found[-1] if found else None


def run_one(row: Row, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """A cached run: reuse ``result.json`` when the key matches, else run and store it."""
    try:
        cfg = config_for(row, seed, args)
    except Exception as err:  # noqa: BLE001 - e.g. a preset key the strategy no longer has
        return {"group": row.group, "strategy": row.name, "seed": seed, "cached": False, "elapsed_s": 0.0,
                "status": f"config error: {str(err).splitlines()[0][:200]}"}
    key = cache_key(row, cfg)
    folder = args.cache / row.group / row.name.replace(":", "_") / f"seed{seed}-{key}"
    result_file = folder / "result.json"
    if result_file.is_file() and not args.rerun:
        return json.loads(result_file.read_text()) | {"cached": True}
    if args.no_run:
        older = latest_cached(args.cache, row, seed)
        if older is not None:  # the preset or the strategy changed since: show the run that exists, marked
            return json.loads(older.read_text()) | {"cached": True, "stale": True}
        return {"group": row.group, "strategy": row.name, "seed": seed, "cached": False, "elapsed_s": 0.0,
                "status": "not run"}
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), eval_subset(TEST_PER_CLASS.get(args.stream)):
            res = run_cl(cfg, folder / "run") if row.engine == "cl" else run_avalanche_row(row, cfg)
        res["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failing strategy is a row that says so, not a dead benchmark
        res = {"status": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        (folder / "error.txt").write_text(traceback.format_exc())
    res.update({"group": row.group, "strategy": row.name, "seed": seed, "key": key, "preset": row.preset,
                "stream": args.stream, "quick": bool(args.quick), "elapsed_s": time.perf_counter() - t0})
    if res["status"] == "ok":
        result_file.write_text(json.dumps(res, indent=1) + "\n")
    return res | {"cached": False}


# ------------------------------------------------------------------------------------------------ reporting
def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}" if abs(n) < 10 * div else f"{n / div:.1f}{unit}"
    return str(int(n))


def aggregate(results: list[dict[str, Any]], rows: list[Row]) -> list[dict[str, Any]]:
    table = []
    for row in rows:
        rs = [r for r in results if r["group"] == row.group and r["strategy"] == row.name]
        ok = [r for r in rs if r.get("status") == "ok"]
        entry: dict[str, Any] = {"group": row.group, "strategy": row.name, "runs": ok,
                                 "failed": [r["status"] for r in rs if r.get("status") != "ok"]}
        if ok:
            flops = [r["flops"] for r in ok if r.get("flops") is not None]
            entry.update({
                "last acc %": mean_std([r["last_acc"] for r in ok], 100),
                "avg inc acc %": mean_std([r["avg_inc_acc"] for r in ok], 100),
                "forgetting %": mean_std([r["forgetting"] for r in ok], 100),
                "wall s": mean_std([r["wall_s"] for r in ok], 1, 0),
                "train GFLOPs": mean_std([f / 1e9 for f in flops], 1, 0) if flops else "–",
                "trainable params": human(ok[0]["trainable_params"]),
                "added params": human(ok[0]["added_params"]),
                "seeds": ",".join(str(r["seed"]) for r in ok),
            })
        table.append(entry)
    return table


STALE_NOTE = ("† run with an earlier version of the strategy's preset or source file (the current one changed after "
              "the run and was not rerun within the time budget; the run's own `config.yaml` in the cache says what "
              "ran).")


def group_head(group: str) -> list[str]:
    return [f"**{group}**: {GROUPS[group]['title']} (`{' '.join(group_backbone(group))}`)", "",
            "| " + " | ".join(COLUMNS[1:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]


def row_line(e: dict[str, Any]) -> str:
    if not e["runs"]:
        why = ("not run yet (time budget)" if set(e["failed"]) <= {"not run"}
               else "failed: " + "; ".join(sorted(set(e["failed"])))[:120])
        return f"| {e['strategy']} | " + " | ".join(["–"] * (len(COLUMNS) - 3)) + f" | {why} |"
    mark = " †" if any(r.get("stale") for r in e["runs"]) else ""
    return "| " + " | ".join(str(e[c]) + (mark if c == "strategy" else "") for c in COLUMNS[1:]) + " |"


def markdown(table: list[dict[str, Any]], command: str, args: argparse.Namespace, elapsed: float) -> str:
    lines = [MARK_START, "", f"Made by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPU cores, {elapsed / 60:.1f} min including cached runs' original time"
             f"{'; QUICK mode: not a result' if args.quick else ''}). Stream `{args.stream}`: "
             f"`{' '.join(STREAMS[args.stream])}`, test images per class: "
             f"{TEST_PER_CLASS.get(args.stream) or 'all'}.", ""]
    for group in dict.fromkeys(e["group"] for e in table):
        lines += [*group_head(group), *(row_line(e) for e in table if e["group"] == group), ""]
    if any(r.get("stale") for e in table for r in e["runs"]):
        lines += [STALE_NOTE, ""]
    lines += [f"![proxy benchmark]({Path(os.path.relpath(PLOT, README.parent)).as_posix()})", "", MARK_END]
    return "\n".join(lines)


def row_label(line: str) -> str:
    return line.split("|")[1].strip().removesuffix(" †")


def merge_table(block: str, new: dict[str, list[str]], order: dict[str, list[str]], note: str) -> str:
    """``block`` (a table written by :func:`markdown`) with the row lines of ``new`` (group -> lines) replacing the
    rows of the same label or inserted where a full run puts them (``order``: group -> labels in a full run's
    order); every other line stays as it is, and ``note`` is added above the first group (replacing a note that
    reads the same up to its first " by `", i.e. an earlier merge of the same rows, whatever its command)."""
    lines = block.split("\n")
    sep = "|" + "---|" * (len(COLUMNS) - 1)
    for group, new_lines in new.items():
        heads = {g: i for i, ln in enumerate(lines) for g in order if ln.startswith(f"**{g}**:")}
        if group not in heads:  # a group the table lacks: before the next group of a full run, else after the last
            later = [heads[g] for g in list(order)[list(order).index(group) + 1:] if g in heads]
            at = min(later) if later else next(i for i, ln in enumerate(lines)
                                               if ln.startswith(("† ", "![proxy benchmark]", MARK_END)))
            lines[at:at] = [*group_head(group), ""]
            heads[group] = at
        start = lines.index(sep, heads[group]) + 1
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        rank = {name: i for i, name in enumerate(order[group])}
        for line in new_lines:
            labels = [row_label(ln) for ln in lines[start:end]]
            if row_label(line) in labels:
                lines[start + labels.index(row_label(line))] = line
                continue
            mine = rank.get(row_label(line), math.inf)
            at = next((start + j for j, lab in enumerate(labels) if rank.get(lab, -1) > mine), end)
            lines.insert(at, line)
            end += 1
    same = [i for i, ln in enumerate(lines) if ln.split(" by `")[0] == note.split(" by `")[0]]
    for i in reversed(same):  # the same rows merged before (by any command): that note is superseded
        del lines[i:i + 2]
    first = next(i for i, ln in enumerate(lines) if any(ln.startswith(f"**{g}**:") for g in order))
    lines[first:first] = [note, ""]
    stale = any("†" in ln.split("|")[1] for ln in lines if ln.startswith("| "))
    if stale and STALE_NOTE not in lines:
        at = next(i for i, ln in enumerate(lines) if ln.startswith(("![proxy benchmark]", MARK_END)))
        lines[at:at] = [STALE_NOTE, ""]
    elif not stale and STALE_NOTE in lines:
        del lines[lines.index(STALE_NOTE):lines.index(STALE_NOTE) + 2]
    return "\n".join(lines)


def current_block() -> str | None:
    text = README.read_text() if README.is_file() else ""
    if MARK_START not in text or MARK_END not in text:
        return None
    return MARK_START + text.split(MARK_START, 1)[1].split(MARK_END, 1)[0] + MARK_END


def write_readme(block: str) -> None:
    text = README.read_text() if README.is_file() else "# Benchmarks\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## Proxy benchmark: the table\n\n" + block + "\n"
    README.write_text(text)


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = [e for e in table if e["runs"]]
    if not entries:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"vit": "tab:blue", "scratch": "tab:orange"}
    labels = [f"{e['strategy']}\n({e['group']})" for e in entries]
    means = [100 * np.mean([r["last_acc"] for r in e["runs"]]) for e in entries]
    stds = [100 * np.std([r["last_acc"] for r in e["runs"]]) for e in entries]
    ax1.bar(range(len(entries)), means, yerr=stds, color=[colors.get(e["group"], "grey") for e in entries],
            capsize=3)
    ax1.set_xticks(range(len(entries)), labels, rotation=60, fontsize=7)
    ax1.set_ylabel("last accuracy over all seen classes (%)")
    ax1.set_title("last accuracy (mean ± std over seeds)")
    for e in entries:
        rows = [r["accuracy_matrix"] for r in e["runs"]]
        curve = []
        for i in range(len(rows[0])):
            vals = [np.nanmean([v for v in m[i][: i + 1] if v is not None]) for m in rows]
            curve.append(100 * float(np.mean(vals)))
        ax2.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=f"{e['strategy']} ({e['group']})",
                 linestyle="-" if e["group"] == "vit" else "--")
    ax2.set_xlabel("experiences trained")
    ax2.set_ylabel("mean accuracy over seen experiences (%)")
    ax2.set_title("accuracy along the stream")
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, help="row names (strategy names, avalanche:naive, avalanche)")
    p.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    p.add_argument("--stream", default="proxy", choices=list(STREAMS))
    p.add_argument("--quick", action="store_true", help="one seed, --quick-batches training batches per epoch")
    p.add_argument("--quick-batches", type=int, default=3)
    p.add_argument("--rerun", action="store_true", help="ignore cached results")
    p.add_argument("--no-run", action="store_true", help="only tabulate runs already in the cache")
    p.add_argument("--cache", type=Path, default=CACHE, help="cache folder (default benchmarks/proxy/cache)")
    p.add_argument("--no-readme", action="store_true", help="print the table instead of writing the README")
    p.add_argument("--readme", type=Path, default=None, help="write the table into this file instead")
    p.add_argument("--plot", type=Path, default=None, help="plot path (default benchmarks/proxy/proxy_fmnist.png)")
    p.add_argument("--list", action="store_true", help="print the planned rows and exit")
    p.add_argument("--merge", action="store_true",
                   help="replace/insert only the rows that ran (with --only/--groups) in the README's table and keep "
                        "every other row; rows without a run are left as they are; the plot is not redrawn (it "
                        "is drawn only when the table is written whole)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.merge and args.quick:
        p.error("--merge: a quick run is not a result, not merged into the table")
    partial = bool(args.only) or set(args.groups) != set(GROUPS)
    if partial and not args.merge and not args.list:
        print(f"warning: {'the plot is' if args.no_readme else 'the table and the plot are'} rewritten with these "
              "rows only, every other row dropped; --merge keeps them", file=sys.stderr)
    global PLOT, README
    if args.plot:
        PLOT = args.plot.resolve()
    if args.readme:
        README = args.readme.resolve()
    old = current_block()
    if args.merge and (old is None or f"Stream `{args.stream}`:" not in old):
        p.error(f"--merge: {README} has no proxy table of stream {args.stream} to merge into")

    import torch

    from cl.runner import quiet_lightning

    torch.set_num_threads(int(os.environ.get("CL_BENCH_THREADS", torch.get_num_threads())))
    quiet_lightning()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    rows = plan(args.only, args.groups)
    if args.list:
        for r in rows:
            print(f"{r.group:8s} {r.name:18s} {r.engine:9s} preset={r.preset} {' '.join(r.overrides)}")
        return []
    t_start = time.perf_counter()
    results = []
    order = sorted(rows, key=lambda r: FIRST.index(f"{r.group}/{r.name}") if f"{r.group}/{r.name}" in FIRST
                   else len(FIRST))
    for seed in args.seeds:  # seed-major: a cut-short run still has one complete seed of every row
        for row in order:
            res = run_one(row, seed, args)
            results.append(res)
            tag = "cached" if res["cached"] else f"{res['elapsed_s']:.1f} s"
            acc = f"last_acc {100 * res['last_acc']:.1f}" if res.get("status") == "ok" else res["status"]
            print(f"[{time.strftime('%H:%M:%S')}] {row.group:8s} {row.name:18s} seed {seed}: {acc} ({tag})",
                  flush=True)
    elapsed = sum(r.get("elapsed_s", 0.0) for r in results)
    table = aggregate(results, rows)
    cmd = "python benchmarks/proxy/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if args.merge:
        new: dict[str, list[str]] = {}
        for e in table:
            if e["runs"]:
                new.setdefault(e["group"], []).append(row_line(e))
            else:
                print(f"not merged (no run): {e['group']}/{e['strategy']}")
        names = ", ".join(f"`{e['group']}/{e['strategy']}`" for e in table if e["runs"])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        note = (f"Rows {names} replaced or added by `{cmd.strip()}` ({stamp}, {os.cpu_count()} CPU cores); the plot "
                "shows the rows as made above.")
        order = {g: [r.name for r in plan(None, [g])] for g in GROUPS}
        block = merge_table(old or "", new, order, note)
    else:
        block = markdown(table, cmd.strip(), args, elapsed)
    if args.no_readme:
        print(block)
    else:
        write_readme(block)
    if not args.merge:
        plot(table, PLOT)
    print(f"wall {time.perf_counter() - t_start:.0f} s; table -> {README if not args.no_readme else 'stdout'}, "
          f"plot -> {PLOT if not args.merge else 'not redrawn (--merge)'}")
    return table


if __name__ == "__main__":
    main()
