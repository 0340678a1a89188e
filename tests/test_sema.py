"""SEMA: detection-driven expansion, frozen old modules, router mixing, checkpoint regrowth, DDP agreement.

The stream: split digits 5 + 3 + 2 classes, the last experience colour-inverted (a shifted domain), on a tiny random
timm ViT (width 32, depth 2, 16 px, patch 4) with block 1 expandable. Experience 1 comes from the same distribution
as experience 0 (new digits) and must not expand; experience 2 (inverted) must.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cl.cli import main as cl_main
from cl.config import build_config
from cl.runner import Runner, build_strategy, load_checkpoint, restore_model
from conftest import REPO, cl_cli, read_metrics
from strategies.sema import SEMA, AdapterMixture, RepresentationDescriptor

STREAM = [
    "strategy=sema", "scenario=split_digits", "scenario.init_classes=5", "scenario.increment=3",
    "scenario.invert_last=true", "scenario.augment=false", "backbone=vit", "backbone.width=32", "backbone.depth=2",
    "backbone.heads=2", "backbone.patch=4", "strategy.epochs=2", "strategy.rd_epochs=3", "strategy.adapter_dim=8",
    "strategy.rd_dim=16", "strategy.window=64", "strategy.detect_batch=64", "strategy.expandable_blocks=[1]",
    "strategy.lr=0.05", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
    "data.batch_size=32",
]


def _adapters(metrics: dict) -> list[list[int]]:
    return [e["extra"]["sema/adapters_per_block"] for e in metrics["experiences"]]


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sema") / "run"
    cfg = build_config(None, [*STREAM, f"run.dir={run_dir}"])
    runner = Runner(cfg)
    results = runner.run()
    return cfg, runner, results, run_dir


# ------------------------------------------------------------------------------------------------ units


def test_z_is_zero_until_three_values_then_hand_computed():
    rd = RepresentationDescriptor(dim=4, latent=2, window=4, eps=1e-8)
    losses = torch.tensor([1.0, 5.0])
    rd.push(torch.tensor([2.0]))
    assert torch.equal(rd.z_score(losses), torch.zeros(2))
    rd.push(torch.tensor([4.0]))
    assert torch.equal(rd.z_score(losses), torch.zeros(2)), "z must be 0 while the window holds <= 2 values"
    rd.push(torch.tensor([6.0]))  # window [2, 4, 6]: mean 4, unbiased std 2
    assert torch.allclose(rd.z_score(losses), torch.tensor([1.5, 0.5]))
    rd.push(torch.tensor([8.0, 10.0]))  # sliding window of 4 keeps [4, 6, 8, 10]: mean 7, std sqrt(20/3)
    assert int(rd.count) == 4 and rd.record.tolist() == [4.0, 6.0, 8.0, 10.0]
    assert torch.allclose(rd.z_score(torch.tensor([7.0 + math.sqrt(20 / 3)])), torch.tensor([1.0]))
    # a constant window gives a finite z (eps), no NaN
    flat = RepresentationDescriptor(dim=4, latent=2, window=4, eps=1e-8)
    flat.push(torch.ones(3))
    assert torch.isfinite(flat.z_score(torch.tensor([1.0, 2.0]))).all()
    assert flat.z_score(torch.tensor([1.0])).item() == 0.0


def test_router_sums_to_one_and_one_adapter_is_that_adapter():
    torch.manual_seed(0)
    mix = AdapterMixture(dim=8, hidden=4, expandable=True, rd_latent=4, window=16, eps=1e-8)
    mix.add()
    torch.nn.init.normal_(mix.adapters[0].up.weight)  # a non-trivial adapter (Up is zero at init)
    r = torch.randn(3, 5, 8)  # (B, N, D)
    assert torch.equal(mix(r), mix.adapters[0](r)), "with one adapter the mixture must be that adapter"
    for _ in range(2):
        mix.add()
        torch.nn.init.normal_(mix.adapters[-1].up.weight)
    w = mix.weights(r)
    assert w.shape == (3, 3) and torch.allclose(w.sum(1), torch.ones(3))
    by_hand = sum(w[:, k].view(3, 1, 1) * mix.adapters[k](r) for k in range(3))
    assert torch.allclose(mix(r), by_hand, atol=1e-6)
    fixed = AdapterMixture(dim=8, hidden=4, expandable=False, rd_latent=4, window=16, eps=1e-8)
    fixed.add()
    with pytest.raises(RuntimeError):
        fixed.add()


def test_block_is_base_block_plus_adapter_on_raw_residual():
    """The injected block computes r + mlp(norm2(r)) + adapter(r), r the un-normalised post-attention residual."""
    cfg = build_config(None, STREAM)
    from cl.runner import build_scenario

    model = build_strategy(cfg, build_scenario(cfg))
    for m in model.mixtures:
        m.add()
    block = model.backbone.blocks[0]
    torch.nn.init.normal_(model.mixtures[0].adapters[0].up.weight)
    x = torch.randn(2, 17, 32)
    r = x + block.attn(block.norm1(x))
    expected = r + block.mlp.base_layer(block.norm2.base_layer(r)) + model.mixtures[0].adapters[0](r)
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_rd_parameters_get_no_gradient_from_ce():
    cfg = build_config(None, STREAM)
    from cl.runner import build_scenario

    sc = build_scenario(cfg)
    model = build_strategy(cfg, sc)
    for m in model.mixtures:
        m.add()
    model.n_seen = 5
    model.requires_grad_(True)  # even trainable RDs must stay out of the CE graph
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    model.phase.name = "func"
    model.training_step((x, y), 0).backward()
    rd = model.mixtures[1].descriptors[0]
    assert all(p.grad is None for p in rd.parameters()), "RDs must get no gradient from the classification loss"
    assert model.mixtures[1].adapters[0].up.weight.grad is not None


# ------------------------------------------------------------------------------------------------ a whole stream


def test_expands_only_on_the_shifted_experience(stream_run):
    _, _, results, _ = stream_run
    extras = [e["extra"] for e in results.metrics["experiences"]]
    assert extras[0]["sema/adapters_per_block"] == [1, 1]
    assert extras[1]["sema/expanded_blocks"] == [], "same-distribution data must not expand"
    assert extras[1]["sema/detect_z"]["round0"]["1"][0] < 2.0
    assert extras[2]["sema/expanded_blocks"] == [1], "the inverted experience must expand the expandable block"
    assert extras[2]["sema/detect_z"]["round0"]["1"][0] > 2.0
    assert _adapters(results.metrics) == [[1, 1], [1, 1], [1, 2]]
    assert extras[2]["sema/added_params"] > extras[1]["sema/added_params"]


def test_old_modules_bit_identical_after_later_training(stream_run):
    _, _, _, run_dir = stream_run
    before = load_checkpoint(run_dir / "checkpoints" / "exp1.ckpt")["state_dict"]
    after = load_checkpoint(run_dir / "checkpoints" / "exp2.ckpt")["state_dict"]
    old = [k for k in before if not k.startswith("classifier.")]
    assert any(".router.0." in k for k in old) and any(".descriptors.0.record" in k for k in old)
    changed = [k for k in old if not torch.equal(before[k], after[k])]
    assert not changed, f"old adapters/descriptors/router columns/backbone changed: {changed[:5]}"
    new = "backbone.blocks.1.mlp.pet_modules.sema.adapters.1.up.weight"
    assert new not in before and after[new].abs().sum() > 0, "the new adapter must have trained"
    assert int(after["backbone.blocks.1.mlp.pet_modules.sema.descriptors.1.count"]) == 64, "new RD window filled"


def test_checkpoint_after_expansion_restores_same_shape_and_outputs(stream_run):
    cfg, runner, _, run_dir = stream_run
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    fresh = build_strategy(cfg, runner.scenario)
    restore_model(fresh, state)
    assert [len(m) for m in fresh.mixtures] == [1, 2]
    exp = runner.scenario.experiences[-1]
    x = torch.stack([exp.test.source[int(i)] for i in exp.test.indices[:16]])
    runner.model.cpu().eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(runner.model(runner.model.eval_transform(x)), fresh(fresh.eval_transform(x)))
    z = fresh.novelty(fresh.eval_transform(x))
    assert list(z) == [1] and len(z[1]) == 2 and min(z[1]) < 2.0, "the new RD knows the shifted data"


def test_paper_configs_load_and_stop_offline(capsys):
    configs = sorted((REPO / "configs" / "sema").glob("*.yaml"))
    names = {p.stem for p in configs}
    assert {"cpu", "cifar100", "imagenet_r_5", "imagenet_r_10", "imagenet_r_20", "imagenet_a", "vtab"} <= names
    for path in configs:
        cfg = build_config(str(path))
        assert cfg.strategy.name == "sema"
        if path.stem == "cpu":
            continue
        assert cfg.backbone.model == "vit_base_patch16_224.augreg2_in21k_ft_in1k" and cfg.backbone.pretrained
        assert list(cfg.strategy.expandable_blocks) == [9, 10, 11] and cfg.data.batch_size == 32
        code = cl_main(["train", f"config={path}", "data.root=/nonexistent", "run.root=/tmp/sema_offline"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "error" in err, (path.name, err)
    out = cl_cli(["train", "config=configs/sema/cifar100.yaml", "data.root=/nonexistent", "run.root=/tmp/sema_off"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_take_the_same_expansion_decisions(stream_run, tmp_path):
    _, _, results, _ = stream_run
    out = cl_cli(["train", *STREAM, f"run.dir={tmp_path / 'two'}", "trainer.devices=2", "trainer.strategy=ddp"])
    assert out.returncode == 0, out.stderr[-3000:]
    hashes = json.loads((tmp_path / "two" / "state_hashes.json").read_text())["ranks"]
    assert len(hashes) == 2 and hashes[0] == hashes[1], "parameters, RD windows or adapters differ between ranks"
    two = read_metrics(tmp_path / "two")
    assert two["world_size"] == 2
    assert _adapters(two) == _adapters(results.metrics) == [[1, 1], [1, 1], [1, 2]]


def test_contract_overrides_are_tiny():
    assert any("depth=2" in o for o in SEMA.contract_overrides)


# ------------------------------------------------------------------------------------------------ detection rule


class _Dist:
    @staticmethod
    def all_reduce_sum(t):
        return t


class _Ctx:
    """The parts of RunContext that detection uses: a loader of ``n_batches`` batches, seeds, identity reduce."""

    def __init__(self, n_batches: int) -> None:
        self.n_batches, self.device, self.dist, self.passes = n_batches, torch.device("cpu"), _Dist(), 0

    def loader(self, data, *, train, batch_size=None, shuffle=None, tag=""):
        self.passes += 1
        return [(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long)) for _ in range(self.n_batches)]

    def seed_for(self, tag: str) -> int:
        return len(tag)


_EXP = type("Exp", (), {"train": None})()  # detection only hands exp.train to the (fake) loader


def _two_expandable_model():
    cfg = build_config(None, [*STREAM, "strategy.expandable_blocks=[0,1]", "strategy.threshold=1.0"])
    from cl.runner import build_scenario

    model = build_strategy(cfg, build_scenario(cfg))
    for m in model.mixtures:
        m.add()
    model.expansions = [[0, 1]]  # experience 0 done
    return model


def _scripted(model, script):
    """Replace the per-batch z computation: ``script[i]`` = {block: mean z} for the i-th scanned batch."""
    calls = []

    def batch_z_sums(ctx, x, candidates):
        z = script[len(calls)] if len(calls) < len(script) else {}
        calls.append(list(candidates))
        return {b: torch.tensor([z.get(b, 0.0) * 2] * len(model.mixtures[b].descriptors) + [2.0],
                                dtype=torch.float64) for b in candidates}

    model._batch_z_sums = batch_z_sums
    return calls


def test_shallower_block_grows_after_a_deeper_one_in_the_same_pass():
    """Official rule: block 0 stays eligible after block 1 expands, and the scan goes on with the next batch."""
    model = _two_expandable_model()
    ctx = _Ctx(n_batches=3)
    # batch 0: only block 1 novel -> expand 1; batch 1 (same pass, block 0 still eligible): block 0 novel -> expand 0
    calls = _scripted(model, [{0: 0.5, 1: 3.0}, {0: 3.0}])
    names = [p.name for p in model.phases(exp=_EXP, ctx=ctx)]
    assert names == ["func1", "rd1", "func0", "rd0"], names
    assert model.expansions[-1] == [1, 0]
    assert [len(m) for m in model.mixtures] == [2, 2]
    assert calls[:2] == [[0, 1], [0]], "after block 1 grew, block 0 (shallower) must stay a candidate"
    assert ctx.passes == 1, "every block grew: no further pass"


def test_detection_repeats_passes_until_one_adds_nothing():
    model = _two_expandable_model()
    ctx = _Ctx(n_batches=2)
    # pass 0: block 1 novel on its last batch; pass 1: block 0 novel only now (e.g. after block 1 changed nothing
    # upstream: a different shuffle); pass 1 therefore grows block 0 and the loop ends (nothing left to grow)
    _scripted(model, [{0: 0.2, 1: 0.2}, {0: 0.2, 1: 5.0}, {0: 4.0}])
    names = [p.name for p in model.phases(exp=_EXP, ctx=ctx)]
    assert names == ["func1", "rd1", "func0", "rd0"] and ctx.passes == 2
    # nothing novel: one pass, no expansion, classifier-only training
    model = _two_expandable_model()
    ctx = _Ctx(n_batches=2)
    _scripted(model, [{0: 0.9, 1: 0.9}, {0: 0.9, 1: 0.9}])
    assert [p.name for p in model.phases(exp=_EXP, ctx=ctx)] == ["classifier"] and ctx.passes == 1
    # a pass that adds something is followed by another one, which here adds nothing
    model = _two_expandable_model()
    ctx = _Ctx(n_batches=2)
    _scripted(model, [{0: 0.2, 1: 5.0}, {0: 0.2}, {0: 0.2}, {0: 0.2}])
    assert [p.name for p in model.phases(exp=_EXP, ctx=ctx)] == ["func1", "rd1"] and ctx.passes == 2
    assert model.expansions[-1] == [1]
