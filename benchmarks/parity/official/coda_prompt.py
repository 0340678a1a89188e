"""Official side of the CODA-Prompt row: GT-RIPL/CODA-Prompt@6417d4f (``run.py`` + ``trainer.py``), unmodified.

    python benchmarks/parity/official/coda_prompt.py --row coda_prompt --setup SETUP.npz --seed 0 --out result.json

Driven as ``run.py`` does it: its ``get_args`` reads ``configs/cifar-100_prompt.yaml`` with the command line of
``experiments/cifar-100.sh`` (``--learner_type prompt --learner_name CODAPrompt --prompt_param POOL 8 MU``,
``--gpuid -1`` for the CPU), the seeds are set as its main loop sets them (``random``, ``numpy``, ``torch`` with
the repeat's seed), and its ``Trainer(args, seed, ...).train(...)`` runs the task loop: their ``CODAPrompt``
learner (masked CE + prompt loss, a fresh Adam and ``CosineSchedule`` per task over the prompt and the classifier),
their ``CodaPrompt`` module (Gram-Schmidt re-init of the new components in ``process_task_count``, old ones sliced
and detached) and their ``VisionTransformer`` with the prompts prepended to the keys and values. Nothing in the
source tree is edited or copied; the runner only swaps in, at run time:

Shims:

* ``torch.Tensor.cuda`` -> ``clone()`` (what ``.cuda()`` of a CPU tensor is: a differentiable copy, so their
  in-place ``prompt_loss += loss`` on ``torch.zeros((1,), requires_grad=True).cuda()`` in the ViT forward stays
  legal); ``data_weighting`` also moves its weights with ``.cuda()`` (``if self.cuda:`` tests a bound method, always
  true) and ``ortho_penalty`` its identity matrix; everything else honours ``--gpuid -1``.
* Backbone: ``models.zoo.VisionTransformer`` (called for the ViT-B/16 at 224 px) -> THEIR ``models.vit``
  ``VisionTransformer`` class at the tiny size (img 32, patch 4, in_chans 1, width 64, depth 4, heads 2, mlp 4, qkv
  bias), and ``timm.models.vit_base_patch16_224`` (the ImageNet download whose state dict they load strictly) ->
  the committed tiny ViT's weights (``common.vit_state_dict()``, same key names) plus the ``head.*`` keys they
  delete.
* Width: ``ViTZoo`` hard-codes 768 (ViT-B/16) for ``CodaPrompt(768, ...)`` (embedding and key width) and for the
  classifier ``nn.Linear(768, num_classes)``. ``models.zoo.CodaPrompt`` -> a subclass whose constructor passes
  ``emb_d = key_dim = 64``; after ``ViTZoo.__init__`` the classifier is replaced by ``nn.Linear(64, num_classes)``
  (PyTorch's default init, as theirs; it draws from the global RNG after their prompt init instead of before).
* Data: ``dataloaders.iCIFAR10`` (CIFAR-10 download; chosen because its ``num_classes = 10`` is the setup's) -> a
  subclass of their ``iDataset`` whose ``load`` returns the setup arrays (grey uint8 32x32, labels already in
  class order). ``rand_split: False`` keeps that order (their Trainer shuffles only then, and only for seed > 0),
  ``first_split_size = other_split_size = 2`` gives the 5 tasks.
* Transforms: ``dataloaders.utils.get_transform`` (RandomResizedCrop(224) + flip / Resize(224), ToTensor,
  Normalize(mean 0, std 1)) -> ``ToTensor()`` alone: the same raw [0, 1] values without the random crop
  (no augmentation on either side, common.py).
* Config values (not code): ``schedule: [EPOCHS]``, ``batch_size``, ``lr``, ``workers: 0``, ``rand_split: False``,
  ``dataset: CIFAR10``, ``first_split_size``/``other_split_size``, ``overwrite 1``, ``log_dir`` in the temp dir.
* Recording only: ``learners.default.accumulate_acc`` is wrapped to also count argmax hits of each evaluation batch
  and ``Trainer.task_eval`` to file those counts under (trained task, evaluated task); their own returned accuracy
  must equal the counts.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

#: the tiny hyper-parameters, identical on both sides (the paper's values where they fit the setup)
HPARAMS: dict[str, Any] = {
    "pool_size": 50,  # 10 components per task on 5 tasks (paper: 100 on 10); Gram-Schmidt needs <= width 64
    "prompt_length": 8,  # the paper's
    "ortho_mu": 0.0,  # the published runs' (experiments/*.sh)
    "lr": 0.001,  # the paper's Adam lr, betas (0.9, 0.999), no weight decay, the official cosine schedule
    "epochs": 5,  # smoke-scale substitute for 20 (CIFAR-100)
    "batch_size": 32,  # ... for 128 (600 images per task here: 18 steps per epoch); drop_last on both sides
    "blocks": [0, 1, 2, 3],  # their e_layers [0..4] hard-coded: every block of the 4-block tiny ViT
}


def ours_overrides(h: dict[str, Any] = HPARAMS) -> list[str]:
    return ["strategy=coda_prompt", "backbone=vit_p4_w64_d4",
            "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt", f"strategy.lr={h['lr']}",
            f"strategy.epochs={h['epochs']}", f"strategy.pool_size={h['pool_size']}",
            f"strategy.prompt_length={h['prompt_length']}", f"strategy.ortho_mu={h['ortho_mu']}",
            f"strategy.blocks=[{','.join(map(str, h['blocks']))}]", "strategy.schedule=cosine",
            f"data.batch_size={h['batch_size']}", "data.drop_last=true", "data.eval_batch_size=500"]


ROWS: dict[str, dict[str, Any]] = {
    "coda_prompt": {"ours": ours_overrides(), "official": {"ortho_mu": HPARAMS["ortho_mu"]}},
}


# ------------------------------------------------------------------------------------------------ shims
def install_shims(setup: dict[str, Any], record: dict[str, Any]) -> None:
    """Patch the backbone, width, data and transforms, and wrap the evaluation to count predictions."""
    import warnings

    import dataloaders
    import dataloaders.utils
    import learners.default as default_mod
    import models.vit as vit_mod
    import models.zoo as zoo
    import numpy as np
    import timm.models
    import torch
    import trainer as trainer_mod
    from dataloaders.dataloader import iDataset
    from torch import nn
    from torchvision import transforms as T

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    warnings.filterwarnings("ignore")
    # a copy, as .cuda() of a CPU tensor is: their ``prompt_loss += loss`` needs a non-leaf tensor
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()  # type: ignore[method-assign]
    a = VIT_ARCH
    width = int(a["embed_dim"])

    def tiny_vit(**_: Any) -> nn.Module:
        return vit_mod.VisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                                         embed_dim=width, depth=a["depth"], num_heads=a["num_heads"],
                                         mlp_ratio=a["mlp_ratio"], qkv_bias=True, drop_path_rate=0, ckpt_layer=0)

    class _Pretrained:
        def state_dict(self) -> dict[str, Any]:
            sd = dict(vit_state_dict())
            sd["head.weight"], sd["head.bias"] = torch.zeros(1, width), torch.zeros(1)  # deleted by ViTZoo
            return sd

    zoo.VisionTransformer = tiny_vit
    timm.models.vit_base_patch16_224 = lambda pretrained=False, **_: _Pretrained()

    class CodaPrompt(zoo.CodaPrompt):
        def __init__(self, emb_d: int, n_tasks: int, prompt_param: Any, key_dim: int = 768) -> None:
            super().__init__(width, n_tasks, prompt_param, key_dim=width)

    zoo.CodaPrompt = CodaPrompt
    orig_init = zoo.ViTZoo.__init__

    def vitzoo_init(self: Any, num_classes: int = 10, *args: Any, **kwargs: Any) -> None:
        orig_init(self, num_classes, *args, **kwargs)
        self.last = nn.Linear(width, num_classes)

    zoo.ViTZoo.__init__ = vitzoo_init

    class SetupDataset(iDataset):
        def load(self) -> None:
            x, y = (setup["train_x"], setup["train_y"]) if self.train else (setup["test_x"], setup["test_y"])
            self.data, self.targets = np.ascontiguousarray(x), np.asarray(y, dtype=np.int64)

    dataloaders.iCIFAR10 = SetupDataset
    dataloaders.utils.get_transform = lambda *args, **kwargs: T.Compose([T.ToTensor()])

    counter = {"correct": 0, "total": 0}
    orig_acc = default_mod.accumulate_acc

    def accumulate_acc(output: Any, target: Any, task: Any, meter: Any, topk: Any) -> Any:
        counter["correct"] += int((output.argmax(1) == target).sum())
        counter["total"] += int(target.numel())
        return orig_acc(output, target, task, meter, topk)

    default_mod.accumulate_acc = accumulate_acc
    orig_eval = trainer_mod.Trainer.task_eval

    def task_eval(self: Any, t_index: int, local: bool = False, task: str = "acc") -> Any:
        counter["correct"] = counter["total"] = 0
        acc = orig_eval(self, t_index, local=local, task=task)
        record[(self.current_t_index, t_index)] = (counter["correct"], counter["total"], float(acc))
        return acc

    trainer_mod.Trainer.task_eval = task_eval


def official_args(src: Path, spec: dict[str, Any], n_tasks: int, cpt: int, log_dir: Path) -> Any:
    """Their ``get_args`` on the CIFAR-100 prompt config and the experiments script's command line, then the tiny
    setup's config values."""
    import run as coda_run

    h = HPARAMS
    argv = ["--config", str(src / "configs" / "cifar-100_prompt.yaml"), "--gpuid", "-1", "--repeat", "1",
            "--overwrite", "1", "--learner_type", "prompt", "--learner_name", "CODAPrompt",
            "--prompt_param", str(h["pool_size"]), str(h["prompt_length"]), str(spec["ortho_mu"]),
            "--log_dir", str(log_dir / "coda-p")]
    args = coda_run.get_args(argv)
    args.dataset, args.first_split_size, args.other_split_size = "CIFAR10", cpt, cpt
    args.schedule, args.batch_size, args.lr = [int(h["epochs"])], int(h["batch_size"]), float(h["lr"])
    args.workers, args.rand_split, args.dataroot, args.max_task = 0, False, str(log_dir / "data"), n_tasks
    return args, argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--setup", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    start = time.perf_counter()

    from benchmarks.parity.common import OFFICIAL, RunResult, load_npz, official_source, seen_accuracy

    src = official_source("coda_prompt")
    sys.path.insert(0, str(src))
    setup = load_npz(args.setup)
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    if n_tasks * cpt != 10:
        raise RuntimeError("the runner stands in for their CIFAR10 dataset (10 classes)")
    record: dict[tuple[int, int], tuple[int, int, float]] = {}
    install_shims(setup, record)

    import numpy as np
    import torch
    from trainer import Trainer

    log_dir = Path.cwd() / "coda_official"
    spec = ROWS[args.row]["official"]
    cargs, argv = official_args(src, spec, n_tasks, cpt, log_dir)
    random.seed(args.seed)  # run.py's main loop, repeat r = seed
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    trainer = Trainer(cargs, args.seed, ["acc", "time"], ["global", "pt", "pt-local"])
    if trainer.max_task != n_tasks:
        raise RuntimeError(f"official Trainer built {trainer.max_task} tasks, expected {n_tasks}")
    metrics = {k: {"global": np.zeros((n_tasks, 1)), "pt": np.zeros((n_tasks, n_tasks, 1)),
                   "pt-local": np.zeros((n_tasks, n_tasks, 1))} for k in ("acc", "time")}
    trainer.train(metrics)

    correct = [[record[(t, j)][0] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    total = [[record[(t, j)][1] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    for (t, j), (c, n, acc) in record.items():  # their accuracy (%) must be what was counted
        if abs(acc - 100.0 * c / n) > 1e-6:
            raise RuntimeError(f"task {t}, eval {j}: their accuracy {acc} != counted {c}/{n}")
    matrix = [[100.0 * correct[t][j] / total[t][j] if j <= t else None for j in range(n_tasks)]
              for t in range(n_tasks)]
    repo, commit = OFFICIAL["coda_prompt"]
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=seen_accuracy(correct, total),
                    wall_s=round(time.perf_counter() - start, 2), matrix=matrix,
                    extra={"official": f"{repo}@{commit[:7]}", "argv": argv, "hparams": HPARAMS,
                           "config_overrides": {"dataset": "CIFAR10", "schedule": cargs.schedule,
                                                "batch_size": cargs.batch_size, "lr": cargs.lr,
                                                "rand_split": False, "split_size": cpt}},
                    command=" ".join(sys.argv))
    res.write(args.out)
    print(f"{args.row} official seed {args.seed}: acc {' '.join(f'{a:.1f}' for a in res.acc)}")


if __name__ == "__main__":
    main()
