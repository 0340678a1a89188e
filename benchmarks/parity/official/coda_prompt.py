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
  must equal the counts. As an extra, the same wrapper counts the task-aware hits (argmax over the evaluated
  experience's own classes), written as ``extra.til_matrix`` like our side's.
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

    counter = {"correct": 0, "total": 0, "til": 0}
    orig_acc = default_mod.accumulate_acc
    cpt = int(setup["classes_per_task"])

    def accumulate_acc(output: Any, target: Any, task: Any, meter: Any, topk: Any) -> Any:
        counter["correct"] += int((output.argmax(1) == target).sum())
        counter["total"] += int(target.numel())
        # task-aware view (an extra, as ours reports it): the argmax over the target's own experience's classes
        first = (target // cpt) * cpt
        cols = first[:, None] + torch.arange(cpt)[None, :]
        counter["til"] += int((output.gather(1, cols).argmax(1) + first == target).sum())
        return orig_acc(output, target, task, meter, topk)

    default_mod.accumulate_acc = accumulate_acc
    orig_eval = trainer_mod.Trainer.task_eval

    def task_eval(self: Any, t_index: int, local: bool = False, task: str = "acc") -> Any:
        counter["correct"] = counter["total"] = counter["til"] = 0
        acc = orig_eval(self, t_index, local=local, task=task)
        record[(self.current_t_index, t_index)] = (counter["correct"], counter["total"], float(acc), counter["til"])
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


# ------------------------------------------------------------------------------------------------ replay
def _adam_recorder(first_side: str) -> tuple[dict, dict, dict, Any]:
    """A replacement for ``torch.optim.Adam.step`` that, after each step, records ``watch["weight"]()`` (a flat
    tensor of the watched parameters) and the step's rate under ``watch["side"]``; nothing while the weight is
    None. Returns ``steps``, ``lrs``, ``watch`` and the replacement (the caller installs and restores it)."""
    import torch

    adam_step = torch.optim.Adam.step
    steps: dict[str, list[torch.Tensor]] = {"official": [], "ours": []}
    lrs: dict[str, list[float]] = {"official": [], "ours": []}
    watch: dict[str, Any] = {"side": first_side, "weight": None}

    def adam_step_recording(self, *args: Any, **kwargs: Any) -> Any:
        out = adam_step(self, *args, **kwargs)
        if watch["weight"] is not None:
            steps[watch["side"]].append(watch["weight"]().detach().cpu().clone())
            lrs[watch["side"]].append(float(self.param_groups[0]["lr"]))
        return out

    return steps, lrs, watch, adam_step_recording


def check_run(setup_path: str, seed: int, work: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """THEIR whole run, then ours replaying it: the same initial components and classifier, the same batches.

    1. THEIR ``Trainer.train`` runs as :func:`main` runs it (seed ``seed``) while wrappers only observe: the index
       order of every ``RandomSampler`` iteration (one per task and epoch; batch 32, ``drop_last``), the new
       components of every prompted block when they are drawn (``CodaPrompt.__init__`` for task 0,
       ``process_task_count`` later: rows ``[s, f)`` of ``e_k_l``, ``e_a_l``, ``e_p_l``), the classifier before task
       0 trains, and after each task's ``learn_batch`` every component so far and the classifier.
    2. Our :class:`~cl.runner.Runner` runs the row with ``RankBatchSampler.__iter__`` yielding THEIR order (their
       task data are the setup's training images of the task's classes in natural order, ``np.isin(...)``; mapped
       to ours through ``exp.train.indices``), and at each experience start the chunk :meth:`CodaPool.grow` just
       drew overwritten with THEIR rows of that task (and the classifier with theirs at experience 0). Everything
       else is our code. At each experience end our components and classifier are compared with THEIR snapshot.

    ``extra`` overrides go to our side only (a deliberate change the replay must catch, as the tests do).
    """
    import numpy as np
    import torch
    import torch.utils.data.sampler as tsampler

    from benchmarks.parity.common import load_npz, official_source, replay_config, seen_accuracy

    src = official_source("coda_prompt")
    sys.path.insert(0, str(src))
    setup = load_npz(Path(setup_path))
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    record: dict[tuple[int, int], tuple[int, int, float, int]] = {}
    install_shims(setup, record)
    from models import zoo
    from trainer import Trainer

    # ---- 1. THEIR run, observed
    perms: list[np.ndarray] = []
    rand_iter = tsampler.RandomSampler.__iter__

    def rand_iter_recording(self):
        order = list(rand_iter(self))  # the same draws at the same moment
        perms.append(np.asarray(order))
        yield from order

    blocks = HPARAMS["blocks"]
    pt = HPARAMS["pool_size"] // n_tasks
    new_rows: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # task -> block -> {k, a, p} rows [s, f)

    def rows_of(prompt: Any, t: int) -> dict[int, dict[str, torch.Tensor]]:
        s, f = t * pt, (t + 1) * pt
        return {b: {n: getattr(prompt, f"e_{n}_{b}")[s:f].detach().clone() for n in "kap"} for b in blocks}

    ptc = zoo.CodaPrompt.process_task_count

    def ptc_recording(self):
        ptc(self)
        new_rows[self.task_count] = rows_of(self, self.task_count)

    zoo.CodaPrompt.process_task_count = ptc_recording
    tsampler.RandomSampler.__iter__ = rand_iter_recording
    adam_step = torch.optim.Adam.step
    steps, lrs, watch, adam_step_recording = _adam_recorder("official")
    torch.optim.Adam.step = adam_step_recording
    log_dir = Path(work) / "coda_official"
    cargs, _ = official_args(src, ROWS["coda_prompt"]["official"], n_tasks, cpt, log_dir)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ends: list[dict[str, torch.Tensor]] = []
    try:
        trainer = Trainer(cargs, seed, ["acc", "time"], ["global", "pt", "pt-local"])
        model = trainer.learner.model
        watch["weight"] = lambda: torch.cat([trainer.learner.model.last.weight.reshape(-1),
                                             trainer.learner.model.prompt.e_k_0.reshape(-1)])
        new_rows[0] = rows_of(model.prompt, 0)
        cls_init = {k: v.detach().clone() for k, v in model.last.state_dict().items()}
        for t in range(n_tasks):  # their task data are the setup's images of the task's classes, natural order
            pos = np.flatnonzero(np.isin(setup["train_y"], np.arange(t * cpt, (t + 1) * cpt)))
            assert np.array_equal(trainer.train_dataset.archive[t][0], setup["train_x"][pos]), t
        learn = type(trainer.learner).learn_batch

        def learn_recording(self, *args: Any, **kwargs: Any) -> Any:
            out = learn(self, *args, **kwargs)
            t = self.model.prompt.task_count
            f = (t + 1) * pt
            snap = {f"{n}{b}": getattr(self.model.prompt, f"e_{n}_{b}")[:f].detach().clone()
                    for b in blocks for n in "kap"}
            snap.update({f"last.{k}": v.detach().clone() for k, v in self.model.last.state_dict().items()})
            ends.append(snap)
            return out

        type(trainer.learner).learn_batch = learn_recording
        metrics = {k: {"global": np.zeros((n_tasks, 1)), "pt": np.zeros((n_tasks, n_tasks, 1)),
                       "pt-local": np.zeros((n_tasks, n_tasks, 1))} for k in ("acc", "time")}
        trainer.train(metrics)
        type(trainer.learner).learn_batch = learn
    finally:
        tsampler.RandomSampler.__iter__ = rand_iter
        zoo.CodaPrompt.process_task_count = ptc
        watch.update(side="ours", weight=None)
    correct = [[record[(t, j)][0] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    total = [[record[(t, j)][1] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    their_acc = seen_accuracy(correct, total)

    # ---- 2. ours, replaying THEIR draws
    import strategies.coda_prompt as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    train_y = np.asarray(setup["train_y"])
    their_pos = {t: np.flatnonzero(np.isin(train_y, np.arange(t * cpt, (t + 1) * cpt))) for t in range(n_tasks)}
    state: dict[str, Any] = {"exp": 0, "pos_of": None}
    misses: list[str] = []
    exps: list[dict[str, Any]] = []
    sampler_iter = loaders.RankBatchSampler.__iter__
    queue = list(perms)

    def sampler_replay(self):
        if not self.shuffle:
            yield from sampler_iter(self)
            return
        perm = queue.pop(0) if queue else None
        if perm is None or len(perm) != self.n:
            misses.append(f"exp {state['exp']}: a shuffle their run never drew (own order)")
            yield from sampler_iter(self)
            return
        order = state["pos_of"][their_pos[state["exp"]][perm]]
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch].tolist()

    start_fn, end_fn = ours_mod.CodaPrompt.on_experience_start, ours_mod.CodaPrompt.on_experience_end

    def start_replay(self, exp, ctx):
        pos_of = np.full(len(train_y), -1)
        pos_of[np.asarray(exp.train.indices)] = np.arange(len(exp.train.indices))
        state.update(exp=exp.index, pos_of=pos_of)
        start_fn(self, exp, ctx)
        with torch.no_grad():
            for b, pool in zip(self.blocks, self.pools):
                rows = new_rows[exp.index][b]
                pool.keys[-1].copy_(rows["k"])
                pool.attn[-1].copy_(rows["a"])
                pool.prompts[-1].copy_(rows["p"])
            if exp.index == 0:
                for k, v in cls_init.items():
                    getattr(self.classifier, k).copy_(v)
        n_pad = HPARAMS["pool_size"] - sum(self.pools[0].sizes)
        watch["weight"] = lambda: torch.cat([self.classifier.weight.reshape(-1), self.pools[0].all_components()[0]
                                             .reshape(-1), self.classifier.weight.new_zeros(n_pad * self.pools[0]
                                                                                           .key_dim)])

    def end_replay(self, exp, ctx):
        end_fn(self, exp, ctx)
        ref = ends[exp.index]
        diff: dict[str, float] = {}
        for b, pool in zip(self.blocks, self.pools):
            k, a, p = pool.all_components()
            for n, v in zip("kap", (k, a, p)):
                diff[f"{n}{b}"] = float((v.detach().cpu() - ref[f"{n}{b}"]).abs().max())
        for k, v in self.classifier.state_dict().items():
            diff[f"last.{k}"] = float((v.cpu() - ref[f"last.{k}"]).abs().max())
        exps.append({"experience": exp.index, "max_abs_diff": max(diff.values()), "per_tensor": diff})

    cfg, _ = replay_config(ROWS["coda_prompt"]["ours"], setup_path, n_tasks, seed, Path(work) / "ours",
                           extra=extra)
    loaders.RankBatchSampler.__iter__ = sampler_replay
    ours_mod.CodaPrompt.on_experience_start, ours_mod.CodaPrompt.on_experience_end = start_replay, end_replay
    try:
        m = Runner(cfg).run()
    finally:
        loaders.RankBatchSampler.__iter__ = sampler_iter
        ours_mod.CodaPrompt.on_experience_start, ours_mod.CodaPrompt.on_experience_end = start_fn, end_fn
        torch.optim.Adam.step = adam_step
    step_diff = [float((a - b).abs().max()) for a, b in zip(steps["official"], steps["ours"])]
    our_acc = seen_accuracy(m["correct"], m["total"])
    return {"seed": seed, "acc_official": [round(a, 3) for a in their_acc], "acc_ours": [round(a, 3) for a in our_acc],
            "matrix_official": [[None if j > t else round(100.0 * correct[t][j] / total[t][j], 3)
                                 for j in range(n_tasks)] for t in range(n_tasks)],
            "matrix_ours": [[None if v is None else round(100.0 * v, 3) for v in r] for r in m["accuracy_matrix"]],
            "replay_misses": misses, "unused_shuffles": len(queue), "experiences": exps,
            "steps": {"official": len(steps["official"]), "ours": len(steps["ours"])},
            "step_max_abs_diff": [float(f"{d:.3g}") for d in step_diff], "lr": lrs}


def check_run_reverse(setup_path: str, seed: int, work: str) -> dict[str, Any]:
    """The replay the other way round: OUR run (seed ``seed``) first, then THEIR code fed OUR draws.

    1. Our :class:`~cl.runner.Runner` runs the ``coda_prompt`` row unmodified while wrappers only observe: the order
       of every shuffled training pass (``RankBatchSampler``, per experience and epoch, as setup indices through
       ``exp.train.indices``), the chunk of components :meth:`CodaPool.grow` draws at each experience start (keys,
       attention vectors and prompts of every block), the classifier before experience 0 trains, the watched
       tensors (classifier weight and block 0's keys) after every Adam step, and the accuracy matrix.
    2. THEIR ``Trainer.train`` then runs (:func:`install_shims`, seed ``seed``) with rows ``[s, f)`` of their
       ``e_k_l``, ``e_a_l``, ``e_p_l`` overwritten by OUR chunk of that task right after they draw it
       (``CodaPrompt.__init__`` for task 0, ``process_task_count`` later), the classifier by ours before task 0,
       and every ``RandomSampler`` pass yielding OUR order of that (task, epoch) mapped to their task data (the
       task's training images in natural order, ``np.isin``); our epoch drops the last 24 images, their
       ``drop_last`` loader drops the same tail (appended after our batches). Their own draw is still made and
       thrown away, so their RNG stream is as in a plain run. Everything else is their code.

    Answers whether a run of ours that ends low ends as low in THEIR code from the same draws: if it does, the
    draw is what is low, not our code.
    """
    import numpy as np
    import torch
    import torch.utils.data.sampler as tsampler

    from benchmarks.parity.common import load_npz, official_source, replay_config, seen_accuracy

    setup = load_npz(Path(setup_path))
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    train_y = np.asarray(setup["train_y"])
    blocks = HPARAMS["blocks"]
    pt = HPARAMS["pool_size"] // n_tasks
    adam_step = torch.optim.Adam.step
    steps, lrs, watch, adam_step_recording = _adam_recorder("ours")

    # ---- 1. ours, observed
    import strategies.coda_prompt as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    state: dict[str, Any] = {"exp": 0, "epoch": 0, "indices": None}
    perms: list[tuple[int, int, np.ndarray]] = []  # (experience, epoch, setup indices in our batch order)
    chunks: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # experience -> block -> {k, a, p}
    cls_init: dict[str, torch.Tensor] = {}
    sampler_iter, start_fn = loaders.RankBatchSampler.__iter__, ours_mod.CodaPrompt.on_experience_start

    def sampler_recording(self):
        batches = list(sampler_iter(self))
        if self.shuffle:
            perms.append((state["exp"], state["epoch"], state["indices"][np.concatenate(batches)]))
            state["epoch"] += 1
        yield from batches

    def start_recording(self, exp, ctx):
        state.update(exp=exp.index, epoch=0, indices=np.asarray(exp.train.indices))
        start_fn(self, exp, ctx)
        chunks[exp.index] = {b: {"k": pool.keys[-1].detach().clone(), "a": pool.attn[-1].detach().clone(),
                                 "p": pool.prompts[-1].detach().clone()} for b, pool in zip(self.blocks, self.pools)}
        if exp.index == 0:
            cls_init.update({k: v.detach().clone() for k, v in self.classifier.state_dict().items()})
        n_pad = HPARAMS["pool_size"] - sum(self.pools[0].sizes)
        watch["weight"] = lambda: torch.cat([self.classifier.weight.reshape(-1), self.pools[0].all_components()[0]
                                             .reshape(-1), self.classifier.weight.new_zeros(n_pad * self.pools[0]
                                                                                           .key_dim)])

    cfg, _ = replay_config(ROWS["coda_prompt"]["ours"], setup_path, n_tasks, seed, Path(work) / "ours")
    loaders.RankBatchSampler.__iter__, ours_mod.CodaPrompt.on_experience_start = sampler_recording, start_recording
    torch.optim.Adam.step = adam_step_recording
    try:
        m = Runner(cfg).run()
    finally:
        loaders.RankBatchSampler.__iter__, ours_mod.CodaPrompt.on_experience_start = sampler_iter, start_fn
        watch.update(side="official", weight=None)
    our_acc = seen_accuracy(m["correct"], m["total"])
    our_matrix = [[None if v is None else round(100.0 * v, 3) for v in r] for r in m["accuracy_matrix"]]

    # ---- 2. THEIR code, fed our draws
    src = official_source("coda_prompt")
    sys.path.insert(0, str(src))
    record: dict[tuple[int, int], tuple[int, int, float, int]] = {}
    install_shims(setup, record)
    from models import zoo
    from trainer import Trainer

    their_of = {}  # setup index -> position in THEIR task data (natural order)
    for t in range(n_tasks):
        pos = np.flatnonzero(np.isin(train_y, np.arange(t * cpt, (t + 1) * cpt)))
        inv = np.full(len(train_y), -1)
        inv[pos] = np.arange(len(pos))
        their_of[t] = inv

    def load_chunk(prompt: Any, t: int) -> None:
        s, f = t * pt, (t + 1) * pt
        with torch.no_grad():
            for b in blocks:
                for n in "kap":
                    getattr(prompt, f"e_{n}_{b}")[s:f].copy_(chunks[t][b][n])

    ptc = zoo.CodaPrompt.process_task_count

    def ptc_loading(self):
        ptc(self)
        load_chunk(self, self.task_count)

    queue = list(perms)
    own: list[str] = []
    rand_iter = tsampler.RandomSampler.__iter__

    def rand_iter_replay(self):
        theirs = list(rand_iter(self))  # their draw, made and discarded: their RNG stream as in a plain run
        if not queue:
            own.append("a shuffle ours never drew (their own order)")
            yield from theirs
            return
        t, e, perm = queue.pop(0)
        order = their_of[t][perm]
        if (order < 0).any() or len(theirs) != len(train_y[np.isin(train_y, np.arange(t * cpt, (t + 1) * cpt))]):
            own.append(f"task {t} epoch {e}: our order does not fit their task data (their own order)")
            yield from theirs
            return
        rest = np.setdiff1d(np.arange(len(theirs)), order)  # the tail our drop_last left out; theirs drops it too
        yield from np.concatenate([order, rest]).tolist()

    zoo.CodaPrompt.process_task_count = ptc_loading
    tsampler.RandomSampler.__iter__ = rand_iter_replay
    log_dir = Path(work) / "coda_official"
    cargs, _ = official_args(src, ROWS["coda_prompt"]["official"], n_tasks, cpt, log_dir)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        trainer = Trainer(cargs, seed, ["acc", "time"], ["global", "pt", "pt-local"])
        model = trainer.learner.model
        load_chunk(model.prompt, 0)
        with torch.no_grad():
            for k, v in cls_init.items():
                getattr(model.last, k).copy_(v)
        watch["weight"] = lambda: torch.cat([trainer.learner.model.last.weight.reshape(-1),
                                             trainer.learner.model.prompt.e_k_0.reshape(-1)])
        metrics = {k: {"global": np.zeros((n_tasks, 1)), "pt": np.zeros((n_tasks, n_tasks, 1)),
                       "pt-local": np.zeros((n_tasks, n_tasks, 1))} for k in ("acc", "time")}
        trainer.train(metrics)
    finally:
        tsampler.RandomSampler.__iter__ = rand_iter
        zoo.CodaPrompt.process_task_count = ptc
        torch.optim.Adam.step = adam_step
        watch.update(side=None, weight=None)
    correct = [[record[(t, j)][0] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    total = [[record[(t, j)][1] if j <= t else 0 for j in range(n_tasks)] for t in range(n_tasks)]
    their_acc = seen_accuracy(correct, total)
    their_matrix = [[None if j > t else round(100.0 * correct[t][j] / total[t][j], 3) for j in range(n_tasks)]
                    for t in range(n_tasks)]
    step_diff = [float((a - b).abs().max()) for a, b in zip(steps["official"], steps["ours"])]
    return {"seed": seed, "direction": "ours first, then THEIR code on our draws",
            "setup_class_order": [int(c) for c in setup.get("class_order", [])],
            "their_own_shuffles": own, "unused_shuffles": len(queue),
            "acc_ours": [round(a, 3) for a in our_acc], "acc_official": [round(a, 3) for a in their_acc],
            "matrix_ours": our_matrix, "matrix_official": their_matrix,
            "same_matrix": our_matrix == their_matrix,
            "steps": {"official": len(steps["official"]), "ours": len(steps["ours"])},
            "step_max_abs_diff": [float(f"{d:.3g}") for d in step_diff], "lr": lrs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--row", required=True, choices=sorted(ROWS))
    ap.add_argument("--setup", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--check-run", action="store_true",
                    help="replay: THEIR run, then ours with their initial components/classifier and batch order")
    ap.add_argument("--check-run-reverse", action="store_true",
                    help="reverse replay: OUR run, then THEIR code with our initial components/classifier and order")
    ap.add_argument("--ours", nargs="*", default=[], help="with --check-run: extra overrides for our side only")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.check_run_reverse:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            report = check_run_reverse(str(args.setup), args.seed, work)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print("ours:", report["acc_ours"], "| their code on our draws:", report["acc_official"])
        print("steps:", report["steps"], "| max step diff:", max(report["step_max_abs_diff"], default=None),
              "| same matrix:", report["same_matrix"], "| their own shuffles:", report["their_own_shuffles"],
              "| unused:", report["unused_shuffles"])
        return
    if args.check_run:
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            report = check_run(str(args.setup), args.seed, work, tuple(args.ours))
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        for e in report["experiences"]:
            t = e["experience"]
            print(f"exp {t}: acc official {report['acc_official'][t]:.2f} | ours {report['acc_ours'][t]:.2f} | "
                  f"max |ours - theirs| {e['max_abs_diff']:.2e}")
        print("misses:", report["replay_misses"], "| unused shuffles:", report["unused_shuffles"])
        return

    from benchmarks.parity.common import OFFICIAL, RunResult, load_npz, official_source, seen_accuracy

    src = official_source("coda_prompt")
    sys.path.insert(0, str(src))
    setup = load_npz(args.setup)
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    if n_tasks * cpt != 10:
        raise RuntimeError("the runner stands in for their CIFAR10 dataset (10 classes)")
    record: dict[tuple[int, int], tuple[int, int, float, int]] = {}
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
    for (t, j), (c, n, acc, _) in record.items():  # their accuracy (%) must be what was counted
        if abs(acc - 100.0 * c / n) > 1e-6:
            raise RuntimeError(f"task {t}, eval {j}: their accuracy {acc} != counted {c}/{n}")
    matrix = [[100.0 * correct[t][j] / total[t][j] if j <= t else None for j in range(n_tasks)]
              for t in range(n_tasks)]
    til = [[100.0 * record[(t, j)][3] / total[t][j] if j <= t else None for j in range(n_tasks)]
           for t in range(n_tasks)]
    repo, commit = OFFICIAL["coda_prompt"]
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=seen_accuracy(correct, total),
                    wall_s=round(time.perf_counter() - start, 2), matrix=matrix,
                    extra={"official": f"{repo}@{commit[:7]}", "til_matrix": til, "argv": argv, "hparams": HPARAMS,
                           "config_overrides": {"dataset": "CIFAR10", "schedule": cargs.schedule,
                                                "batch_size": cargs.batch_size, "lr": cargs.lr,
                                                "rand_split": False, "split_size": cpt}},
                    command=" ".join(sys.argv))
    res.write(args.out)
    print(f"{args.row} official seed {args.seed}: acc {' '.join(f'{a:.1f}' for a in res.acc)}")


if __name__ == "__main__":
    main()
