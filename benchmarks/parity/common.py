"""The shared tiny setup of the parity harness, and our side of every row.

One setup serves every strategy: the Fashion-MNIST STREAM half (the images the committed tiny ViT never saw in
pre-training, ``scenarios/proxy.py::proxy_split``), resized once to 32 x 32 uint8, ``train_per_class`` training and
``test_per_class`` test images per class, 5 experiences of 2 classes. The class order of seed ``s`` is the PyCIL
permutation ``np.random.seed(s); np.random.permutation(10)``; labels are renumbered to positions in that order
*before* either side sees them, so both run with the natural order (experience t owns labels 2t, 2t + 1).
No augmentation on either side: the official pipelines' crops and jitters are random, so keeping them would only
add noise to a side-by-side comparison (each official runner says which transform it swaps out).

The arrays go to an ``.npz`` file (:func:`write_npz`) that our ``scenario=npz`` reads and each official runner
loads through its shim. Results are :class:`RunResult` JSON files under ``benchmarks/parity/results/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"  # extracted official sources and setup files (git-ignored)
RESULTS = HERE / "results"  # one JSON per (row, side, seed), committed: the table is made from them
VIT_CKPT = REPO / "assets" / "backbones" / "vit_p4_w64_d4_fmnist.pt"
#: the committed ViT: timm VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=4,
#: num_heads=2, mlp_ratio=4, num_classes=0), pre-trained on the SOURCE half (docs/pretrain.md)
VIT_ARCH = {"img_size": 32, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4, "num_heads": 2,
            "mlp_ratio": 4.0}

#: the official code, pinned: (GitHub repository, commit)
OFFICIAL: dict[str, tuple[str, str]] = {
    "slca": ("GengDavid/SLCA", "169d4e6b91e3ca30caa717200c1944981c4426d1"),
    "lae": ("gqk/LAE", "1680e496b7ac7ffa408b13d3b1a53a9be9b87696"),
    "sema": ("huiyiwang01/SEMA-CL", "5a4551262d659c6d93dd6c50ff814e028554fbf3"),
    "prd": ("naderAsadi/Probing-Continual-Learning", "8b82d53b142ae8a13cd342a8a3da6b0ca2b4d28c"),
    "ranpac": ("RanPAC/RanPAC", "012927f86e8d95dc9e7c6015a5e1048e6604c8b6"),
    "aper": ("zhoudw-zdw/RevisitingCIL", "a2e6b71f6a2fed4421609a0917eea861fa387c76"),
    "l2p": ("JH-LEE-KR/l2p-pytorch", "f7bc994365f51221e059b7be18c9b08c369444e6"),
    "dualprompt": ("JH-LEE-KR/dualprompt-pytorch", "7eb457d988409a6abf97af2b121ffa62dd4b498a"),
    "coda_prompt": ("GT-RIPL/CODA-Prompt", "6417d4f68754be68b697c7ca2323ee61e791e1a3"),
}
SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------------------------ the data
@dataclass
class Setup:
    """The arrays both sides train and test on (labels already renumbered to class-order positions)."""

    seed: int
    train_x: np.ndarray  # (N, 32, 32) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    class_order: list[int]  # original Fashion-MNIST labels in stream order
    n_tasks: int = 5
    classes_per_task: int = 2
    mean: tuple[float, ...] = (0.2860,)  # Fashion-MNIST, for the ``normalized`` convention
    std: tuple[float, ...] = (0.3530,)

    @property
    def n_classes(self) -> int:
        return self.n_tasks * self.classes_per_task


def make_setup(seed: int, train_per_class: int = 300, test_per_class: int = 200, size: int = 32) -> Setup:
    """Build the setup of ``seed`` from the local Fashion-MNIST files (Debian ``dataset-fashion-mnist``)."""
    import torch
    import torch.nn.functional as F

    import cl  # noqa: F401  (scenarios import cl.config)
    from scenarios.base import pycil_permutation
    from scenarios.fmnist import load_fmnist
    from scenarios.proxy import PROXY_SPLIT_SEED, proxy_split

    train, test = load_fmnist(os.environ.get("CL_DATA_ROOT", "data"))
    _, stream = proxy_split(train.targets)
    tr_idx = np.sort(np.concatenate([stream[train.targets[stream] == c][:train_per_class] for c in range(10)]))
    rng = np.random.default_rng(PROXY_SPLIT_SEED + 1)  # the same fixed test subset as proxy_fmnist
    te_idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(test.targets == c))[:test_per_class]
                                     for c in range(10)]))

    def resize(x: torch.Tensor) -> np.ndarray:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()

    order = pycil_permutation(10, seed)
    remap = np.empty(10, dtype=np.int64)
    remap[np.asarray(order)] = np.arange(10)
    return Setup(seed=seed, train_x=resize(train.images[tr_idx]), train_y=remap[train.targets[tr_idx]],
                 test_x=resize(test.images[te_idx]), test_y=remap[test.targets[te_idx]], class_order=order)


def write_npz(setup: Setup, path: Path | None = None) -> Path:
    """Write the setup for ``scenario=npz`` and the official shims; returns the path (cached per seed)."""
    path = path or CACHE / f"setup_seed{setup.seed}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, train_x=setup.train_x, train_y=setup.train_y, test_x=setup.test_x, test_y=setup.test_y,
             mean=np.asarray(setup.mean), std=np.asarray(setup.std), class_order=np.asarray(setup.class_order),
             n_tasks=setup.n_tasks, classes_per_task=setup.classes_per_task)
    os.replace(tmp, path)
    return path


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def vit_state_dict() -> dict[str, Any]:
    """The committed ViT's weights with timm's key names (``patch_embed.proj.weight``, ``blocks.0.attn.qkv``...)."""
    import torch

    return torch.load(VIT_CKPT, map_location="cpu", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------------ official code
def official_source(name: str) -> Path:
    """The official repository of ``name`` at its pinned commit, extracted under ``.cache/src`` (never edited).

    Taken from ``$CL_PARITY_MIRROR/<owner>+<repo>/repo`` (a bare git directory) when present, else cloned from
    GitHub (needs the internet once).
    """
    repo, commit = OFFICIAL[name]
    dest = CACHE / "src" / f"{name}@{commit[:7]}"
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    mirror = Path(os.environ.get("CL_PARITY_MIRROR", "/work/.mirror")) / repo.replace("/", "+") / "repo"
    with tempfile.TemporaryDirectory() as tmp:
        git_dir = mirror
        if not mirror.exists():
            git_dir = Path(tmp) / "clone"
            subprocess.run(["git", "clone", "--bare", "-q", f"https://github.com/{repo}.git", str(git_dir)],
                           check=True)
        archive = Path(tmp) / "src.tar"
        cmd = ["git", f"--git-dir={git_dir}", "archive", "-o", str(archive), commit]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            # a partial mirror (large data files left out, e.g. CODA-Prompt's DomainNet split lists): archive the
            # regular files whose blobs it has
            cmd += ["--", *_present_paths(git_dir, commit)]
            subprocess.run(cmd, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    (dest / ".complete").write_text(commit + "\n")
    return dest


def _present_paths(git_dir: Path, commit: str) -> list[str]:
    """Paths of ``commit``'s regular files whose blobs exist in ``git_dir`` (symbolic links left out: the safe
    extraction filter refuses absolute ones, such as CODA-Prompt's ``data`` link)."""
    tree = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "-z", commit], check=True,
                          capture_output=True).stdout.decode().split("\0")
    entries = [e.split("\t", 1) for e in tree if e and not e.startswith("120000 ")]
    shas = "\n".join(meta.split()[2] for meta, _ in entries) + "\n"
    check = subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "--batch-check"], input=shas.encode(),
                           check=True, capture_output=True).stdout.decode().splitlines()
    return [path for (_, path), line in zip(entries, check) if not line.endswith(" missing")]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RunResult:
    """One run of one side: ``acc[t]`` = accuracy (%) on the seen classes after experience t, sample-weighted."""

    row: str  # e.g. "slca", "lae-adapter"
    side: str  # "official" | "ours"
    seed: int
    acc: list[float]
    wall_s: float
    matrix: list[list[float | None]] = field(default_factory=list)  # % on exp j after exp i, if known
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. SEMA's adapters per block after each experience
    command: str = ""

    @property
    def last(self) -> float:
        return self.acc[-1]

    @property
    def avg_inc(self) -> float:
        return float(np.mean(self.acc))

    def save(self, root: Path = RESULTS) -> Path:
        return self.write(root / self.row / f"{self.side}_seed{self.seed}.json")

    def write(self, path: str | os.PathLike) -> Path:
        """Write this result as JSON to ``path``, atomically (the official runners' ``--out``, :meth:`save`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls(**json.loads(Path(path).read_text()))


def seen_accuracy(correct: list[list[int]], total: list[list[int]]) -> list[float]:
    """Sample-weighted accuracy (%) on the seen experiences after each experience, from count matrices."""
    out = []
    for t, (c, n) in enumerate(zip(correct, total)):
        out.append(100.0 * sum(c[: t + 1]) / max(1, sum(n[: t + 1])))
    return out


def counts_from_predictions(evals: list[tuple[Any, Any]], n_tasks: int, classes_per_task: int
                            ) -> tuple[list[float], list[list[float | None]]]:
    """(seen accuracy after each experience, per-experience matrix in %) from one ``(y_pred, y_true)`` pair per
    evaluation (labels are class-order positions, so experience j owns labels ``j * cpt .. (j + 1) * cpt - 1``)."""
    correct, total, matrix = [], [], []
    for t, (y_pred, y_true) in enumerate(evals):
        y_pred, y_true = np.asarray(y_pred), np.asarray(y_true)
        row_c, row_n, row_m = [], [], []
        for j in range(n_tasks):
            mask = (y_true // classes_per_task) == j
            c, n = int((y_pred[mask] == y_true[mask]).sum()), int(mask.sum())
            row_c.append(c)
            row_n.append(n)
            row_m.append(100.0 * c / n if j <= t and n else None)
        correct.append(row_c)
        total.append(row_n)
        matrix.append(row_m)
    return seen_accuracy(correct, total), matrix


def capturing_eval_cnn(eval_cnn: Callable[..., tuple[Any, Any]], captured: dict) -> Callable[..., tuple[Any, Any]]:
    """Wrap a PyCIL / LAMDA-PILOT ``_eval_cnn`` (bound or unbound; it returns ``(y_pred (N, topk), y_true)``) so that
    every call also appends its top-1 predictions and labels to ``captured["evals"]`` (for
    :func:`counts_from_predictions`); what it returns is unchanged."""

    def wrapped(*args: Any) -> tuple[Any, Any]:
        y_pred, y_true = eval_cnn(*args)
        captured.setdefault("evals", []).append((y_pred[:, 0].copy(), y_true.copy()))
        return y_pred, y_true

    return wrapped


def replay_config(overrides: list[str], setup_path: str | os.PathLike, n_tasks: int, seed: int,
                  work: str | os.PathLike, extra: tuple[str, ...] = ()) -> tuple[Any, Path]:
    """Our side of an in-process replay (the official runners' ``--check-run``): a row's ``overrides`` (then
    ``extra``) on the setup file, as :func:`run_ours` runs them, in a fresh ``work`` directory (emptied first)."""
    from cl.config import build_config

    work_dir = Path(work).resolve()
    shutil.rmtree(work_dir, ignore_errors=True)
    cfg = build_config(None, ["scenario=npz", f"scenario.path={Path(setup_path).resolve()}",
                              f"scenario.n_experiences={n_tasks}", "scenario.augment=false", f"seed={seed}",
                              f"run.dir={work_dir}", "run.checkpoint=false", "trainer.accelerator=cpu",
                              "trainer.enable_progress_bar=false", "trainer.logger=none",
                              *[f"backbone.checkpoint={VIT_CKPT}" if o.startswith("backbone.checkpoint=") else o
                                for o in overrides], *extra])
    return cfg, work_dir


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_ours(row: str, setup_npz: Path, seed: int, overrides: list[str], threads: int = 1) -> RunResult:
    """Run ``cl train`` on the setup file in a subprocess and read its ``metrics.json``.

    ``overrides`` hold the strategy and backbone keys of the row; the scenario keys are fixed here.
    """
    data = load_npz(setup_npz)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "cl", "train", "scenario=npz", f"scenario.path={setup_npz}",
                f"scenario.n_experiences={int(data['n_tasks'])}", "scenario.augment=false", f"seed={seed}",
                f"run.dir={tmp}/run", "run.checkpoint=false", "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false", "trainer.logger=none", *overrides]
        start = time.perf_counter()
        proc = subprocess.run(argv, env=thread_env(threads), capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"cl train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        metrics = json.loads(Path(tmp, "run", "metrics.json").read_text())
    def pct(m: list[list[float | None]]) -> list[list[float | None]]:
        return [[None if v is None else 100.0 * v for v in r] for r in m]

    matrix = pct(metrics["accuracy_matrix"])
    extra: dict[str, Any] = {"records": metrics.get("records", {})}
    if metrics.get("til_accuracy_matrix"):  # task-incremental view (PRD's headline): mean over seen experiences
        til = pct(metrics["til_accuracy_matrix"])
        extra["til_matrix"] = til
        extra["til_acc"] = [float(np.mean([v for v in r[: t + 1] if v is not None])) for t, r in enumerate(til)]
    shown = [a if " " not in a else repr(a) for a in argv[3:]]
    return RunResult(row=row, side="ours", seed=seed, acc=seen_accuracy(metrics["correct"], metrics["total"]),
                     wall_s=round(wall, 2), matrix=matrix, extra=extra,
                     command="cl " + " ".join(shown).replace(str(setup_npz), "SETUP.npz"))
