"""Process groups for multi-process runs, set up *before* the first ``fit`` so every CL step can use collectives.

Every rank runs the whole experience loop (the model Slurm's ``srun``, ``torchrun`` and Lightning's ``ddp`` launcher
share). ``cl train trainer.strategy=ddp trainer.devices=N`` started by hand re-runs its own command N-1 times with
``LOCAL_RANK``/``WORLD_SIZE`` set, exactly as Lightning's launcher would, and initialises the process group at once;
Lightning then finds the group ready and reuses it for every ``Trainer.fit``. Under ``srun`` or ``torchrun`` the
ranks come from their environment and nothing is spawned.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from cl.errors import ConfigError


@dataclass
class Dist:
    """Rank information and the few collectives CL steps need (no-ops in a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def _comm_device(self) -> torch.device:
        return self.device if self.active and tdist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks (returns a new tensor on ``t``'s device). Use for sums and counts, never means."""
        if not self.active:
            return t
        buf = t.detach().to(self._comm_device()).clone()
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
        return buf.to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if not self.active:
            return t
        buf = t.detach().to(self._comm_device()).clone()
        tdist.broadcast(buf, src=src)
        return buf.to(t.device)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective decision)."""
        return bool(self.all_reduce_sum(torch.tensor([int(flag)])).item() > 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_of(trainer_cfg: Any) -> int:
    strategy = str(trainer_cfg.strategy)
    if not strategy.startswith("ddp"):
        devices = str(trainer_cfg.devices)
        if devices.isdigit() and int(devices) > 1 or int(trainer_cfg.num_nodes) > 1:
            raise ConfigError(f"trainer.devices={devices} (num_nodes={trainer_cfg.num_nodes}) needs "
                              "trainer.strategy=ddp; CL state must be kept in step on every rank")
        return 1
    devices = trainer_cfg.devices
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        n = len(devices)
    elif str(devices).isdigit():
        n = int(devices)
    else:
        raise ConfigError(f"trainer.devices='{devices}' must be a number (or list) with trainer.strategy={strategy}")
    if strategy == "ddp_spawn":
        raise ConfigError("trainer.strategy=ddp_spawn cannot keep CL state across experiences; use ddp")
    return n * int(trainer_cfg.num_nodes)


def setup(trainer_cfg: Any, argv: list[str] | None) -> Dist:
    """Find or create this process's rank and initialise the process group when the run has several ranks."""
    world = world_size_of(trainer_cfg)
    accel = str(trainer_cfg.accelerator)
    use_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if world == 1:
        return Dist(device=torch.device("cuda", 0) if use_gpu else torch.device("cpu"))
    env = os.environ
    children: list[subprocess.Popen] = []
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) == world:
        rank, local_rank = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", _slurm_main_host())
        env.setdefault("MASTER_PORT", str(12910 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    elif "LOCAL_RANK" in env and "WORLD_SIZE" in env:
        local_rank = int(env["LOCAL_RANK"])
        rank = int(env.get("RANK", int(env.get("NODE_RANK", "0")) * (world // int(trainer_cfg.num_nodes))
                           + local_rank))
    else:
        if int(trainer_cfg.num_nodes) > 1:
            raise ConfigError("trainer.num_nodes > 1 needs a cluster launcher (srun or torchrun); see `cl slurm`")
        if argv is None:
            raise ConfigError("multi-process DDP from Python needs the `cl train` command, srun or torchrun; "
                              "in a notebook use trainer.devices=1")
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(_free_port())
        env["WORLD_SIZE"], env["NODE_RANK"] = str(world), "0"
        for r in range(1, world):
            child_env = dict(env, LOCAL_RANK=str(r), RANK=str(r))
            children.append(subprocess.Popen([sys.executable, "-m", "cl", *argv], env=child_env))
        env["LOCAL_RANK"], env["RANK"] = "0", "0"
        rank = local_rank = 0
        atexit.register(_reap, children)
    env["WORLD_SIZE"] = str(world)
    backend = "nccl" if use_gpu else "gloo"
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    else:  # ranks share the cores: avoid oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world // int(trainer_cfg.num_nodes))))
    if not tdist.is_initialized():
        tdist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device, children=children)


def _slurm_main_host() -> str:
    nodes = os.environ.get("SLURM_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0].split("[")[0]


def _reap(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            try:
                c.wait(timeout=60)
            except subprocess.TimeoutExpired:
                c.kill()


def finish(dist: Dist, ok: bool) -> int:
    """Wait for spawned ranks; return a non-zero code if any failed. Kill them if this rank failed."""
    code = 0
    for c in dist.children:
        if not ok and c.poll() is None:
            c.kill()
        rc = c.wait()
        code = code or rc
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    return code
