"""FPF and k-FPF: only the selected modules change, module selection, training dynamics, the k-call schedule across
a resume, old-experience accuracy rising across an FPF call, and the CPU preset's claim against ER and fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl.backbones.nets import ResNet18Cifar
from cl.callbacks import base as cb_base
from cl.components.buffer import ReservoirBuffer
from cl.components.fpf import (
    TrainingDynamics,
    default_modules,
    l1_change,
    resolve_modules,
    run_fpf,
    selective_finetuning,
)
from cl.config import build_config
from cl.errors import ConfigError
from cl.runner import Runner
from conftest import REPO, TINY
from strategies.kfpf import schedule


class Net(nn.Module):
    """A tiny CIFAR ResNet-18 (nf 4) with a ``classifier``, as strategies hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNet18Cifar(3, nf=4)
        self.classifier = nn.Linear(self.backbone.num_features, 4)

    def forward(self, x):
        return self.classifier(self.backbone(x))


def _filled_buffer(n: int = 48) -> ReservoirBuffer:
    g = torch.Generator().manual_seed(0)
    buf = ReservoirBuffer(n, seed=0)
    buf.add(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g), task=0)
    return buf


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("frozen_bn", ["eval", "batch_stats"])
def test_fpf_changes_only_the_selected_modules(frozen_bn):
    torch.manual_seed(0)
    model = Net()
    model.backbone.conv1.weight.requires_grad_(False)  # a flag that must come back as it was
    model.eval()
    names = resolve_modules(model, ["backbone.layer4.*.bn*", "classifier"])
    assert names == ["backbone.layer4.0.bn1", "backbone.layer4.0.bn2", "backbone.layer4.1.bn1",
                     "backbone.layer4.1.bn2", "classifier"]
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = run_fpf(model, _filled_buffer(), names, iters=3, lr=0.1, batch_size=16,
                  transform=nn.Upsample(size=16), call_tag=0, frozen_bn=frozen_bn)
    after = _state(model)
    selected = tuple(f"{n}." for n in names)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "FPF changed nothing"
    assert all(k.startswith(selected) for k in changed), f"unselected state changed: {sorted(changed)[:4]}"
    # selected BN: affine parameters AND running statistics (re-estimated on the buffer) moved
    for k in ("weight", "running_mean", "running_var", "num_batches_tracked"):
        assert f"backbone.layer4.0.bn1.{k}" in changed
    assert "classifier.weight" in changed
    # unselected BN: running statistics bit-identical (checked above through the state dict), flags and mode back
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
    assert res.iters == 3 and res.fwd_flops > 0 and res.bwd_flops > 0
    assert res.n_params == sum(p.numel() for n, p in model.named_parameters() if n.startswith(selected))


def test_context_manager_freezes_and_restores():
    model = Net()
    with selective_finetuning(model, ["classifier"]) as params:
        assert {id(p) for p in params} == {id(p) for p in model.classifier.parameters()}
        assert all(not p.requires_grad for p in model.backbone.parameters())
        assert not model.backbone.bn1.training and model.classifier.training
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.bn1.training


def test_module_selection_defaults_types_and_errors():
    model = Net()
    auto = default_modules(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert auto == bns + ["classifier"]
    assert default_modules(model, domain=True) == ["backbone.conv1", *bns, "classifier"]
    assert resolve_modules(model, ["BatchNorm", "head"]) == auto
    assert resolve_modules(model, ["type:Conv2d"])[0] == "backbone.conv1"
    assert resolve_modules(model, ["first_conv", "classifier"]) == ["backbone.conv1", "classifier"]
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    assert resolve_modules(model, ["auto", "last_conv"]) == [*bns, "classifier", last]
    assert resolve_modules(model, ["backbone", "classifier"]) == ["backbone", "classifier"]
    assert resolve_modules(model, ["backbone.layer1", "backbone.layer1.0.bn1"]) == ["backbone.layer1"]  # nested
    with pytest.raises(ConfigError, match="fpf.modules entry 'backbone.nope'"):
        resolve_modules(model, ["backbone.nope"])

    from timm.models.vision_transformer import VisionTransformer

    vit = nn.Module()
    vit.backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=0)
    vit.head = nn.Linear(16, 3)
    lns = [n for n, m in vit.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 5 and default_modules(vit) == lns + ["head"]
    assert default_modules(vit, domain=True)[0] == "backbone.patch_embed.proj"


def test_training_dynamics_is_normalised_l1_change():
    a = {"m": [torch.tensor([1.0, 2.0]), torch.tensor([0.0])], "grew": [torch.zeros(2)]}
    b = {"m": [torch.tensor([2.0, 0.0]), torch.tensor([3.0])], "grew": [torch.zeros(3)], "new": [torch.ones(1)]}
    assert l1_change(a, b) == {"m": pytest.approx((1 + 2 + 3) / 3)}  # |d| summed / parameter count

    lin = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    dyn = TrainingDynamics()
    dyn.experience_start(lin)
    with torch.no_grad():
        lin[0].weight.add_(1.0)
    dyn.epoch_end(lin)
    with torch.no_grad():
        lin[0].weight.add_(1.0)
    dyn.epoch_end(lin)
    first = dyn.experience_end(lin)
    assert first["within"]["0"] == pytest.approx(1.0) and "cross" not in first
    dyn.experience_start(lin)
    with torch.no_grad():
        lin[0].weight.add_(-3.0)
        lin[1].running_mean.add_(2.0)
    dyn.epoch_end(lin)
    second = dyn.experience_end(lin)
    assert second["cross"]["0"] == pytest.approx(3.0) and second["cross"]["1#running"] == pytest.approx(1.0)
    assert second["score"]["0"] == pytest.approx(1.0) and second["top_cross"][0] == "0"


def test_schedule_is_k_distinct_steps_ending_at_the_last():
    for total, k in [(10, 3), (7, 7), (1000, 10), (5, 1)]:
        s = schedule(total, k)
        assert len(s) == k == len(set(s)) and s[-1] == total and s == sorted(s)
    assert schedule(10, 3) == [4, 7, 10]


# ------------------------------------------------------------------------------------------------ runs
class _Stop(Exception):
    pass


class _StopAt(cb_base.CLCallback):
    at = -1

    def on_experience_start(self, exp, ctx):
        if exp.index == _StopAt.at:
            raise _Stop


def _calls(metrics: dict) -> list[dict]:
    return [c for e in metrics["experiences"] for c in e["extra"].get("fpf/calls", [])]


def test_k_calls_exactly_k_times_also_across_a_resume(tmp_path, monkeypatch):
    import cl.runner

    args = ["strategy=kfpf", *TINY, "scenario.n_experiences=5", "backbone=mlp", "backbone.hidden=32",
            "strategy.buffer_size=40", "strategy.k=3", "fpf.iters=3", "strategy.epochs=1"]
    full = Runner(build_config(None, [*args, f"run.dir={tmp_path / 'full'}"])).run()
    steps_full = [c["step"] for c in _calls(full.metrics)]
    total = full.metrics["experiences"][-1]["extra"]["compute/train_steps"]  # steps of the last experience
    assert len(steps_full) == 3 and steps_full == schedule(steps_full[-1], 3)
    assert total > 0 and steps_full[-1] == sum(e["extra"]["compute/train_steps"] for e in full.metrics["experiences"])
    assert sum(e["extra"]["compute/fpf_steps"] for e in full.metrics["experiences"] if "compute/fpf_steps" in
               e["extra"]) == 3 * 3  # 3 calls x 3 iterations

    monkeypatch.setattr(cl.runner, "CALLBACKS", cb_base.CALLBACKS + [_StopAt])
    _StopAt.at = 2
    with pytest.raises(_Stop):
        Runner(build_config(None, [*args, f"run.dir={tmp_path / 'cut'}"])).run()
    _StopAt.at = -1
    resumed = Runner(build_config(None, [*args, f"run.dir={tmp_path / 'cut'}", "resume=auto"])).run()
    assert [c["step"] for c in _calls(resumed.metrics)] == steps_full, "a resume must fire the same k calls"
    assert resumed.accuracy_matrix == full.accuracy_matrix


def test_old_experience_accuracy_rises_across_an_fpf_call(tmp_path):
    """Fine-tuning forgets old classes; FPF (BN + head, 100 steps on a buffer of 200) brings them back."""
    args = ["strategy=finetune", *TINY, "scenario.init_classes=4", "scenario.increment=3", "backbone=cnn",
            "backbone.width=8", "strategy.lr=0.05", "strategy.epochs=2", "fpf.enabled=true", "fpf.measure=true",
            "fpf.iters=100", "fpf.buffer_size=200", f"run.dir={tmp_path / 'run'}"]
    res = Runner(build_config(None, args)).run()
    calls = _calls(res.metrics)
    assert len(calls) == 3 and [c["exp"] for c in calls] == [0, 1, 2]
    for c in calls[1:]:
        assert c["old_acc_after"] > c["old_acc_before"], c
        assert c["seen_acc_after"] > c["seen_acc_before"], c
    gain = sum(c["old_acc_after"] - c["old_acc_before"] for c in calls[1:]) / 2
    assert gain > 0.2, f"FPF raised old-experience accuracy by only {gain:.3f} on average"
    extra = res.metrics["experiences"][-1]["extra"]
    assert extra["fpf/modules"] == ["backbone.net.1", "backbone.net.5", "backbone.net.9", "classifier"]
    dyn = extra["fpf/dynamics"]
    assert set(dyn) >= {"cross", "within", "score", "top_cross"} and "backbone.net.1#running" in dyn["cross"]


def test_fpf_refused_where_it_does_not_apply():
    from cl.registry import STRATEGIES
    from cl.runner import build_scenario, build_strategy

    cfg = build_config(None, ["strategy=kfpf", *TINY, "fpf.enabled=true"])
    assert STRATEGIES.get("kfpf").fpf_refusal
    with pytest.raises(ConfigError, match="does not apply to strategy 'kfpf'"):
        build_strategy(cfg, build_scenario(cfg))


@pytest.mark.slow
def test_cpu_preset_kfpf_close_to_er_at_a_fraction_of_its_flops(tmp_path):
    """The issue's claim on ``configs/kfpf/cpu.yaml`` (seed 0, one thread as in ``benchmarks/kfpf_cpu.py``): k-FPF
    beats fine-tuning by a wide margin and is within a few points of ER at under 0.7x its training FLOPs.
    Measured: k-FPF 85.1, ER 83.6, fine-tuning 16.2 % last accuracy; FLOPs 0.65x of ER's."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, path in [("kfpf", "kfpf/cpu.yaml"), ("er", "er/cpu.yaml"), ("finetune", "kfpf/cpu_finetune.yaml")]:
            cfg = build_config(str(REPO / "configs" / path), ["seed=0", "run.checkpoint=false", "trainer.logger=none",
                                                               f"run.dir={tmp_path / name}"])
            m = Runner(cfg).run().metrics
            out[name] = (m["last_acc"], m["experiences"][-1]["extra"]["compute/cumulative_flops"])
    finally:
        torch.set_num_threads(threads)
    (kf, kf_flops), (er, er_flops), (ft, _) = out["kfpf"], out["er"], out["finetune"]
    assert kf > ft + 0.4, out
    assert kf > er - 0.08, out  # seeds 5-9 average 3.9 points below ER: "close", not "above"
    assert kf_flops < 0.7 * er_flops, out
