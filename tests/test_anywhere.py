"""Runs from anywhere: config-relative paths, packaged presets by name (``config=slca/cpu``), ``--help`` with a
config, and a built wheel that carries configs/ and assets/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from cl import cli
from cl.config import build_config, preset_names
from cl.errors import ConfigError
from conftest import REPO, read_metrics


def test_paths_in_a_config_resolve_against_its_folder(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    ckpt = tmp_path / "weights" / "w.pt"
    ckpt.write_bytes(b"")
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "conf" / "base" / "data_here").mkdir()
    (tmp_path / "conf" / "base" / "parent.yaml").write_text("data:\n  root: data_here\n")
    (tmp_path / "conf" / "run.yaml").write_text(
        "extends: base/parent.yaml\nbackbone:\n  name: mlp\n  checkpoint: ../weights/w.pt\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = build_config(str(tmp_path / "conf" / "run.yaml"))
    assert cfg.backbone.checkpoint == str(ckpt.resolve())  # against the file that wrote it
    assert cfg.data.root == str((tmp_path / "conf" / "base" / "data_here").resolve())  # the parent file's folder
    # not found beside the file: left relative, so it means the working directory (as before)
    (tmp_path / "conf" / "run.yaml").write_text("backbone:\n  checkpoint: nothere.pt\n")
    assert build_config(str(tmp_path / "conf" / "run.yaml")).backbone.checkpoint == "nothere.pt"
    # a command-line value is the user's own: relative to where they stand
    cfg = build_config(str(tmp_path / "conf" / "run.yaml"), ["backbone.checkpoint=../weights/w.pt"])
    assert cfg.backbone.checkpoint == "../weights/w.pt"


def test_presets_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"quickstart", "slca/cpu", "lae/cpu"} <= set(preset_names())
    cfg = build_config("slca/cpu")
    assert cfg.strategy.name == "slca" and Path(cfg.backbone.checkpoint).is_file()
    assert build_config(str(REPO / "configs" / "slca" / "cpu.yaml")).backbone.checkpoint == cfg.backbone.checkpoint
    assert build_config("quickstart.yaml").strategy.lr == 0.05
    with pytest.raises(ConfigError, match="config file 'slca/cpux' does not exist .*packaged preset"):
        build_config("slca/cpux")


def test_help_with_a_config_shows_its_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main(["train", "config=quickstart", "strategy.epochs=3", "--help"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:4]] for ln in out.splitlines()
            if ln.count("│") >= 4}
    assert rows["strategy.lr"] == ["0.01", "0.05"]  # default, then this config's value
    assert rows["strategy.epochs"] == ["None", "3"]  # the command line on top of the file
    assert rows["seed"] == ["0", ""]  # equal to the default: left empty
    assert rows["trainer.accelerator"] == ["auto", "cpu"]
    assert cli.main(["train", "config=nope/none", "--help"]) == 2


@pytest.mark.slow
def test_wheel_carries_presets_and_runs_from_an_empty_folder(tmp_path):
    src = tmp_path / "src"
    for name in ("cl", "strategies", "scenarios", "configs", "assets"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                            "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)  # dependencies from this env
    py = tmp_path / "venv" / "bin" / "python"
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                           str(wheel)], capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    probe = subprocess.run([str(py), "-c", "import cl, cl.config as c; print(cl.__file__); "
                            "print(c.build_config('slca/cpu').backbone.checkpoint)"],
                           cwd=empty, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, ckpt = probe.stdout.split()
    assert str(tmp_path / "venv") in where and str(tmp_path / "venv") in ckpt and Path(ckpt).is_file()
    run = subprocess.run([str(tmp_path / "venv" / "bin" / "cl"), "train", "config=quickstart",
                          "scenario.n_experiences=2", "strategy.epochs=1", "trainer.enable_progress_bar=false"],
                         cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read_metrics(empty / "runs" / "split_digits" / "finetune" / "seed0")["finished"]
