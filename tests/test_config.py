"""Config building: defaults < file < command line, typed sections per registered entry, one-line errors."""

from __future__ import annotations

import pytest

from cl.config import build_config, describe
from cl.errors import ConfigError
from conftest import cl_cli


def test_defaults_file_then_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nstrategy:\n  name: finetune\n  lr: 0.5\ndata:\n  batch_size: 8\n")
    cfg = build_config(str(f), ["strategy.lr=0.25"])
    assert cfg.seed == 3 and cfg.data.batch_size == 8
    assert cfg.strategy.lr == 0.25  # the command line wins over the file
    assert cfg.data.eval_batch_size == 256  # default kept


def test_shortcut_brings_entry_defaults():
    cfg = build_config(None, ["backbone=resnet18_cifar"])
    assert cfg.backbone.name == "resnet18_cifar" and cfg.backbone.nf == 64
    with pytest.raises(ConfigError, match="unknown config key 'backbone.hidden'"):
        build_config(None, ["backbone=resnet18_cifar", "backbone.hidden=3"])  # an MLP key is not a ResNet key


def test_command_line_entry_switch_drops_the_file_keys_of_the_replaced_entry(tmp_path, caplog):
    f = tmp_path / "c.yaml"
    f.write_text("backbone:\n  name: cnn\n  width: 8\nstrategy:\n  name: er\n  lr: 0.3\n  buffer_size: 50\n")
    cfg = build_config(str(f), ["backbone=resnet18_cifar", "backbone.nf=8", "strategy=finetune"])
    assert cfg.backbone.name == "resnet18_cifar" and cfg.backbone.nf == 8 and "width" not in cfg.backbone
    assert cfg.strategy.name == "finetune" and cfg.strategy.lr == 0.3  # a key both entries declare is kept
    assert "backbone.width" in caplog.text and "strategy.buffer_size" in caplog.text
    assert build_config(str(f)).backbone.width == 8  # without a switch the file's keys stand
    with pytest.raises(ConfigError, match="unknown config key 'backbone.width'"):
        build_config(str(f), ["backbone=resnet18_cifar", "backbone.width=4"])  # on the command line: still an error


def test_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nstrategy:\n  name: finetune\n  lr: 0.3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nstrategy:\n  epochs: 2\n")
    cfg = build_config(str(tmp_path / "child.yaml"))
    assert cfg.seed == 1 and cfg.strategy.lr == 0.3 and cfg.strategy.epochs == 2


@pytest.mark.parametrize("overrides, message", [
    (["strategy.lrr=0.1"], "unknown config key 'strategy.lrr' (did you mean: strategy.lr"),
    (["strategy.lr=abc"], "invalid value for 'strategy.lr'"),
    (["strategy=finetun"], "unknown strategy 'finetun' (did you mean: finetune"),
    (["scenario=split_digit"], "unknown scenario 'split_digit' (did you mean: split_digits"),
    (["backbone=mlpp"], "unknown backbone 'mlpp' (did you mean: mlp"),
    (["strategy.lr=-1"], "'strategy.lr': -1.0 (must be > 0)"),
    (["scenario.n_experiences=0"], "'scenario.n_experiences': 0 (must be >= 1)"),
    (["trainer.logger=foo"], "choose csv, tensorboard, wandb, mlflow, none, or a module:Class logger"),
    (["seed"], "not of the form key=value"),
    (["seed=x"], "invalid value for 'seed'"),
])
def test_bad_input_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        build_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        build_config(str(lst))


def test_describe_lists_strategy_keys():
    keys = {k for k, _, _ in describe(names={"strategy": "finetune", "scenario": "split_digits", "backbone": "mlp"})}
    assert {"seed", "strategy.lr", "scenario.n_experiences", "backbone.hidden", "trainer.devices", "run.dir"} <= keys


@pytest.mark.parametrize("args, message", [
    (["train", "strategy.lrr=1"], "unknown config key"),
    (["train", "config=/does/not/exist.yaml"], "does not exist"),
    (["train", "scenario.n_experiences=3", "run.root=/tmp/cl-never"], "does not divide the 10 classes"),
    (["train", "trainer.devices=2", "trainer.strategy=ddp_spawn"], "ddp_spawn"),
    (["train", "trainer.devices=2"], "needs trainer.strategy=ddp"),
    (["nosuchcommand"], "unknown command"),
])
def test_cli_user_errors_exit_2_without_traceback(args, message):
    out = cl_cli(args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_cli_help_lists_keys():
    out = cl_cli(["train", "--help", "strategy=finetune"])
    assert out.returncode == 0 and "strategy.lr" in out.stdout and "data.batch_size" in out.stdout
    assert cl_cli(["--help"]).stdout.startswith("usage: cl")
    listing = cl_cli(["list"]).stdout
    assert "finetune" in listing and "split_digits" in listing and "resnet18_cifar" in listing
