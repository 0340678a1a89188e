"""``ranpac``: the streamed closed form equals a direct ridge solve on the gathered features; G and Q are sums, so two
rank shards give the one-process W (and identical W on both ranks); the random projection comes from the run seed,
the same on every rank and kept by a checkpoint; lambda is the grid value with the best held-out score."""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cl.config import build_config
from cl.data.loaders import make_loader
from cl.runner import Runner, build_scenario, build_strategy
from conftest import TINY
from strategies.ranpac import RIDGE_GRID, split_held_out

FAST = ["strategy=ranpac", *TINY, "backbone=mlp", "strategy.adapt=none", "strategy.projection_dim=96"]


class _Dist:
    """``all_reduce_sum`` across ``world`` threads (a barrier per call), or the identity for one process."""

    def __init__(self, world: int = 1) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def for_rank(self, rank: int) -> SimpleNamespace:
        def all_reduce_sum(t):
            if self.world == 1:
                return t
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            return out

        return SimpleNamespace(all_reduce_sum=all_reduce_sum, rank=rank, world_size=self.world)


def _ctx(rank: int = 0, world: int = 1, seed: int = 0, dist: _Dist | None = None) -> SimpleNamespace:
    """What RanPAC's hooks use from a RunContext: device, rank-sharded loaders, dist, seeded generators, record."""
    dist = dist or _Dist(1)

    def loader(data, *, train, batch_size=None, **_):
        return make_loader(data, batch_size or 64, train=train, rank=rank, world=world)

    def generator(tag):
        s = int.from_bytes(hashlib.sha256(f"{seed}/{tag}".encode()).digest()[:4], "little")
        return torch.Generator().manual_seed(s)

    return SimpleNamespace(device=torch.device("cpu"), loader=loader, dist=dist.for_rank(rank), generator=generator,
                           record=lambda *a: None, records={})


def _gathered(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        x = data.source.batch(torch.as_tensor(data.indices))
        h = model.project(model.features(model.eval_transform(x))).double()
    return h, torch.as_tensor(data.targets)


def test_closed_form_equals_direct_solve_on_gathered_features(tmp_path):
    runner = Runner(build_config(None, [*FAST, f"run.dir={tmp_path / 'run'}"]))
    runner.run()
    model = runner.model.cpu().eval()
    hs, ys = zip(*(_gathered(model, e.train) for e in runner.scenario.experiences))
    h, y = torch.cat(hs), torch.cat(ys)
    onehot = F.one_hot(y, runner.scenario.n_classes).double()
    torch.testing.assert_close(model.gram, h.t() @ h, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(model.q, h.t() @ onehot, rtol=1e-10, atol=1e-6)
    lam = float(model.ridge)
    assert lam in RIDGE_GRID
    w = torch.linalg.solve(h.t() @ h + lam * torch.eye(h.shape[1], dtype=h.dtype), h.t() @ onehot)  # (M, C)
    torch.testing.assert_close(model.weight, w.t().float(), rtol=1e-4, atol=1e-5)
    # the logits are the projected features times that solution
    exp = runner.scenario.experiences[-1]
    x = model.eval_transform(exp.test.source.batch(torch.as_tensor(exp.test.indices[:16])))
    with torch.no_grad():
        f = model.features(x)
        torch.testing.assert_close(model(x), torch.relu(f @ model.w_rand) @ w.float(), rtol=1e-4, atol=1e-4)


def test_two_rank_shards_give_the_one_process_solution():
    cfg = build_config(None, FAST)
    sc = build_scenario(cfg)
    torch.manual_seed(0)
    one = build_strategy(cfg, sc)
    ranks = [build_strategy(cfg, sc) for _ in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    dist = _Dist(2)
    for exp in sc.experiences:
        one.on_experience_start(exp, _ctx())
        one.on_experience_end(exp, _ctx())
        errors: list[BaseException] = []

        def run(rank: int, exp=exp, errors=errors) -> None:
            try:
                ranks[rank].on_experience_start(exp, _ctx(rank, 2, dist=dist))
                ranks[rank].on_experience_end(exp, _ctx(rank, 2, dist=dist))
            except BaseException as err:  # noqa: BLE001 - re-raised below in the main thread
                errors.append(err)
                dist.barrier.abort()

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
    a, b = ranks
    # identical on both ranks (same reduced sums, same lambda); equal to one process up to float32 feature rounding
    # (the backbone's batches differ in size between one and two ranks)
    for name in ("w_rand", "gram", "q", "weight", "ridge"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.w_rand, one.w_rand) and float(a.ridge) == float(one.ridge)
    torch.testing.assert_close(a.gram, one.gram, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.q, one.q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.weight, one.weight, rtol=1e-5, atol=1e-6)


def test_projection_is_seeded_the_same_on_every_rank_and_kept_on_resume():
    cfg = build_config(None, FAST)
    sc = build_scenario(cfg)
    exp = sc.experiences[0]
    models = [build_strategy(cfg, sc) for _ in range(3)]
    for m, (rank, seed) in zip(models, [(0, 0), (1, 0), (0, 1)], strict=True):
        m.on_experience_start(exp, _ctx(rank, 2, seed))
        m.draw_projection(_ctx(rank, 2, seed))
    assert models[0].w_rand.abs().sum() > 0
    assert torch.equal(models[0].w_rand, models[1].w_rand), "ranks must draw the same projection"
    assert not torch.equal(models[0].w_rand, models[2].w_rand), "another run seed draws another projection"
    # a resumed run restores the projection from the checkpoint and never draws it again
    a = models[0]
    a.on_experience_end(exp, _ctx(0, 1, 0))
    fresh = build_strategy(cfg, sc)
    fresh.regrow(a.cl_structure())
    fresh.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(fresh.w_rand, a.w_rand) and bool(fresh.projected)
    nxt = sc.experiences[1]
    fresh.on_experience_start(nxt, _ctx(0, 1, seed=7))  # another seed: a redraw would change w_rand
    fresh.on_experience_end(nxt, _ctx(0, 1, seed=7))
    assert torch.equal(fresh.w_rand, a.w_rand)


def test_ridge_is_the_grid_value_with_the_best_held_out_score():
    for criterion in ("mse", "accuracy"):
        cfg = build_config(None, [*FAST, f"strategy.ridge_criterion={criterion}",
                                  "strategy.ridge_search_precision=float64"])
        sc = build_scenario(cfg)
        model = build_strategy(cfg, sc)
        exp = sc.experiences[0]
        ctx = _ctx(seed=3)
        model.on_experience_start(exp, ctx)
        model.on_experience_end(exp, ctx)
        # by hand: the same seeded 80/20 split, a direct solve per lambda, F.mse_loss or accuracy on the 20 %
        fit, val = split_held_out(exp.train, 0.2, ctx.generator("ranpac/ridge_split"))
        assert len(fit) == int(0.8 * len(exp.train)) and len(fit) + len(val) == len(exp.train)
        assert not set(fit.indices.tolist()) & set(val.indices.tolist())
        hf, yf = _gathered(model, fit)
        hv, yv = _gathered(model, val)
        yf1, yv1 = F.one_hot(yf, exp.n_classes).double(), F.one_hot(yv, exp.n_classes).double()
        scores = []
        for lam in RIDGE_GRID:
            w = torch.linalg.solve(hf.t() @ hf + lam * torch.eye(hf.shape[1], dtype=hf.dtype), hf.t() @ yf1)
            pred = hv @ w
            scores.append(-F.mse_loss(pred, yv1).item() if criterion == "mse"
                          else (pred.argmax(1) == yv).double().mean().item())
        best = RIDGE_GRID[max(range(len(scores)), key=lambda i: (round(scores[i], 9), -i))]
        assert float(model.ridge) == best, (criterion, float(model.ridge), best, scores)
        mine = model.ridge_scores(*_sums(hf, yf1), *_sums(hv, yv1), len(val), hv, yv, ctx)
        # the eigendecomposition route equals the direct solve where the system is well conditioned (lambda >= 1e-2)
        for lam, s, ref in zip(RIDGE_GRID, mine, scores, strict=True):
            if lam >= 1e-2:
                assert abs(s - ref) < 1e-6, (criterion, lam, s, ref)


def _sums(h: torch.Tensor, y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return h.t() @ h, h.t() @ y1


def test_float32_search_is_the_official_procedure():
    """The default search (``ridge_search_precision=float32``) scores each lambda as the official
    ``optimise_ridge_parameter``: ``torch.linalg.solve`` in float32 on the fitting rows, ``F.mse_loss`` on the rest,
    argmin over the grid; here with fewer fitting rows than M (G_fit singular), the regime of RanPAC's first task."""
    g = torch.Generator().manual_seed(0)
    m, n_fit, n_val = 400, 80, 40
    centres = torch.randn(2, 32, generator=g)
    y = torch.arange(n_fit + n_val) % 2
    f = centres[y] + 0.8 * torch.randn(n_fit + n_val, 32, generator=g)
    h = torch.relu(f @ torch.randn(32, m, generator=g))
    y1 = F.one_hot(y, 2).float()
    h64, y64 = h.double(), y1.double()
    sums = (h64[:n_fit].t() @ h64[:n_fit], h64[:n_fit].t() @ y64[:n_fit], h64[n_fit:].t() @ h64[n_fit:],
            h64[n_fit:].t() @ y64[n_fit:])
    official = []  # their code, float32 from the features
    for lam in RIDGE_GRID:
        wo = torch.linalg.solve(sums[0].float() + lam * torch.eye(m), sums[1].float()).T
        official.append(F.mse_loss(h[n_fit:] @ wo.T, y1[n_fit:]).item())
    cfg = build_config(None, [*FAST, "strategy.projection_dim=400"])
    model = build_strategy(cfg, build_scenario(cfg))
    assert model.cfg.ridge_search_precision == "float32"
    scores = model.ridge_scores(*sums, n_val, None, None, _ctx(seed=0))
    for lam, s, ref in zip(RIDGE_GRID, scores, official, strict=True):
        assert -s == pytest.approx(ref, rel=1e-3, abs=1e-6), (lam, -s, ref)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    assert best == min(range(len(official)), key=lambda i: official[i])
    # the exact search differs from it where float32 cannot resolve the singular system
    exact = build_strategy(build_config(None, [*FAST, "strategy.projection_dim=400",
                                              "strategy.ridge_search_precision=float64"]), build_scenario(cfg))
    e_scores = exact.ridge_scores(*sums, n_val, None, None, _ctx(seed=0))
    assert max(abs(a - b) for a, b in zip(e_scores[:3], scores[:3])) > 10 * max(abs(a - b) for a, b in
                                                                                zip(e_scores[-5:], scores[-5:]))
