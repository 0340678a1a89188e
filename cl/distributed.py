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


@dataclass
class Launch:
    """What an external launcher (torchrun, srun, Lightning's or our own re-launch) set in the environment."""

    name: str
    world: int
    rank: int
    local_rank: int
    local_world: int

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))


def _slurm_tasks_per_node(env: Any, ntasks: int) -> int:
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    head = raw.split(",")[0].split("(")[0]  # "2(x3)" -> 2
    if head.isdigit():
        return int(head)
    return max(1, ntasks // max(1, int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1)))


def detect_launch(env: Any = None, configured_world: int | None = None) -> Launch | None:
    """The launcher's ranks, if a launcher started this process as one of several; else ``None``.

    torchrun (and Lightning's launcher, and the ranks ``cl`` re-launches itself) set ``WORLD_SIZE``/``RANK``/
    ``LOCAL_RANK`` (torchrun also ``LOCAL_WORLD_SIZE``). ``srun`` sets ``SLURM_NTASKS``/``SLURM_PROCID``/
    ``SLURM_LOCALID``; a Slurm allocation is taken as a launch when it runs in a job step (``SLURM_STEP_ID``) or
    its task count equals the configured world size, so a plain command inside ``salloc`` is not mistaken for one.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "LOCAL_RANK" in env and int(env["WORLD_SIZE"]) > 1:
        world, local_rank = int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
        name = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "the launcher"
        # 0 = not said (Lightning-style launchers): taken from trainer.num_nodes in world_size_of
        local_world = int(env.get("LOCAL_WORLD_SIZE", "0") or 0)
        return Launch(name, world, int(env.get("RANK", local_rank)), local_rank, local_world)
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if "SLURM_PROCID" in env and ntasks > 1 and ("SLURM_STEP_ID" in env or ntasks == configured_world):
        return Launch("srun", ntasks, int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")),
                      _slurm_tasks_per_node(env, ntasks))
    return None


def _device_count(devices: Any) -> int | None:
    """Devices per node as a number: an int, a list of ids, or ``None`` for ``auto`` / ``-1`` (decided later)."""
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ConfigError(f"trainer.devices='{devices}' must be a positive number, a list of device ids, auto or -1")


def _local_devices(accelerator: str, devices: Any) -> int:
    """``auto`` / ``-1`` without a launcher, as Lightning counts them: every visible GPU, or on a CPU one process
    for ``auto`` and one per core for ``-1``."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return max(1, torch.cuda.device_count())
    return (os.cpu_count() or 1) if str(devices).strip() == "-1" else 1


def world_size_of(trainer_cfg: Any, launch: Launch | None = None) -> int:
    """The run's world size. Under a launcher it must agree with ``trainer.devices`` / ``trainer.num_nodes``; the
    resolved values are written back into ``trainer_cfg`` so every ``Trainer`` sees the same numbers."""
    strategy = str(trainer_cfg.strategy)
    nodes = int(trainer_cfg.num_nodes)
    count = _device_count(trainer_cfg.devices)
    if launch is not None:
        if not launch.local_world:
            launch.local_world = max(1, launch.world // nodes)
        what = f"{launch.name} started {launch.world} processes ({launch.local_world} per node on {launch.nodes} " \
               "node(s))"
        if not strategy.startswith("ddp"):
            raise ConfigError(f"{what}, but trainer.strategy={strategy}: add trainer.strategy=ddp (or launch one "
                              "process); independent runs would race on one run directory")
        if count is not None and count != launch.local_world:
            raise ConfigError(f"trainer.devices={trainer_cfg.devices} disagrees with the launcher: {what}; set "
                              f"trainer.devices={launch.local_world} (or auto), or launch {count} per node")
        if nodes != launch.nodes:
            raise ConfigError(f"trainer.num_nodes={nodes} disagrees with the launcher: {what}; set "
                              f"trainer.num_nodes={launch.nodes}")
        if count is None:
            trainer_cfg.devices = launch.local_world
        return launch.world
    if count is None:
        # auto without a launcher and without ddp stays one process (a plain `cl train` never fans out by itself)
        auto_single = str(trainer_cfg.devices).strip() == "auto" and not strategy.startswith("ddp")
        count = 1 if auto_single else _local_devices(str(trainer_cfg.accelerator), trainer_cfg.devices)
        trainer_cfg.devices = count
    if not strategy.startswith("ddp"):
        if count > 1 or nodes > 1:
            raise ConfigError(f"trainer.devices={trainer_cfg.devices} (num_nodes={nodes}) needs "
                              "trainer.strategy=ddp; CL state must be kept in step on every rank")
        return 1
    if strategy == "ddp_spawn":
        raise ConfigError("trainer.strategy=ddp_spawn cannot keep CL state across experiences; use ddp")
    return count * nodes


def _gpu_index(trainer_cfg: Any, local_rank: int) -> int:
    """``trainer.devices=[2, 3]`` puts local rank 0 on GPU 2 and rank 1 on GPU 3 (as Lightning does)."""
    devices = trainer_cfg.devices
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return int(list(devices)[local_rank])
    return local_rank


def setup(trainer_cfg: Any, argv: list[str] | None) -> Dist:
    """Find or create this process's rank and initialise the process group when the run has several ranks."""
    configured = _device_count(trainer_cfg.devices)
    launch = detect_launch(configured_world=None if configured is None else configured * int(trainer_cfg.num_nodes))
    world = world_size_of(trainer_cfg, launch)
    accel = str(trainer_cfg.accelerator)
    use_gpu = accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())
    if world == 1:
        return Dist(device=torch.device("cuda", _gpu_index(trainer_cfg, 0)) if use_gpu else torch.device("cpu"))
    env = os.environ
    children: list[subprocess.Popen] = []
    if launch is not None and launch.name == "srun":
        rank, local_rank = launch.rank, launch.local_rank
        env.setdefault("MASTER_ADDR", _slurm_main_host())
        env.setdefault("MASTER_PORT", str(12910 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
    elif launch is not None:
        rank, local_rank = launch.rank, launch.local_rank
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
            child_env = dict(env, LOCAL_RANK=str(r), RANK=str(r), LOCAL_WORLD_SIZE=str(world))
            children.append(subprocess.Popen([sys.executable, "-m", "cl", *argv], env=child_env))
        env["LOCAL_RANK"], env["RANK"], env["LOCAL_WORLD_SIZE"] = "0", "0", str(world)
        rank = local_rank = 0
        atexit.register(_reap, children)
    env["WORLD_SIZE"] = str(world)
    backend = "nccl" if use_gpu else "gloo"
    device = torch.device("cuda", _gpu_index(trainer_cfg, local_rank)) if use_gpu else torch.device("cpu")
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
