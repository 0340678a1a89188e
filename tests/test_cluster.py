"""Cluster runs: sweeps, `cl slurm` job scripts and submission (fake sbatch), submitit's requeue handler calling
our checkpoint, a killed run resumed, a multi-node run simulated with two processes and Slurm variables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cl.cluster import TrainJob
from cl.sweep import expand
from conftest import REPO, TINY, cl_cli, read_metrics


def test_sweep_expansion(tmp_path):
    runs = expand(["seed=1,2,3", "strategy.lr=0.1"])
    assert [r[-1] for r in runs] == ["seed=1", "seed=2", "seed=3"]
    grid = expand(["seed=1,2", "strategy.lr=0.1,0.01"])
    assert len(grid) == 4 and "run.name=strategy.lr=0.01" in grid[3]
    assert expand(["scenario.order=[1,2,3]"]) == [["scenario.order=[1,2,3]"]]  # a list is not a sweep
    f = tmp_path / "sweep.yaml"
    f.write_text("- {seed: 1}\n- {seed: 2, strategy.lr: 0.5}\n")
    runs = expand(["strategy=finetune"], str(f))
    assert runs == [["strategy=finetune", "seed=1"], ["strategy=finetune", "seed=2", "strategy.lr=0.5",
                                                      "run.name=strategy.lr=0.5"]]


@pytest.mark.slow
def test_seed_sweep_runs_each_in_its_own_directory(tmp_path):
    out = cl_cli(["train", *TINY, "seed=1,2", f"run.root={tmp_path}"])
    assert out.returncode == 0, out.stderr[-2000:]
    for seed in (1, 2):
        assert read_metrics(tmp_path / "split_digits" / "finetune" / f"seed{seed}")["finished"]


@pytest.mark.parametrize("nodes", [1, 2])
def test_slurm_dry_run_script_is_valid(nodes, tmp_path):
    out = cl_cli(["slurm", "config=configs/quickstart.yaml", f"slurm.nodes={nodes}", "slurm.gpus_per_node=4",
                  "slurm.partition=gpu", "slurm.time=90", f"slurm.folder={tmp_path}/logs", "--dry-run"])
    assert out.returncode == 0, out.stderr
    script = out.stdout.split("# task:")[0]
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")]).returncode == 0
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --signal=USR2@120"):
        assert line in script
    assert "srun" in script
    assert f"trainer.num_nodes={nodes} trainer.devices=4 trainer.accelerator=gpu trainer.strategy=ddp" in out.stdout


def test_slurm_submission_with_fake_sbatch(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f"#!/bin/bash\ncp \"${{@: -1}}\" {tmp_path}/submitted.sh\n"
                                   "echo 'Submitted batch job 4242'\n")
    (bindir / "sbatch").chmod(0o755)
    (bindir / "srun").write_text("#!/bin/bash\nexit 0\n")
    (bindir / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "cl", "slurm", "config=configs/quickstart.yaml", "slurm.nodes=2",
                          "slurm.gpus_per_node=2", f"slurm.folder={tmp_path}/logs/%j", "seed=1,2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "submitted job 4242" in out.stdout
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-1" in script and "#SBATCH --nodes=2" in script
    # a config mistake is caught before anything is submitted
    bad = subprocess.run([sys.executable, "-m", "cl", "slurm", "strategy.lrr=1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key" in bad.stderr


def test_requeue_handler_checkpoints_and_requeues(tmp_path, monkeypatch):
    """submitit's signal handler (as it runs in the job) calls TrainJob.checkpoint and requeues."""
    import submitit
    from submitit.core import job_environment, utils

    job = TrainJob(["config=configs/quickstart.yaml", "seed=3"])
    delayed = submitit.helpers.DelayedSubmission(job)
    delayed._timeout_min, delayed._timeout_countdown = 60, 3
    requeued = []

    class Env:
        global_rank = 0

        def _requeue(self, countdown):
            requeued.append(countdown)

    paths = job_environment.JobPaths(tmp_path, job_id="7")
    paths.submitted_pickle.parent.mkdir(parents=True, exist_ok=True)
    handler = job_environment.SignalHandler(Env(), paths, delayed)
    monkeypatch.setattr(handler, "_exit", lambda: None)
    handler.checkpoint_and_try_requeue(signal.SIGUSR2)
    assert requeued == [3]
    resubmitted = utils.pickle_load(paths.submitted_pickle)
    assert resubmitted.function.args[-1] == "resume=auto" and "seed=3" in resubmitted.function.args


@pytest.mark.slow
def test_signal_in_mid_experience_then_the_requeued_command_gives_the_same_matrix(tmp_path):
    """Slurm's pre-emption SIGTERM inside experience 1: a step checkpoint, exit 143; the command the requeue
    handler re-submits (TrainJob.checkpoint: resume=auto) continues at the next batch, to the same matrix."""
    args = ["config=configs/quickstart.yaml", "trainer.enable_progress_bar=false", "strategy.epochs=8",
            "scenario.n_experiences=2", "trainer.logger=none", "seed=2"]
    ref = cl_cli(["train", *args, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "preempted"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")  # cl_cli's: the same thread count
    proc = subprocess.Popen([sys.executable, "-m", "cl", "train", *args, f"run.dir={run}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "exp0.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at experience 1" in err
    assert (run / "checkpoints" / "step.ckpt").is_file()
    requeued = TrainJob([*args, f"run.dir={run}"]).checkpoint().function.args
    assert requeued[-1] == "resume=auto"
    resumed = cl_cli(["train", *requeued])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing inside experience 1" in resumed.stderr
    assert read_metrics(run)["correct"] == read_metrics(tmp_path / "ref")["correct"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_matrix(tmp_path):
    """SIGKILL at several points (right after a checkpoint lands, and inside the next experience), then resume."""
    args = ["train", "config=configs/quickstart.yaml", "trainer.enable_progress_bar=false", "strategy.epochs=10",
            "trainer.logger=none", "seed=5"]
    ref = cl_cli([*args, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = read_metrics(tmp_path / "ref")["correct"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # short delays: on an idle machine an experience of this stream takes well under a second, and the kill must
    # land before the run ends (right at the start of the next experience, or a few steps into it)
    for marker, delay in (("exp0.ckpt", 0.0), ("exp2.ckpt", 0.05)):
        run = tmp_path / f"killed_{marker}"
        proc = subprocess.Popen([sys.executable, "-m", "cl", *args, f"run.dir={run}"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (run / "checkpoints" / marker).exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not json.loads((run / "metrics.json").read_text())["finished"], f"run ended before the kill ({marker})"
        again = cl_cli([*args, f"run.dir={run}"])
        assert again.returncode == 2 and "unfinished run" in again.stderr
        resumed = cl_cli([*args, f"run.dir={run}", "resume=auto"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert read_metrics(run)["correct"] == expected, f"killed after {marker} + {delay}s"
    done = cl_cli([*args, f"run.dir={run}", "resume=auto"])
    assert done.returncode == 0 and "already finished" in done.stdout


@pytest.mark.ddp
def test_multinode_simulated_with_slurm_variables(tmp_path):
    """Two processes that look like two Slurm nodes with one task each (srun would start them)."""
    port = 29000 + os.getpid() % 1000
    procs = []
    for rank in range(2):
        env = dict(os.environ, HF_HUB_OFFLINE="1", SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID="0",
                   SLURM_NODEID=str(rank), SLURM_NNODES="2", SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="99",
                   SLURM_JOB_NAME="cl", SLURM_NTASKS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("LOCAL_RANK", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cl", "train", *TINY, "trainer.num_nodes=2", "trainer.devices=1",
             "trainer.strategy=ddp", "scenario.augment=false", f"run.dir={tmp_path / 'run'}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    hashes = json.loads((tmp_path / "run" / "state_hashes.json").read_text())["ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["slurm"]["SLURM_JOB_ID"] == "99"
