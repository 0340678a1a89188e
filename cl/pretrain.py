"""``cl pretrain``: supervised pre-training of a small backbone on the SOURCE half of Fashion-MNIST.

The pre-trained-model strategies (SLCA, LAE, SEMA, ``ncm``) assume a backbone pre-trained on a large source; no
weights can be downloaded here, so this command makes one locally::

    cl pretrain config=configs/pretrain/vit_fmnist.yaml [key=value ...]

It trains ``backbone`` plus a linear head with cross-entropy on the SOURCE half (:func:`scenarios.proxy.source_half`,
never the images of the ``proxy_fmnist`` stream), measures accuracy on the source images and on held-out STREAM
images, and saves (atomically, loadable with ``torch.load(weights_only=True)``)::

    {"state_dict": backbone tensors (no head), "config": resolved YAML, "config_hash": sha256,
     "content_hash": sha256 of the tensors (cl.utils.tensor_hash), "metrics": {...}}

plus a JSON sidecar (same name, ``.json``) with the hashes, the metrics and the command that regenerates it.
``backbone.checkpoint=PATH`` loads the file (:func:`cl.backbones.base.load_backbone_checkpoint`, which also checks
the content hash).

Input convention: SLCA feeds ``normalized`` inputs, LAE and SEMA ``unit`` ([0, 1]) ones. With
``pretrain.input_norm=mixed`` (the default) every training image is drawn in one of the two conventions at random,
so the same backbone serves both (the metrics report accuracy in each). A plain single-process loop, on purpose:
the job is a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from cl.cli import command, split_args
from cl.config import DataConfig, build_config, opt, section
from cl.errors import UserError
from cl.utils import atomic_torch_save, atomic_write_json, seed_everything, tensor_hash

#: keys that do not change the trained weights, left out of the config hash (the pre-training loop is a plain
#: loop of its own: the stream loader's keys, drop_last and num_workers, do not reach it)
HASH_EXCLUDE = (("pretrain", "output"), ("pretrain", "threads"), ("data", "root"), ("data", "num_workers"),
                ("data", "drop_last"))


@dataclass
class PretrainConfig:
    """Keys of the ``pretrain`` section."""

    source: str = opt("fmnist_half", "pre-training data: fmnist_half (the SOURCE half of Fashion-MNIST's train set)",
                      choices=("fmnist_half",))
    n_images: int | None = opt(20000, "class-balanced subset of the source (null = all 30,000)", ge=10)
    image_size: int = opt(32, "input size (must match scenario.image_size when the backbone is used)", ge=8)
    epochs: int = opt(3, "passes over the source images", ge=1)
    lr: float = opt(2e-3, "AdamW peak learning rate", gt=0)
    weight_decay: float = opt(0.05, "AdamW weight decay", ge=0)
    warmup_steps: int = opt(100, "linear warm-up steps before the cosine decay", ge=0)
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing", ge=0)
    augment: bool = opt(False, "random crop (pad image_size/8) on the training images")
    input_norm: str = opt("mixed", "input convention: normalized | unit | mixed (random per image, serves both)",
                          choices=("normalized", "unit", "mixed"))
    eval_images: int = opt(2000, "images used to measure source and held-out (STREAM half) accuracy", ge=10)
    output: str = opt("assets/backbones/pretrained.pt", "checkpoint path (a .json sidecar is written next to it)")
    threads: int | None = opt(None, "torch CPU threads (null = torch's default)", ge=1)


@dataclass
class PretrainRoot:
    """Root of the ``cl pretrain`` config: seed, backbone, data root and batch size, the pretrain section."""

    seed: int = opt(0, "seeds Python, NumPy and torch")
    backbone: Any = None
    data: DataConfig = opt(default_factory=DataConfig)
    pretrain: PretrainConfig = opt(default_factory=PretrainConfig)


def build_pretrain_config(path: str | None, overrides: list[str] | None = None) -> DictConfig:
    return build_config(path, overrides, root_cls=PretrainRoot)


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the canonical config (sorted JSON of the resolved tree, without paths that do not matter)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for sec, key in HASH_EXCLUDE:
        tree.get(sec, {}).pop(key, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _prepare(x: Tensor, size: int, mean: float, std: float, norm: str, augment: bool,
             gen: torch.Generator | None = None) -> Tensor:
    """Resize, optionally crop-augment, and map to the input convention (``mixed``: per image at random)."""
    from scenarios.base import random_crop

    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if augment:
        x = random_crop(x, pad=max(1, size // 8))
    if norm == "unit":
        return x
    normed = (x - mean) / std
    if norm == "normalized":
        return normed
    pick = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(pick.view(-1, 1, 1, 1), normed, x)


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, images: Tensor, labels: Tensor, size: int, norm: str,
             batch: int = 500) -> float:
    """Top-1 accuracy of backbone + head on uint8/float images in one fixed input convention."""
    from scenarios.fmnist import FMNIST_MEAN, FMNIST_STD

    backbone.eval()
    head.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        x = images[i:i + batch].float()
        x = x / 255.0 if images.dtype == torch.uint8 else x
        x = _prepare(x, size, FMNIST_MEAN[0], FMNIST_STD[0], norm, augment=False)
        correct += int((head(backbone(x)).argmax(1) == labels[i:i + batch]).sum())
    return correct / len(labels)


def _balanced(targets: np.ndarray, n: int) -> np.ndarray:
    per = max(1, n // len(np.unique(targets)))
    return np.sort(np.concatenate([np.flatnonzero(targets == c)[:per] for c in np.unique(targets)]))


def pretrain(cfg: DictConfig, log: Any = None) -> dict[str, Any]:
    """Run the pre-training described by ``cfg``; returns the checkpoint dict (also saved to ``pretrain.output``)."""
    from cl.backbones import build_backbone
    from scenarios.fmnist import FMNIST_MEAN, FMNIST_STD
    from scenarios.proxy import source_half, stream_half

    p: PretrainConfig = section(cfg, "pretrain")
    log = log or (lambda msg: print(msg, flush=True))
    if p.threads:
        torch.set_num_threads(p.threads)
    seed_everything(cfg.seed)
    src = source_half(cfg.data.root, p.n_images)
    labels = torch.as_tensor(src.targets)
    # resize once (not per batch): float images at the training size, (N, 1, S, S) in [0, 1]
    images = F.interpolate(src.images.float() / 255.0, size=(p.image_size, p.image_size), mode="bilinear",
                           align_corners=False)
    n_classes = int(labels.max()) + 1
    backbone = build_backbone(section(cfg, "backbone"), (1, p.image_size, p.image_size))
    head = nn.Linear(backbone.num_features, n_classes)
    params = list(backbone.parameters()) + list(head.parameters())
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]  # biases, norms, tokens: no weight decay (ViT practice)
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=p.lr)
    bs = int(cfg.data.batch_size)
    steps_per_epoch = len(labels) // bs
    total = max(1, steps_per_epoch * p.epochs)

    def lr_at(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - p.warmup_steps) / max(1, total - p.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    step, t0 = 0, time.time()
    for epoch in range(p.epochs):
        backbone.train()
        head.train()
        order = torch.randperm(len(labels), generator=gen)
        run_loss, run_correct, seen, t_ep = 0.0, 0, 0, time.time()
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            x = _prepare(images[idx], p.image_size, FMNIST_MEAN[0], FMNIST_STD[0], p.input_norm,
                         p.augment, gen)
            y = labels[idx]
            logits = head(backbone(x))
            loss = F.cross_entropy(logits, y, label_smoothing=p.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            run_loss += loss.item() * len(y)
            run_correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if (b + 1) % 50 == 0:
                rate = seen / (time.time() - t_ep)
                log(f"  step {b + 1}/{steps_per_epoch}: loss {run_loss / seen:.4f}, {rate:.0f} img/s")
        log(f"epoch {epoch + 1}/{p.epochs}: loss {run_loss / seen:.4f}, train acc {run_correct / seen:.4f}, "
            f"{seen * (epoch + 1) / (time.time() - t0):.0f} img/s")
    train_s = time.time() - t0

    stream = stream_half(cfg.data.root)
    ev_src = _balanced(src.targets, p.eval_images)
    ev_held = _balanced(stream.targets, p.eval_images)
    metrics: dict[str, Any] = {"train_seconds": round(train_s, 1), "images_per_second": round(step * bs / train_s, 1),
                               "n_source_images": len(labels), "epochs": p.epochs, "eval_images": len(ev_held)}
    for norm in ("normalized", "unit"):
        metrics[f"source_acc_{norm}"] = round(accuracy(
            backbone, head, images[ev_src], labels[ev_src], p.image_size, norm), 4)
        metrics[f"heldout_acc_{norm}"] = round(accuracy(
            backbone, head, stream.images[ev_held], torch.as_tensor(stream.targets[ev_held]), p.image_size, norm), 4)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()}
    ckpt = {
        "state_dict": state,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "config_hash": config_hash(cfg),
        "content_hash": tensor_hash(state),
        "metrics": metrics,
    }
    atomic_torch_save(ckpt, p.output)
    return ckpt


def write_sidecar(ckpt: dict[str, Any], path: str | Path, command_line: str) -> Path:
    """The JSON next to a checkpoint: hashes, metrics, size and the command that regenerates it."""
    path = Path(path)
    side = path.with_suffix(".json")
    atomic_write_json(side, {
        "file": path.name,
        "bytes": path.stat().st_size,
        "config_hash": ckpt["config_hash"],
        "content_hash": ckpt["content_hash"],
        "command": command_line,
        "metrics": ckpt["metrics"],
        "torch": torch.__version__,
    })
    return side


@command("pretrain")
def cmd_pretrain(args: list[str]) -> int:
    """``cl pretrain config=PATH key=value ...``; ``--help`` lists the keys."""
    config, overrides, flags = split_args(args)
    if "--help" in flags or "-h" in args:
        from cl.config import describe

        for key, default, help_ in describe(PretrainRoot, {"backbone": "vit_p4_w64_d4"}):
            print(f"  {key:<28} {default:<34} {help_}")
        return 0
    cfg = build_pretrain_config(config, overrides)
    out = Path(cfg.pretrain.output)
    if out.suffix != ".pt":
        raise UserError(f"pretrain.output '{out}' must end in .pt (the sidecar gets .json)")
    ckpt = pretrain(cfg)
    side = write_sidecar(ckpt, out, "cl pretrain " + " ".join(shlex.quote(a) for a in args))
    m = ckpt["metrics"]
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) and {side}")
    print(f"config_hash {ckpt['config_hash'][:16]}  content_hash {ckpt['content_hash'][:16]}")
    print("accuracy (normalized / unit inputs): source "
          f"{m['source_acc_normalized']:.4f} / {m['source_acc_unit']:.4f}, held-out STREAM images "
          f"{m['heldout_acc_normalized']:.4f} / {m['heldout_acc_unit']:.4f}")
    return 0
