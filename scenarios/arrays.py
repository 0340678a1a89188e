"""``npz``: a class-incremental stream from image arrays in one ``.npz`` file (your own data, or a fixed setup).

The file holds ``train_x``, ``train_y``, ``test_x``, ``test_y``: images as uint8 (0..255) or float ([0, 1]) arrays of
shape (N, H, W) (grey) or (N, H, W, C) / (N, C, H, W), labels as integers. Optional ``mean`` and ``std`` (one value
per channel) give the ``normalized`` input convention; without them they are computed from ``train_x``. The
parity harness (``benchmarks/parity/``) writes its shared data this way, so our runs and the official code's read
the same pixels.

    cl train strategy=finetune scenario=npz scenario.path=data.npz scenario.n_experiences=5
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl.config import DataConfig, ScenarioConfig, opt
from cl.errors import ConfigError, DataError
from cl.registry import register_scenario
from scenarios.base import Scenario, ScenarioBuilder, TensorSource, class_incremental

REQUIRED = ("train_x", "train_y", "test_x", "test_y")


def _to_nchw(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"'{path}': {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scenario.path '{path}' does not exist (an .npz file with {', '.join(REQUIRED)})")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in REQUIRED if k not in f.files]
        if missing:
            raise DataError(f"'{path}' lacks {', '.join(missing)} (it has {', '.join(f.files) or 'nothing'})")
        return {k: f[k] for k in f.files}


@register_scenario("npz")
class ArraysNPZ(ScenarioBuilder):
    description = "class-incremental stream from image arrays in an .npz file (train_x/train_y/test_x/test_y)"

    @dataclass
    class Config(ScenarioConfig):
        name: str = opt("npz", "registered scenario name")
        path: str | None = opt(None, "the .npz file (train_x, train_y, test_x, test_y; optional mean, std)",
                               path=True)

    def build(self, cfg: Config, data: DataConfig) -> Scenario:
        if not cfg.path:
            raise ConfigError("scenario=npz needs scenario.path=FILE.npz")
        arrays = load_npz(cfg.path)
        path = Path(cfg.path)
        tr = _to_nchw(arrays["train_x"], "train_x", path)
        te = _to_nchw(arrays["test_x"], "test_x", path)
        if tr.shape[1:] != te.shape[1:] or tr.shape[-1] != tr.shape[-2]:
            raise DataError(f"'{path}': train_x {tuple(tr.shape[1:])} and test_x {tuple(te.shape[1:])} must be "
                            "square images of one shape")
        train = TensorSource(tr, arrays["train_y"].astype(np.int64))
        test = TensorSource(te, arrays["test_y"].astype(np.int64))
        if "mean" in arrays and "std" in arrays:
            mean, std = tuple(float(v) for v in arrays["mean"]), tuple(float(v) for v in arrays["std"])
        else:
            flat = train.batch(torch.arange(len(train))).transpose(0, 1).reshape(tr.shape[1], -1)
            mean, std = tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist())
        return class_incremental(cfg.name, train, test, cfg, image_size=tr.shape[-1], channels=tr.shape[1],
                                 mean=mean, std=std, augment="crop", meta={"path": str(path)})
