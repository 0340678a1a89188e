"""Provenance of a run: what produced it, so two runs can be compared and a result traced.

Written as ``provenance.json`` in the run directory by rank 0: the resolved config and its hash, the git commit
of the code and whether the tree was dirty, package versions, the host of every rank, world size, seed, the
command line, Slurm job ids, and a hash of each experience's class list and sample indices.
"""

from __future__ import annotations

import hashlib
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PACKAGES = ("cl-lightning-lab", "torch", "torchvision", "pytorch-lightning", "avalanche-lib", "timm", "torchmetrics",
            "omegaconf", "numpy", "scikit-learn")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config as sorted YAML (run-directory keys excluded: they do not change results)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain = {k: v for k, v in plain.items() if k not in ("run", "resume")}
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(plain), sort_keys=True).encode()).hexdigest()


def git_state(path: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding the ``cl`` package (None outside a git checkout)."""
    root = path or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(cfg: DictConfig, scenario: Any, hosts: list[str], world_size: int, argv: list[str] | None) -> dict:
    import os

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": config_hash(cfg),
        "git": git_state(),
        "packages": package_versions(),
        "hosts": hosts,
        "world_size": world_size,
        "seed": int(cfg.seed),
        "argv": argv if argv is not None else sys.argv,
        "slurm": {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                                                                "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")},
        "scenario": {"name": scenario.name, "fingerprint": scenario.fingerprint(),
                     "class_order": list(map(int, scenario.class_order)),
                     "experience_hashes": scenario.experience_hashes()},
    }


def hostname() -> str:
    return socket.gethostname()
