"""``ncm`` (SimpleCIL): class means equal a hand computation, rank-sharded sums add up to the one-process sums, and
on the pre-trained ViT it beats sequential fine-tuning on the proxy stream."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cl.config import build_config
from cl.data.loaders import make_loader
from cl.runner import Runner, build_scenario, build_strategy
from conftest import TINY
from strategies.ncm import accumulate

CKPT = Path(__file__).resolve().parents[1] / "assets" / "backbones" / "vit_p4_w64_d4_fmnist.pt"


def _ctx(rank: int = 0, world: int = 1) -> SimpleNamespace:
    """The two things ``NCM.class_sums`` uses from a RunContext: the device and a rank-sharded loader."""
    def loader(data, *, train, batch_size=None, **_):
        return make_loader(data, batch_size or 64, train=train, rank=rank, world=world)

    return SimpleNamespace(device=torch.device("cpu"), loader=loader)


def test_means_equal_hand_computation(tmp_path):
    cfg = build_config(None, ["strategy=ncm", *TINY, f"run.dir={tmp_path / 'run'}"])
    runner = Runner(cfg)
    runner.run()
    model = runner.model.cpu().eval()
    assert model.means.shape[0] == runner.scenario.n_classes == 10
    with torch.no_grad():
        for exp in runner.scenario.experiences:
            x = exp.train.source.batch(torch.as_tensor(exp.train.indices))
            y = torch.as_tensor(exp.train.targets)
            f = model.features(model.eval_transform(x)).double()
            for c in exp.classes:
                hand = f[y == c].mean(0)
                assert int(model.counts[c]) == int((y == c).sum())
                torch.testing.assert_close(model.sums[c], f[y == c].sum(0), rtol=1e-10, atol=1e-9)
                torch.testing.assert_close(model.means[c], hand.float(), rtol=1e-5, atol=1e-6)
        # the logits are cosine similarities to these means
        exp = runner.scenario.experiences[0]
        x = model.eval_transform(exp.test.source.batch(torch.as_tensor(exp.test.indices[:5])))
        f = torch.nn.functional.normalize(model.features(x), dim=1)
        m = torch.nn.functional.normalize(model.means, dim=1)
        torch.testing.assert_close(model(x), f @ m.t())


def test_sums_over_two_rank_shards_add_up_to_all_at_once():
    cfg = build_config(None, ["strategy=ncm", *TINY])
    sc = build_scenario(cfg)
    model = build_strategy(cfg, sc)
    exp = sc.experiences[0]
    model.on_experience_start(exp, SimpleNamespace())
    s_all, c_all = model.class_sums(exp.train, _ctx())
    s0, c0 = model.class_sums(exp.train, _ctx(0, 2))
    s1, c1 = model.class_sums(exp.train, _ctx(1, 2))
    assert torch.equal(c0 + c1, c_all) and int(c_all.sum()) == len(exp.train)
    assert int(c0.sum()) > 0 and int(c1.sum()) > 0
    torch.testing.assert_close(s0 + s1, s_all, rtol=1e-12, atol=1e-9)
    # accumulate itself: two halves of a batch added equal the whole batch
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(50, 7, generator=g), torch.randint(0, 4, (50,), generator=g)
    zs, zc = torch.zeros(4, 7, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)
    a = accumulate(*accumulate(zs, zc, feats[:20], labels[:20]), feats[20:], labels[20:])
    b = accumulate(zs, zc, feats, labels)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    hand = torch.stack([feats[labels == c].double().sum(0) for c in range(4)])
    torch.testing.assert_close(b[0], hand, rtol=1e-12, atol=1e-12)


def test_ncm_regrow_restores_buffer_shapes():
    cfg = build_config(None, ["strategy=ncm", *TINY])
    sc = build_scenario(cfg)
    a = build_strategy(cfg, sc)
    for exp in sc.experiences:
        a.on_experience_start(exp, SimpleNamespace())
        a.on_experience_end(exp, SimpleNamespace(device=torch.device("cpu"), loader=_ctx().loader,
                                                 dist=SimpleNamespace(all_reduce_sum=lambda t: t),
                                                 record=lambda *args: None))
    b = build_strategy(cfg, sc)
    b.regrow(a.cl_structure())
    b.load_state_dict(a.state_dict(), strict=True)
    assert b.sums.shape == a.sums.shape == (10, a.backbone.num_features)
    assert torch.equal(b.means, a.means) and torch.equal(b.counts, a.counts)


@pytest.mark.slow
@pytest.mark.skipif(not CKPT.is_file(), reason="committed pre-trained ViT checkpoint missing")
def test_ncm_on_pretrained_vit_beats_finetune_on_proxy_stream(tmp_path):
    common = ["scenario=proxy_fmnist", "scenario.n_experiences=2", "scenario.shift=none",
              "scenario.train_per_class=100", "scenario.test_per_class=200", "backbone=vit_p4_w64_d4",
              f"backbone.checkpoint={CKPT}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
              "trainer.logger=none", "run.checkpoint=false", "data.eval_batch_size=500"]
    ncm = Runner(build_config(None, ["strategy=ncm", *common, f"run.dir={tmp_path / 'ncm'}"])).run()
    ft = Runner(build_config(None, ["strategy=finetune", "strategy.epochs=1", "strategy.lr=0.01", *common,
                                    f"run.dir={tmp_path / 'ft'}"])).run()
    print(f"ncm last_acc {ncm['last_acc']:.4f}, finetune last_acc {ft['last_acc']:.4f}")
    assert ncm["last_acc"] > 0.65
    assert ncm["last_acc"] > ft["last_acc"] + 0.15, (ncm["last_acc"], ft["last_acc"])
