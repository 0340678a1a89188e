"""SEMA parity tools: the whole-run replay's name mapping between THEIR modules and ours, and the draw summary.

The replay itself (``benchmarks/parity/official/sema.py --check-run``) needs the official code; the mapping test
against THEIR ``AdapterModule`` runs only where the mirror is present (skipped in CI).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.parity.common import OFFICIAL, RunResult
from benchmarks.parity.official.sema import _group, _official_names
from benchmarks.parity.sema_draws import summary
from strategies.sema import AdapterMixture


def _mixture(expandable: bool, n: int) -> AdapterMixture:
    m = AdapterMixture(dim=8, hidden=4, expandable=expandable, rd_latent=3, window=10, eps=1e-8)
    for _ in range(n):
        m.add()
    return m


def test_replay_names_cover_every_parameter_of_an_expandable_mixture():
    m = _mixture(True, 3)
    mapped = {name for k in range(3) for name in _official_names(2, k)}
    routers = {f"router.{k}.{p}" for k in range(3) for p in ("weight", "bias")}
    assert {n for n, _ in m.named_parameters()} == mapped | routers
    # THEIR names carry the block and the adapter index; every one is distinct
    theirs = [t for k in range(3) for t in _official_names(2, k).values()]
    assert len(set(theirs)) == len(theirs) and all(t.startswith("backbone.blocks.2.adapter_module.adapters.")
                                                    for t in theirs)
    assert {_group(n) for n, _ in m.named_parameters()} == {"adapters", "rds", "routers"}


def test_replay_names_of_a_plain_block_are_the_adapter_only():
    m = _mixture(False, 1)
    names = {n for n, _ in m.named_parameters()}
    assert names == {k for k in _official_names(0, 0) if k.startswith("adapters.")}


def test_draw_summary_by_hand():
    def res(side: str, seed: int, acc: list[float]) -> RunResult:
        return RunResult(row="sema", side=side, seed=seed, acc=acc, wall_s=0.0)

    s = summary({"ours": [res("ours", 0, [100.0, 40.0]), res("ours", 1, [100.0, 60.0])]})["ours"]
    assert s["n"] == 2 and s["last_mean"] == pytest.approx(50.0) and s["last_std"] == pytest.approx(14.1421356)
    assert (s["last_min"], s["last_max"]) == (40.0, 60.0)
    assert s["avg_inc_mean"] == pytest.approx(75.0) and s["avg_inc_std"] == pytest.approx(7.0710678)


_MIRROR = Path(os.environ.get("CL_PARITY_MIRROR", "/work/.mirror")) / OFFICIAL["sema"][0].replace("/", "+") / "repo"


@pytest.mark.skipif(not _MIRROR.exists(), reason="needs the official SEMA-CL mirror")
def test_replay_names_match_their_adapter_module():
    from benchmarks.parity.common import official_source

    sys.path.insert(0, str(official_source("sema")))
    try:
        import torch
        from torch import nn

        cuda = nn.Module.cuda
        nn.Module.cuda = lambda self, device=None: self  # their module calls .cuda() on routers
        from backbone.sema_block import SEMAModules

        cfg = SimpleNamespace(ffn_num=4, ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1",
                              ffn_adapter_layernorm_option="none", d_model=8, adapt_start_layer=2,
                              adapt_end_layer=3, rd_dim=3, buffer_size=10, exp_threshold=0.6)
        mod = SEMAModules(cfg, layer_id=2, writer=None)
        mod.add_adapter()
        nn.Module.cuda = cuda
        keys = {f"backbone.blocks.2.adapter_module.{k}" for k in mod.state_dict()}
        theirs = {t for k in range(2) for t in _official_names(2, k).values()}
        assert theirs <= keys
        # everything else of theirs is the router (old columns + the new one), which the replay maps by row
        rest = {k.split("adapter_module.", 1)[1] for k in keys - theirs}
        assert rest == {"router.weight", "router.bias", "new_router.weight", "new_router.bias"}
        assert torch.is_tensor(mod.router.weight) and mod.router.weight.shape == (1, 8)
    finally:
        sys.path.remove(str(official_source("sema")))
        for name in [n for n in sys.modules if n == "backbone" or n.startswith("backbone.")]:
            del sys.modules[name]
