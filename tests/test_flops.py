"""FLOP accounting: FlopCounterMode counts on known layers match a hand computation, and a run's records equal the
per-step hand count times the number of steps."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cl.callbacks.flops import measure
from cl.config import build_config
from cl.runner import Runner
from conftest import TINY


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    with FlopCounterMode(display=False) as fc:
        out = model(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    return fwd, fc.get_total_flops()


def test_linear_and_conv_match_hand_counts():
    torch.manual_seed(0)
    # Linear 10 -> 5 on a batch of 4: forward = 2 * B * in * out; backward (input needs no grad) = weight grad only
    fwd, bwd = _fwd_bwd(nn.Linear(10, 5), torch.randn(4, 10))
    assert (fwd, bwd) == (2 * 4 * 10 * 5, 2 * 4 * 10 * 5)
    # with an input that needs a gradient the backward pass doubles (grad input + grad weight)
    fwd, bwd = _fwd_bwd(nn.Linear(10, 5), torch.randn(4, 10, requires_grad=True))
    assert bwd == 2 * (2 * 4 * 10 * 5)
    # Conv2d 3 -> 4, 3x3, no padding, on (2, 3, 8, 8): output 6x6; 2 * (B * Cout * Hout * Wout) * (Cin * k * k)
    fwd, bwd = _fwd_bwd(nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8))
    assert fwd == 2 * (2 * 4 * 6 * 6) * (3 * 3 * 3) == 15552 and bwd == fwd
    assert measure(nn.Linear(3, 2), torch.randn(7, 3)) == 2 * 7 * 3 * 2


def test_run_records_steps_times_measured_step(tmp_path):
    """finetune, MLP 256-128-128 + growing head, 2 experiences of 5 classes, batch 32, 1 epoch."""
    args = ["strategy=finetune", *TINY, "backbone=mlp", "backbone.hidden=128", "backbone.depth=2",
            "scenario.image_size=16", f"run.dir={tmp_path / 'run'}"]
    runner = Runner(build_config(None, args))
    res = runner.run()
    b, d, h = 32, 16 * 16, 128
    for i, e in enumerate(res.metrics["experiences"]):
        rec, c = e["extra"], 5 * (i + 1)  # the head covers 5 classes after experience 0, 10 after experience 1
        steps = rec["compute/train_steps"]
        assert steps == len(runner.scenario.experiences[i].train) // b  # drop_last: full global batches only
        fwd = 2 * b * (d * h + h * h + h * c)
        bwd = 2 * b * (d * h + h * h + h * c) + 2 * b * (h * h + h * c)  # weight grads + input grads (not layer 1)
        assert rec["compute/train_fwd_flops"] == steps * fwd
        assert rec["compute/train_bwd_flops"] == steps * bwd
        assert rec["compute/samples_seen"] == steps * b
        assert rec["compute/total_flops"] == steps * (fwd + bwd)
    first, second = (e["extra"] for e in res.metrics["experiences"])
    assert second["compute/cumulative_flops"] == first["compute/total_flops"] + second["compute/total_flops"]
