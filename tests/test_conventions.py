"""``strategy.input_convention`` and ``data.drop_last``: the paper's choice by default, the config's when set."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cl.config import build_config
from cl.data.loaders import RankBatchSampler
from cl.errors import ConfigError
from cl.registry import STRATEGIES
from cl.runner import build_scenario, build_strategy, check_pretrained_convention, drop_last, input_convention
from conftest import TINY

PAPER = {"slca": "normalized", "lae": "unit", "sema": "unit", "prd": "pm1"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_default_is_the_papers_convention_and_the_config_overrides_it(name):
    cfg = build_config(None, [*TINY, f"strategy={name}"])
    assert input_convention(cfg, STRATEGIES.get(name)) == PAPER[name]
    other = "unit" if PAPER[name] != "unit" else "normalized"
    cfg = build_config(None, [*TINY, f"strategy={name}", f"strategy.input_convention={other}"])
    assert input_convention(cfg, STRATEGIES.get(name)) == other


def test_the_model_sees_the_configured_convention():
    base = [*TINY, "strategy=finetune", "scenario.augment=false"]
    x = torch.rand(4, 1, 16, 16)
    outs = {}
    for conv in ("normalized", "unit", "pm1"):
        cfg = build_config(None, [*base, f"strategy.input_convention={conv}"])
        model = build_strategy(cfg, build_scenario(cfg))
        outs[conv] = model.eval_transform(x)
    assert torch.equal(outs["unit"], x)
    assert torch.allclose(outs["pm1"], x * 2 - 1)
    sc = build_scenario(build_config(None, base))
    assert torch.allclose(outs["normalized"], (x - sc.mean[0]) / sc.std[0])


def test_unknown_convention_is_a_config_error():
    with pytest.raises(ConfigError, match="input_convention"):
        build_config(None, [*TINY, "strategy.input_convention=imagenet"])


class _Pretrained(nn.Module):
    pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def test_warns_when_pretrained_weights_expect_other_inputs():
    cfg = build_config(None, [*TINY, "strategy=lae", "backbone=timm", "backbone.pretrained=true"])
    sc = build_scenario(cfg)
    with pytest.warns(UserWarning, match="pre-trained on inputs with mean"):
        check_pretrained_convention(cfg, _Pretrained(), "unit", sc)
    sc.mean, sc.std = _Pretrained.pretrained_cfg["mean"], _Pretrained.pretrained_cfg["std"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_pretrained_convention(cfg, _Pretrained(), "normalized", sc)  # matches: silent
        cfg.backbone.pretrained = False
        check_pretrained_convention(cfg, _Pretrained(), "unit", sc)  # random init: nothing to disagree with


def test_drop_last_follows_the_official_loader_unless_set():
    assert drop_last(build_config(None, [*TINY, "strategy=lae"]), STRATEGIES.get("lae")) is True
    for name in ("slca", "sema", "prd"):
        assert drop_last(build_config(None, [*TINY, f"strategy={name}"]), STRATEGIES.get(name)) is False
    cfg = build_config(None, [*TINY, "strategy=slca", "data.drop_last=true"])
    assert drop_last(cfg, STRATEGIES.get("slca")) is True


@pytest.mark.parametrize(("n", "batch", "world", "sizes"), [
    (10, 4, 1, [4, 4, 2]),
    (9, 4, 1, [4, 4]),       # a tail of one sample would break BatchNorm: dropped
    (14, 6, 2, [3, 3]),      # tail of 2 -> one per rank: dropped
    (16, 6, 2, [3, 3, 2]),   # tail of 4 split over 2 ranks
    (17, 6, 2, [3, 3, 2]),   # tail of 5 -> 4 kept (a multiple of the world size)
])
def test_partial_batch_is_kept_in_equal_shards(n, batch, world, sizes):
    per_rank = [list(RankBatchSampler(n, batch, rank, world, shuffle=True, seed=3, drop_last=False))
                for rank in range(world)]
    for shards in per_rank:
        assert [len(b) for b in shards] == sizes
    seen = sorted(i for shards in per_rank for b in shards for i in b)
    assert len(seen) == len(set(seen)) == world * sum(sizes)
    dropped = list(RankBatchSampler(n, batch, 0, world, shuffle=True, seed=3, drop_last=True))
    assert len(dropped) == n // batch
