"""cl.peft: injected adapters, LoRA and prefixes on an unmodified timm ViT (hand-computed references)."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cl.peft import (
    AdapterSpec,
    InputTap,
    LoRASpec,
    PrefixAttention,
    PrefixSpec,
    active_adapters,
    copy_adapter,
    ema_update_,
    inject,
    load_pet_state_dict,
    mark_only_pet_trainable,
    pet_parameters,
    pet_state_dict,
    remove,
    set_active,
)

SPECS = {
    "adapter_attn_lae": AdapterSpec(width=5),
    "adapter_mlp_residual_sema": AdapterSpec(width=16, placement="mlp", input="residual", activation="relu",
                                             scale="none"),
    "adapter_mlp_normed_ratio": AdapterSpec(width=0.25, placement="mlp", scale="fixed", scale_value=0.1),
    "adapter_sequential": AdapterSpec(width=4, placement="mlp", mode="sequential"),
    "lora_kv": LoRASpec(rank=5),
    "lora_proj": LoRASpec(rank=3, target_path="attn.proj", slices="all"),
}


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=3, num_heads=2).eval()


def randomize_pet(model: nn.Module) -> None:
    """Move PET parameters away from their (identity) init so placements can be checked by hand."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pet_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_identity_at_init_and_only_pet_gets_gradients(name: str, x: torch.Tensor) -> None:
    vit = tiny_vit()
    ref = vit(x)
    m = copy.deepcopy(vit)
    created = inject(m, [0, 2], SPECS[name], name="online")
    assert len(created) == 2
    assert torch.equal(m(x), ref)  # exactly the unwrapped model's output
    mark_only_pet_trainable(m, "online")
    m(x).pow(2).sum().backward()
    for n, p in m.named_parameters():
        if "pet_modules.online." in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, n
    # the up projection / B gets a gradient at init (otherwise the module could never leave the identity)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pet_parameters(m))


def test_lae_adapter_placement_by_hand(x: torch.Tensor) -> None:
    m = tiny_vit()
    inject(m, [1], AdapterSpec(width=5), name="a")
    randomize_pet(m)
    blk = m.blocks[1]
    ad = blk.attn.pet_modules["a"]
    h = m.patch_embed(x)
    h = m._pos_embed(h)
    h = m.blocks[0](h)
    u = blk.norm1(h)
    expect = h + blk.attn.base_layer(u) + ad.scale.scale * ad.up(nn.functional.gelu(ad.down(u)))
    expect = expect + blk.mlp(blk.norm2(expect))
    torch.testing.assert_close(blk(h), expect)


def test_sema_adapter_reads_raw_residual(x: torch.Tensor) -> None:
    m = tiny_vit()
    inject(m, [0], SPECS["adapter_mlp_residual_sema"], name="a")
    assert isinstance(m.blocks[0].norm2, InputTap)
    randomize_pet(m)
    blk = m.blocks[0]
    ad = blk.mlp.pet_modules["a"]
    h = m._pos_embed(m.patch_embed(x))
    r = h + blk.attn(blk.norm1(h))
    expect = r + blk.mlp.base_layer(blk.norm2.base_layer(r)) + ad.up(torch.relu(ad.down(r)))
    torch.testing.assert_close(blk(h), expect)
    assert blk.norm2.captured is None  # consumed, so the model stays deep-copyable
    copy.deepcopy(m)


def test_kv_lora_equals_weight_delta_and_leaves_q(x: torch.Tensor) -> None:
    m = tiny_vit()
    inject(m, [0], LoRASpec(rank=5), name="a")
    randomize_pet(m)
    qkv = m.blocks[0].attn.qkv
    lo = qkv.pet_modules["a"]
    tokens = torch.randn(2, 7, 32)
    d = 32
    delta_w = torch.cat([torch.zeros(d, d), lo.k.scale.scale * lo.k.lora_B @ lo.k.lora_A,
                         lo.v.scale.scale * lo.v.lora_B @ lo.v.lora_A])
    expect = nn.functional.linear(tokens, qkv.base_layer.weight + delta_w, qkv.base_layer.bias)
    out = qkv(tokens)
    torch.testing.assert_close(out, expect)
    assert torch.equal(out[..., :d], qkv.base_layer(tokens)[..., :d])  # the query slice is untouched


def test_sequential_adapter_by_hand() -> None:
    m = tiny_vit()
    inject(m, [0], SPECS["adapter_sequential"], name="a")
    randomize_pet(m)
    mlp = m.blocks[0].mlp
    ad = mlp.pet_modules["a"]
    t = torch.randn(2, 5, 32)
    h = mlp.base_layer(t)
    torch.testing.assert_close(mlp(t), h + ad.scale.scale * ad.up(nn.functional.gelu(ad.down(h))))


def test_prefix_wrapper_transparent_without_prefix_and_decomposes(x: torch.Tensor) -> None:
    vit = tiny_vit()
    ref = vit(x)
    m = copy.deepcopy(vit)
    inject(m, [0, 1], PrefixSpec(length=3), name="p")
    assert isinstance(m.blocks[0].attn, PrefixAttention)
    with active_adapters(m, []):
        assert torch.equal(m(x), ref)  # no active prefix: the original timm forward, bit for bit
    # exact decomposition: out = (1 - lam) * Attn_orig + Attn_prefix (compensated), before proj
    randomize_pet(m)
    att = m.blocks[0].attn
    a, pre = att.base_layer, att.pet_modules["p"]
    tokens = torch.randn(2, 6, 32)
    b, n, _ = tokens.shape
    q, k, v = a.qkv(tokens).reshape(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    pk, pv = (t.reshape(3, 2, 16).permute(1, 0, 2) for t in pre.tokens())  # (h, L, hd)
    logits_orig = (q * a.scale) @ k.transpose(-2, -1)
    logits_pre = (q * a.scale) @ pk.transpose(-2, -1)
    z = torch.cat([logits_orig, logits_pre], -1).logsumexp(-1, keepdim=True)
    lam = (logits_pre - z).exp().sum(-1, keepdim=True)
    attn_orig = logits_orig.softmax(-1) @ v
    attn_pre = logits_pre.softmax(-1) @ pv
    mixed = ((1 - lam) * attn_orig + attn_pre).transpose(1, 2).reshape(b, n, 32)
    torch.testing.assert_close(att(tokens), a.proj(mixed), rtol=1e-5, atol=1e-6)


def test_prefix_compensation_weights_sum_to_one() -> None:
    m = tiny_vit()
    inject(m, [0], PrefixSpec(length=4), name="p")
    randomize_pet(m)
    att = m.blocks[0].attn
    w, _ = att.attention(torch.randn(3, 9, 32))  # (B, h, N, N+L), prefix at positions 1..4
    prefix_mass = w[..., 1:5].sum(-1)
    torch.testing.assert_close(prefix_mass, torch.ones_like(prefix_mass))
    real_mass = w[..., :1].sum(-1) + w[..., 5:].sum(-1)
    assert (real_mass < 1).all() and (real_mass > 0).all()  # = 1 - lam
    att.pet_modules["p"].compensation = False
    w, _ = att.attention(torch.randn(3, 9, 32))
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 9))  # plain softmax without compensation


def test_prefix_at_init_is_near_but_not_exactly_identity(x: torch.Tensor) -> None:
    """A prefix always takes attention mass lam > 0, so exact identity at init is impossible (module docstring).

    LAE's uniform(0, 0.01) tokens keep the value contribution small; what is exactly true is the decomposition
    tested above and the bit-identical forward without an active prefix.
    """
    vit = tiny_vit()
    ref = vit(x)
    m = copy.deepcopy(vit)
    inject(m, [0, 1, 2], PrefixSpec(length=2, compensation=False), name="p")
    assert not torch.allclose(m(x), ref, atol=1e-4)
    with torch.no_grad():  # zero value tokens: each attention output is exactly (1 - lam) * original
        for blk in m.blocks:
            blk.attn.pet_modules["p"].value.zero_()
    att = m.blocks[0].attn
    t = torch.randn(2, 5, 32)
    w, _ = att.attention(t)
    lam = w[..., 1:3].sum(-1, keepdim=True)  # (B, h, N, 1)
    a = att.base_layer
    q, k, v = a.qkv(t).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    orig = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
    expect = a.proj(((1 - lam) * orig).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(att(t), expect, rtol=1e-5, atol=1e-6)


def test_copy_ema_state_dict_and_remove(x: torch.Tensor) -> None:
    vit = tiny_vit()
    ref = vit(x)
    m = copy.deepcopy(vit)
    inject(m, [0, 1], SPECS["adapter_attn_lae"], name="online")
    mark_only_pet_trainable(m, "online")
    copy_adapter(m, "online", "offline")
    on, off = pet_state_dict(m, "online"), pet_state_dict(m, "offline")
    assert len(on) == len(off) == 10
    assert all(torch.equal(on[k], off[k.replace(".online.", ".offline.")]) for k in on)
    assert not any(p.requires_grad for p in pet_parameters(m, "offline"))
    randomize_pet(m)  # online and offline now differ
    before = {k: v.clone() for k, v in pet_state_dict(m, "offline").items()}
    ema_update_(m, "online", "offline", 0.9)
    after = pet_state_dict(m, "offline")
    for k, v in pet_state_dict(m, "online").items():
        k_off = k.replace(".online.", ".offline.")
        torch.testing.assert_close(after[k_off], 0.9 * before[k_off] + 0.1 * v, rtol=0, atol=1e-7)
    # switching experts changes the output; the active list comes back after the context
    out_on = m(x)
    with active_adapters(m, "offline"):
        out_off = m(x)
    assert not torch.allclose(out_on, out_off) and torch.equal(m(x), out_on)
    # a fresh model with the same injection loads the PET state and reproduces both experts
    fresh = copy.deepcopy(vit)
    inject(fresh, [0, 1], SPECS["adapter_attn_lae"], name="online")
    copy_adapter(fresh, "online", "offline")
    load_pet_state_dict(fresh, pet_state_dict(m))
    assert torch.equal(fresh(x), out_on)
    set_active(fresh, "offline")
    assert torch.equal(fresh(x), out_off)
    # removal gives back the original module tree and output
    remove(m)
    assert sorted(m.state_dict()) == sorted(vit.state_dict())
    assert torch.equal(m(x), ref)


def test_copy_as_buffers_keeps_keys_and_output(x: torch.Tensor) -> None:
    m = tiny_vit()
    inject(m, [0], LoRASpec(rank=2), name="online")
    randomize_pet(m)
    copy_adapter(m, "online", "offline", as_buffers=True)
    off = m.blocks[0].attn.qkv.pet_modules["offline"]
    assert list(off.parameters()) == [] and len(list(off.buffers())) == 6  # A, B, scale for K and V
    assert sorted(pet_state_dict(m, "offline")) == sorted(k.replace(".online.", ".offline.")
                                                         for k in pet_state_dict(m, "online"))
    out_on = m(x)
    with active_adapters(m, "offline"):
        assert torch.equal(m(x), out_on)
    ema_update_(m, "online", "offline", 0.5)  # EMA works on buffers too
    with torch.no_grad():
        m.blocks[0].attn.qkv.pet_modules["online"].k.lora_B.add_(1.0)
    before = off.k.lora_B.clone()
    ema_update_(m, "online", "offline", 0.5)
    torch.testing.assert_close(off.k.lora_B, 0.5 * before + 0.5 * m.blocks[0].attn.qkv.pet_modules["online"].k.lora_B)


def test_bad_specs_raise() -> None:
    with pytest.raises(ValueError, match="width"):
        inject(tiny_vit(), [0], AdapterSpec(width=0))
    with pytest.raises(ValueError, match="placement"):
        AdapterSpec(placement="norm")
    with pytest.raises(ValueError, match="no module"):
        inject(tiny_vit(), [7], AdapterSpec())
    with pytest.raises(ValueError, match="Linear"):
        inject(tiny_vit(), [0], LoRASpec(target_path="mlp"))
