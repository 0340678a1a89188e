"""PRD: SupCon against a hand-written reference, detached prototype loss, frozen future prototypes, relation
distillation (zero at the first experience, positive under drift), task-IL >= class-IL, paper presets."""

from __future__ import annotations

import math
import types

import pytest
import torch

from cl.callbacks import base as cb_base
from cl.config import build_config
from cl.errors import ConfigError
from cl.registry import SCENARIOS
from cl.runner import Runner, build_scenario, build_strategy
from conftest import REPO, TINY, cl_cli
from strategies.prd import PRD, PRDAugment, step_lr, supcon_loss

SMALL = ["strategy=prd", "scenario=split_digits", "scenario.n_experiences=5", "backbone=resnet18_cifar",
         "backbone.nf=2", "scenario.image_size=8", "strategy.proj_hidden=16", "strategy.proj_dim=8"]


def _model(extra: list[str] = ()) -> tuple[PRD, types.SimpleNamespace]:
    torch.manual_seed(0)
    cfg = build_config(None, SMALL + list(extra))
    scenario = build_scenario(cfg)
    model = build_strategy(cfg, scenario)
    return model, types.SimpleNamespace(scenario=scenario, cfg=cfg)


def _batch(model: PRD, exp, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.as_tensor(exp.train.indices[:: max(1, len(exp.train) // n)][:n])
    x = exp.train.source.batch(idx)
    y = torch.as_tensor(exp.train.targets[:: max(1, len(exp.train) // n)][:n])
    return model.on_after_batch_transfer((x, y), 0)


def _supcon_reference(z: torch.Tensor, y: torch.Tensor, t: float, base: float) -> float:
    """Khosla et al.'s definition written out anchor by anchor with Python floats."""
    n = len(y)
    total = 0.0
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
        pos = [p for p in range(n) if p != i and int(y[p]) == int(y[i])]
        total += -sum(float(z[i] @ z[p]) / t - math.log(denom) for p in pos) / len(pos)
    return (t / base) * total / n


def test_supcon_equals_reference():
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 1]).repeat(2)  # two views of 6 samples
    got = supcon_loss(z, y, temperature=0.1, base_temperature=0.07)
    assert got.item() == pytest.approx(_supcon_reference(z, y, 0.1, 0.07), rel=1e-10)
    # gathered form (contrast set = two "ranks", anchors = the second one) equals the full loss on those anchors
    full = supcon_loss(z, y, 0.1, 0.07)
    half = supcon_loss(z[6:], y[6:], 0.1, 0.07, z, y, self_offset=6)
    first = supcon_loss(z[:6], y[:6], 0.1, 0.07, z, y, self_offset=0)
    assert ((half + first) / 2).item() == pytest.approx(full.item(), rel=1e-10)


def test_augment_keeps_range_and_changes_views():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    a, b = PRDAugment()(x), PRDAugment()(x)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, b)
    # crop padding is filled with -1: a large shift on a constant +1 image leaves -1 borders somewhere
    ones = PRDAugment(crop_pad=4, jitter=0, grayscale_p=0)(torch.ones(16, 1, 8, 8))
    assert (ones == -1).any() and set(ones.unique().tolist()) <= {-1.0, 1.0}


def _ramp_stats(aug: PRDAugment) -> list[float]:
    torch.manual_seed(0)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    y = torch.cat([aug(ramp) for _ in range(64)])
    return [y.mean().item(), y.std().item(), (y < 0).float().mean().item(), (y == 0).float().mean().item()]


def test_jitter_is_official_kornia_on_pm1_and_clamps():
    """Parity gap 1: the official ``kornia.augmentation.ColorJitter(0.4, 0.4, 0.4, p=0.8)`` (kornia 0.6.1) runs on
    the [-1, 1] tensor: additive brightness and multiplicative contrast, each clamped to [0, 1], so every jittered
    view loses its negative values. Reference numbers measured with kornia 0.6.1 itself on this ramp (64 x 64
    grey 8 x 8 images from -1 to 1, seed 0): mean 0.2225, std 0.4053, share < 0 0.0981, share == 0 0.3146."""
    ours = _ramp_stats(PRDAugment(crop_pad=0, grayscale_p=0))
    for got, want, tol in zip(ours, [0.2225, 0.4053, 0.0981, 0.3146], [0.015, 0.015, 0.01, 0.02]):
        assert got == pytest.approx(want, abs=tol), (ours, "kornia 0.6.1 reference")
    # the [0, 1]-space torchvision jitter keeps the dark half: clearly different statistics
    tv = _ramp_stats(PRDAugment(crop_pad=0, grayscale_p=0, impl="torchvision"))
    assert tv[0] < 0.05 and tv[2] > 0.4 and tv[3] == 0.0
    # every jittered view lies in [0, 1]; with jitter_p=1 a -1 background is gone, with jitter_p=0 it stays
    x = -torch.ones(32, 1, 6, 6)
    x[:, :, 2:4, 2:4] = 0.5
    y = PRDAugment(crop_pad=0, jitter_p=1.0, grayscale_p=0)(x)
    assert y.min() >= 0 and y.max() <= 1 and (y[:, :, 0, 0] <= 0.4 + 1e-6).all()
    assert torch.equal(PRDAugment(crop_pad=0, jitter_p=0.0, grayscale_p=0)(x).abs(), x.abs())  # flip only


def test_kornia_saturation_closed_form():
    """kornia's RGB -> HSV -> scale s -> RGB (max |diff| to kornia 0.6.1 measured 8e-7 on random [-1, 1] colours)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g)
    one = torch.ones(4, 1, 1, 1)
    assert torch.allclose(PRDAugment.kornia_saturation(x, one), x, atol=1e-6)  # factor 1: identity
    grey = PRDAugment.kornia_saturation(x, 0 * one)
    assert torch.allclose(grey, x.max(1, keepdim=True).values.expand_as(x), atol=1e-6)  # s = 0: grey at v = max
    tiled = x[:, :1].repeat(1, 3, 1, 1) * 2 - 1
    assert torch.equal(PRDAugment.kornia_saturation(tiled, 1.4 * one), tiled)  # grey pixels never change
    # the HSV formula, one coloured pixel: v = 0.8, min 0.2, s = 0.75 -> s' = 1 (clamped) at factor 1.4
    px = torch.tensor([0.8, 0.5, 0.2]).view(1, 3, 1, 1)
    assert torch.allclose(PRDAugment.kornia_saturation(px, torch.tensor(1.4)).flatten(),
                          torch.tensor([0.8, 0.4, 0.0]), atol=1e-6)


def test_backbone_gets_official_kaiming_fan_out_init():
    """Parity gap 2: the official ResNet inits every conv kaiming-normal (fan-out, ReLU gain); PyTorch's default
    kaiming-uniform(a=sqrt(5)) gives ~2.4x smaller weights behind BatchNorm, i.e. a ~6x larger effective lr."""
    model, _ = _model(["backbone.nf=8"])
    conv = model.backbone.layer3[0].conv2  # 32 -> 32 channels, 3 x 3: fan-out 288
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 288), rel=0.1)
    default, _ = _model(["backbone.nf=8", "strategy.conv_init=default"])
    assert default.backbone.layer3[0].conv2.weight.std().item() == pytest.approx(math.sqrt(1 / (3 * 288)), rel=0.1)


def test_conv_init_refuses_to_overwrite_a_checkpoint():
    model, ctx = _model()
    ctx.cfg.backbone.checkpoint = "pretrained.pt"
    with pytest.raises(ConfigError, match="conv_init"):
        model.on_experience_start(ctx.scenario.experiences[0], ctx)


def test_lr_decay_starts_after_the_milestone_epoch(monkeypatch):
    """Parity gap 3: the official ``adjust_learning_rate`` decays when ``epoch > m`` (epoch index from 0 within the
    task), one epoch later than ``epoch >= m``."""
    assert [step_lr(1.0, 0.1, [4, 6], e) for e in range(9)] == pytest.approx([1, 1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    model, _ = _model(["strategy.lr=1.0", "strategy.lr_milestones=[4,6]"])
    opt = model.configure_optimizers()
    model.optimizers = lambda: types.SimpleNamespace(optimizer=opt)
    for epoch, want in [(4, 1.0), (5, 0.1), (6, 0.1), (7, 0.01)]:
        monkeypatch.setattr(PRD, "current_epoch", property(lambda self, e=epoch: e))
        model.on_train_epoch_start()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([want, want])  # prototypes' group too


def test_views_do_not_depend_on_scenario_augment():
    """The parity harness (and any run) with scenario.augment=false still gets PRD's two augmented views: the
    scenario's crop never applies to PRD, only strategy.augment switches the views off."""
    model, ctx = _model(["scenario.augment=false"])
    model.on_experience_start(ctx.scenario.experiences[0], ctx)
    assert model.use_augment
    off, ctx2 = _model(["strategy.augment=false"])
    off.on_experience_start(ctx2.scenario.experiences[0], ctx2)
    assert not off.use_augment


def test_prototype_loss_gives_encoder_no_gradient_and_future_prototypes_are_frozen():
    model, ctx = _model()
    exp = ctx.scenario.experiences[0]
    model.on_experience_start(exp, ctx)
    assert [h.weight.shape[0] for h in model.prototypes] == [2] * 5  # all built at the start
    assert [h.weight.requires_grad for h in model.prototypes] == [True, False, False, False, False]
    model.train()
    x, y = _batch(model, exp)
    model.losses(x, y)["proto"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.projector.parameters())
    assert model.prototypes[0].weight.grad.abs().sum() > 0
    assert all(h.weight.grad is None for h in model.prototypes[1:])


def test_distillation_zero_first_experience_positive_under_drift():
    model, ctx = _model()
    e0, e1 = ctx.scenario.experiences[:2]
    model.on_experience_start(e0, ctx)
    model.train()
    x, y = _batch(model, e0)
    assert model.losses(x, y)["distill"].item() == 0.0  # no teacher in the first experience
    model.on_experience_end(e0, types.SimpleNamespace(dist=types.SimpleNamespace(world_size=1),
                                                      record=lambda *a: None))
    model.on_experience_start(e1, ctx)
    assert [h.weight.requires_grad for h in model.prototypes] == [True, True, False, False, False]
    x1, y1 = _batch(model, e1)
    views = torch.cat([x1, x1])
    h = model.backbone(views)
    assert model.distill_loss(views, h, 1).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = model.backbone(views)
    d = model.distill_loss(views, h, 1)
    assert d.item() > 1e-4
    d.backward()
    assert model.prototypes[0].weight.grad.abs().sum() > 0  # old prototypes move through L_d
    assert all(p.grad is None for p in model.teacher.parameters())


class _Snap(cb_base.CLCallback):
    """Prototype weights at the end of every experience."""

    protos: list[list[torch.Tensor]] = []

    def on_experience_end(self, exp, ctx):
        _Snap.protos.append([h.weight.detach().clone() for h in ctx.model.prototypes])


def _run(tmp_path, extra: list[str], monkeypatch) -> tuple[Runner, dict]:
    import cl.runner

    _Snap.protos = []
    monkeypatch.setattr(cl.runner, "CALLBACKS", cb_base.CALLBACKS + [_Snap])
    cfg = build_config(None, [*TINY, *SMALL, "scenario.init_classes=4", "scenario.increment=3", "strategy.epochs=2",
                              "strategy.warmup_epochs=1", "strategy.lr=0.05", f"run.dir={tmp_path}", *extra])
    runner = Runner(cfg)
    return runner, runner.run().metrics


@pytest.mark.slow
def test_stream_future_prototypes_unchanged_old_ones_move_til_ge_cil(tmp_path, monkeypatch):
    runner, m = _run(tmp_path, [], monkeypatch)
    p = _Snap.protos
    assert torch.equal(p[0][2], p[1][2]), "a prototype of a future experience changed"
    assert not torch.equal(p[0][0], p[1][0]), "old prototypes should evolve through the distillation"
    assert not torch.equal(p[0][1], p[1][1])
    # task-IL (argmax within the experience) can only be at least class-IL (argmax over all seen classes)
    for row_c, row_t in zip(m["accuracy_matrix"], m["til_accuracy_matrix"]):
        for c, t in zip(row_c, row_t):
            if c is not None:
                assert t >= c
    assert m["til_last_acc"] >= m["last_acc"]
    # the optimizer state (momentum) is carried across experiences and checkpointed
    extra = runner.model.extra_state()
    assert extra["optimizer"]["state"], "momentum buffers must persist"


@pytest.mark.parametrize("preset", ["cifar100", "mini_imagenet"])
def test_paper_presets_load_and_stop_on_missing_data(preset, tmp_path):
    path = REPO / "configs" / "prd" / f"{preset}.yaml"
    cfg = build_config(str(path))
    assert cfg.strategy.name == "prd" and cfg.strategy.epochs == 100 and cfg.strategy.warmup_epochs == 120
    assert cfg.scenario.n_experiences == 20 and cfg.backbone.nf == 64 and cfg.data.batch_size == 128
    if cfg.scenario.name not in SCENARIOS.names():
        pytest.skip(f"scenario {cfg.scenario.name} is not registered yet")
    out = cl_cli(["train", f"config={path}", f"data.root={tmp_path / 'data'}", f"run.root={tmp_path / 'runs'}"],
                 timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert str(tmp_path / "data") in out.stderr  # the one-line DataError names the data root it searched
