"""File-backed data: the papers' per-image pipelines in the loader workers, workers by default, evaluation through
the same workers, and the batch transform taking uint8 batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from cl.config import DataConfig
from cl.data import loaders
from cl.data.loaders import default_workers, make_loader
from cl.errors import ConfigError
from cl.registry import SCENARIOS
from scenarios.base import BatchTransform, ExperienceData
from scenarios.folder import FileListSource, paper_transform


def jpeg_tree(folder: Path, classes: int = 2, per_class: int = 4) -> list[tuple[str, int]]:
    from PIL import Image

    rng = np.random.RandomState(0)
    items = []
    for c in range(classes):
        for i in range(per_class):
            h, w = rng.randint(40, 90, size=2)  # odd aspect ratios, as ImageNet-R's
            rel = f"c{c}/img{i}.jpg"
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / rel)
            items.append((rel, c))
    return items


def test_eval_pipeline_is_resize_then_center_crop(tmp_path):
    from PIL import Image

    items = jpeg_tree(tmp_path)
    src = FileListSource(tmp_path, [p for p, _ in items], [c for _, c in items], 32, paper_transform(32, False))
    x = src[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    with Image.open(tmp_path / items[3][0]) as im:
        ref = v2.PILToTensor()(v2.CenterCrop(32)(v2.Resize(37, antialias=True)(im.convert("RGB"))))
    assert torch.equal(x, ref)


def test_train_pipeline_is_random_per_image(tmp_path):
    items = jpeg_tree(tmp_path)
    src = FileListSource(tmp_path, [p for p, _ in items], [c for _, c in items], 32, paper_transform(32, True))
    torch.manual_seed(0)
    a = torch.stack([src[0] for _ in range(4)])
    assert a.shape == (4, 3, 32, 32) and not all(torch.equal(a[0], a[k]) for k in range(1, 4))


def test_workers_give_the_same_evaluation_batches(tmp_path):
    items = jpeg_tree(tmp_path)
    src = FileListSource(tmp_path, [p for p, _ in items], [c for _, c in items], 16, paper_transform(16, False))
    data = ExperienceData(src, np.arange(len(items)), np.asarray([c for _, c in items]))
    main = [x for x, _ in make_loader(data, 3, train=False, num_workers=0)]
    workers = make_loader(data, 3, train=False, num_workers=2)
    assert workers.num_workers == 2 and workers.persistent_workers
    assert all(torch.equal(a, b) for a, b in zip(main, (x for x, _ in workers)))


def test_default_workers_share_the_cpus_of_the_node(monkeypatch):
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 8  # capped
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert default_workers() == 0


def test_batch_transform_takes_uint8_batches():
    class Sc:
        image_size, augment, mean, std = 8, "none", (0.5,), (0.25,)

    tf = BatchTransform(Sc(), "normalized", train=True)
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert torch.allclose(tf(x), (x.float() / 255 - 0.5) / 0.25)


def test_folder_scenarios_use_the_paper_pipeline_by_default(tmp_path):
    names = [f"n{i:08d}" for i in range(4)]
    for part in ("train", "test"):
        for n in names:
            jpeg_tree(tmp_path / "imagenet-a" / part / n, classes=1, per_class=2)
    builder = SCENARIOS.get("split_imagenet_a")()
    sc = builder.build(builder.Config(verify="layout", image_size=16, n_experiences=2), DataConfig(root=str(tmp_path)))
    assert sc.augment == "none"  # the workers augment; the batch transform only maps the convention
    assert sc.experiences[0].train.source.transform is not None
    assert sc.experiences[0].train.source[0].shape == (3, 16, 16)
    old = builder.build(builder.Config(verify="layout", image_size=16, n_experiences=2, pipeline="resize"),
                        DataConfig(root=str(tmp_path)))
    assert old.augment == "crop_flip" and old.experiences[0].train.source.transform is None
    with pytest.raises(ConfigError, match="crop_scale"):
        builder.build(builder.Config(verify="layout", image_size=16, crop_scale=[0.5, 0.1]),
                      DataConfig(root=str(tmp_path)))
