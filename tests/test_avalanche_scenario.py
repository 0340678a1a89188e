"""Avalanche streams in: ``scenario=avalanche scenario.factory=module:callable scenario.kwargs={...}`` on class-, task-
and domain-incremental benchmarks (labels in our convention, recorded; lazy views), two strategies on a benchmark
built from local data, Avalanche's own SplitFMNIST over local Fashion-MNIST files, and the domain-stream export."""

from __future__ import annotations

import gzip
import json
import shutil
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from cl import cli
from cl.config import build_config, section
from cl.runner import Runner, build_scenario
from conftest import REPO, cl_cli, read_metrics
from scenarios.avalanche import AvalancheSource

FACTORIES = '''
"""Avalanche benchmarks over scikit-learn's bundled digits (no download)."""
import numpy as np
import torch
from sklearn.datasets import load_digits


class Digits(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.targets = x, [int(t) for t in y]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def _split(invert=False):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = 1 - x if invert else x
    cut = int(0.75 * len(x))
    return Digits(x[:cut], d.target[:cut]), Digits(x[cut:], d.target[cut:])


def split_digits(n_experiences=2, seed=0, task_labels=False):
    from avalanche.benchmarks import nc_benchmark
    train, test = _split()
    return nc_benchmark(train, test, n_experiences=n_experiences, task_labels=task_labels, seed=seed,
                        class_ids_from_zero_in_each_exp=task_labels)


def digit_domains():
    from avalanche.benchmarks import dataset_benchmark
    (a, ta), (b, tb) = _split(), _split(invert=True)
    return dataset_benchmark([a, b], [ta, tb])
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    name = f"benches_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _scenario(factory: str, *extra: str):
    cfg = build_config(None, ["scenario=avalanche", f"scenario.factory={factory}", *extra])
    return build_scenario(cfg), cfg


def test_class_task_and_domain_streams_in_our_convention(factories):
    sc, _ = _scenario(f"{factories}:split_digits", "scenario.kwargs={n_experiences: 5, seed: 3}")
    bench = __import__(factories).split_digits(n_experiences=5, seed=3)
    avalanche_order = [c for e in bench.train_stream for c in e.classes_in_this_experience]
    assert sc.kind == "class" and sc.class_order == avalanche_order != sorted(avalanche_order)
    assert [e.classes for e in sc.experiences] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    for e, a in zip(sc.experiences, bench.train_stream):  # renumbered: position in Avalanche's class order
        assert list(e.train.targets) == [avalanche_order.index(int(t)) for t in a.dataset.targets]
        assert isinstance(e.train.source, AvalancheSource) and set(vars(e.train.source)) == {"dataset", "targets"}
    assert sc.meta["labels"]["experiences"][1] == {"task": 0, "original": avalanche_order[2:4], "labels": [2, 4]}
    assert sc.channels == 1 and sc.image_size == 8 and 0.2 < sc.mean[0] < 0.4

    task, _ = _scenario(f"{factories}:split_digits", "scenario.kwargs={n_experiences: 2, task_labels: true}")
    assert task.kind == "task" and [e.task_label for e in task.experiences] == [0, 1]
    assert [e.classes for e in task.experiences] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # (task, class) -> label

    dom, _ = _scenario(f"{factories}:digit_domains")
    assert dom.kind == "domain" and all(e.classes == list(range(10)) for e in dom.experiences)
    assert not dom.meta["labels"]["renumbered"]
    exported = dom.benchmark  # the export covers domain streams
    assert [len(e.dataset) for e in exported.train_stream] == [len(e.train) for e in dom.experiences]
    x, y = exported.test_stream[1].dataset[0][:2]
    assert y == int(dom.experiences[1].test.targets[0])
    assert np.allclose(x.numpy(), dom.experiences[1].test.source[0].numpy())


@pytest.mark.parametrize("strategy", ["finetune", "er"])
def test_strategies_train_on_a_local_avalanche_benchmark(tmp_path, factories, strategy):
    cfg = build_config(None, ["scenario=avalanche", f"scenario.factory={factories}:split_digits",
                              "scenario.kwargs={n_experiences: 2}", f"strategy={strategy}", "strategy.epochs=3",
                              "strategy.lr=0.05", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                              "trainer.logger=none", f"run.dir={tmp_path}"])
    res = Runner(cfg).run()
    assert res["finished"] and len(res["accuracy_matrix"]) == 2
    assert res["accuracy_matrix"][0][0] > 0.5  # 5 digit classes (chance 0.2) after three epochs: it learned
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["scenario"]["class_order"] == build_scenario(cfg).class_order  # the label map is in the run
    assert section(cfg, "scenario").factory.endswith(":split_digits")


@pytest.mark.parametrize("override, message", [
    ("scenario.factory=nomod_zz:make", "cannot import 'nomod_zz'"),
    ("scenario.factory=just_a_name", "is not of the form module:callable"),
    ("scenario.kwargs={n_experience: 2}", "scenario.kwargs do not fit"),
])
def test_factory_mistakes_are_one_line(tmp_path, factories, capsys, override, message):
    args = ["train", "scenario=avalanche", f"scenario.factory={factories}:split_digits", override,
            "trainer.logger=none", f"run.dir={tmp_path}"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def fmnist_root(tmp_path) -> Path:
    """torchvision's layout, ROOT/FashionMNIST/raw/ with the four idx files unzipped, from the Debian package."""
    src = Path("/usr/share/datasets/fashion-mnist")
    if not src.is_dir():
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    raw = tmp_path / "fm" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in src.glob("*-ubyte.gz"):
        with gzip.open(gz) as fin, open(raw / gz.name[:-3], "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return tmp_path / "fm"


@pytest.mark.slow
def test_avalanche_split_fmnist_on_local_files(tmp_path, fmnist_root):
    out = cl_cli(["train", f"config={REPO / 'configs' / 'quickstart.yaml'}", "scenario=avalanche",
                  "scenario.factory=avalanche.benchmarks.classic:SplitFMNIST",
                  f"scenario.kwargs={{n_experiences: 2, dataset_root: '{fmnist_root}', seed: 0}}",
                  "strategy.epochs=1", "trainer.limit_train_batches=40", "trainer.enable_progress_bar=false",
                  f"run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m = read_metrics(tmp_path / "run")
    assert m["finished"] and [len(e["classes"]) for e in m["experiences"]] == [5, 5]
    assert m["accuracy_matrix"][0][0] > 0.5  # 5 clothing classes, 40 batches: well above chance
    assert not (tmp_path / "run" / "data").exists() and not (fmnist_root / "FashionMNIST" / "processed").exists()
