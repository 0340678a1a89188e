"""Official side of the LAE rows: gqk/LAE@1680e49 (``main.py`` + ``libml``), run unmodified on the shared setup.

    python benchmarks/parity/official/lae.py --row lae-adapter --setup SETUP.npz --seed 0 --out result.json

The official entry point is driven as its ``main.py`` does it: ``libml.core.App(datamodule_cls=MyDataModule,
module_cls=MyModule, config_cls=MyConf).main(argv)``, with the config file ``config/vit_{adapter,lora,prefix}.yaml``
(which extends ``base/cifar100_order1.yaml``) read from the extracted source and the tiny-setup values given as
their own command-line overrides (OmegaConf ``key=value``, see ``official_argv``). Their ``Trainer`` (a Lightning
Fabric subclass) runs the task loop, their ``MyModule`` trains (local CE, PET frozen for the first
``num_freeze_epochs`` epochs of tasks >= 1, one Adam per task over all heads + the online PET, ``ModelEmaV2`` offline
PET created at the start of task 1 and updated after every step) and evaluates (max of the two softmaxes) with
their own code. Nothing in the source tree is edited or copied; the runner only swaps in, at run time:

Shims (all applied in :func:`install_shims` / :func:`patch_official` before ``App.main`` runs):

* ``lightning`` (1.9.4 is not installed; pytorch_lightning/lightning_fabric 2.6 are): a ``sys.modules`` stand-in
  whose ``Fabric`` is ``lightning_fabric.Fabric`` with the two 1.9 call conventions the code relies on:
  ``strategy=None`` (their Trainer's single-device reset) -> ``"auto"`` and ``save(content, path)`` (1.9 argument
  order) -> ``save(path, content)``; ``lightning.fabric.strategies`` is ``lightning_fabric.strategies``.
* ``nn.Parameter.__format__``: torch 1.12 formatted any 0-dim tensor as a number (their ``Scaler.extra_repr``
  does ``f"{self.scale:.4f}"`` on a Parameter, logged at every task start); torch 2.14 only does so for plain
  tensors. The stand-in formats a 0-dim Parameter with ``item()``.
* ``dataclasses._get_field``: Python 3.11 rejects their config dataclasses' instance defaults
  (``memory: MemoryConf = MemoryConf()``, a "mutable default"), which 3.8-3.10 accepted; such a default becomes a
  ``default_factory`` returning a copy (OmegaConf's structured config reads the same values).
* ``torchmetrics.Accuracy``: torchmetrics 1.9 requires ``task=``; a minimal stand-in for 0.10's default
  ``Accuracy()`` (top-1 micro accuracy of argmax predictions, ``update/compute/reset``) replaces it.
* ``torchinfo`` (not installed; only its ``summary`` is imported, and ``module.summary_depth=-1`` skips the call),
  ``skimage``, ``imagehash`` and ``datasets`` (imported by continuum 1.2.4 for datasets/scenarios LAE never uses):
  empty ``sys.modules`` stubs (they also keep the slow imports of pyarrow & co. out of the wall time).
  continuum 1.2.4 itself and h5py are installed into the harness venv (``requirements-official.txt``).
* timm 0.5.4 names gone from timm 1.0: ``timm.models.layers.helpers.to_2tuple`` (a module stub re-exporting
  ``timm.layers.to_2tuple``), ``timm.models.helpers.overlay_external_default_cfg`` and
  ``timm.models.vision_transformer._init_vit_weights`` (imported by their Swin file only; never called here).
* Backbone: ``libml.model._BACKBONE["ViT-B_16"]`` (the IN21k ViT-B/16 download) -> THEIR ``VisionTransformer``
  class (``libml/model/backbone/vit.py``, with their PET-aware ``Block``/``Attention``) at the tiny size
  (img 32, patch 4, in_chans 1, width 64, depth 4, heads 2, mlp 4, qkv bias) loaded strictly with the committed
  tiny ViT's weights (``common.vit_state_dict()``: timm and their ViT use the same key names).
* Data: ``DataModule.configure_dataset`` (CIFAR-100 download) -> continuum ``InMemoryDataset`` over the setup
  arrays (grey uint8 32x32; labels already in class order, so ``class_order=None`` = natural order, increment 2).
  ``MyDataModule.train_transform``/``val_transform`` (RandomResizedCrop(224)+flip / Resize(256)+CenterCrop(224) +
  ToTensor) -> ``[ToTensor()]`` (the ``unit`` convention: the paper's ``norm=False``) or ``[ToTensor(),
  Normalize(mean, std)]`` for ``--convention normalized``; no augmentation on either side (common.py).
* Config values (command-line overrides, not code): ``accelerator=cpu``, ``data.dataloader.num_workers=0``,
  ``pin_memory=false``, ``module.summary_depth=-1`` (no torchinfo), the tiny hyper-parameters (``HPARAMS``).
* Recording only (no effect on training): ``MyModule.post_eval_epoch`` is wrapped to keep, after the last
  evaluation of each task, their ensemble/online/offline predictions (``eval_epoch``'s return value), their
  ``val_acc``/``val_task_accs``, and the per-head logit statistics of the online and offline experts on the test
  samples of each seen task after its last epoch (the "newest experience at 0 %" investigation). The seen
  accuracy written to ``--out`` is checked against their own ``val_acc`` counts.
* ``--convention normalized`` (not a row; an extra measurement): both sides on mean/std-normalised inputs.

``torch.set_float32_matmul_precision("medium")`` (their ``libml.core.abc._fix_f32_mp``) is left as they set it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.abc
import importlib.machinery
import sys
import time
import types
from pathlib import Path
from typing import Any

#: the tiny hyper-parameters, identical on both sides (the paper's CIFAR-100 values where they fit the setup)
HPARAMS: dict[str, Any] = {
    "lr": 0.0028125,  # the paper's 0.03 * 24 / 256, Adam, constant (schedule_unit none)
    "batch_size": 24,  # drop_last true (their loader; ours: LAE.drop_last)
    "epochs": 3,  # smoke-scale substitute for 5 (CIFAR-100)
    "num_freeze_epochs": 2,  # ... for 3 of 5
    "ema_decay": 0.995,  # smoke-scale substitute for 0.9999: 75 steps per task here, 1 - 0.995^75 = 31 % per task
    "blocks": [0, 1],  # of 4 (paper: 0-4 of 12)
    "adapter_width": 5,
    "lora_rank": 5,
    "prefix_length": 10,
    "convention": "unit",  # the paper's ToTensor-only inputs
}

_CONFIG = {"adapter": "vit_adapter", "lora": "vit_lora", "prefix": "vit_prefix"}


def ours_overrides(pet: str, convention: str = HPARAMS["convention"]) -> list[str]:
    h = HPARAMS
    return ["strategy=lae", f"strategy.pet={pet}", "backbone=vit_p4_w64_d4",
            "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt", f"strategy.lr={h['lr']}",
            f"strategy.epochs={h['epochs']}", f"strategy.num_freeze_epochs={h['num_freeze_epochs']}",
            f"strategy.ema_decay={h['ema_decay']}", f"strategy.blocks=[{','.join(map(str, h['blocks']))}]",
            f"strategy.adapter_width={h['adapter_width']}", f"strategy.lora_rank={h['lora_rank']}",
            f"strategy.prefix_length={h['prefix_length']}", f"strategy.input_convention={convention}",
            f"data.batch_size={h['batch_size']}", "data.drop_last=true", "data.eval_batch_size=500"]


ROWS: dict[str, dict[str, Any]] = {
    f"lae-{pet}": {"ours": ours_overrides(pet), "official": {"pet": pet, "config": _CONFIG[pet]}}
    for pet in ("adapter", "lora", "prefix")
}


# ------------------------------------------------------------------------------------------------ shims
class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty packages for imports the LAE code path never uses (any attribute is a dummy class)."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def getattr_(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {})

        mod.__getattr__ = getattr_  # type: ignore[method-assign]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install_shims() -> None:
    """Module-level stand-ins, before anything of the official code is imported."""
    import warnings

    import lightning_fabric
    import lightning_fabric.strategies
    import timm.layers
    import timm.models.helpers
    import timm.models.layers
    import timm.models.vision_transformer
    import torch
    import torchmetrics
    from torch import nn

    warnings.filterwarnings("ignore")

    # Python 3.11 refuses a dataclass instance as a field default (``memory: MemoryConf = MemoryConf()``);
    # 3.8-3.10 (their era) accepted it: turn such a default into a default_factory of a copy.
    orig_get_field = dataclasses._get_field  # type: ignore[attr-defined]

    def get_field(cls: type, name: str, *args: Any) -> Any:
        default = cls.__dict__.get(name, dataclasses.MISSING)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            setattr(cls, name, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d)))
        return orig_get_field(cls, name, *args)

    dataclasses._get_field = get_field  # type: ignore[attr-defined]
    sys.meta_path.insert(0, _StubFinder({"torchinfo", "skimage", "imagehash", "datasets"}))

    class Fabric(lightning_fabric.Fabric):
        """lightning 1.9's ``Fabric`` call conventions on lightning_fabric 2.6."""

        def __init__(self, *args: Any, strategy: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, strategy="auto" if strategy is None else strategy, **kwargs)

        def save(self, content: Any, filepath: Any) -> None:  # 1.9: save(content, filepath)
            super().save(filepath, content)

    lightning = types.ModuleType("lightning")
    lightning.Fabric = Fabric  # type: ignore[attr-defined]
    lightning.fabric = lightning_fabric  # type: ignore[attr-defined]
    sys.modules["lightning"] = lightning
    sys.modules["lightning.fabric"] = lightning_fabric
    sys.modules["lightning.fabric.strategies"] = lightning_fabric.strategies

    class Accuracy(nn.Module):
        """torchmetrics 0.10 ``Accuracy()``: top-1 micro accuracy of argmax predictions."""

        def __init__(self) -> None:
            super().__init__()
            self.correct, self.total = 0, 0

        def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
            pred = preds.argmax(dim=1) if preds.ndim > 1 else preds
            self.correct += int((pred == target).sum())
            self.total += int(target.numel())

        def compute(self) -> torch.Tensor:
            return torch.tensor(self.correct / max(1, self.total))

        def reset(self) -> None:
            self.correct, self.total = 0, 0

    torchmetrics.Accuracy = Accuracy  # type: ignore[attr-defined,misc]

    def param_format(self: torch.Tensor, spec: str) -> str:  # torch 1.12: 0-dim tensors format as numbers
        return self.item().__format__(spec) if self.dim() == 0 else torch.Tensor.__format__(self, spec)

    nn.Parameter.__format__ = param_format  # type: ignore[method-assign]

    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple  # type: ignore[attr-defined]
    sys.modules["timm.models.layers.helpers"] = helpers
    timm.models.helpers.overlay_external_default_cfg = lambda *a, **k: None  # Swin only
    timm.models.vision_transformer._init_vit_weights = lambda *a, **k: None  # Swin only


def patch_official(setup: dict[str, Any], convention: str, record: dict[str, Any]) -> Any:
    """Swap the backbone factory, the dataset and the transforms; wrap the evaluation to record results."""
    import libml.core.datamodule as dm_mod
    import libml.model as model_mod
    import main as lae_main
    import numpy as np
    import torch
    from continuum.datasets import InMemoryDataset
    from libml.model.backbone import vit as vit_mod
    from torchvision import transforms as T

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    def tiny_vit(**_: Any) -> torch.nn.Module:
        a = VIT_ARCH
        model = vit_mod.VisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                                          embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"],
                                          mlp_ratio=a["mlp_ratio"], qkv_bias=True)
        model.load_state_dict(vit_state_dict(), strict=True)
        return model

    model_mod._BACKBONE["ViT-B_16"] = tiny_vit

    def configure_dataset(self: Any, train: bool) -> Any:
        x, y = (setup["train_x"], setup["train_y"]) if train else (setup["test_x"], setup["test_y"])
        return InMemoryDataset(np.ascontiguousarray(x), np.asarray(y, dtype=np.int64))

    dm_mod.DataModule.configure_dataset = configure_dataset

    def transforms(self: Any) -> list[Any]:
        tf: list[Any] = [T.ToTensor()]
        if convention == "normalized":
            tf.append(T.Normalize(mean=[float(v) for v in setup["mean"]], std=[float(v) for v in setup["std"]]))
        return tf

    lae_main.MyDataModule.train_transform = transforms
    lae_main.MyDataModule.val_transform = transforms

    original_post_eval = lae_main.MyModule.post_eval_epoch

    def post_eval_epoch(self: Any, result: Any = None) -> None:
        task = self.current_task
        pred_on, pred_off, pred_ens, gts = result
        gts_t = torch.cat(gts)
        per_exp = gts_t // int(setup["classes_per_task"])

        def per_exp_acc(preds: list[torch.Tensor]) -> list[float] | None:
            if not preds:
                return None
            p = torch.cat(preds)
            return [100.0 * float((p[per_exp == j] == gts_t[per_exp == j]).float().mean()) for j in range(task + 1)]

        record[task] = {
            "seen_acc": 100.0 * float(self.val_acc.compute()),
            "correct": int(self.val_acc.correct), "total": int(self.val_acc.total),
            "task_accs": [100.0 * float(a.compute()) for a in self.val_task_accs],
            "ens": per_exp_acc(pred_ens), "online": per_exp_acc(pred_on), "offline": per_exp_acc(pred_off),
            "epoch": int(self.current_epoch),
            # the extra forward passes only after the task's last epoch (the evaluation that is kept)
            "logits": logit_stats(self, setup, task, convention) if self.current_epoch + 1 == self.cfg.num_epochs
            else None,
        }
        return original_post_eval(self, result)

    lae_main.MyModule.post_eval_epoch = post_eval_epoch
    return lae_main


def logit_stats(module: Any, setup: dict[str, Any], task: int, convention: str) -> dict[str, Any]:
    """Per expert: mean over the test samples of each seen task of each head's max logit, and the new head's
    share of argmax wins on the newest task's samples (the 'newest experience at 0 %' investigation)."""
    import torch
    import torch.nn.functional as F

    cpt = int(setup["classes_per_task"])
    x = torch.from_numpy(setup["test_x"]).float().div(255.0)[:, None]
    y = torch.from_numpy(setup["test_y"]).long()
    keep = y < (task + 1) * cpt
    x, y = x[keep], y[keep]
    if convention == "normalized":
        x = (x - float(setup["mean"][0])) / float(setup["std"][0])
    experts = {"online": module.pets}
    if len(module.pets_emas):
        experts["offline"] = module.pets_emas[0].module
    out: dict[str, Any] = {}
    model = module.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, pets in experts.items():
            module.attach_pets(pets)
            logits = torch.cat([model(xb) for xb in x.split(500)])
            heads = logits.view(len(logits), task + 1, cpt)  # (N, heads, classes per head)
            rows = []
            for j in range(task + 1):
                sel = (y // cpt) == j
                rows.append([float(v) for v in heads[sel].max(dim=2).values.mean(0)])
            newest = (y // cpt) == task
            win = logits[newest].argmax(1) // cpt
            out[name] = {"max_logit_by_task_head": rows,
                         "newest_task_pred_head_share": [float((win == h).float().mean()) for h in range(task + 1)],
                         "newest_task_prob_mass_new_head": float(
                             F.softmax(logits[newest], 1)[:, task * cpt:].sum(1).mean())}
        module.attach_pets(module.pets)
    model.train(was_training)
    return out


def official_argv(spec: dict[str, Any], seed: int, n_tasks: int, cpt: int) -> list[str]:
    """Their command line: the row's config file plus the tiny-setup values as OmegaConf overrides."""
    h = HPARAMS
    return [f"seed_everything={seed}", "accelerator=cpu", "devices=1", f"data.num_increment_classes={cpt}",
            "data.num_init_classes=0", "data.dataloader.num_workers=0", "data.dataloader.pin_memory=false",
            f"data.dataloader.batch_size={h['batch_size']}", "data.dataloader.drop_last=true",
            f"module.num_epochs={h['epochs']}", f"module.num_freeze_epochs={h['num_freeze_epochs']}",
            f"module.ema_decay={h['ema_decay']}", f"module.optimizer.lr={h['lr']}",
            f"module.adapt_blocks=[{','.join(map(str, h['blocks']))}]", "module.summary_depth=-1",
            *{"adapter": [f"module.pet_kwargs.down_sample={h['adapter_width']}"],
              "lora": [f"module.pet_kwargs.rank={h['lora_rank']}"],
              "prefix": [f"module.pet_kwargs.length={h['prefix_length']}"]}[spec["pet"]]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--setup", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--convention", default=HPARAMS["convention"], choices=("unit", "normalized"))
    args = ap.parse_args()
    start = time.perf_counter()

    from benchmarks.parity.common import OFFICIAL, RunResult, load_npz, official_source, seen_accuracy

    src = official_source("lae")
    sys.path.insert(0, str(src))
    install_shims()
    setup = load_npz(args.setup)
    spec = ROWS[args.row]["official"]
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    record: dict[int, dict[str, Any]] = {}
    lae_main = patch_official(setup, args.convention, record)

    from absl import flags
    from libml.core import App

    log_root = Path.cwd() / "lae_official"
    log_root.mkdir(exist_ok=True)
    flags.FLAGS([str(src / "main.py"), f"--config={spec['config']}", f"--config_dir={src / 'config'}"])
    app = App(datamodule_cls=lae_main.MyDataModule, module_cls=lae_main.MyModule, config_cls=lae_main.MyConf,
              root=log_root)
    argv = official_argv(spec, args.seed, n_tasks, cpt)
    app.main([str(src / "main.py"), *argv])

    tasks = sorted(record)
    if tasks != list(range(n_tasks)):
        raise RuntimeError(f"official run recorded tasks {tasks}, expected {n_tasks}")
    matrix = [[*record[t]["ens"], *([None] * (n_tasks - t - 1))] for t in tasks]
    correct = [[0] * n_tasks for _ in tasks]
    total = [[0] * n_tasks for _ in tasks]
    test_y = setup["test_y"]
    for t in tasks:  # counts per experience from the recorded per-experience accuracies (exact: equal class sizes)
        for j in range(t + 1):
            n = int((test_y // cpt == j).sum())
            total[t][j] = n
            correct[t][j] = round(record[t]["ens"][j] * n / 100.0)
    acc = seen_accuracy(correct, total)
    for t in tasks:  # their own val_acc (a count over all seen test samples) must agree with the per-experience counts
        if (record[t]["correct"], record[t]["total"]) != (sum(correct[t]), sum(total[t])):
            raise RuntimeError(f"task {t}: val_acc counts {record[t]['correct']}/{record[t]['total']} != "
                               f"per-experience {sum(correct[t])}/{sum(total[t])}")
    repo, commit = OFFICIAL["lae"]
    wall = round(time.perf_counter() - start, 2)
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=wall, matrix=matrix,
                    extra={"official": f"{repo}@{commit[:7]}", "config": spec["config"], "argv": argv,
                           "convention": args.convention, "hparams": HPARAMS,
                           "online_matrix": [record[t]["online"] for t in tasks],
                           "offline_matrix": [record[t]["offline"] for t in tasks],
                           "logits": [record[t]["logits"] for t in tasks]},
                    command=" ".join(sys.argv))
    res.write(args.out)
    print(f"{args.row} official seed {args.seed}: acc {' '.join(f'{a:.1f}' for a in acc)}")


if __name__ == "__main__":
    main()
