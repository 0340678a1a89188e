"""Pre-training and the proxy protocol: disjoint SOURCE/STREAM halves, a useful committed backbone (linear probe),
clear errors for a checkpoint that does not fit, exact round trips, and hashes that match the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl.backbones import build_backbone
from cl.backbones.base import load_backbone_checkpoint
from cl.config import build_config, section
from cl.errors import UserError
from cl.pretrain import build_pretrain_config, config_hash, pretrain, write_sidecar
from cl.runner import build_scenario
from cl.utils import tensor_hash
from conftest import cl_cli
from scenarios.fmnist import load_fmnist
from scenarios.proxy import proxy_split, source_half, stream_half

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "assets" / "backbones" / "vit_p4_w64_d4_fmnist.pt"
needs_ckpt = pytest.mark.skipif(not CKPT.is_file(), reason="committed pre-trained ViT checkpoint missing")


def _balanced(targets: np.ndarray, per_class: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(targets == c)[:per_class] for c in range(10)]))


def _features(backbone: torch.nn.Module, images: torch.Tensor, size: int = 32) -> torch.Tensor:
    x = F.interpolate(images.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    backbone.eval()
    with torch.no_grad():
        return backbone(x)  # unit ([0, 1]) inputs, the LAE/SEMA/ncm convention


def test_source_and_stream_halves_never_overlap():
    train, _ = load_fmnist("data")
    src, stream = proxy_split(train.targets)
    assert len(np.intersect1d(src, stream)) == 0
    assert len(src) == len(stream) == 30000 and len(np.union1d(src, stream)) == 60000
    assert np.all(np.bincount(train.targets[src]) == 3000)
    assert np.array_equal(src, proxy_split(train.targets)[0]), "the split must be deterministic"
    # every training image of the stream (FMNIST experiences) comes from the STREAM half, none from SOURCE
    sc = build_scenario(build_config(None, ["scenario=proxy_fmnist", "scenario.train_per_class=300"]))
    stream_bytes = {bytes(img.numpy().tobytes()) for img in stream_half("data").images}
    source_set = source_half("data")
    fm = np.concatenate([e.train.indices for e in sc.experiences[:5]])
    imgs = sc.experiences[0].train.source.images[fm]
    assert len(fm) == 3000 and all(bytes(i.numpy().tobytes()) in stream_bytes for i in imgs)
    assert len(source_set) == 30000
    # the last experience is the shifted one: 10 new classes (labels 10..19)
    assert sc.meta["shifted_experiences"] == [5] and sc.experiences[5].classes == list(range(10, 20))


@needs_ckpt
def test_committed_backbone_features_are_linearly_separable():
    """A logistic-regression probe on frozen features of held-out images (STREAM half -> official test set)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    cfg = build_config(None, ["backbone=vit_p4_w64_d4", f"backbone.checkpoint={CKPT}"])
    stream = stream_half("data")
    _, test = load_fmnist("data")
    tr, te = _balanced(stream.targets, 100), _balanced(test.targets, 100)

    def probe(backbone: torch.nn.Module) -> float:
        ftr, fte = _features(backbone, stream.images[tr]).numpy(), _features(backbone, test.images[te]).numpy()
        scaler = StandardScaler().fit(ftr)
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(ftr), stream.targets[tr])
        return float(clf.score(scaler.transform(fte), test.targets[te]))

    pre = probe(build_backbone(section(cfg, "backbone"), (1, 32, 32)))
    torch.manual_seed(0)
    rand = probe(build_backbone(section(build_config(None, ["backbone=vit_p4_w64_d4"]), "backbone"), (1, 32, 32)))
    # measured: pre-trained ~0.83, random init ~0.61, chance 0.10
    assert pre > 0.75, pre
    assert pre > rand + 0.10, (pre, rand)


@needs_ckpt
def test_committed_checkpoint_matches_its_sidecar_and_config():
    side = json.loads(CKPT.with_suffix(".json").read_text())
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert tensor_hash(ckpt["state_dict"]) == ckpt["content_hash"] == side["content_hash"]
    assert ckpt["config_hash"] == side["config_hash"]
    # the committed config regenerates this checkpoint: same canonical config hash
    cfg = build_pretrain_config(str(REPO / side["command"].split("config=")[1].split()[0]))
    assert config_hash(cfg) == side["config_hash"]
    assert CKPT.stat().st_size < 2_000_000 and side["bytes"] == CKPT.stat().st_size
    assert side["metrics"]["heldout_acc_unit"] > 0.7 and side["metrics"]["heldout_acc_normalized"] > 0.7


TINY_PRETRAIN = ["backbone=vit", "backbone.width=16", "backbone.depth=1", "backbone.heads=2", "backbone.patch=4",
                 "pretrain.image_size=16", "pretrain.n_images=300", "pretrain.epochs=1", "pretrain.eval_images=100",
                 "pretrain.warmup_steps=2", "data.batch_size=50"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "tiny.pt"
    cfg = build_pretrain_config(None, [*TINY_PRETRAIN, f"pretrain.output={out}"])
    ckpt = pretrain(cfg, log=lambda _: None)
    write_sidecar(ckpt, out, "test")
    return out


def test_round_trip_reproduces_features_exactly(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"state_dict", "config", "config_hash", "content_hash", "metrics"}
    cfg = build_config(None, ["backbone=vit", "backbone.width=16", "backbone.depth=1", "backbone.heads=2",
                              f"backbone.checkpoint={tiny_ckpt}"])
    loaded = build_backbone(section(cfg, "backbone"), (1, 16, 16))
    fresh = build_backbone(section(build_config(None, ["backbone=vit", "backbone.width=16", "backbone.depth=1",
                                                       "backbone.heads=2"]), "backbone"), (1, 16, 16))
    fresh.load_state_dict(ckpt["state_dict"])
    x = torch.rand(6, 1, 16, 16)
    loaded.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), fresh(x))
    assert tensor_hash(loaded.state_dict()) == ckpt["content_hash"]
    # a bare state dict (any local timm-compatible file) loads the same way
    bare = tiny_ckpt.with_name("bare.pt")
    torch.save(ckpt["state_dict"], bare)
    other = build_backbone(section(build_config(None, ["backbone=vit", "backbone.width=16", "backbone.depth=1",
                                                       "backbone.heads=2"]), "backbone"), (1, 16, 16))
    load_backbone_checkpoint(other, bare)
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), loaded(x))


def test_wrong_shapes_and_tampering_give_clear_errors(tiny_ckpt):
    wide = build_backbone(section(build_config(None, ["backbone=vit", "backbone.width=32", "backbone.depth=1",
                                                      "backbone.heads=2"]), "backbone"), (1, 16, 16))
    with pytest.raises(UserError, match=r"shape mismatch: .*cls_token \(1, 1, 16\) vs model \(1, 1, 32\)"):
        load_backbone_checkpoint(wide, tiny_ckpt)
    deep = build_backbone(section(build_config(None, ["backbone=vit", "backbone.width=16", "backbone.depth=2",
                                                      "backbone.heads=2"]), "backbone"), (1, 16, 16))
    with pytest.raises(UserError, match=r"missing keys: blocks\.1\."):
        load_backbone_checkpoint(deep, tiny_ckpt)
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["cls_token"] += 1.0
    bad = tiny_ckpt.with_name("tampered.pt")
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match="content hash"):
        load_backbone_checkpoint(wide, bad)
    # through the CLI: exit code 2 and one line naming the key
    res = cl_cli(["train", "backbone=vit", "backbone.width=32", f"backbone.checkpoint={tiny_ckpt}",
                  "scenario.image_size=16", "trainer.accelerator=cpu", "run.root=" + str(tiny_ckpt.parent / "r")])
    assert res.returncode == 2 and "cls_token" in res.stderr and "Traceback" not in res.stderr
