"""CODA-Prompt: what is special to it, checked by numbers.

Gram-Schmidt growth (new components orthonormal and orthogonal to the old ones), the attention-weighted prompt
against a hand computation, the prefix it puts into a timm ``Attention`` (keys/values prepended before [CLS]),
the orthogonality penalty by hand, the official cosine schedule, and one in-process run on two tiny experiences:
the first experience's components, keys, attention vectors and classifier rows are bit-identical after training
the second, the backbone is bit-identical, only the current chunk and the classifier get gradients.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from cl.callbacks import base as cb_base
from cl.config import build_config
from cl.errors import UserError
from cl.runner import Runner, build_scenario, build_strategy
from conftest import TINY
from strategies.coda_prompt import CodaPool, CodaPrompt, gram_schmidt, ortho_penalty

TINY_CODA = [*TINY, "strategy=coda_prompt", "backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16",
             "strategy.epochs=2", "strategy.blocks=[0,1]", "strategy.pool_size=20", "strategy.prompt_length=4",
             "strategy.lr=0.01", "strategy.ortho_mu=0.1", "trainer.limit_train_batches=4", "run.checkpoint=false"]


def _strategy(overrides: list[str] = ()) -> CodaPrompt:
    cfg = build_config(None, [*TINY_CODA, *overrides])
    return build_strategy(cfg, build_scenario(cfg))


def _ctx(n_exp: int = 2) -> SimpleNamespace:
    """What the hooks read of a RunContext; each generator call seeded differently (``seed_for`` is per experience)."""
    seeds = iter(range(1000))
    return SimpleNamespace(scenario=SimpleNamespace(experiences=[None] * n_exp),
                           generator=lambda tag: torch.Generator().manual_seed(next(seeds)))


def test_gram_schmidt_orthonormal_and_orthogonal_to_old():
    g = torch.Generator().manual_seed(0)
    old = gram_schmidt(torch.zeros(0, 16), 5, g)
    new = gram_schmidt(old, 6, g)
    both = torch.cat([old, new])
    assert new.shape == (6, 16)
    assert torch.allclose(both @ both.T, torch.eye(11), atol=1e-5)
    assert (old @ new.T).abs().max() < 1e-5
    with pytest.raises(ValueError, match="orthogonal"):
        gram_schmidt(both, 6, g)


def test_new_components_are_normalised_standard_normal_draws():
    """The draws the replay overwrites with THEIR rows: ``models/zoo.py:104-122`` makes each new component from
    ``torch.randn_like`` (standard normal) minus its projections, then unit norm; the ``tensor_prompt`` U(0, 1) init
    (zoo.py:342-351) never survives (rows past the current task are zeroed by ``gram_schmidt``'s ``zeros_like``).
    So the first component of a pool is a normalised N(0, I) draw (uniform on the sphere), and later ones are the
    draws' components orthogonal to everything before them."""
    d = 64
    first = gram_schmidt(torch.zeros(0, d), 1, torch.Generator().manual_seed(5))
    v = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.allclose(first[0].double(), v / v.norm(), atol=1e-7)
    # over many pools: coordinates of a uniform unit vector in R^d have mean 0 and variance 1/d (a U(0, 1) start
    # would give a positive mean of about sqrt(3/d) / 2)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([gram_schmidt(torch.zeros(0, d), 10, g) for _ in range(50)])
    assert abs(rows.mean().item()) < 0.01 and abs(rows.var().item() * d - 1) < 0.05
    # a new chunk after trained (not orthonormal) old rows: the official classical Gram-Schmidt, written out
    old = torch.randn(12, d, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1
    new = gram_schmidt(old, 3, torch.Generator().manual_seed(2))
    g2, basis, expect = torch.Generator().manual_seed(2), [u for u in old.double()], []
    for _ in range(3):
        vk = torch.randn(d, generator=g2, dtype=torch.float64)
        uk = vk - sum((vk @ u) / (u @ u) * u for u in basis)  # projections of the draw, not of the residual
        basis.append(uk)
        expect.append(uk / uk.norm())
    assert torch.allclose(new.double(), torch.stack(expect), atol=1e-6)


def test_classifier_init_is_pytorch_default():
    """The official classifier is a plain ``nn.Linear(768, num_classes)`` (``models/zoo.py:374``; the parity shim
    makes it ``nn.Linear(64, ...)``, the same default init): weight and bias U(-1/sqrt(D), 1/sqrt(D)), not a
    trunc-normal or zero head."""
    torch.manual_seed(0)
    model = _strategy()
    w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    bound = 1 / math.sqrt(w.shape[1])
    assert w.abs().max() <= bound and b.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound and b.abs().min() > 0


def test_growth_freezes_old_chunks_and_stays_orthogonal():
    model = _strategy()
    ctx = _ctx(2)
    for i, classes in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        model.on_experience_start(SimpleNamespace(index=i, classes=classes), ctx)
    assert model.known == 5 and model.n_seen == 10
    for pool in model.pools:
        assert pool.sizes == [10, 10]  # pool_size 20 over 2 experiences
        k, a, p = pool.all_components()
        flat = p.reshape(20, -1)
        for t in (k, a, flat):
            assert torch.allclose(t @ t.T, torch.eye(20), atol=1e-5)
        assert pool.ortho_loss() < 1e-9
        assert [t.requires_grad for t in pool.keys] == [False, True]
        assert [t.requires_grad for t in pool.prompts] == [False, True]
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "pet_modules" not in n)


def test_prompt_is_the_attention_weighted_sum_by_hand():
    torch.manual_seed(0)
    pool = CodaPool(dim=6, key_dim=6, length=4)
    pool.grow(3, torch.Generator().manual_seed(1))
    pool.grow(2, torch.Generator().manual_seed(2))
    q = torch.randn(2, 6)
    k, a, p = pool.all_components()
    want = torch.zeros(2, 4, 6)
    for b in range(2):
        for m in range(5):
            aq = q[b] * a[m]
            alpha = float(aq @ k[m]) / (float(aq.norm()) * float(k[m].norm()))
            want[b] += alpha * p[m]
    assert torch.allclose(pool.prompt(q), want, atol=1e-6)
    pool.query = q
    pk, pv = pool.tokens()
    assert torch.equal(pk, pool.prompt(q)[:, :2]) and torch.equal(pv, pool.prompt(q)[:, 2:])


def test_prefix_prepended_to_keys_and_values_of_every_head():
    model = _strategy()
    model.on_experience_start(SimpleNamespace(index=0, classes=[0, 1, 2, 3, 4]), _ctx(2))
    wrapper = model.backbone.blocks[0].attn
    pool, attn = model.pools[0], wrapper.base_layer
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64)  # (B, N, D) tokens entering block 0's attention
    q = torch.randn(3, 64)
    pool.query = q
    out = wrapper(x)
    pool.query = None
    # by hand: the timm attention with L/2 = 2 prompt keys and values before the [CLS] position
    pk, pv = pool.prompt(q)[:, :2], pool.prompt(q)[:, 2:]
    h, hd = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(3, 17, 3, h, hd).permute(2, 0, 3, 1, 4)
    qq, kk, vv = qkv[0], qkv[1], qkv[2]
    kk = torch.cat([pk.reshape(3, 2, h, hd).permute(0, 2, 1, 3), kk], dim=2)
    vv = torch.cat([pv.reshape(3, 2, h, hd).permute(0, 2, 1, 3), vv], dim=2)
    w = (qq @ kk.transpose(-2, -1) * hd ** -0.5).softmax(-1)
    want = attn.proj((w @ vv).transpose(1, 2).reshape(3, 17, h * hd))
    assert torch.allclose(out, want, atol=1e-5)


def test_query_is_the_unprompted_vit():
    model = _strategy()
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    model.on_experience_start(SimpleNamespace(index=0, classes=[0, 1, 2, 3, 4]), _ctx(2))
    from cl.peft import active_adapters

    with active_adapters(model.backbone, []):
        plain = model.backbone(x)
    assert torch.equal(model.query(x), plain)
    assert not torch.allclose(model.prompted_features(x), plain)  # the prompts do change the features


def test_ortho_penalty_by_hand():
    t = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0]])  # t t^T - I = [[0, 2], [2, 3]] -> mean of squares 17 / 4
    assert math.isclose(float(ortho_penalty(t)), 4.25)
    pool = CodaPool(dim=2, key_dim=4, length=2)
    pool.regrow([2])
    with torch.no_grad():
        pool.keys[0].copy_(t)
        pool.attn[0].copy_(torch.eye(4)[:2])  # orthonormal: 0
        pool.prompts[0].copy_(torch.ones(2, 2, 2))  # flat rows of four ones: P P^T - I = [[3, 4], [4, 3]] -> 12.5
    assert math.isclose(float(pool.ortho_loss()), 4.25 + 0.0 + 12.5)


def test_official_cosine_schedule_as_it_runs():
    model = _strategy()
    # the rates their learner logs ("LR:") per epoch on the 5-epoch parity row: their own _LRScheduler starts one
    # step behind, so epochs 0 and 1 both run at the base rate and the last at 0.39, not at cos(99 pi / 200)
    logged = [0.001, 0.001, 0.0009253751992908621, 0.0007126385189252054, 0.0003935408236546514]
    assert all(math.isclose(0.001 * model.lr_factor(e, 5), lr, rel_tol=1e-12) for e, lr in enumerate(logged))
    lrs = [model.lr_factor(e, 20) for e in range(20)]
    assert lrs[0] == lrs[1] == 1.0 and math.isclose(lrs[-1], math.cos(99 * math.pi * 18 / (200 * 19)))
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert model.lr_factor(0, 1) == 1.0


def test_config_errors_are_one_line():
    with pytest.raises(UserError, match="pool_size=100 exceeds the ViT width 64"):
        _strategy(["strategy.pool_size=100"])
    with pytest.raises(UserError, match="prompt_length=3 must be even"):
        build_config(None, [*TINY_CODA, "strategy.prompt_length=3"])
    with pytest.raises(UserError, match="blocks"):
        _strategy(["strategy.blocks=[5]"])


# ------------------------------------------------------------------------------------------------ a real run
class _Recorder(cb_base.CLCallback):
    fits: list[dict] = []

    def trainer_callbacks(self, ctx):
        rec = _Recorder

        class Fit(pl.Callback):
            def on_train_start(self, trainer, module):
                rec.fits.append({"exp": module.exp_index, "grads": None, "lrs": [],
                                 "state": {k: v.detach().clone() for k, v in module.state_dict().items()}})

            def on_train_epoch_start(self, trainer, module):
                rec.fits[-1]["lrs"].append(trainer.optimizers[0].param_groups[0]["lr"])

            def on_after_backward(self, trainer, module):
                if rec.fits[-1]["grads"] is None:
                    rec.fits[-1]["grads"] = sorted(n for n, p in module.named_parameters() if p.grad is not None)

            def on_train_end(self, trainer, module):
                rec.fits[-1]["end"] = {k: v.detach().clone() for k, v in module.state_dict().items()}

        return [Fit()]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coda")
    cfg = build_config(None, [*TINY_CODA, f"run.dir={tmp / 'run'}"])
    _Recorder.fits = []
    saved = cb_base.CALLBACKS
    import cl.runner

    cb_base.CALLBACKS = cl.runner.CALLBACKS = saved + [_Recorder]
    try:
        runner = Runner(cfg)
        results = runner.run()
    finally:
        cb_base.CALLBACKS = cl.runner.CALLBACKS = saved
    return runner, results, list(_Recorder.fits)


def test_old_components_and_rows_bit_identical_after_later_training(recorded_run):
    runner, results, fits = recorded_run
    assert [f["exp"] for f in fits] == [0, 1]
    first_end, second_start, second_end = fits[0]["end"], fits[1]["state"], fits[1]["end"]
    old_keys = [k for k in first_end if "pet_modules.coda." in k]
    assert old_keys and all(k.endswith(".0") for k in old_keys)  # after experience 0 only chunk 0 exists
    for k in old_keys:  # chunk 0 of every block: trained in experience 0, frozen in experience 1
        assert torch.equal(second_end[k], first_end[k]), k
    new_keys = [k for k in second_end if "pet_modules.coda." in k and k.endswith(".1")]
    assert new_keys and any(not torch.equal(second_end[k], second_start[k]) for k in new_keys)
    known = len(runner.scenario.experiences[0].classes)
    w0, w1 = second_start["classifier.weight"], second_end["classifier.weight"]
    assert torch.equal(w1[:known], w0[:known]), "earlier classes' rows get no gradient through the masked logits"
    assert not torch.equal(w1[known:known * 2], w0[known:known * 2])
    # the backbone (everything outside the pools and the classifier) never changes
    for k, v in fits[0]["state"].items():
        if "pet_modules" not in k and not k.startswith("classifier."):
            assert torch.equal(second_end[k], v), k
    assert results.metrics["experiences"][-1]["passes"].keys() == {"main"}


def test_gradients_only_for_the_current_chunk_and_classifier(recorded_run):
    _, _, fits = recorded_run
    for fit, chunk in zip(fits, (0, 1)):
        grads = fit["grads"]
        assert grads and all(n.startswith("classifier.") or n.endswith(f".{chunk}") for n in grads), grads
        assert {"classifier.weight", "classifier.bias"} <= set(grads)
    for fit in fits:  # a fresh Adam and schedule per experience; 2 epochs: both at the base rate (the official lag)
        assert fit["lrs"] == [0.01, 0.01], fit["lrs"]
