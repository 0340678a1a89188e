"""The paper scenarios on generated miniature copies of each expected folder layout (nothing downloads).

Each copy is a few 8x8 PNGs per class in ``tmp_path``; ``scenario.verify=layout`` accepts the reduced counts,
``verify=full`` must reject them. Errors must name the missing folder, the missing file or the changed list.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cl.config import DataConfig
from cl.data.loaders import make_loader
from cl.errors import DataError
from cl.registry import SCENARIOS
from scenarios.base import pycil_permutation

PYCIL_1993_FIRST10 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def png(path: Path, seed: int, size: int = 8) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def class_tree(folder: Path, classes: list[str], per_class: int, seed: int = 0, sub: str = "") -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(folder / name / sub / f"{name}_{i}.png", seed + 1000 * c + i)


def build(name: str, root: Path, **keys):
    builder = SCENARIOS.get(name)()
    cfg = builder.Config(**{"verify": "layout", "image_size": 8, **keys})
    return builder, builder.build(cfg, DataConfig(root=str(root)))


def sizes(sc) -> list[int]:
    return [e.n_classes for e in sc.experiences]


def check_stream(sc, n_classes: int) -> None:
    """Experiences own contiguous renumbered labels; every sample's label is in its experience."""
    start = 0
    for e in sc.experiences:
        assert e.classes == list(range(start, start + e.n_classes))
        for part in (e.train, e.test):
            assert len(part) > 0 and set(part.targets.tolist()) <= set(e.classes)
        start += e.n_classes
    assert start == sc.n_classes == n_classes


# ------------------------------------------------------------------------------------------------------------- CIFAR


def fake_cifar(root: Path, which: str = "cifar100", per_class: int = 2) -> Path:
    n = 100 if which == "cifar100" else 10
    folder = root / ("cifar-100-python" if n == 100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if n == 100 else "labels"
    rng = np.random.RandomState(0)

    def dump(name: str, labels: list[int]) -> None:
        data = rng.randint(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels}, f)

    train_labels = [c for c in range(n) for _ in range(per_class)]
    if n == 100:
        dump("train", train_labels)
        dump("test", list(range(n)))
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(n)]}, f)
    else:
        for b in range(1, 6):
            dump(f"data_batch_{b}", train_labels)
        dump("test_batch", list(range(n)))
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"c{i}" for i in range(n)]}, f)
    return folder


def test_cifar100_slca_protocol(tmp_path: Path) -> None:
    fake_cifar(tmp_path)
    builder, sc = build("split_cifar100", tmp_path, protocol="slca", image_size=32)
    assert sc.image_size == 224  # the protocol sets the ViT size; image_size=32 is the default, so it is filled
    assert len(sc) == 10 and sizes(sc) == [10] * 10
    assert sc.class_order[:10] == PYCIL_1993_FIRST10
    check_stream(sc, 100)
    e0 = sc.experiences[0]
    assert len(e0.train) == 20 and len(e0.test) == 10
    # the data behind renumbered label 0 is original class 68
    assert e0.train.source.targets[e0.train.indices[e0.train.targets == 0]].tolist() == [68, 68]
    x = e0.train.source.batch(torch.as_tensor(e0.train.indices[:4]))
    assert x.shape == (4, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    # an explicit user key wins over the protocol
    _, sc = build("split_cifar100", tmp_path, protocol="slca", increment=30)
    assert sizes(sc) == [10, 30, 30, 30]


def test_cifar_full_verify_and_missing_file(tmp_path: Path) -> None:
    folder = fake_cifar(tmp_path)
    with pytest.raises(DataError, match="md5"):  # the fake pickles are not torchvision's files
        build("split_cifar100", tmp_path, verify="full")
    (folder / "meta").unlink()
    with pytest.raises(DataError, match=r"missing file '.*cifar-100-python/meta'"):
        build("split_cifar100", tmp_path)
    with pytest.raises(DataError, match=r"missing folder '.*cifar-100-python'.*download=True"):
        build("split_cifar100", tmp_path / "elsewhere")


def test_cifar10_kfpf(tmp_path: Path) -> None:
    fake_cifar(tmp_path, "cifar10")
    _, sc = build("split_cifar10", tmp_path, protocol="kfpf")
    assert sizes(sc) == [2] * 5 and sc.class_order == list(range(10))
    assert len(sc.experiences[0].train) == 2 * 2 * 5  # 2 classes x 2 images x 5 batches


# --------------------------------------------------------------------------------------------------------- ImageNet-R

WNIDS = [f"n{i:08d}" for i in range(4)]


def test_imagenet_r_l2p_and_coda(tmp_path: Path) -> None:
    class_tree(tmp_path / "imagenet-r", WNIDS, 5)
    _, l2p = build("split_imagenet_r", tmp_path, n_experiences=2, split="l2p")
    assert sizes(l2p) == [2, 2] and l2p.class_order == [0, 1, 2, 3]
    check_stream(l2p, 4)
    tr = l2p.experiences[0].train
    assert np.bincount(tr.source.targets).tolist() == [4, 4, 4, 4]  # per class floor(0.8 * 5)
    _, coda = build("split_imagenet_r", tmp_path, n_experiences=4, split="coda")
    assert len(coda.experiences[0].train.source) == 16  # global floor(0.8 * 20)
    # deterministic: the same files give the same split; the two recipes differ
    _, again = build("split_imagenet_r", tmp_path, n_experiences=2, split="l2p")
    assert again.experiences[0].train.source.files == tr.source.files
    assert coda.experiences[0].train.source.files != tr.source.files  # not balanced per class
    # permutation order over the 4 classes follows the PyCIL recipe
    _, perm = build("split_imagenet_r", tmp_path, n_experiences=2, class_order="permutation")
    assert perm.class_order == pycil_permutation(4, 1993)
    bm = perm.benchmark  # the Avalanche export of a file-backed stream has the same experiences
    assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == [[0, 1], [2, 3]]
    assert list(bm.classes_order_original_ids) == perm.class_order
    img = tr.source[int(tr.indices[0])]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8  # the paper pipeline ships uint8 from workers
    _, squash = build("split_imagenet_r", tmp_path, n_experiences=2, split="l2p", pipeline="resize")
    img = squash.experiences[0].train.source[int(tr.indices[0])]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32 and 0 <= float(img.min()) <= float(img.max()) <= 1
    x = bm.train_stream[0].dataset[0][0]  # Avalanche sees float images in [0, 1] either way
    assert x.dtype == torch.float32 and float(x.max()) <= 1
    assert not hasattr(tr.source, "batch")
    x, y = next(iter(make_loader(tr, 4, train=True)))
    assert x.shape == (4, 3, 8, 8) and y.tolist() and set(y.tolist()) <= {0, 1}


def test_imagenet_r_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing folder '.*imagenet-r'.*imagenet-r.tar"):
        build("split_imagenet_r", tmp_path)
    class_tree(tmp_path / "imagenet-r", WNIDS, 5)
    with pytest.raises(DataError, match="has 20 images, expected 30000"):
        build("split_imagenet_r", tmp_path, verify="full")
    with pytest.raises(DataError, match="split=pilot needs"):
        build("split_imagenet_r", tmp_path, split="pilot")
    build("split_imagenet_r", tmp_path, n_experiences=2)  # records the file-list hashes
    record = json.loads((tmp_path / "imagenet-r" / ".cl_filelists.json").read_text())
    assert set(record) == {"l2p/train", "l2p/test"}
    (tmp_path / "imagenet-r" / WNIDS[1] / f"{WNIDS[1]}_3.png").unlink()
    with pytest.raises(DataError, match=r"file list of split 'l2p/(train|test)'.*changed since it was first recorded"):
        build("split_imagenet_r", tmp_path, n_experiences=2)
    (tmp_path / "imagenet-r" / WNIDS[2]).rename(tmp_path / "imagenet-r" / "n99999999")
    with pytest.raises(DataError, match="changed since"):
        build("split_imagenet_r", tmp_path, n_experiences=2)


def test_imagenet_r_lae_lists(tmp_path: Path) -> None:
    """With LAE's train_list.txt / val_list.txt in data.root, split=l2p uses them (the shipped split)."""
    class_tree(tmp_path / "imagenet-r", WNIDS, 3)
    rows = {"train": [], "val": []}
    for c, w in enumerate(WNIDS):
        for i in range(3):
            rows["train" if i < 2 else "val"].append(f"imagenet-r/{w}/{w}_{i}.png {c}")
    for part, r in rows.items():
        (tmp_path / f"{part}_list.txt").write_text("\n".join(r) + "\n")
    _, sc = build("split_imagenet_r", tmp_path, n_experiences=2)
    assert sc.meta["split"] == "l2p-lists" and sc.class_names == WNIDS
    src = sc.experiences[0].test.source
    assert src.files == [f"{w}/{w}_2.png" for w in WNIDS] and src.targets.tolist() == [0, 1, 2, 3]
    (tmp_path / "imagenet-r" / WNIDS[3] / f"{WNIDS[3]}_0.png").unlink()
    with pytest.raises(DataError, match=r"missing file '.*_0.png' \(listed in '.*train_list.txt' line 7\)"):
        build("split_imagenet_r", tmp_path)


def test_imagenet_r_coda_lists(tmp_path: Path) -> None:
    """With CODA-Prompt's YAML lists in data.root, split=coda uses them."""
    import yaml

    class_tree(tmp_path / "imagenet-r", WNIDS, 3)
    for part, keep in (("train", (0, 1)), ("test", (2,))):
        data = [f"data/imagenet-r/{w}/{w}_{i}.png" for w in WNIDS for i in keep]
        targets = [c for c in range(4) for _ in keep]
        (tmp_path / f"imagenet-r_{part}.yaml").write_text(yaml.safe_dump({"data": data, "targets": targets}))
    _, sc = build("split_imagenet_r", tmp_path, split="coda", n_experiences=4)
    assert sc.meta["split"] == "coda-lists" and sizes(sc) == [1] * 4
    assert sc.experiences[0].train.source.files[:2] == [f"{WNIDS[0]}/{WNIDS[0]}_0.png", f"{WNIDS[0]}/{WNIDS[0]}_1.png"]
    (tmp_path / "imagenet-r" / WNIDS[0] / f"{WNIDS[0]}_2.png").unlink()
    with pytest.raises(DataError, match=r"missing file '.*_2.png' \(listed in '.*imagenet-r_test.yaml'\)"):
        build("split_imagenet_r", tmp_path, split="coda")


def test_lae_explicit_orders(tmp_path: Path) -> None:
    fake_cifar(tmp_path, per_class=1)
    _, sc = build("split_cifar100", tmp_path, protocol="lae_order2")
    assert sc.class_order[:5] == [23, 8, 11, 7, 48] and sizes(sc) == [10] * 10  # LAE config, order 2
    _, sc = build("split_cifar100", tmp_path, protocol="lae_order3")
    assert sc.class_order[:5] == [53, 37, 65, 51, 4]
    for name, n in (("split_imagenet_r", 200), ("split_domainnet", 345)):
        for k in ("lae_order2", "lae_order3"):
            assert sorted(SCENARIOS.get(name).protocols[k]["order"]) == list(range(n))


def test_imagenet_r_pilot_folders_and_protocol(tmp_path: Path) -> None:
    names = [f"n{i:08d}" for i in range(40)]
    class_tree(tmp_path / "imagenet-r" / "train", names, 1)
    class_tree(tmp_path / "imagenet-r" / "test", names, 1, seed=7)
    _, sc = build("split_imagenet_r", tmp_path, protocol="sema20")
    assert sc.meta["split"] == "pilot" and sizes(sc) == [10] * 4
    assert sc.class_order == pycil_permutation(40, 1993)
    check_stream(sc, 40)


# ------------------------------------------------------------------------------------------------------ the others


def test_imagenet_a_folders_natural_order(tmp_path: Path) -> None:
    names = [f"n{i:08d}" for i in range(6)]
    class_tree(tmp_path / "imagenet-a" / "train", names, 2)
    class_tree(tmp_path / "imagenet-a" / "test", names, 1, seed=5)
    _, sc = build("split_imagenet_a", tmp_path, protocol="sema", init_classes=2, increment=2)
    assert sizes(sc) == [2, 2, 2] and sc.class_order == list(range(6)) and sc.meta["split"] == "folders"
    check_stream(sc, 6)
    (tmp_path / "imagenet-a" / "test" / names[5]).rename(tmp_path / "imagenet-a" / "test" / "other")
    with pytest.raises(DataError, match="different class folders"):
        build("split_imagenet_a", tmp_path)


def fake_cub(root: Path, n_classes: int = 4, per_class: int = 3) -> Path:
    folder = root / "CUB_200_2011"
    lines, labels, split, classes = [], [], [], []
    k = 1
    for c in range(n_classes):
        cname = f"{c + 1:03d}.Bird_{c}"
        classes.append(f"{c + 1} {cname}")
        for i in range(per_class):
            rel = f"{cname}/Bird_{c}_{i}.png"
            png(folder / "images" / rel, k)
            lines.append(f"{k} {rel}")
            labels.append(f"{k} {c + 1}")
            split.append(f"{k} {int(i < per_class - 1)}")
            k += 1
    for name, rows in (("images.txt", lines), ("image_class_labels.txt", labels), ("train_test_split.txt", split),
                       ("classes.txt", classes)):
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def test_cub_official_split(tmp_path: Path) -> None:
    folder = fake_cub(tmp_path)
    _, sc = build("split_cub200", tmp_path, n_experiences=2)
    assert sizes(sc) == [2, 2] and sc.meta["split"] == "official"
    assert sc.class_names[0] == "001.Bird_0"
    check_stream(sc, 4)
    assert sum(len(e.train) for e in sc.experiences) == 8 and sum(len(e.test) for e in sc.experiences) == 4
    (folder / "images" / "002.Bird_1" / "Bird_1_0.png").unlink()
    with pytest.raises(DataError, match=r"missing file '.*Bird_1_0.png' \(listed in .*images.txt'\)"):
        build("split_cub200", tmp_path)
    (folder / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"missing file '.*train_test_split.txt'"):
        build("split_cub200", tmp_path)


def test_cars_remainder_task(tmp_path: Path) -> None:
    names = [f"car_{i:03d}" for i in range(10)]
    class_tree(tmp_path / "cars" / "train", names, 1)
    class_tree(tmp_path / "cars" / "test", names, 1, seed=3)
    _, sc = build("split_cars196", tmp_path, init_classes=4, increment=4, class_order="permutation")
    assert sizes(sc) == [4, 4, 2]  # PyCIL: the remainder forms one smaller last task
    assert sc.class_order == pycil_permutation(10, 1993)
    check_stream(sc, 10)
    with pytest.raises(DataError, match="has 20 images, expected 16185"):
        build("split_cars196", tmp_path, verify="full")


def fake_domainnet(root: Path, domains: list[str], n_classes: int = 3, per_class: int = 3) -> Path:
    folder = root / "domainnet"
    for d in domains:
        rows = {"train": [], "test": []}
        for c in range(n_classes):
            for i in range(per_class):
                rel = f"{d}/class_{c}/{d}_{c}_{i}.png"
                png(folder / rel, hash((d, c, i)) % 10000)
                rows["train" if i else "test"].append(f"{rel} {c}")
        for part, r in rows.items():
            (folder / f"{d}_{part}.txt").write_text("\n".join(r) + "\n")
    return folder


def test_domainnet_class_and_domain_incremental(tmp_path: Path) -> None:
    folder = fake_domainnet(tmp_path, ["clipart", "real"])
    _, sc = build("split_domainnet", tmp_path, domains=["clipart", "real"], n_classes=3, n_experiences=3)
    assert sizes(sc) == [1, 1, 1] and sc.kind == "class" and sc.class_names == ["class_0", "class_1", "class_2"]
    check_stream(sc, 3)
    assert len(sc.experiences[0].train) == 4  # 2 domains x 2 training images
    _, dom = build("domainnet_domains", tmp_path, domains=["real", "clipart"], n_classes=3)
    assert dom.kind == "domain" and [e.name for e in dom.experiences] == ["real", "clipart"]
    assert all(e.classes == [0, 1, 2] for e in dom.experiences)
    assert all(f.startswith("real/") for f in dom.experiences[0].train.source.files)
    with pytest.raises(DataError, match=r"missing file '.*sketch_train.txt'"):
        build("domainnet_domains", tmp_path, domains=["sketch"], n_classes=3)
    (folder / "real" / "class_1" / "real_1_2.png").unlink()
    with pytest.raises(DataError, match=r"missing file '.*real_1_2.png' \(listed in .*real_train.txt' line"):
        build("domainnet_domains", tmp_path, domains=["real"], n_classes=3)


def test_vtab_and_tinyimagenet(tmp_path: Path) -> None:
    names = [f"vtab_{i:02d}" for i in range(10)]
    class_tree(tmp_path / "vtab" / "train", names, 1)
    class_tree(tmp_path / "vtab" / "test", names, 1, seed=9)
    _, sc = build("split_vtab", tmp_path, protocol="sema", init_classes=5, increment=5)
    assert sizes(sc) == [5, 5] and sc.class_order == list(range(10))

    folder = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in (5, 1, 3, 2)]  # wnids.txt order is the class order
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    class_tree(folder / "train", wnids, 2, sub="images")
    ann = []
    for c, w in enumerate(wnids):
        png(folder / "val" / "images" / f"val_{c}.JPEG", 50 + c)
        ann.append(f"val_{c}.JPEG\t{w}\t0\t0\t8\t8")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    _, sc = build("split_tinyimagenet", tmp_path, n_experiences=2)
    assert sizes(sc) == [2, 2] and sc.class_names == wnids
    check_stream(sc, 4)
    assert sc.experiences[0].test.source.targets.tolist() == [0, 1, 2, 3]
    (folder / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DataError, match=r"missing file '.*val_2.JPEG' \(listed in"):
        build("split_tinyimagenet", tmp_path)


def test_mini_imagenet_csv_layout(tmp_path: Path) -> None:
    folder = tmp_path / "mini-imagenet"
    wnids = [f"n{i:08d}" for i in range(6)]
    for part, ws in (("train", wnids[:3]), ("val", wnids[3:4]), ("test", wnids[4:])):
        rows = ["filename,label"]
        for w in ws:
            for i in range(6):
                png(folder / "images" / f"{w}{i:04d}.jpg", i)
                rows.append(f"{w}{i:04d}.jpg,{w}")
        (folder / f"{part}.csv").write_text("\n".join(rows) + "\n")
    _, sc = build("split_mini_imagenet", tmp_path, protocol="prd", n_experiences=3, test_per_class=1)
    assert sc.image_size == 8 and sizes(sc) == [2, 2, 2]  # the explicit image_size=8 wins over PRD's 64
    check_stream(sc, 6)
    assert sum(len(e.train) for e in sc.experiences) == 30 and sum(len(e.test) for e in sc.experiences) == 6
    assert sc.meta["split"] == "derived-seed0-test1"
    (folder / "val.csv").unlink()
    with pytest.raises(DataError, match=r"missing file '.*val.csv'"):
        build("split_mini_imagenet", tmp_path)


PACS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def test_pacs_domain_incremental(tmp_path: Path) -> None:
    for k, d in enumerate(PACS):
        class_tree(tmp_path / "PACS" / "kfold" / d, PACS_CLASSES, 5, seed=100 * k)
    _, sc = build("pacs_domains", tmp_path)
    assert sc.kind == "domain" and [e.name for e in sc.experiences] == ["sketch", "cartoon", "art_painting", "photo"]
    assert all(e.classes == list(range(7)) for e in sc.experiences)
    assert all(len(e.train) == 28 and len(e.test) == 7 for e in sc.experiences)  # per class 4 / 1
    assert sc.n_classes == 7 and sc.class_names == PACS_CLASSES
    assert sc.experiences[0].train.source[0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"domain folder '.*sketch' has 35 images, expected 3929"):
        build("pacs_domains", tmp_path, verify="full")
    (tmp_path / "PACS" / "kfold" / "photo" / "horse").rename(tmp_path / "PACS" / "kfold" / "photo" / "horses")
    with pytest.raises(DataError, match=r"missing class folder '.*photo/horse'"):
        build("pacs_domains", tmp_path)


# ---------------------------------------------------------------------------------------------- through the CLI


def test_cl_train_and_data_check_on_a_miniature_copy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cl.cli import main

    class_tree(tmp_path / "data" / "imagenet-r", WNIDS, 5)
    assert main(["data", "check", "scenario=split_imagenet_r", f"data.root={tmp_path / 'data'}",
                 "scenario.verify=layout", "scenario.n_experiences=2"]) == 0
    out = capsys.readouterr().out
    assert "l2p/train: 16 images, 4 classes" in out and "classes per experience [2, 2]" in out
    assert main(["data", "check", "scenario=split_imagenet_r", f"data.root={tmp_path / 'data'}"]) == 2
    assert "has 20 images, expected 30000" in capsys.readouterr().err
    assert main(["data", "check", "scenario=split_cub200", f"data.root={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert "missing folder" in err and "CUB_200_2011" in err and "data.caltech.edu" in err
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    for name in ("split_cifar100", "split_imagenet_r", "pacs_domains", "domainnet_domains", "split_vtab"):
        assert name in listing
    assert "protocol slca: init_classes=20, increment=20, class_order=permutation" in listing
    run_dir = tmp_path / "run"
    assert main(["train", "scenario=split_imagenet_r", f"data.root={tmp_path / 'data'}", "scenario.verify=layout",
                 "scenario.n_experiences=2", "scenario.image_size=8", "backbone=mlp", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false", "trainer.logger=none", "data.batch_size=4",
                 "data.num_workers=1", "run.checkpoint=false", f"run.dir={run_dir}"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_experiences"] == 2
    assert main(["train", "scenario=split_cifar100", f"data.root={tmp_path / 'none'}", f"run.dir={run_dir}2"]) == 2
    assert "download=True" in capsys.readouterr().err
