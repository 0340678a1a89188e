"""Foundation-level scenario tests: the embedded and local streams, class orders, PyCIL splits, Avalanche export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cl.config import DataConfig, ScenarioConfig
from cl.errors import ConfigError, DataError
from cl.registry import SCENARIOS
from scenarios.base import TensorSource, class_incremental, pycil_permutation, resolve_class_order, split_sizes

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def build(name: str, root: str = "data", **keys):
    builder = SCENARIOS.get(name)()
    return builder.build(builder.Config(**keys), DataConfig(root=root))


def test_pycil_permutation_seed_1993_matches_official_order() -> None:
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    order = pycil_permutation(100, 1993)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # common.md §3, the SLCA/SEMA order
    assert sorted(order) == list(range(100))
    assert np.array_equal(np.random.get_state()[1], before)  # the global NumPy stream is left untouched


def test_split_digits_default_stream() -> None:
    sc = build("split_digits")
    assert len(sc) == 5 and [e.classes for e in sc.experiences] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(len(e.train) for e in sc.experiences) == 1347 and sum(len(e.test) for e in sc.experiences) == 450
    for e in sc.experiences:  # natural order: renumbered label == original label
        assert np.array_equal(e.train.source.targets[e.train.indices], e.train.targets)
        assert set(e.test.targets.tolist()) == set(e.classes)
    x = sc.experiences[0].train.source.batch(torch.as_tensor(sc.experiences[0].train.indices[:3]))
    assert x.shape == (3, 1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert sc.kind == "class" and all(e.task_label == 0 for e in sc.experiences)


def test_permutation_order_renumbers_labels() -> None:
    sc = build("split_digits", class_order="permutation", n_experiences=2)
    order = pycil_permutation(10, 1993)
    assert sc.class_order == order
    e0 = sc.experiences[0]
    originals = e0.train.source.targets[e0.train.indices]
    assert set(originals.tolist()) == set(order[:5])
    assert all(order[new] == old for new, old in zip(e0.train.targets.tolist(), originals.tolist()))


def test_explicit_order_and_its_errors() -> None:
    sc = build("split_digits", class_order="explicit", order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], n_experiences=5)
    e = sc.experiences[0]
    assert set(e.train.source.targets[e.train.indices].tolist()) == {9, 8} and e.classes == [0, 1]
    with pytest.raises(ConfigError, match=r"missing \[9\]"):
        build("split_digits", class_order="explicit", order=list(range(9)))
    with pytest.raises(ConfigError, match="exactly once"):
        build("split_digits", class_order="explicit", order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    with pytest.raises(ConfigError, match=r"unknown or repeated \[10\]"):
        resolve_class_order(ScenarioConfig(class_order="explicit", order=[*range(9), 10]), range(10))


def test_init_increment_with_remainder_task() -> None:
    cars = ScenarioConfig(init_classes=20, increment=20)
    assert split_sizes(196, cars) == [20] * 9 + [16]  # PyCIL: Cars-196, 20/20 -> 9 x 20 + 16
    assert split_sizes(100, ScenarioConfig(init_classes=50, increment=10)) == [50] + [10] * 5
    assert split_sizes(100, ScenarioConfig(n_experiences=20)) == [5] * 20
    with pytest.raises(ConfigError, match="does not divide"):
        split_sizes(10, ScenarioConfig(n_experiences=3))
    with pytest.raises(ConfigError, match="exceeds"):
        split_sizes(10, ScenarioConfig(init_classes=11))
    # the same through a builder: a 7-class stream with init 3 / increment 3 ends with a 1-class task
    rng = np.random.RandomState(0)
    src = TensorSource(torch.from_numpy(rng.rand(70, 1, 4, 4).astype(np.float32)), np.repeat(np.arange(7), 10))
    sc = class_incremental("toy", src, src, ScenarioConfig(init_classes=3, increment=3), image_size=4, channels=1,
                           mean=(0.5,), std=(0.25,))
    assert [e.classes for e in sc.experiences] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [len(e.train) for e in sc.experiences] == [30, 30, 10]


def test_task_labels_give_task_incremental_streams() -> None:
    sc = build("split_digits", task_labels=True)
    assert sc.kind == "task" and [e.task_label for e in sc.experiences] == [0, 1, 2, 3, 4]


def test_avalanche_benchmark_has_the_same_experiences() -> None:
    sc = build("split_digits", class_order="permutation", init_classes=4, increment=3)
    bm = sc.benchmark
    train_stream, test_stream = bm.train_stream, bm.test_stream
    assert len(train_stream) == len(sc) == 3
    for ours, theirs, theirs_test in zip(sc.experiences, train_stream, test_stream):
        assert sorted(theirs.classes_in_this_experience) == ours.classes
        assert len(theirs.dataset) == len(ours.train) and len(theirs_test.dataset) == len(ours.test)
    assert list(bm.classes_order_original_ids) == sc.class_order
    assert [sorted(c) for c in bm.original_classes_in_exp] == [sorted(sc.class_order[e.classes[0]:e.classes[-1] + 1])
                                                               for e in sc.experiences]


@pytest.mark.skipif(not FMNIST_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_split_fmnist_from_the_debian_package() -> None:
    sc = build("split_fmnist", root=str(FMNIST_ROOT))
    assert len(sc) == 5 and sum(len(e.train) for e in sc.experiences) == 60000
    assert sum(len(e.test) for e in sc.experiences) == 10000
    assert all(len(e.test) == 2000 for e in sc.experiences)
    small = build("split_fmnist", root=str(FMNIST_ROOT), train_per_class=10, n_experiences=2)
    assert [len(e.train) for e in small.experiences] == [50, 50]
    x = small.experiences[0].train.source.batch(torch.as_tensor([0, 1]))
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32 and float(x.max()) <= 1


def test_missing_fmnist_root_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scenarios.fmnist as fm

    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "no-debian")
    with pytest.raises(DataError, match=rf"data.root='{tmp_path / 'nowhere'}'.*apt-get install dataset-fashion-mnist"):
        build("split_fmnist", root=str(tmp_path / "nowhere"))


def test_batch_transform_conventions() -> None:
    sc = build("split_digits", augment=False)
    x = torch.full((2, 1, 8, 8), 0.5)
    tr_unit, ev_unit = sc.transforms("unit")
    assert ev_unit(x).shape == (2, 1, 16, 16) and torch.allclose(ev_unit(x), torch.full((2, 1, 16, 16), 0.5))
    _, ev_pm1 = sc.transforms("pm1")
    assert torch.allclose(ev_pm1(x), torch.zeros(2, 1, 16, 16), atol=1e-6)
    _, ev_norm = sc.transforms("normalized")
    assert torch.allclose(ev_norm(x), torch.full((2, 1, 16, 16), (0.5 - 0.3051) / 0.3870), atol=1e-5)
    with pytest.raises(ConfigError, match="unknown input convention"):
        sc.transforms("raw")
