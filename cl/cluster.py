"""``cl slurm``: submit ``cl train`` as a Slurm job with submitit, with requeue on preemption or time-out.

The job runs one task per GPU under ``srun``; every task runs the whole experience loop (``cl.distributed`` reads
``SLURM_PROCID``/``SLURM_NTASKS``; Lightning's ``SLURMEnvironment`` takes the same ranks). Slurm sends
``USR2`` ``slurm.signal_delay_s`` seconds before the time limit or on preemption; submitit's handler calls
:meth:`TrainJob.checkpoint` on rank 0, which re-submits the same command with ``resume=auto``, and requeues the
job. The requeued job restores the newest good checkpoint: the step checkpoint inside the interrupted experience
when ``run.checkpoint_every_n_steps`` wrote one (:mod:`cl.checkpointing`), else the last experience boundary. A sweep
(``seed=1,2,3``, ``sweep=FILE``) becomes a Slurm job array, one run directory per task.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cl.cli import command, split_args
from cl.config import build_config, opt
from cl.errors import ConfigError, UserError
from cl.sweep import expand


@dataclass
class SlurmConfig:
    nodes: int = opt(1, "number of nodes", ge=1)
    gpus_per_node: int = opt(1, "GPUs (= tasks) per node; 0 runs one CPU task per node", ge=0)
    cpus_per_task: int = opt(8, "CPU cores per task", ge=1)
    partition: str | None = opt(None, "Slurm partition")
    time: int = opt(240, "time limit in minutes", ge=1)
    mem: str | None = opt(None, "memory per node, e.g. 64G")
    account: str | None = opt(None, "Slurm account")
    qos: str | None = opt(None, "quality of service")
    job_name: str = opt("cl", "job name")
    folder: str = opt("slurm_logs/%j", "where submitit keeps job scripts and logs (%j = job id)")
    signal_delay_s: int = opt(120, "seconds before the time limit when the checkpoint-and-requeue signal comes",
                              ge=10)
    max_requeues: int = opt(3, "how many time-outs are requeued before giving up", ge=0)
    array_parallelism: int = opt(16, "array tasks running at once", ge=1)


class TrainJob:
    """A picklable ``cl train`` call that submitit runs in every task, and re-submits on preemption."""

    def __init__(self, args: list[str]) -> None:
        self.args = list(args)

    def __call__(self) -> int:
        from cl.cli import main

        code = main(["train", *self.args])
        if code:
            raise RuntimeError(f"cl train exited with code {code}")
        return code

    def checkpoint(self) -> Any:
        """Called by submitit on rank 0 when the job is preempted or times out: resume where it stopped."""
        import submitit

        args = [a for a in self.args if not a.startswith("resume=")] + ["resume=auto"]
        return submitit.helpers.DelayedSubmission(TrainJob(args))


def slurm_parameters(s: SlurmConfig) -> dict[str, Any]:
    params: dict[str, Any] = dict(
        nodes=s.nodes, ntasks_per_node=max(1, s.gpus_per_node), cpus_per_task=s.cpus_per_task, time=s.time,
        job_name=s.job_name, signal_delay_s=s.signal_delay_s,
        setup=["export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}", "export PYTHONUNBUFFERED=1"],
    )
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "mem", "account", "qos"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    return params


def train_args_for(s: SlurmConfig, args: list[str]) -> list[str]:
    """The ``cl train`` arguments of every task: the user's, plus the trainer topology the job provides."""
    world = s.nodes * max(1, s.gpus_per_node)
    topo = [f"trainer.num_nodes={s.nodes}", f"trainer.devices={max(1, s.gpus_per_node)}",
            f"trainer.accelerator={'gpu' if s.gpus_per_node else 'cpu'}"]
    if world > 1:
        topo.append("trainer.strategy=ddp")
    return [a for a in args if not a.startswith(("trainer.num_nodes=", "trainer.devices="))] + topo


def job_script(s: SlurmConfig, array: int | None = None) -> str:
    """The sbatch script submitit writes (rendered without submitting, for --dry-run)."""
    from submitit.slurm import slurm as sl  # submitit's own renderer: the script --dry-run prints is the real one

    folder = Path(s.folder).resolve()
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    params = slurm_parameters(s)
    return sl._make_sbatch_string(command=command, folder=folder, map_count=array,
                                  array_parallelism=s.array_parallelism, **params)


@command("slurm")
def cmd_slurm(args: list[str]) -> int:
    import submitit

    config, overrides, flags = split_args(args)
    slurm_items = [o.split(".", 1)[1] for o in overrides if o.startswith("slurm.")]
    rest = [o for o in overrides if not o.startswith("slurm.")]
    sweep_file = next((o.split("=", 1)[1] for o in rest if o.startswith("sweep=")), None)
    rest = [o for o in rest if not o.startswith("sweep=")]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SlurmConfig), OmegaConf.from_dotlist(slurm_items))
        s = OmegaConf.to_object(merged)
    except Exception as err:  # noqa: BLE001 - OmegaConf raises several types for a bad key or value
        raise ConfigError(f"invalid slurm option: {str(err).splitlines()[0]}") from None
    runs = expand(rest, sweep_file)
    task_args = []
    for run in runs:
        targs = train_args_for(s, ([f"config={config}"] if config else []) + run)
        c, o, _ = split_args(targs)
        build_config(c, o)  # a config mistake surfaces now, not in the queue
        task_args.append(targs)
    if "--dry-run" in flags:
        print(job_script(s, array=len(task_args) if len(task_args) > 1 else None))
        for t in task_args:
            print("# task: cl train " + " ".join(t))
        return 0
    try:
        executor = submitit.SlurmExecutor(folder=s.folder, max_num_timeout=s.max_requeues)
    except RuntimeError as err:  # submitit looks for srun on PATH
        hint = "run `cl slurm` on a Slurm login node, or add --dry-run to print the job script"
        raise UserError(f"{err} ({hint})") from None
    executor.update_parameters(**slurm_parameters(s), array_parallelism=s.array_parallelism)
    try:
        if len(task_args) == 1:
            jobs = [executor.submit(TrainJob(task_args[0]))]
        else:
            with executor.batch():
                jobs = [executor.submit(TrainJob(t)) for t in task_args]
    except Exception as err:  # noqa: BLE001 - sbatch missing or refusing is a user-level problem
        why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"submission failed: {why}") from None
    for job in jobs:
        print(f"submitted job {job.job_id} (logs in {Path(s.folder.replace('%j', str(job.job_id))).resolve()})")
    return 0
