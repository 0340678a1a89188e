"""Launch where the cluster launches: ranks from torchrun / srun, and a one-line error when the config disagrees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cl.distributed import Launch, _gpu_index, detect_launch, world_size_of
from cl.errors import ConfigError
from conftest import REPO, TINY, cl_cli, read_metrics

TORCHRUN = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}


def trainer(devices="1", num_nodes=1, strategy="ddp", accelerator="cpu"):
    return SimpleNamespace(devices=devices, num_nodes=num_nodes, strategy=strategy, accelerator=accelerator)


def test_detects_torchrun_and_srun_but_not_a_plain_command_in_an_allocation():
    assert detect_launch(TORCHRUN) == Launch("torchrun", 4, 3, 1, 2)
    srun = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_STEP_ID": "0"}
    assert detect_launch(srun) == Launch("srun", 4, 2, 0, 2)
    salloc = {k: v for k, v in srun.items() if k != "SLURM_STEP_ID"}  # the batch shell itself, no srun
    assert detect_launch(salloc, configured_world=1) is None
    assert detect_launch({}) is None and detect_launch({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None


def test_devices_auto_takes_the_launchers_count():
    t = trainer(devices="auto", num_nodes=2)
    assert world_size_of(t, detect_launch(TORCHRUN)) == 4 and t.devices == 2
    t = trainer(devices=-1, num_nodes=2)
    assert world_size_of(t, detect_launch(TORCHRUN)) == 4 and t.devices == 2


@pytest.mark.parametrize(("t", "match"), [
    (trainer(devices=4, num_nodes=2), r"trainer.devices=4 disagrees .* set trainer.devices=2"),
    (trainer(devices=2, num_nodes=1), r"trainer.num_nodes=1 disagrees .* set trainer.num_nodes=2"),
    (trainer(devices=2, num_nodes=2, strategy="auto"), r"add trainer.strategy=ddp"),
])
def test_a_config_that_disagrees_with_the_launcher_is_one_clear_error(t, match):
    with pytest.raises(ConfigError, match=match):
        world_size_of(t, detect_launch(TORCHRUN))


def test_devices_without_a_launcher_as_lightning_counts_them():
    t = trainer(devices="auto", strategy="auto")
    assert world_size_of(t) == 1 and t.devices == 1  # CPU auto: one process
    t = trainer(devices=-1)
    assert world_size_of(t) == (os.cpu_count() or 1)  # CPU -1: one per core
    assert world_size_of(trainer(devices=[2, 3])) == 2
    assert _gpu_index(trainer(devices=[2, 3]), 1) == 3 and _gpu_index(trainer(devices=2), 1) == 1
    with pytest.raises(ConfigError, match="positive number, a list of device ids, auto or -1"):
        world_size_of(trainer(devices="two"))


def test_mismatch_under_a_launcher_exits_2_with_one_line_and_no_run_directory(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **{**TORCHRUN, "RANK": "0",
                                                                           "LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    proc = subprocess.run([sys.executable, "-m", "cl", "train", *TINY, "trainer.strategy=ddp", "trainer.devices=4",
                           f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "disagrees with the launcher" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.ddp
def test_torchrun_launch_matches_the_self_launched_run(tmp_path):
    args = [*TINY, "trainer.strategy=ddp", "scenario.augment=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    with socket.socket() as sock:  # torchrun's --master_port=0 leaves MASTER_PORT=0 to the ranks: pick one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "-m", "cl", "train", *args, f"run.dir={tmp_path / 'torchrun'}"],  # devices: from torchrun
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    own = cl_cli(["train", *args, "trainer.devices=2", f"run.dir={tmp_path / 'own'}"])
    assert own.returncode == 0, own.stderr[-3000:]
    hashes = json.loads((tmp_path / "torchrun" / "state_hashes.json").read_text())["ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert hashes == json.loads((tmp_path / "own" / "state_hashes.json").read_text())["ranks"]
    assert read_metrics(tmp_path / "torchrun")["correct"] == read_metrics(tmp_path / "own")["correct"]
    assert read_metrics(tmp_path / "torchrun")["world_size"] == 2


def test_lightnings_slurm_auto_requeue_is_off_under_slurm(monkeypatch, tmp_path):
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from cl.config import build_config
    from cl.runner import make_trainer

    cfg = build_config(None, TINY)
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_JOB_NAME": "cl"}.items():
        monkeypatch.setenv(key, value)
    env = make_trainer(cfg, 1, [], [], tmp_path)._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
