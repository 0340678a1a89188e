"""DualPrompt: the E-prompt of task t at training and by the query at test, the shared-pool copy, prefixes only at
the chosen blocks, the official key/value reshape, and a real fit that keeps the ViT frozen."""

from __future__ import annotations

import pytest
import torch

from cl.config import build_config
from cl.errors import ConfigError
from cl.peft import active_adapters
from cl.runner import Runner, build_scenario, build_strategy
from cl.utils import seed_everything
from conftest import REPO, TINY, cl_cli

TINY_DP = [*TINY, "strategy=dualprompt", "backbone=vit_p4_w64_d4", "backbone.depth=4", "scenario.image_size=16",
           "strategy.epochs=1", "strategy.g_layers=[0]", "strategy.e_layers=[2,3]", "strategy.pool_size=4",
           "strategy.g_length=2", "strategy.e_length=3", "strategy.lr=0.01", "trainer.limit_train_batches=4",
           "run.checkpoint=false"]


def _model(overrides: list[str] = ()):
    cfg = build_config(None, [*TINY_DP, *overrides])
    return build_strategy(cfg, build_scenario(cfg))


class _Exp:
    def __init__(self, index: int, classes: list[int]) -> None:
        self.index, self.classes = index, classes


def test_task_prompt_at_training_query_at_test():
    torch.manual_seed(0)
    m = _model(["strategy.batchwise_prompt=never"])
    m.on_experience_start(_Exp(0, [0, 1]), None)
    m.on_experience_start(_Exp(1, [2, 3]), None)  # task 1 -> E-prompt 1 at training
    q = torch.eye(64)[[0, 2, 3, 3]]
    with torch.no_grad():
        m.pool.key.zero_()
        m.pool.key[:, :4] = torch.eye(4)
    m.query = lambda x: q
    x = torch.rand(4, 1, 16, 16)
    m.train()
    m(x)
    assert m.last_idx.flatten().tolist() == [1, 1, 1, 1]
    m.eval()
    with torch.no_grad():
        m(x)
    assert m.last_idx.flatten().tolist() == [0, 2, 3, 3]  # the nearest key per sample
    m2 = _model(["strategy.batchwise_prompt=always"])
    m2.n_seen, m2.query = 4, (lambda x: q)
    with torch.no_grad():
        m2.pool.key.copy_(m.pool.key)
        m2.eval()(x)
    assert m2.last_idx.flatten().tolist() == [3, 3, 3, 3]  # the vote


def test_pull_uses_the_task_key_at_training():
    m = _model()
    m.on_experience_start(_Exp(0, [0, 1]), None)
    m.train()
    x = torch.rand(3, 1, 16, 16)
    _, pull = m.prompted(x)
    q = m.query(x)
    cos = torch.nn.functional.cosine_similarity(q, m.pool.key[0:1].expand(3, -1), dim=1)
    assert pull.item() == pytest.approx(cos.sum().item() / 3, rel=1e-5)


def test_shared_pool_copies_the_previous_e_prompt_not_the_key():
    m = _model()
    m.on_experience_start(_Exp(0, [0, 1]), None)
    with torch.no_grad():
        m.pool.prompt[0].fill_(0.25)
    before_key = m.pool.key.detach().clone()
    m.on_experience_start(_Exp(1, [2, 3]), None)
    assert torch.equal(m.pool.prompt[1], m.pool.prompt[0])
    assert torch.equal(m.pool.key, before_key)
    off = _model(["strategy.shared_prompt_pool=false"])
    off.on_experience_start(_Exp(0, [0, 1]), None)
    with torch.no_grad():
        off.pool.prompt[0].fill_(0.25)
    off.on_experience_start(_Exp(1, [2, 3]), None)
    assert not torch.equal(off.pool.prompt[1], off.pool.prompt[0])


def _block_outputs(m, x):
    outs = []
    hooks = [b.register_forward_hook(lambda mod, i, o: outs.append(o.detach().clone())) for b in m.backbone.blocks]
    m.prompted(x)
    for h in hooks:
        h.remove()
    return outs[len(m.backbone.blocks):]  # after the query forward's outputs: the prompted forward's


def _plain_outputs(m, x):
    """Every block's output of the unprompted ViT, computed block by block with the original attention."""
    vit, outs = m.backbone, []
    h = vit._pos_embed(vit.patch_embed(x))
    for b in vit.blocks:
        h = _plain_block(b, h)
        outs.append(h)
    return outs


def test_prefixes_change_only_their_blocks():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    m = _model(["strategy.g_layers=[]", "strategy.e_layers=[2]"]).eval()  # an E-prefix at block 2 only
    with torch.no_grad():
        plain = _plain_outputs(m, x)
        with active_adapters(m.backbone, []):  # the query forward is the unprompted ViT, bit for bit
            assert torch.equal(m.backbone(x), m.backbone.norm(plain[-1])[:, 0])
        outs = _block_outputs(m, x)
    assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1], plain[1])
    assert not torch.allclose(outs[2], plain[2]) and not torch.allclose(outs[3], plain[3])
    g = _model().eval()  # the G-prompt at block 0 changes block 0 already
    with torch.no_grad():
        assert not torch.allclose(_block_outputs(g, x)[0], _plain_outputs(g, x)[0])


def _plain_block(block, h):
    attn = block.attn.base_layer if hasattr(block.attn, "base_layer") else block.attn
    h = h + block.ls1(attn(block.norm1(h)))
    return h + block.ls2(block.mlp(block.norm2(h)))


def test_prefix_attention_by_hand():
    """E-prefix keys/values prepended before [CLS] in every head, no compensation (PreT_Attention)."""
    torch.manual_seed(0)
    m = _model(["strategy.g_layers=[]", "strategy.e_layers=[2]", "strategy.batchwise_prompt=never"]).eval()
    m.n_seen = 4
    wrapper = m.backbone.blocks[2].attn
    a = wrapper.base_layer
    h = torch.randn(2, 17, 64)
    idx = torch.tensor([[1], [3]])
    pre = m.e_prefixes(idx)[0]  # (B, 2, L, D)
    from cl.peft.prompt import feed

    feed(wrapper, "e_prompt", pre[:, 0], pre[:, 1])
    got = wrapper(h)
    qkv = a.qkv(h).reshape(2, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    pk = pre[:, 0].reshape(2, 3, 2, 32).permute(0, 2, 1, 3)
    pv = pre[:, 1].reshape(2, 3, 2, 32).permute(0, 2, 1, 3)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
    expect = a.proj((attn @ v).transpose(1, 2).reshape(2, 17, 64))
    assert torch.allclose(got, expect, atol=1e-5)
    # the entry's own key tokens are keys: sample 0 gets entry 1, sample 1 entry 3
    assert torch.equal(pre[0, 0], m.pool.prompt[1, 0, 0]) and torch.equal(pre[1, 1], m.pool.prompt[3, 0, 1])


def test_official_kv_reshape_reproduces_the_port():
    m = _model(["strategy.official_kv_reshape=true"])
    b = 4
    idx = torch.full((b, 1), 2)  # a batch-wise selection: every row the same entry
    pre = m.e_prefixes(idx)  # (layers, B, 2, L, D)
    e = m.pool.prompt[2]  # (layers, 2, L, D)
    for s in range(b):  # first half: keys as keys and values; second half: values as both
        src = 0 if s < b // 2 else 1
        assert torch.equal(pre[:, s, 0], e[:, src]) and torch.equal(pre[:, s, 1], e[:, src])
    # the port's own expression on the port's layout (layers, 2, pool, L, heads, hd)
    port = m.pool.prompt.detach().permute(1, 2, 0, 3, 4).reshape(2, 2, 4, 3, 2, 32)
    raw = port[:, :, idx]  # (layers, 2, B, 1, L, heads, hd)
    expect = raw.reshape(2, b, 2, 3, 2, 32)
    assert torch.equal(pre.detach().reshape(2, b, 2, 3, 2, 32), expect)


def test_fit_keeps_backbone_frozen_and_trains_prompts(tmp_path):
    cfg = build_config(None, [*TINY_DP, f"run.dir={tmp_path}"])
    seed_everything(cfg.seed)  # as Runner._run: the same initial weights as the run's model
    before = build_strategy(cfg, build_scenario(cfg))
    runner = Runner(cfg)
    runner.run()
    after = runner.model.cpu()
    trainable = sorted(n for n, p in after.named_parameters() if p.requires_grad)
    assert trainable == ["backbone.blocks.0.attn.pet_modules.g_prompt.key",
                         "backbone.blocks.0.attn.pet_modules.g_prompt.value", "head.bias", "head.weight",
                         "pool.key", "pool.prompt"]
    base = {k: v for k, v in before.backbone.state_dict().items() if "pet_modules" not in k}
    now = after.backbone.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in base.items()), "the frozen ViT must stay bit-identical"
    # two experiences: E-prompts 0 and 1 trained (1 started as a copy of 0), 2 and 3 untouched
    assert not torch.equal(before.pool.prompt[0], after.pool.prompt[0])
    assert not torch.equal(after.pool.prompt[1], after.pool.prompt[0])
    assert torch.equal(before.pool.prompt[2:], after.pool.prompt[2:])
    assert torch.equal(before.pool.key[2:], after.pool.key[2:])


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="disjoint"):
        build_config(None, [*TINY_DP, "strategy.g_layers=[2]"])
    cfg = build_config(None, [*TINY_DP, "strategy.e_layers=[7]"])
    with pytest.raises(ConfigError, match="do not exist"):
        build_strategy(cfg, build_scenario(cfg))


@pytest.mark.parametrize("preset", ["cifar100", "imagenet_r"])
def test_paper_presets_stop_offline(preset, tmp_path):
    cfg = build_config(str(REPO / f"configs/dualprompt/{preset}.yaml"))
    assert cfg.data.batch_size == 24 and cfg.strategy.e_layers == [2, 3, 4] and cfg.strategy.g_layers == [0, 1]
    out = cl_cli(["train", f"config=configs/dualprompt/{preset}.yaml", f"run.root={tmp_path}",
                  f"data.root={tmp_path}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and ("not found" in out.stderr or "pretrained" in out.stderr)
