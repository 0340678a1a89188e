"""L2P and the prompt pool: selection, vote, pull term by hand; the prompted forward; a real fit keeps the ViT frozen.

The pool tests use hand-made keys and queries whose cosine similarities are known; the model tests use the tiny timm
ViT of the contract test and compare the prompted forward with a forward written out token by token.
"""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from cl.config import build_config
from cl.errors import ConfigError
from cl.peft import PromptPool, active_adapters
from cl.peft.prompt import l2_normalize, majority_vote
from cl.runner import Runner, build_scenario, build_strategy
from cl.utils import seed_everything
from conftest import REPO, TINY, cl_cli

TINY_L2P = [*TINY, "strategy=l2p", "backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16",
            "strategy.epochs=1", "strategy.pool_size=4", "strategy.top_k=2", "strategy.prompt_length=2",
            "strategy.lr=0.01", "trainer.limit_train_batches=4", "run.checkpoint=false"]


def _pool() -> PromptPool:
    """4 keys along +x, +y, -x, (x+y)/sqrt2 in 2-D; prompts of one token whose value is the entry's id."""
    pool = PromptPool(4, 2, (1, 3))
    with torch.no_grad():
        pool.key.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]))
        pool.prompt.copy_(torch.arange(4.0).view(4, 1, 1).expand(4, 1, 3))
    return pool


def test_pool_init_is_uniform_pm1():
    torch.manual_seed(0)
    pool = PromptPool(50, 16, (5, 16))
    for t in (pool.prompt, pool.key):
        assert t.min() >= -1 and t.max() <= 1 and t.min() < -0.9 and t.max() > 0.9  # U(-1, 1), not U(0, 1)
    assert pool.prompt.shape == (50, 5, 16) and pool.key.shape == (50, 16)


def test_l2_normalize_matches_the_guarded_formula():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))  # zero stays zero (eps guard)


def test_topk_selection_by_cosine_similarity():
    pool = _pool()
    q = torch.tensor([[1.0, 0.1], [0.0, -5.0], [0.2, 1.0]])
    sim = pool.similarity(q)
    s = 1 / math.sqrt(2)
    expect0 = torch.tensor([1.0, 0.1, -1.0, 1.1 * s]) / math.hypot(1.0, 0.1)
    assert torch.allclose(sim[0], expect0, atol=1e-6)
    idx = pool.select(q, top_k=2)
    # sample 0: +x (0.995) then diagonal (0.774); sample 1: -y: -x and +x tie at 0, diagonal -0.71, +y -1
    assert idx[0].tolist() == [0, 3]
    assert set(idx[1].tolist()) == {0, 2}
    assert idx[2].tolist() == [1, 3]


def test_batchwise_vote_and_padding():
    # ids chosen: 3 three times, 1 twice, 0 once -> the top-2 vote is (3, 1), given to every sample
    idx = torch.tensor([[3, 1], [3, 0], [3, 1]])
    assert majority_vote(idx, pool_size=6, top_k=2).tolist() == [3, 1]
    # a single distinct id with top_k=2: the port pads with the smallest chosen id (count 0)
    assert majority_vote(torch.tensor([[2], [2]]), pool_size=4, top_k=2).tolist() == [2, 2]
    pool = _pool()
    q = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.2, 1.0]])
    votes = pool.select(q, top_k=1, batchwise=True)
    assert votes.tolist() == [[0], [0], [0]]  # two of three samples pick +x: everyone gets +x


def test_pull_term_by_hand():
    pool = _pool()
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    idx = torch.tensor([[0, 3], [1, 2]])
    s = 1 / math.sqrt(2)
    expect = ((1.0 + s) + (1.0 + 0.0)) / 2  # sum of cosines of each query with its selected keys, / B
    assert pool.pull(q, idx).item() == pytest.approx(expect, abs=1e-6)
    # the gradient reaches the selected keys only
    pool.pull(q, idx).backward()
    assert pool.key.grad[[0, 1, 2, 3]].abs().sum(1).gt(0).tolist() == [False, True, True, True]  # key 0 at optimum


def _model(overrides: list[str] = ()):
    cfg = build_config(None, [*TINY_L2P, *overrides])
    return build_strategy(cfg, build_scenario(cfg))


def test_initial_draws_follow_the_official_distributions():
    """The draws the whole-run replay overwrites with THEIR values (so it cannot see their distribution): the port's
    ``prompt.py:20-34`` U(-1, 1) prompts and keys, and the head of ``vision_transformer.py:410-421,519-524``
    (``init_weights_vit_timm``: ``trunc_normal_(std=.02)``, cut at +-2 absolute, so a plain N(0, 0.02^2) here; bias
    0), not ``nn.Linear``'s own kaiming-uniform (std 1/sqrt(3 D) = 0.072 at D = 64, bias nonzero)."""
    stats = []
    for seed in range(4):
        torch.manual_seed(seed)
        m = _model(["strategy.pool_size=40", "strategy.prompt_length=5"])
        w = m.head.weight.detach()
        assert torch.equal(m.head.bias, torch.zeros_like(m.head.bias))
        stats.append((w.mean().item(), w.std().item(), w.abs().max().item()))
        for t in (m.pool.prompt, m.pool.key):
            assert -1 <= t.min() < -0.95 and 0.95 < t.max() <= 1
            assert abs(t.mean().item()) < 0.05 and abs(t.std().item() - 1 / math.sqrt(3)) < 0.02  # U(-1, 1)
    w_mean, w_std, w_max = (sum(s[i] for s in stats) / len(stats) for i in range(3))
    assert abs(w_mean) < 0.002 and abs(w_std - 0.02) < 0.002 and w_max < 0.1
    assert len({round(s[1], 8) for s in stats}) == len(stats)  # each seed its own draw


def test_prompted_forward_by_hand():
    torch.manual_seed(0)
    m = _model(["strategy.batchwise_prompt=never"]).eval()
    m.n_seen = 4
    vit: VisionTransformer = m.backbone
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        q = vit.norm(vit.blocks(vit._pos_embed(vit.patch_embed(x))))[:, 0]
        idx = torch.topk(l2_normalize(q) @ l2_normalize(m.pool.key).t(), k=2, dim=1).indices
        prompts = m.pool.prompt[idx].reshape(3, 4, -1) + vit.pos_embed[:, :1]
        t = vit._pos_embed(vit.patch_embed(x))
        t = torch.cat([t[:, :1], prompts, t[:, 1:]], dim=1)  # [CLS, prompts, patches]
        out = vit.norm(vit.blocks(t))
        logits = m.head(out[:, 1:5].mean(1))
        got = m(x)
    assert torch.equal(m.last_idx, idx)
    assert torch.allclose(got, logits[:, :4], atol=1e-5)
    with torch.no_grad(), active_adapters(vit, []):  # the query forward is the unprompted ViT, bit for bit
        assert torch.equal(vit(x), q)


def test_vote_follows_batchwise_mode():
    q = torch.eye(64)[[0, 0, 1, 2, 3]] * 5  # queries along 4 distinct keys; key 0 wins the vote
    for mode, vote_train, vote_eval in (("always", True, True), ("train", True, False), ("never", False, False)):
        m = _model([f"strategy.batchwise_prompt={mode}", "strategy.top_k=1"])
        m.n_seen = 4
        with torch.no_grad():
            m.pool.key.zero_()
            m.pool.key[:, :4] = torch.eye(4)
        m.query = lambda x, q=q: q
        x = torch.rand(5, 1, 16, 16)
        for training, vote in ((True, vote_train), (False, vote_eval)):
            m.train(training)
            with torch.no_grad():
                m(x)
            assert m.last_idx.flatten().tolist() == ([0] * 5 if vote else [0, 0, 1, 2, 3]), (mode, training)


def test_fit_keeps_backbone_frozen_and_trains_pool_and_head(tmp_path):
    cfg = build_config(None, [*TINY_L2P, f"run.dir={tmp_path}"])
    seed_everything(cfg.seed)  # as Runner._run: the same initial weights as the run's model
    before = build_strategy(cfg, build_scenario(cfg))
    runner = Runner(cfg)
    runner.run()
    after = runner.model.cpu()
    trainable = sorted(n for n, p in after.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight", "pool.key", "pool.prompt"]
    b0, b1 = before.backbone.state_dict(), after.backbone.state_dict()
    assert all(torch.equal(b0[k], b1[k]) for k in b0), "the frozen ViT must stay bit-identical"
    assert not torch.equal(before.pool.prompt, after.pool.prompt)
    assert not torch.equal(before.pool.key, after.pool.key)  # the pull term moves the keys


def test_training_mask_and_pull_in_the_loss():
    torch.manual_seed(0)
    m = _model(["strategy.pull_coeff=0.5"]).train()
    m.n_seen, m.current = 4, [2, 3]
    x, y = torch.rand(5, 1, 16, 16), torch.tensor([2, 3, 3, 2, 2])
    m.log_train_loss = lambda *a, **k: None
    torch.manual_seed(3)
    loss = m.training_step((x, y), 0)
    torch.manual_seed(3)
    logits, pull = m.prompted(x)
    expect = torch.nn.functional.cross_entropy(logits[:, 2:4], y - 2) - 0.5 * pull
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="top_k"):
        build_config(None, [*TINY_L2P, "strategy.top_k=9"])
    cfg = build_config(None, [*TINY_L2P, "backbone=mlp"])
    with pytest.raises(ConfigError, match="VisionTransformer"):
        build_strategy(cfg, build_scenario(cfg))


def test_paper_preset_stops_offline(tmp_path):
    cfg = build_config(str(REPO / "configs/l2p/cifar100.yaml"))
    assert cfg.strategy.lr == pytest.approx(0.03 * 16 / 256) and cfg.data.batch_size == 16
    assert cfg.backbone.model == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    out = cl_cli(["train", "config=configs/l2p/cifar100.yaml", f"run.root={tmp_path}", f"data.root={tmp_path}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and ("not found" in out.stderr or "pretrained" in out.stderr)
