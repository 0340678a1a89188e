"""Resume inside an experience (cl/checkpointing.py): step checkpoints every `run.checkpoint_every_n_steps` and at a
signal, restored mid-epoch and mid-phase to the uninterrupted run's accuracy matrix and weights, exactly (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cl.checkpointing import STEP_FILE, load_step_checkpoint
from cl.config import build_config
from cl.errors import ConfigError, Preempted, UserError
from cl.runner import Runner
from cl.utils import tensor_hash
from conftest import REPO, TINY, cl_cli, read_metrics

# quickstart's MLP on split digits, 2 experiences x 3 epochs: 21 steps per epoch in experience 1
BASE = ["trainer.enable_progress_bar=false", "trainer.logger=none", "strategy.epochs=3", "scenario.n_experiences=2",
        "seed=4"]


def _cfg(run: Path, *extra: str):
    return build_config("configs/quickstart.yaml", [f"run.dir={run}", *BASE, *extra])


class Crash(pl.Callback):
    """Raise (a crash, no checkpoint of that step) at the end of step ``step`` of phase ``phase`` in ``exp``."""

    def __init__(self, exp: int, step: int, phase: str | None = None) -> None:
        self.exp, self.step, self.phase = exp, step, phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (pl_module.exp_index == self.exp and trainer.global_step == self.step
                and self.phase in (None, pl_module.phase.name)):
            raise RuntimeError("crash")


class Signal(pl.Callback):
    """Send this process ``sig`` once at the end of step ``step`` of experience ``exp``."""

    def __init__(self, exp: int, step: int, sig: int = signal.SIGUSR1) -> None:
        self.exp, self.step, self.sig, self.sent = exp, step, sig, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sent and pl_module.exp_index == self.exp and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.sig)


def _weights(run) -> str:
    return tensor_hash(run.model.cl_state_tensors())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = Runner(_cfg(tmp_path_factory.mktemp("ref") / "run"))
    res = run.run()
    return res.metrics["correct"], _weights(run)


@pytest.mark.parametrize("resume_with", ["run.checkpoint_every_n_steps=4", "run.checkpoint=false"])
def test_crash_between_step_checkpoints_resumes_exactly(tmp_path, reference, resume_with):
    """Crash at step 30 of experience 1 (epoch 1, batch 8); the newest checkpoint is run step 92 (every 4). The
    resumed run may write no checkpoints of its own and still continues from the file."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        Runner(_cfg(run, "run.checkpoint_every_n_steps=4"), callbacks=[Crash(1, 30)]).run()
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["exp0.ckpt", "last.ckpt", STEP_FILE], "only the newest step checkpoint is kept"
    state = torch.load(run / "checkpoints" / STEP_FILE, map_location="cpu", weights_only=True)
    # experience 0 took 63 steps; run step 92 = step 29 of experience 1 = epoch 1, 8 batches done
    assert (state["exp_index"], state["phase"], state["epoch"], state["batch"]) == (1, 0, 1, 8)
    assert state["global_step"] == 92 and state["global_step"] % 4 == 0
    assert state["optimizers"][0]["state"], "SGD momentum buffers are in the file"
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    resumed = Runner(_cfg(run, resume_with, "resume=auto"))
    res = resumed.run()
    assert (res.metrics["correct"], _weights(resumed)) == reference
    if resume_with != "run.checkpoint=false":
        assert not (run / "checkpoints" / STEP_FILE).exists(), "a finished experience drops its step checkpoint"


@pytest.mark.parametrize("every, step", [(21, 23), (63, 10)])
def test_checkpoint_on_the_last_batch_of_an_epoch_and_of_the_first_experience(tmp_path, reference, every, step):
    """every=21: due at the last batch of experience 1's first epoch (run step 84), taken one step later, at the
    first batch of epoch 1 (Lightning would restart a last-batch save as if the epoch end had run). every=63: due at
    experience 0's last step, never taken inside it; the crash in experience 1 resumes from the boundary."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        Runner(_cfg(run, f"run.checkpoint_every_n_steps={every}"), callbacks=[Crash(1, step)]).run()
    if every == 21:
        state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
        assert (state["exp_index"], state["epoch"], state["batch"], state["global_step"]) == (1, 1, 1, 85)
    else:
        assert not (run / "checkpoints" / STEP_FILE).exists()
    resumed = Runner(_cfg(run, f"run.checkpoint_every_n_steps={every}", "resume=auto"))
    assert (resumed.run().metrics["correct"], _weights(resumed)) == reference


def test_crash_inside_the_first_experience_resumes_from_the_step_checkpoint_alone(tmp_path, reference):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        Runner(_cfg(run, "run.checkpoint_every_n_steps=10"), callbacks=[Crash(0, 45)]).run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP_FILE]
    with pytest.raises(UserError, match="unfinished run"):
        Runner(_cfg(run, "run.checkpoint_every_n_steps=10")).run()
    resumed = Runner(_cfg(run, "resume=auto"))  # the cadence may change on resume
    assert (resumed.run().metrics["correct"], _weights(resumed)) == reference


def test_signal_mid_experience_checkpoints_and_stops_without_periodic_checkpoints(tmp_path, reference):
    """SIGUSR1 with checkpoint_every_n_steps=null: the handler attaches the callback, the next step is saved."""
    run = tmp_path / "run"
    seen: list[list[str]] = []

    class Spy(pl.Callback):  # which callbacks the Trainer holds at each fit start
        def on_train_start(self, trainer, pl_module) -> None:
            seen.append([type(c).__name__ for c in trainer.callbacks])

    with pytest.raises(Preempted, match="SIGUSR1 at experience 1"):
        Runner(_cfg(run), callbacks=[Spy(), Signal(1, 13)]).run()
    assert all("StepCheckpoint" not in names for names in seen), "no per-step callback in an uninterrupted fit"
    state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
    assert (state["exp_index"], state["epoch"], state["batch"]) == (1, 0, 14)  # the step after the signal
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, "handlers are restored after the run"
    resumed = Runner(_cfg(run, "resume=auto"))
    assert (resumed.run().metrics["correct"], _weights(resumed)) == reference


def test_config_and_mismatch_errors(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint_every_n_steps"):
        _cfg(tmp_path, "run.checkpoint_every_n_steps=0")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        Runner(_cfg(run, "run.checkpoint_every_n_steps=5"), callbacks=[Crash(1, 8)]).run()
    # a file whose model does not fit the replayed experience cannot continue the phase: one line, no silent restart
    path = run / "checkpoints" / STEP_FILE
    state = load_step_checkpoint(path)
    state["structure"]["n_seen"] = 3
    torch.save(state, path)
    with pytest.raises(UserError, match="does not match the resumed run"):
        Runner(_cfg(run, "resume=auto")).run()
    (run / "checkpoints" / STEP_FILE).write_bytes(b"truncated")
    with pytest.raises(UserError, match="not a cl step checkpoint|unreadable"):
        load_step_checkpoint(run / "checkpoints" / STEP_FILE)


# ------------------------------------------------------------------------------------------------ several phases
def _strategy_cfg(name: str, run: Path, *extra: str):
    from cl.registry import STRATEGIES

    cls = STRATEGIES.get(name)
    return build_config(None, [f"strategy={name}", *TINY, *cls.contract_overrides, f"run.dir={run}", *extra])


@pytest.mark.parametrize("name, exp, phase, step", [
    ("lae", 1, "joint", 3),  # experience 1: phase 0 warmup (1 epoch) is skipped on resume, phase 1 joint continues
    ("sema", 0, "rd", 2),    # phases not replayable: func is re-run, rd continues
])
def test_multi_phase_strategy_resumed_in_its_second_phase(tmp_path, name, exp, phase, step):
    full = Runner(_strategy_cfg(name, tmp_path / "full"))
    want = (full.run().metrics["correct"], _weights(full))
    run = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="crash"):
        Runner(_strategy_cfg(name, run, "run.checkpoint_every_n_steps=1"), callbacks=[Crash(exp, step, phase)]).run()
    state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
    assert (state["exp_index"], state["phase"], state["phase_name"]) == (exp, 1, phase)
    assert state["trainer_step"] == step - 1
    resumed = Runner(_strategy_cfg(name, run, "resume=auto"))
    assert (resumed.run().metrics["correct"], _weights(resumed)) == want


# ------------------------------------------------------------------------------------------------ real processes
def _wait_for_step(path: Path, proc: subprocess.Popen, ok, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - replaced while we read: read again
                state = None
            if state is not None and ok(state):
                return state
        time.sleep(0.01)
    raise AssertionError(f"no step checkpoint satisfying the condition appeared (process rc={proc.poll()})")


ARGS = ["train", "config=configs/quickstart.yaml", *BASE[:-1], "strategy.epochs=12", "seed=6",
        "run.checkpoint_every_n_steps=5"]


@pytest.mark.slow
def test_sigkill_in_the_second_epoch_then_resume_gives_the_same_matrix(tmp_path):
    ref = cl_cli([*ARGS, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    # the same environment as cl_cli's runs: a different intra-op thread count changes float reduction order, and
    # the resumed matrix is only bit-exact against a reference made with the same threads
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "cl", *ARGS, f"run.dir={run}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(run / "checkpoints" / STEP_FILE, proc, lambda s: s["exp_index"] == 1 and s["epoch"] == 1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
    assert state["exp_index"] == 1 and state["epoch"] >= 1, "killed inside experience 1 after its first epoch"
    assert not read_metrics(run)["finished"]
    resumed = cl_cli([*ARGS, f"run.dir={run}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing inside experience 1" in resumed.stderr
    assert read_metrics(run)["correct"] == read_metrics(tmp_path / "ref")["correct"]
    hashes = [json.loads((d / "state_hashes.json").read_text())["ranks"] for d in (run, tmp_path / "ref")]
    assert hashes[0] == hashes[1], "final CL state identical"


@pytest.mark.ddp
def test_ddp_sigterm_to_rank0_stops_every_rank_at_one_step_and_resumes(tmp_path):
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "scenario.augment=false"]
    args = [*ARGS[:-1], "strategy.epochs=6", *ddp]  # signal only: no periodic checkpoints
    ref = cl_cli([*args, f"run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "stopped"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "cl", *args, f"run.dir={run}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "exp0.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # a few steps into experience 1
    proc.send_signal(signal.SIGTERM)  # rank 0 only: the vote stops rank 1 at the same step
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    state = load_step_checkpoint(run / "checkpoints" / STEP_FILE)
    assert state["exp_index"] == 1 and "stopped by SIGTERM at experience 1" in err
    resumed = cl_cli([*args, f"run.dir={run}", "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run)["correct"] == read_metrics(tmp_path / "ref")["correct"]
    hashes = json.loads((run / "state_hashes.json").read_text())["ranks"]
    assert hashes[0] == hashes[1] == json.loads((tmp_path / "ref" / "state_hashes.json").read_text())["ranks"][0]
