"""SLCA and its Gaussian class statistics: exact moments, positive-definite factors, bit-exact head backup, alignment
that lifts old-class accuracy, a frozen slow learner at ``bcb_lrscale=0``, paper presets that stop offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cl.components.gaussian import (
    ClassMoments,
    GaussianBank,
    cholesky_with_jitter,
    mean_and_covariance,
    pack_tril,
    unpack_tril,
)
from cl.config import build_config, section
from cl.distributed import Dist
from cl.errors import UserError
from cl.runner import RunContext, Runner, build_scenario, build_strategy
from cl.utils import seed_everything
from conftest import REPO, cl_cli
from scenarios.base import TensorSource, class_incremental
from strategies.slca import SLCA, mean_shrink_factors, normalized_logits, replace_final_norm

PAPER = ["cifar100", "imagenet_r", "cub200", "cars196"]


# ------------------------------------------------------------------------------------------------ gaussian.py
def test_moments_match_torch_cov_and_are_positive_definite():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64) * 3 + 1
    y = torch.tensor([3] * 15 + [4] * 25)
    m = ClassMoments(2, 16, offset=3)
    m.update(x, y)
    mean, cov = m.finalize(1e-4)
    for k, c in enumerate((3, 4)):
        xc = x[y == c]
        torch.testing.assert_close(mean[k], xc.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cov[k], torch.cov(xc.T) + 1e-4 * torch.eye(16, dtype=torch.float64),
                                   rtol=1e-10, atol=1e-10)
    # n_c < D: the sample covariance is singular, the ridge makes it positive definite (smallest eigenvalue ~1e-4)
    few = ClassMoments(1, 16)
    few.update(x[:5], torch.zeros(5, dtype=torch.long))
    _, cov5 = few.finalize(1e-4)
    eig = torch.linalg.eigvalsh(cov5[0])
    assert eig.min() > 0.9e-4 and torch.linalg.cholesky_ex(cov5)[1].eq(0).all()
    bank = GaussianBank(16)
    bank.add(mean, cov, m.n)
    bank.add(*few.finalize(1e-4), few.n)
    for c in range(len(bank)):  # stored float32 factors rebuild the covariance to float32 precision
        full = cov[c] if c < 2 else cov5[0]
        torch.testing.assert_close(bank.covariance(c), full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
        assert torch.linalg.eigvalsh(bank.covariance(c)).min() > 0


def test_statistics_in_two_halves_summed_equal_all_at_once():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, (64, 8), generator=g).float()  # small integers: every sum is exact in float64
    y = torch.randint(0, 3, (64,), generator=g)
    whole = ClassMoments(3, 8)
    for i in range(0, 64, 16):  # several batches, as a loader gives them
        whole.update(x[i:i + 16], y[i:i + 16])
    a, b = ClassMoments(3, 8), ClassMoments(3, 8)  # "rank 0" and "rank 1" (every other sample, as the loader)
    a.update(x[0::2], y[0::2])
    b.update(x[1::2], y[1::2])
    a.add_(b)  # what ctx.dist.all_reduce_sum does with the two ranks' sums
    assert torch.equal(a.n, whole.n) and torch.equal(a.sum, whole.sum) and torch.equal(a.outer, whole.outer)
    assert [torch.equal(p, q) for p, q in zip(a.finalize(1e-4), whole.finalize(1e-4))] == [True, True]
    # real-valued features: equal up to float64 rounding of the summation order
    xf = torch.randn(64, 8, generator=g)
    whole, a, b = ClassMoments(3, 8), ClassMoments(3, 8), ClassMoments(3, 8)
    whole.update(xf, y)
    a.update(xf[:32], y[:32])
    b.update(xf[32:], y[32:])
    for p, q in zip(a.add_(b).finalize(1e-4), whole.finalize(1e-4)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_cholesky_jitter_retry_and_packing():
    v = torch.randn(6, 2, dtype=torch.float64)
    singular = torch.stack([v @ v.T, torch.eye(6, dtype=torch.float64)])  # rank 2 (needs jitter), identity (not)
    factor = cholesky_with_jitter(singular, jitter=1e-8)
    assert torch.equal(factor[1], torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(factor[0] @ factor[0].T, singular[0], atol=1e-5, rtol=0)
    assert torch.equal(unpack_tril(pack_tril(factor), 6), factor)
    # memory bound of the issue: 200 classes x 768 features in <= 0.5 GB (float64 covariances: 0.94 GB)
    assert GaussianBank.storage_bytes(200, 768) <= 0.5e9 < 200 * 768 * 768 * 8
    with pytest.raises(ValueError, match="no samples"):
        mean_and_covariance(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2, 2), 1e-4)


def test_sampling_shared_generator_identical_and_moments_right():
    bank = GaussianBank(3)
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    bank.add(torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), cov[None], torch.tensor([10.0]))
    x1, y1 = bank.sample([0], 20000, torch.Generator().manual_seed(5), mean_scale=[0.5])
    x2, _ = bank.sample([0], 20000, torch.Generator().manual_seed(5), mean_scale=[0.5])
    assert torch.equal(x1, x2) and y1.eq(0).all()  # same seed on every rank -> the same pseudo-features
    torch.testing.assert_close(x1.double().mean(0), torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64),
                               atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x1.double().T), cov, atol=0.06, rtol=0)


def test_mean_shrink_and_logit_normalisation_by_hand():
    # Cars-196: 9 x 20 + 16; the official task index c // 16 gives class 195 the factor 0.9 + 0.1 * 13 / 10 = 1.03
    f = mean_shrink_factors([20] * 9 + [16], "official")
    assert f[195] == pytest.approx(1.03) and f[0] == pytest.approx(0.91)
    t = mean_shrink_factors([20] * 9 + [16], "task")
    assert t[195] == pytest.approx(1.0) and t[20] == pytest.approx(0.92) and t[0] == pytest.approx(0.91)
    assert mean_shrink_factors([2, 2], "none") == [1.0] * 4
    z = torch.tensor([[3.0, 4.0, 0.0, 1.0]])  # task norms 5 and 1 (+1e-7), mean 3
    expected = z / ((5 + 1 + 2e-7) / 2 * 0.1)
    torch.testing.assert_close(normalized_logits(z, [2, 2], 0.1), expected)


# ------------------------------------------------------------------------------------------------ the strategy
class FlatBackbone(nn.Module):
    """Features = the input itself (B, 1, 1, D) -> (B, D): a controlled feature space for the alignment test."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def _gaussian_stream(seed: int = 0, dim: int = 8, per_class: int = 120):
    """4 overlapping Gaussian classes in 2 experiences of 2; test = fresh draws of the same Gaussians."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, dim, generator=g) * 1.2
    means[2:] += 0.8  # the new task's classes sit at larger feature norm: its stage-1 head gets larger logits

    def draw(n):
        x = torch.cat([means[c] + torch.randn(n, dim, generator=g) for c in range(4)])
        return TensorSource(x.view(-1, 1, 1, dim), np.repeat(np.arange(4), n))

    cfg = section(build_config(None, ["scenario.n_experiences=2"]), "scenario")
    return class_incremental("gauss", draw(per_class), draw(per_class), cfg, image_size=1, channels=1,
                             mean=(0.0,), std=(1.0,), augment="none")


def _ctx(model: SLCA, scenario, tmp_path: Path, overrides: list[str] = ()) -> RunContext:
    cfg = build_config(None, ["strategy=slca", "data.batch_size=16", *overrides])
    return RunContext(cfg, scenario, Dist(), torch.device("cpu"), tmp_path, model)


def _stage1(model: SLCA, exp, ctx: RunContext, epochs: int) -> None:
    """Stage 1 without a Trainer: the module's own training_step and optimizer (what Trainer.fit runs)."""
    model.train()
    opt = model.configure_optimizers()["optimizer"]
    for _ in range(epochs):
        for x, y in ctx.loader(exp.train, train=True):
            loss = model.training_step((x, y), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.filterwarnings("ignore")
def test_alignment_lifts_old_class_accuracy_and_backup_is_restored_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    scenario = _gaussian_stream()
    strat_cfg = section(build_config(None, ["strategy=slca", "strategy.lr=0.05", "strategy.ca_epochs=5",
                                            "strategy.ca_samples_per_class=128", "strategy.bcb_lrscale=0"]),
                        "strategy")
    model = SLCA(strat_cfg, FlatBackbone(8), scenario.n_classes)
    ctx = _ctx(model, scenario, tmp_path)
    for exp in scenario.experiences:
        ctx.exp_index = exp.index
        model.on_experience_start(exp, ctx)
        _stage1(model, exp, ctx, epochs=15)
        stage1 = [h.weight.detach().clone() for h in model.classifier.heads]
        model.on_experience_end(exp, ctx)
    rec = ctx.records[1]
    # the local-CE heads are miscalibrated across tasks; alignment on the class Gaussians fixes the old classes
    assert rec["acc_old"] > rec["acc_old_unaligned"] + 0.1, rec
    assert (rec["acc_old"] + rec["acc_new"]) > (rec["acc_old_unaligned"] + rec["acc_new_unaligned"]), rec
    aligned = [h.weight.detach().clone() for h in model.classifier.heads]
    assert not torch.equal(aligned[0], stage1[0]), "alignment must change the heads"
    assert all(torch.equal(w, b[0]) for w, b in zip(stage1, model.backup)), "the backup holds the stage-1 heads"

    # a checkpoint taken after evaluation (aligned heads + backup) resumes into the restored stage-1 heads
    state = {"structure": model.cl_structure(), "sd": model.state_dict(), "extra": model.extra_state()}
    fresh = SLCA(strat_cfg, FlatBackbone(8), scenario.n_classes)
    fresh.regrow(state["structure"])
    fresh.load_state_dict(state["sd"])
    fresh.load_extra_state(state["extra"])
    assert all(torch.equal(h.weight, w) for h, w in zip(fresh.classifier.heads, aligned))
    for m in (model, fresh):  # the next experience starts from the backup, bit for bit
        m.restore_backup()
        assert all(torch.equal(h.weight, w) for h, w in zip(m.classifier.heads, stage1))
        assert m.backup is None
    assert torch.equal(fresh.bank.factors, model.bank.factors) and torch.equal(fresh.bank.means, model.bank.means)


class CountingBackbone(FlatBackbone):
    """FlatBackbone that counts its forward calls (the cost the evaluation's feature cache saves)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


def test_eval_passes_share_one_backbone_forward_per_batch(tmp_path):
    # the evaluation runs `main` and `unaligned` on each batch: one backbone forward, the same numbers as two
    from cl.evaluation import evaluate

    torch.manual_seed(0)
    scenario = _gaussian_stream()
    cfg = section(build_config(None, ["strategy=slca", "strategy.ca_epochs=1", "strategy.ca_samples_per_class=16",
                                      "strategy.record_old_new=false"]), "strategy")
    model = SLCA(cfg, CountingBackbone(8), scenario.n_classes)
    ctx = _ctx(model, scenario, tmp_path)
    for exp in scenario.experiences:
        ctx.exp_index = exp.index
        model.on_experience_start(exp, ctx)
        _stage1(model, exp, ctx, epochs=2)
        model.on_experience_end(exp, ctx)
    assert model.backup is not None  # aligned and unaligned heads differ: the two passes are distinct
    model.backbone.calls = 0
    res = evaluate(model, scenario.experiences, Dist(), torch.device("cpu"), batch_size=60)
    batches = sum(-(-len(e.test) // 60) for e in scenario.experiences)
    assert model.backbone.calls == batches, "one backbone forward per test batch for both passes"
    model.eval()
    with torch.no_grad():  # reference without the cache: each pass on its own copy of every batch
        exps = scenario.experiences
        x = model.eval_transform(torch.cat([e.test.source.batch(torch.as_tensor(e.test.indices)) for e in exps]))
        y = torch.cat([torch.as_tensor(e.test.targets) for e in exps])
        main, unaligned = model(x.clone()), model.unaligned_logits(x.clone())
    assert not torch.equal(main.argmax(1), unaligned.argmax(1))
    for name, z in (("main", main), ("unaligned", unaligned)):
        assert sum(res[name].correct) == int((z.argmax(1) == y).sum()), name
    # a batch changed in place, training mode or autograd recompute
    xb = x[:8].clone()
    with torch.no_grad():
        before = model(xb)
        xb.mul_(2)
        torch.testing.assert_close(model.unaligned_logits(xb), torch.cat(
            [torch.nn.functional.linear(xb.flatten(1) * model.backbone.scale, w, b) for w, b in model.backup], dim=1))
        assert not torch.equal(model(xb), before)
    n = model.backbone.calls
    model(xb)  # grad enabled
    model.train()
    with torch.no_grad():
        model(xb)
    assert model.backbone.calls == n + 2


@pytest.mark.filterwarnings("ignore")
def test_fresh_norm_and_two_learning_rates():
    cfg = build_config(None, ["strategy=slca", "backbone=vit", "backbone.width=16", "backbone.depth=1",
                              "backbone.heads=2", "scenario.image_size=8"])
    seed_everything(0)
    scenario = build_scenario(cfg)
    model = build_strategy(cfg, scenario)
    assert model.fresh_norm and torch.equal(model.backbone.norm.weight, torch.ones(16))
    assert torch.equal(model.backbone.norm.bias, torch.zeros(16))
    net = nn.Sequential()
    net.norm = nn.LayerNorm(4)
    nn.init.constant_(net.norm.weight, 3.0)
    assert replace_final_norm(net) and net.norm.weight.eq(1).all() and not replace_final_norm(nn.Linear(2, 2))
    model.classifier.grow(5)
    opt = model.configure_optimizers()
    groups = opt["optimizer"].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-2])
    assert any(p is model.backbone.norm.weight for p in groups[0]["params"])
    assert opt["lr_scheduler"]["scheduler"].milestones == {18: 1}


@pytest.mark.filterwarnings("ignore")
def test_zero_backbone_lr_scale_keeps_backbone_bit_identical(tmp_path):
    over = ["strategy=slca", "scenario=split_digits", "scenario.n_experiences=2", "scenario.image_size=8",
            "backbone=vit", "backbone.width=16", "backbone.depth=1", "backbone.heads=2", "strategy.bcb_lrscale=0",
            "strategy.epochs=1", "strategy.ca_epochs=1", "strategy.ca_samples_per_class=16", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "trainer.logger=none", "run.checkpoint=false",
            f"run.dir={tmp_path / 'run'}"]
    cfg = build_config(None, over)
    seed_everything(cfg.seed)  # the runner's order: seed, scenario, strategy -> the same initial weights
    initial = build_strategy(cfg, build_scenario(cfg))
    runner = Runner(cfg)
    runner.run()
    before, after = initial.backbone.state_dict(), runner.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before), "backbone changed at bcb_lrscale=0"
    n_train = sum(len(e.train) for e in runner.scenario.experiences)
    assert len(runner.model.bank) == 10 and int(runner.model.bank.counts.sum()) == n_train


# ------------------------------------------------------------------------------------------------ paper presets
def test_paper_presets_load_and_need_weights_offline():
    for name in PAPER:
        cfg = build_config(str(REPO / "configs" / "slca" / f"{name}.yaml"))
        assert cfg.strategy.name == "slca" and cfg.backbone.model == "vit_base_patch16_224.augreg_in21k"
        assert cfg.backbone.pretrained and cfg.data.batch_size == 128
        assert cfg.strategy.ca_logit_norm == (0.05 if name == "cars196" else 0.1)
        schedule = (20, [18]) if name == "cifar100" else (50, [40])
        assert (cfg.strategy.epochs, list(cfg.strategy.milestones)) == schedule
    cpu = build_config(str(REPO / "configs" / "slca" / "cpu.yaml"))
    assert cpu.scenario.name == "proxy_fmnist" and Path(REPO / cpu.backbone.checkpoint).is_file()
    from cl.backbones import build_backbone

    with pytest.raises(UserError, match="cannot load pretrained weights"):
        build_backbone(section(cfg, "backbone"), (3, 224, 224))


def test_paper_presets_seed_names_the_papers_class_order_runs():
    # the official runs differ in class order only (PyCIL seeds 1993, 1996, 1997): seed=N selects order N
    from cl.runner import run_dir_for
    from scenarios.base import pycil_permutation

    for name in PAPER:
        path = str(REPO / "configs" / "slca" / f"{name}.yaml")
        default = build_config(path)
        assert default.seed == default.scenario.order_seed == 1993
        runs = [build_config(path, [f"seed={s}"]) for s in (1993, 1996, 1997)]
        assert [c.scenario.order_seed for c in runs] == [1993, 1996, 1997]
        assert len({run_dir_for(c) for c in runs}) == 3  # no run directory clash between the paper's runs
        fixed = build_config(path, ["seed=1", "scenario.order_seed=1996"])  # a literal torch.manual_seed(1)
        assert (fixed.seed, fixed.scenario.order_seed) == (1, 1996)
    assert pycil_permutation(100, 1996) != pycil_permutation(100, 1993)


def test_paper_preset_stops_with_one_line_error():
    out = cl_cli(["train", f"config={REPO / 'configs' / 'slca' / 'cifar100.yaml'}", "data.root=/nonexistent"])
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in out.stderr
