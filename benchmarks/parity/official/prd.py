"""Official PRD (``naderAsadi/Probing-Continual-Learning@8b82d53``, ``methods/repe.py``) on the parity setup.

    python benchmarks/parity/official/prd.py --row prd --setup SETUP.npz --seed 0 --out result.json

PRD trains a CIFAR ResNet-18 from scratch (no pre-trained weights on either side). We run THEIR ``main.py``
(``main()``: ``get_parser`` -> ``get_data_and_tfs`` -> ``SupConResNet`` -> ``RePE`` -> ``train``: the per-task epoch
loop with ``adjust_learning_rate`` at every epoch start, ``agent.observe`` per batch, ``agent.eval_agent`` after the
last epoch of each task, ``on_task_finish`` (teacher snapshot)) with the README's PRD command line scaled down;
nothing of their code is copied or edited. What the shim swaps in at run time (``_install_shim``), and why:

* **Missing packages**: ``wandb`` (imported by ``utils/logger.py`` and ``methods/base.py``, unused with
  ``--wandb 0``) and ``fvcore`` (``methods/base.py``: ``FlopCountAnalysis``, only used by ``one_sample_flop``,
  never called) are ``sys.modules`` stubs. ``kornia==0.6.1`` (the README's pinned version) is installed into the
  harness venv: its augmentation pipeline is part of the method and runs UNCHANGED (``CIFAR.train_transforms``:
  RandomCrop(32, pad 4, fill -1), h-flip, ColorJitter(0.4, 0.4, 0.4, p 0.8), RandomGrayscale(p 0.2)).
* **Data**: ``data.base.CIFAR10`` (looked up by ``get_data_and_tfs`` at call time) is replaced by a subclass of
  THEIR ``data.cifar.CIFAR`` (so ``train_transforms`` = their kornia pipeline, ``base/eval_transforms`` = None)
  that serves the setup arrays exactly as their ``CIFAR10`` serves CIFAR: float tensors ``(x / 255 - 0.5) * 2``
  in [-1, 1], ``__getitem__`` = their ``x.squeeze(), y``. The grey (N, 32, 32) images are **tiled to 3 channels**:
  their ``ResNet`` hard-codes ``in_channel=3`` (``SupConResNet`` does not pass it), their ``__getitem__`` squeezes
  a 1-channel image to (32, 32), and kornia's saturation/greyscale need 3 channels. On a grey image the three
  tiled channels stay equal through the whole pipeline (measured: max channel difference 0; kornia's saturation
  and hue go through HSV with s = 0, and greyscale weights sum to 1), so the 3-channel conv1 sees three copies of
  one image; ours runs the same pixels as 1 channel (``scenario=npz`` serves them so). A conv with 3 tied input
  channels equals a 1-channel conv whose kernel is the sum of the three; with BatchNorm right after conv1 the
  function is scale-invariant in that kernel and SGD's relative (angular) update is the same as for one channel
  of sqrt(3)-smaller std, so the two sides are equivalent in distribution (not bit-identical).
  Labels are already class-order positions, so their ``ContinualSampler`` (``np.unique`` classes, task t = labels
  2t, 2t+1) gives the setup's experiences. ``--dataset cifar10`` only selects that slot (``default_n_tasks`` 5).
* **Loaders**: ``--num_workers 0`` (same batches; workers only cost start-up time on the 1-thread harness). Their
  ``DataLoader`` keeps the last partial batch (``drop_last`` False; ours: ``data.drop_last=false``).
* **Seed**: their ``set_seed(--seed)`` (NumPy, random, torch) as in their ``main``; parity is statistical over
  seeds 0 1 2.
* **Hyperparameters** (the README command, scaled down identically on both sides): resnet18 ``--nf 8`` (64-d
  features), projection 64-64-32 (3 layers, no BN), ``--batch_size 32``, ``--lr 0.05`` (README 0.01: too slow for
  8 epochs) = ``--prototypes_lr`` (their per-epoch ``adjust_learning_rate`` overwrites every group's lr anyway),
  ``--n_epochs 5 --n_warmup_epochs 3`` (README 100 + 120), ``--lr_decay_epochs 4,6`` (README 120,160: decay
  inside the first task's warm-up, as there), ``--supcon_temperature 0.1 --distill_coef 4 --prototypes_coef 2
  --distill_temp 1``, momentum 0.9 and weight decay 1e-4 (their defaults), ``--use_augs 1``.
* **Evaluation**: THEIR ``eval_agent`` with ``--task_incremental 1 --singlelinear_eval 1 --keep_training_data 0``
  (the README's setting: per-task accuracy, argmax over that task's prototypes) gives the task-IL rows
  (``extra["til_matrix"]``, ``extra["til_acc"]`` = mean over seen tasks, as their ``Avg Acc``). ``RePE.eval_agent``
  is wrapped (at class level, calling the original first) to also compute, from THEIR model in the eval mode their
  ``evaluate`` left it in, the class-IL accuracy restricted to the seen classes (cosine of
  ``model.return_hidden(x)`` to the L2-normalised prototypes of the seen tasks, as their ``_classify_CI`` but
  without future tasks' untrained rows) = ``acc`` / ``matrix``, and their own ``_classify_CI`` over all 10
  prototype rows (``extra["cil_all_protos_acc"]``, what ``--task_incremental 0`` reports).
* **Step check** (``--check-step``, :func:`check_step`): THEIR ``RePE.process_inc`` and our ``PRD.losses`` on the
  same weights and the same two views in float64, at task 0 and at task 1 with a drifted student (distillation
  active): losses equal to ~1e-15 and every parameter's gradient to ~1e-13 relative; THEIR ``_classify``
  and our eval ``forward`` agree to 1e-16. Everything that still differs between the sides is random draws
  (init, shuffles, augmentation) and float32 round-off.
* **Run check** (``--check-run``, :func:`check_run`): THEIR ``main()`` and our ``Runner`` stepped together on a
  2-task subset (float64, same initial weights, deterministic per-image views, one full batch per epoch, 3-channel
  data on both sides): per-step losses equal to ~1e-9 through task 0 (lr decay included) and the first steps of
  task 1 (momentum carried over, distillation on), then a chaotic drift as large as the official run's own drift
  under a 1e-9 change of its inputs' rounding.
* **Shadow check** (``--check-shadow``, :func:`check_shadow`): our WHOLE run (all 5 tasks, float64, our own
  draws) shadowed step by step by THEIR update rule, with THEIR own lr schedule, momentum buffers, BatchNorm
  statistics, teacher snapshots and evaluation; only the pre-step parameters are taken from ours, so the
  comparison is free of the chaotic drift of free-running twins. ``--inject`` adds overrides to our side (the
  control that shows a wrong schedule or teacher mode is flagged at its step).
* **Augmentation check** (``--check-augment``, :func:`check_augment`): THEIR kornia views vs our ``PRDAugment``
  over 60,000 views per side, per-view statistics compared with batch-clustered standard errors and KS tests.
* **Logs**: their ``Logger`` writes ``params.json`` / ``db.pickle`` under ``--log_path`` in the temporary cwd.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

#: the values shared by both sides (one place, so the two command lines cannot drift apart)
_HP = {"nf": 8, "proj_hidden": 64, "proj_dim": 32, "batch_size": 32, "lr": 0.05, "epochs": 5, "warmup": 3,
       "milestones": [4, 6], "temperature": 0.1, "lambda_d": 4.0, "lambda_p": 2.0, "distill_t": 1.0}

#: rows of the parity table: our ``cl train`` overrides and the official runner's arguments, the same values
ROWS: dict[str, dict] = {
    "prd": {
        "ours": ["strategy=prd", "backbone=resnet18_cifar", f"backbone.nf={_HP['nf']}",
                 f"strategy.lr={_HP['lr']}", "strategy.momentum=0.9", "strategy.weight_decay=0.0001",
                 f"strategy.epochs={_HP['epochs']}", f"strategy.warmup_epochs={_HP['warmup']}",
                 f"strategy.lr_milestones=[{','.join(map(str, _HP['milestones']))}]", "strategy.lr_gamma=0.1",
                 "strategy.proto_momentum=0.0", "strategy.proto_weight_decay=0.0",
                 f"strategy.temperature={_HP['temperature']}", "strategy.base_temperature=0.07",
                 f"strategy.lambda_p={_HP['lambda_p']}", f"strategy.lambda_d={_HP['lambda_d']}",
                 f"strategy.distill_temperature={_HP['distill_t']}", "strategy.teacher_eval=false",
                 f"strategy.proj_hidden={_HP['proj_hidden']}", f"strategy.proj_dim={_HP['proj_dim']}",
                 "strategy.proj_layers=3", "strategy.augment=true", "strategy.crop_pad=4", "strategy.jitter=0.4",
                 "strategy.jitter_p=0.8", "strategy.grayscale_p=0.2", "strategy.input_convention=pm1",
                 f"data.batch_size={_HP['batch_size']}", "data.drop_last=false"],
        "official": dict(_HP),
    },
}


def _install_shim(setup_path: str) -> None:
    """Stub the unused packages and route their CIFAR10 slot to the setup arrays (see the module docstring)."""
    import numpy as np
    import torch

    wandb = types.ModuleType("wandb")
    wandb.init = wandb.log = wandb.finish = wandb.login = lambda *a, **k: None
    wandb.config = types.SimpleNamespace(update=lambda *a, **k: None)
    sys.modules["wandb"] = wandb
    fvcore = types.ModuleType("fvcore")
    fvcore_nn = types.ModuleType("fvcore.nn")
    fvcore_nn.FlopCountAnalysis = None  # only used by Method.one_sample_flop, never called
    fvcore.nn = fvcore_nn
    sys.modules["fvcore"], sys.modules["fvcore.nn"] = fvcore, fvcore_nn

    import data.base as dbase
    from data.cifar import CIFAR

    arrays = np.load(setup_path)

    class SetupArrays(CIFAR, torch.utils.data.Dataset):
        """The setup's grey images as THEIR CIFAR10 serves CIFAR: [-1, 1] floats, tiled to 3 channels."""

        default_n_tasks = int(arrays["n_tasks"])

        def __init__(self, root=None, train=True, transform=None, download=False):
            x = arrays["train_x" if train else "test_x"]
            self.data = torch.from_numpy(x).float()[:, None].repeat(1, 3, 1, 1)
            self.data = (self.data / 255.0 - 0.5) * 2.0
            self.targets = np.asarray(arrays["train_y" if train else "test_y"], dtype=np.int64)
            self.transform = transform

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, index):  # as their CIFAR10.__getitem__
            x, y = self.data[index], self.targets[index]
            if self.transform is not None:
                x = self.transform(x)
            return x.squeeze(), y

    dbase.CIFAR10 = SetupArrays


def check_step(setup_path: str) -> dict[str, float]:
    """One training step of THEIR ``RePE.process_inc`` and of our ``PRD.losses`` on the same weights and views.

    float64 throughout. Their ``SupConResNet`` (3-channel conv1) and ``RePE`` are built with the row's values, our
    PRD gets their weights (conv1: the three tied input channels summed into our one), both get the same two views
    (drawn once by our ``PRDAugment``; theirs tiled to 3 channels through ``train_tf``), and the loss and every
    parameter's gradient are compared: at task 0, and at task 1 after the teacher snapshot and an identical drift
    of both students (relation distillation active). Then THEIR ``_classify`` vs our ``forward`` in eval mode.
    Returns the largest differences (measured: losses equal to ~1e-15, gradients to ~1e-13 relative).
    """
    import copy

    import numpy as np
    import torch
    from torch import nn

    from benchmarks.parity.common import official_source

    sys.path.insert(0, str(official_source("prd")))
    _install_shim(setup_path)
    from methods.repe import RePE
    from models import SupConResNet

    from cl.config import build_config
    from cl.runner import build_scenario, build_strategy

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    hp = ROWS["prd"]["official"]
    args = types.SimpleNamespace(
        mem_size=0, input_size=(3, 32, 32), batch_size=hp["batch_size"], buffer_batch_size=64, task_free=0,
        cka_eval=0, lr=hp["lr"], momentum=0.9, weight_decay=1e-4, n_classes_per_task=2, n_tasks=5, half_iid=0,
        prototypes_lr=hp["lr"], supcon_temperature=hp["temperature"], distill_temp=hp["distill_t"],
        prototypes_coef=hp["lambda_p"], distill_coef=hp["lambda_d"], dataset="setup", use_augs=1,
        n_epochs=hp["epochs"], n_iters=1, task_incremental=1, iid_split=0, eval_layer=-1)
    model = SupConResNet(name="resnet18", head="mlp", nf=hp["nf"], input_size=(3, 32, 32), feat_dim=hp["proj_dim"],
                         hidden_dim=hp["proj_hidden"], batch_norm=False, num_layers=3)
    views: list = []
    agent = RePE(model, types.SimpleNamespace(register_name=lambda n: None), lambda x: views.pop(0), args)
    cfg = build_config(None, ["scenario=npz", f"scenario.path={setup_path}", "scenario.n_experiences=5",
                              "scenario.augment=false", *ROWS["prd"]["ours"]])
    scenario = build_scenario(cfg)
    ours = build_strategy(cfg, scenario).double()
    ctx = types.SimpleNamespace(scenario=scenario, cfg=cfg)
    ours.on_experience_start(scenario.experiences[0], ctx)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    sd = ours.state_dict()
    for k, v in model.encoder.state_dict().items():
        sd["backbone." + k] = v.sum(1, keepdim=True) if k == "conv1.weight" else v
    for i, m in zip((0, 2, 4), linears):
        sd[f"projector.net.{i}.weight"], sd[f"projector.net.{i}.bias"] = m.weight.data, m.bias.data
    for t in range(5):
        sd[f"prototypes.{t}.weight"] = agent.prototypes.heads[str(t)].weight.data
    ours.load_state_dict(sd)
    data = np.load(setup_path)

    def batch(task: int, n: int = 32):
        idx = np.flatnonzero(data["train_y"] // 2 == task)[:n]
        x = (torch.from_numpy(data["train_x"][idx]).double()[:, None] / 255 - 0.5) * 2
        return x, torch.from_numpy(data["train_y"][idx]).long()

    out: dict[str, float] = {}

    def compare(task: int) -> None:
        x, y = batch(task)
        v = [ours.augment(x), ours.augment(x)]
        views[:] = [t.repeat(1, 3, 1, 1) for t in v]
        aug = ours._modules.pop("augment")
        pending = iter(v)
        object.__setattr__(ours, "augment", lambda _x: next(pending))
        agent.train()
        ours.train()
        for p in [*model.parameters(), *agent.prototypes.parameters(), *ours.parameters()]:
            p.grad = None
        theirs_loss = agent.process_inc({"x": x.repeat(1, 3, 1, 1), "y": y.clone(), "t": task})
        our_loss = ours.losses(x, y)["loss"]
        theirs_loss.backward()
        our_loss.backward()
        object.__delattr__(ours, "augment")
        ours._modules["augment"] = aug
        grads = {"backbone." + k: p.grad for k, p in model.encoder.named_parameters()}
        grads["backbone.conv1.weight"] = model.encoder.conv1.weight.grad[:, :1]  # identical in the 3 channels
        for i, m in zip((0, 2, 4), linears):
            grads[f"projector.net.{i}.weight"], grads[f"projector.net.{i}.bias"] = m.weight.grad, m.bias.grad
        for t in range(5):
            grads[f"prototypes.{t}.weight"] = agent.prototypes.heads[str(t)].weight.grad
        worst = 0.0
        for k, p in ours.named_parameters():
            a, b = grads.get(k), p.grad
            if k.startswith("teacher.") or (a is None and b is None):
                continue
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
        out[f"task{task}_loss_abs_diff"] = abs(theirs_loss.item() - our_loss.item())
        out[f"task{task}_grad_max_rel_diff"] = worst

    compare(0)
    agent._record_state()
    ours.on_experience_end(scenario.experiences[0],
                           types.SimpleNamespace(dist=types.SimpleNamespace(world_size=1), record=lambda *a: None))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        theirs_params = dict(model.encoder.named_parameters())
        for k, p in ours.backbone.named_parameters():
            delta = 0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean()
            p.add_(delta)
            theirs_params[k].add_(delta.expand_as(theirs_params[k]) / 3 if k == "conv1.weight" else delta)
    ours.on_experience_start(scenario.experiences[1], ctx)
    compare(1)
    model.eval()
    ours.eval()
    x, _ = batch(1, 64)
    with torch.no_grad():
        theirs_logits = agent._classify(copy.deepcopy(model).return_hidden(x.repeat(1, 3, 1, 1)), 1)
        out["eval_til_logits_max_abs_diff"] = float((theirs_logits - ours(x)[:, 2:4]).abs().max())
    return out


def check_run(setup_path: str, work: str = "prd_check_run") -> list[tuple[float, float]]:
    """THEIR ``main()`` and our Lightning ``Runner`` stepped together: per-step losses of a 10-step, 2-task run.

    A 2-task x 2-class x 24-image subset of the setup, tiled to 3 channels on BOTH sides (so conv1 is the same),
    batch 48 = one full batch per epoch (the batch order the samplers draw cannot matter), 4 epochs + 2 warm-up,
    lr decay after epochs 3 and 4, float64 (ours: ``trainer.precision=64-true``), the same initial weights (theirs
    copied into ours), and deterministic per-image views (a fixed affine + clamp per call index, flipped on odd
    calls) on both sides instead of the random augmentations (those are compared separately). Returns
    ``[(official loss, our loss)]`` per step. Measured: equal to ~1e-9 through task 0 and the first steps of task 1,
    then chaotic drift (1e-4 after 10 steps), as large as the official run's own drift when only the float
    rounding of its inputs changes.
    """
    import copy
    import shutil

    import numpy as np
    import torch
    from torch import nn

    from benchmarks.parity.common import official_source

    work_dir = Path(work).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    full = np.load(setup_path)
    tr = np.concatenate([np.flatnonzero(full["train_y"] == c)[:24] for c in range(4)])
    te = np.concatenate([np.flatnonzero(full["test_y"] == c)[:20] for c in range(4)])
    npz = work_dir / "tiny.npz"
    np.savez(npz, train_x=np.repeat(full["train_x"][tr][:, None], 3, 1), train_y=full["train_y"][tr],
             test_x=np.repeat(full["test_x"][te][:, None], 3, 1), test_y=full["test_y"][te],
             mean=np.array([0.5] * 3), std=np.array([0.5] * 3), n_tasks=2, classes_per_task=2)

    class DetViews(nn.Module):
        """View number k: per-image affine + clamp, flipped when k is odd (no dependence on batch order)."""

        def __init__(self) -> None:
            super().__init__()
            self.k = 0

        def forward(self, x):
            k, self.k = self.k, self.k + 1
            v = (x * (0.6 + 0.1 * (k % 7)) + (-0.3 + 0.1 * (k % 5))).clamp(-1, 1)
            return v.flip(-1) if k % 2 else v

    sys.path.insert(0, str(official_source("prd")))
    _install_shim(str(npz))
    import data.base as dbase
    import methods.repe as repe

    class Tiled(dbase.CIFAR10):
        def __init__(self, root=None, train=True, transform=None, download=False):
            a = np.load(npz)
            self.data = ((torch.from_numpy(a["train_x" if train else "test_x"]).float() / 255.0) * 2 - 1).double()
            self.targets = np.asarray(a["train_y" if train else "test_y"], dtype=np.int64)
            self.transform = transform

        @staticmethod
        def train_transforms(use_augs=False):
            return DetViews()

    dbase.CIFAR10 = Tiled
    init: dict = {}
    losses_t: list[float] = []
    losses_o: list[float] = []
    orig_init, orig_inc = repe.RePE.__init__, repe.RePE.process_inc

    def init_wrap(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        init["model"] = copy.deepcopy(self.model.state_dict())
        init["protos"] = copy.deepcopy(self.prototypes.state_dict())

    def inc_wrap(self, inc):
        loss = orig_inc(self, inc)
        losses_t.append(loss.item())
        return loss

    repe.RePE.__init__, repe.RePE.process_inc = init_wrap, inc_wrap
    hp = ROWS["prd"]["official"]
    sys.argv = ["main.py", "--method=repe", "--dataset=cifar10", "--model=resnet18", f"--nf={hp['nf']}",
                "--use_augs=1", f"--projection_size={hp['proj_dim']}", f"--projection_hidden_size={hp['proj_hidden']}",
                "--task_incremental=1", "--keep_training_data=0", "--singlelinear_eval=1", "--n_tasks=2",
                "--n_epochs=4", "--n_warmup_epochs=2", "--batch_size=48", f"--lr={hp['lr']}",
                f"--supcon_temperature={hp['temperature']}", f"--distill_coef={hp['lambda_d']}",
                f"--prototypes_coef={hp['lambda_p']}", f"--prototypes_lr={hp['lr']}",
                f"--distill_temp={hp['distill_t']}",
                "--lr_decay_epochs=3,4", "--num_workers=0", "--seed=0", f"--log_path={work_dir}/outputs/"]
    torch.set_default_dtype(torch.float64)
    import main as official_main

    official_main.main()
    torch.set_default_dtype(torch.float32)

    import strategies.prd as ours_mod
    from cl.config import build_config
    from cl.runner import Runner

    views = DetViews()
    ours_mod.PRDAugment.forward = lambda self, x: views(x)
    start, losses_fn, forward = ours_mod.PRD.on_experience_start, ours_mod.PRD.losses, ours_mod.PRD.forward

    def start_wrap(self, exp, ctx):
        start(self, exp, ctx)
        if exp.index:
            return
        sd = self.state_dict()
        sd.update({"backbone." + k[len("encoder."):]: v for k, v in init["model"].items() if k.startswith("encoder.")})
        heads = [k for k in init["model"] if k.startswith("head.") and k.endswith(".weight")]
        for i, k in zip((0, 2, 4), heads):
            sd[f"projector.net.{i}.weight"] = init["model"][k]
            sd[f"projector.net.{i}.bias"] = init["model"][k[: -len("weight")] + "bias"]
        sd.update({f"prototypes.{t}.weight": init["protos"][f"heads.{t}.weight"] for t in range(2)})
        self.load_state_dict({k: v.to(self.state_dict()[k].dtype) for k, v in sd.items()})

    def losses_wrap(self, x, y):
        out = losses_fn(self, x, y)
        losses_o.append(out["loss"].item())
        return out

    ours_mod.PRD.on_experience_start, ours_mod.PRD.losses = start_wrap, losses_wrap
    # cl.evaluation feeds float32 batches; the 64-true model takes doubles
    ours_mod.PRD.forward = lambda self, x: forward(self, x.to(next(self.backbone.parameters()).dtype))
    keep = [o for o in ROWS["prd"]["ours"]
            if not o.startswith(("strategy.epochs", "strategy.warmup", "strategy.lr_milestones", "data.batch_size"))]
    shutil.rmtree(work_dir / "ours", ignore_errors=True)
    cfg = build_config(None, ["scenario=npz", f"scenario.path={npz}", "scenario.n_experiences=2",
                              "scenario.augment=false", "seed=0", f"run.dir={work_dir / 'ours'}",
                              "run.checkpoint=false",
                              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.logger=none",
                              "trainer.precision=64-true", *keep, "strategy.epochs=4", "strategy.warmup_epochs=2",
                              "strategy.lr_milestones=[3,4]", "data.batch_size=48"])
    Runner(cfg).run()
    return list(zip(losses_t, losses_o))


def check_shadow(setup_path: str, seed: int, n_tasks: int = 5, extra: list[str] | None = None,
                 work: str = "prd_check_shadow") -> dict:
    """Our whole ``Runner`` run, shadowed step by step by THEIR update rule (float64, every task, real draws).

    Our run is the parity row's (``ROWS["prd"]["ours"]``, seed ``seed``, its own initial weights, loader shuffles
    and ``PRDAugment`` views), on the setup tiled to 3 channels (so conv1 has one shape on both sides) and in
    float64 (``trainer.precision=64-true``). A shadow official agent (THEIR ``SupConResNet`` + ``RePE``, float64)
    follows it: before each of our optimizer steps the shadow's parameters are set to ours; after our step the
    shadow takes THEIR step (``RePE.observe``: ``process_inc`` + ``update``) on the same batch (our labels and our
    two views, fed through their ``train_tf`` slot) and the two post-step states are compared. Everything else the
    shadow keeps as the official run would: its own SGD momentum buffers (one optimizer for the whole run), its own
    learning rate (THEIR ``adjust_learning_rate`` at each epoch start, the epoch counted from the step index, not
    from our trainer), its own BatchNorm running statistics, its own teacher (THEIR ``on_task_finish`` after the
    last step of a task) and its own evaluation (THEIR ``predict``: task-IL ``_classify``; class-IL as the
    runner's ``eval_agent`` wrapper). Because both steps start from the same parameters, the chaotic amplification
    of free-running twins cannot occur: the per-step difference is round-off unless an update rule, a schedule,
    a momentum carry-over, a teacher snapshot or a BatchNorm statistic differs somewhere in the run, and then it
    jumps at that step. The torch RNG is forked around every shadow call, so our run is the normal run of ours.
    ``extra`` appends overrides to our side only (the control: a deliberately wrong schedule must be flagged).
    """
    import math
    import shutil

    import numpy as np
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    from benchmarks.parity.common import official_source

    work_dir = Path(work).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    full = np.load(setup_path)
    cpt = int(full["classes_per_task"])
    keep_tr, keep_te = full["train_y"] < n_tasks * cpt, full["test_y"] < n_tasks * cpt
    npz = work_dir / "tiled.npz"
    np.savez(npz, train_x=np.repeat(full["train_x"][keep_tr][:, None], 3, 1), train_y=full["train_y"][keep_tr],
             test_x=np.repeat(full["test_x"][keep_te][:, None], 3, 1), test_y=full["test_y"][keep_te],
             mean=np.array([0.5] * 3), std=np.array([0.5] * 3), n_tasks=n_tasks, classes_per_task=cpt)
    train_y = full["train_y"][keep_tr]
    test_x = (torch.from_numpy(full["test_x"][keep_te]).double()[:, None].repeat(1, 3, 1, 1) / 255.0 - 0.5) * 2.0
    test_y = torch.from_numpy(full["test_y"][keep_te].astype(np.int64))

    sys.path.insert(0, str(official_source("prd")))
    _install_shim(str(npz))
    from methods.repe import RePE
    from models import SupConResNet
    from utils import adjust_learning_rate

    hp = ROWS["prd"]["official"]
    args = types.SimpleNamespace(
        mem_size=0, input_size=(3, 32, 32), batch_size=hp["batch_size"], buffer_batch_size=64, task_free=0,
        cka_eval=0, lr=hp["lr"], momentum=0.9, weight_decay=1e-4, n_classes_per_task=cpt, n_tasks=n_tasks,
        half_iid=0, prototypes_lr=hp["lr"], supcon_temperature=hp["temperature"], distill_temp=hp["distill_t"],
        prototypes_coef=hp["lambda_p"], distill_coef=hp["lambda_d"], dataset="setup", use_augs=1,
        n_epochs=hp["epochs"], n_warmup_epochs=hp["warmup"], n_iters=1, task_incremental=1, iid_split=0,
        eval_layer=-1, multilinear_eval=0, singlelinear_eval=1, keep_training_data=0,
        lr_decay_epochs=list(hp["milestones"]), lr_decay_rate=0.1, save_snapshot=0)
    torch.set_default_dtype(torch.float64)
    model = SupConResNet(name="resnet18", head="mlp", nf=hp["nf"], input_size=(3, 32, 32), feat_dim=hp["proj_dim"],
                         hidden_dim=hp["proj_hidden"], batch_norm=False, num_layers=3).double()
    views: list = []
    agent = RePE(model, types.SimpleNamespace(register_name=lambda n: None), lambda x: views.pop(0), args)
    torch.set_default_dtype(torch.float32)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    theirs = {"backbone." + k: p for k, p in model.encoder.named_parameters()}
    for i, m in zip((0, 2, 4), linears):
        theirs[f"projector.net.{i}.weight"], theirs[f"projector.net.{i}.bias"] = m.weight, m.bias
    for t in range(n_tasks):
        theirs[f"prototypes.{t}.weight"] = agent.prototypes.heads[str(t)].weight
    steps_per_epoch = [math.ceil(int((train_y // cpt == t).sum()) / hp["batch_size"]) for t in range(n_tasks)]

    import strategies.prd as ours_mod
    from cl.config import build_config
    from cl.runner import Runner

    captured: list = []
    aug_forward, losses_fn, forward = ours_mod.PRDAugment.forward, ours_mod.PRD.losses, ours_mod.PRD.forward

    def aug_wrap(self, x):
        v = aug_forward(self, x)
        captured.append(v.detach().clone())
        return v

    def losses_wrap(self, x, y):
        captured.append(y.detach().clone())
        out = losses_fn(self, x, y)
        captured.append(out["loss"].item())
        return out

    ours_mod.PRDAugment.forward, ours_mod.PRD.losses = aug_wrap, losses_wrap
    ours_mod.PRD.forward = lambda self, x: forward(self, x.to(next(self.backbone.parameters()).dtype))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / a.abs().max().clamp_min(1e-300))

    def evaluate_shadow(task: int) -> dict[str, list[float]]:
        """THEIR predict (task-IL) and the runner's class-IL rule, on THEIR model in eval mode, then train mode."""
        agent.eval()
        agent.prototypes.eval()
        til, cil = [], []
        with torch.no_grad():
            h = torch.cat([model.return_hidden(test_x[i:i + 500]) for i in range(0, len(test_x), 500)])
            seen = F.normalize(torch.cat([agent.prototypes.heads[str(t)].weight for t in range(task + 1)]), dim=1)
            pred_cil = (F.normalize(h, dim=1) @ seen.T).argmax(1)
            for j in range(task + 1):
                m = test_y // cpt == j
                logits, _ = agent.predict(test_x[m], j)
                til.append(100.0 * float((logits.argmax(1) == test_y[m] - j * cpt).double().mean()))
                cil.append(100.0 * float((pred_cil[m] == test_y[m]).double().mean()))
        agent.train()
        return {"til": til, "cil": cil}

    log: dict = {"steps": [], "tasks": [], "shadow_eval": []}
    state = {"task": -1, "step_in_task": 0}

    class Shadow(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            task = pl_module.exp_index
            if task != state["task"]:
                if state["task"] >= 0:  # THEIR order at a task's end: evaluate, then on_task_finish (teacher)
                    log["shadow_eval"].append(evaluate_shadow(state["task"]))
                    with torch.random.fork_rng():
                        agent.on_task_finish(state["task"])
                    ours_t, theirs_t = pl_module.teacher, agent.prev_model
                    tp = dict(ours_t.encoder.named_parameters())
                    entry = {"task": task,
                             "teacher_encoder_rel": max(rel(tp[k], p) for k, p in theirs_t.encoder.named_parameters()),
                             "teacher_protos_rel": max(rel(ours_t.prototypes[t].weight,
                                                           agent.prev_prototypes.heads[str(t)].weight)
                                                       for t in range(n_tasks)),
                             "bn_running_rel": max(rel(b, dict(model.encoder.named_buffers())[k])
                                                   for k, b in pl_module.backbone.named_buffers()
                                                   if b.dtype.is_floating_point)}
                    log["tasks"].append(entry)
                state["task"], state["step_in_task"] = task, 0
            with torch.no_grad():
                for k, p in pl_module.named_parameters():
                    if k in theirs:
                        theirs[k].copy_(p)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            task, k = state["task"], state["step_in_task"]
            y, v1, v2, our_loss = captured[-4], captured[-3], captured[-2], captured[-1]
            captured.clear()
            with torch.random.fork_rng():
                if k % steps_per_epoch[task] == 0:
                    adjust_learning_rate(args, agent.opt, k // steps_per_epoch[task])  # THEIR per-epoch lr
                views[:] = [v1, v2]
                their_loss = float(agent.observe({"x": v1, "y": y.clone(), "t": task}, update_buffer=False))
            opt = pl_module.optimizers().optimizer
            p_rel = b_rel = 0.0
            for name, p in pl_module.named_parameters():
                if name not in theirs:
                    continue
                q = theirs[name]
                p_rel = max(p_rel, rel(p.detach(), q.detach()))
                mb, mq = opt.state.get(p, {}).get("momentum_buffer"), agent.opt.state.get(q, {}).get("momentum_buffer")
                if (mb is None) != (mq is None):
                    b_rel = float("inf")
                elif mb is not None:
                    b_rel = max(b_rel, rel(mb, mq))
            log["steps"].append([task, k // steps_per_epoch[task], opt.param_groups[0]["lr"],
                                 agent.opt.param_groups[0]["lr"], our_loss, their_loss, p_rel, b_rel])
            state["step_in_task"] = k + 1

    shutil.rmtree(work_dir / "ours", ignore_errors=True)
    cfg = build_config(None, ["scenario=npz", f"scenario.path={npz}", f"scenario.n_experiences={n_tasks}",
                              "scenario.augment=false", f"seed={seed}", f"run.dir={work_dir / 'ours'}",
                              "run.checkpoint=false", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                              "trainer.logger=none", "trainer.precision=64-true", *ROWS["prd"]["ours"],
                              *(extra or [])])
    Runner(cfg, callbacks=[Shadow()]).run()
    log["shadow_eval"].append(evaluate_shadow(state["task"]))
    import json

    metrics = json.loads((work_dir / "ours" / "metrics.json").read_text())
    log["ours_cil"] = [[None if v is None else 100.0 * v for v in r] for r in metrics["accuracy_matrix"]]
    log["ours_til"] = [[None if v is None else 100.0 * v for v in r] for r in metrics["til_accuracy_matrix"]]
    return log


def check_augment(setup_path: str, n_images: int = 2000, repeats: int = 10, seed: int = 0) -> dict[str, dict]:
    """THEIR kornia-0.6.1 view pipeline vs our ``PRDAugment``: per-view statistics over many draws, two-sample tests.

    ``n_images`` training images x ``repeats`` draws per side, in batches of the row's size (kornia draws the jitter
    order per batch, as ours): theirs on the images tiled to 3 channels (as the official run sees them, channel 0
    kept), ours on the 1-channel images (as our run sees them). For each view: mean, std, share of pixels exactly 0,
    share negative, share at -1 (crop padding and background), and the mean of its left and top 4-pixel borders
    (crop offset and flip). The jitter's order is drawn once per batch on both sides, so the views of one batch are
    not independent: each statistic is averaged per batch and the batch means are the samples. Returns, per
    statistic, both sides' mean, the difference with its standard error and the Kolmogorov-Smirnov p-value of the
    two samples of batch means.
    """
    import numpy as np
    import torch
    from scipy.stats import ks_2samp

    from benchmarks.parity.common import official_source

    sys.path.insert(0, str(official_source("prd")))
    _install_shim(setup_path)
    from data.cifar import CIFAR

    import strategies.prd as ours_mod

    torch.manual_seed(seed)
    data = np.load(setup_path)
    x = (torch.from_numpy(data["train_x"][:n_images]).float()[:, None] / 255.0 - 0.5) * 2.0
    theirs_tf = CIFAR.train_transforms(use_augs=True)
    ours_tf = ours_mod.PRDAugment(4, 0.4, 0.8, 0.2, "kornia")
    bs = ROWS["prd"]["official"]["batch_size"]

    def stats(v: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = v.flatten(1)
        return {"mean": flat.mean(1), "std": flat.std(1), "zero": (flat == 0).float().mean(1),
                "near_zero": (flat.abs() < 1e-5).float().mean(1),
                "negative": (flat < 0).float().mean(1), "at_minus_1": (flat <= -1 + 1e-6).float().mean(1),
                "left_border": v[..., :, :4].mean((1, 2, 3)), "top_border": v[..., :4, :].mean((1, 2, 3))}

    out: dict[str, list] = {"theirs": [], "ours": []}
    with torch.no_grad():
        for _ in range(repeats):
            for i in range(0, len(x), bs):
                b = x[i:i + bs]
                out["theirs"].append({k: v.mean() for k, v in stats(theirs_tf(b.repeat(1, 3, 1, 1))[:, :1]).items()})
                out["ours"].append({k: v.mean() for k, v in stats(ours_tf(b)).items()})
    res: dict[str, dict] = {}
    for k in out["theirs"][0]:
        a = torch.stack([d[k] for d in out["theirs"]]).double().numpy()
        o = torch.stack([d[k] for d in out["ours"]]).double().numpy()
        se = float(np.sqrt(a.var(ddof=1) / len(a) + o.var(ddof=1) / len(o)))
        res[k] = {"theirs": float(a.mean()), "ours": float(o.mean()), "diff": float(o.mean() - a.mean()), "se": se,
                  "ks_p": float(ks_2samp(a, o).pvalue), "n_batches": len(a)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row")
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--out")
    ap.add_argument("--check-step", action="store_true", help="only compare one training step (float64), print it")
    ap.add_argument("--check-run", action="store_true", help="only step a 10-step 2-task run on both sides, print it")
    ap.add_argument("--check-shadow", action="store_true",
                    help="our whole run (float64) shadowed step by step by THEIR update rule; JSON log to --out")
    ap.add_argument("--tasks", type=int, default=5, help="--check-shadow: the first N tasks of the setup")
    ap.add_argument("--inject", nargs="*", default=[], help="--check-shadow: extra overrides of OUR side (controls)")
    ap.add_argument("--repeats", type=int, default=10, help="--check-augment: draws per image and side")
    ap.add_argument("--check-augment", action="store_true",
                    help="THEIR kornia views vs our PRDAugment: per-view statistics, two-sample tests (JSON to --out)")
    a = ap.parse_args()
    if a.check_augment:
        import json

        res = check_augment(a.setup, repeats=a.repeats)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        for k, r in res.items():
            print(f"{k:>12}: theirs {r['theirs']:+.4f} ours {r['ours']:+.4f} diff {r['diff']:+.5f} "
                  f"(se {r['se']:.5f}) KS p {r['ks_p']:.3f} batches {r['n_batches']}")
        return
    if a.check_shadow:
        import json

        log = check_shadow(a.setup, 0 if a.seed is None else a.seed, a.tasks, a.inject)
        log.update(seed=a.seed, n_tasks=a.tasks, inject=a.inject)
        if a.out:
            Path(a.out).write_text(json.dumps(log) + "\n")
        worst = {}
        for task, _, lr_o, lr_t, _, _, p_rel, b_rel in log["steps"]:
            w = worst.setdefault(task, [0.0, 0.0, 0.0])
            w[0], w[1], w[2] = max(w[0], p_rel), max(w[1], b_rel), max(w[2], abs(lr_o - lr_t))
        for task, (p_rel, b_rel, lr_d) in worst.items():
            print(f"task {task}: params max rel diff {p_rel:.1e}, momentum {b_rel:.1e}, lr {lr_d:.1e}")
        for e in log["tasks"]:
            print(e)
        for t, ev in enumerate(log["shadow_eval"]):
            ours_til, ours_cil = log["ours_til"][t][: t + 1], log["ours_cil"][t][: t + 1]
            print(f"after task {t}: til theirs {[round(v, 2) for v in ev['til']]} "
                  f"ours {[round(v, 2) for v in ours_til]} | cil theirs {[round(v, 2) for v in ev['cil']]} "
                  f"ours {[round(v, 2) for v in ours_cil]}")
        return
    if a.check_run:
        for i, (t, o) in enumerate(check_run(a.setup)):
            print(f"step {i}: official loss {t:.10f} ours {o:.10f} diff {abs(t - o):.1e}")
        return
    if a.check_step:
        for k, v in check_step(a.setup).items():
            print(f"{k}: {v:.3e}")
        return
    if a.row is None or a.seed is None or a.out is None:
        ap.error("--row, --seed and --out are required (unless --check-step)")
    spec = ROWS[a.row]["official"]

    from benchmarks.parity.common import RunResult, official_source, seen_accuracy

    src = official_source("prd")
    sys.path.insert(0, str(src))
    _install_shim(a.setup)

    import methods.repe as repe
    import numpy as np
    import torch
    import torch.nn.functional as F

    test = np.load(a.setup)
    n_tasks, cpt = int(test["n_tasks"]), int(test["classes_per_task"])
    tx = (torch.from_numpy(test["test_x"]).float()[:, None].repeat(1, 3, 1, 1) / 255.0 - 0.5) * 2.0
    ty = torch.from_numpy(np.asarray(test["test_y"], dtype=np.int64))
    til_rows: list[list[float]] = []
    correct: list[list[int]] = []
    total: list[list[int]] = []
    all_protos_acc: list[float] = []
    proto_norms: list[list[float]] = []
    proto_cos: list[list[float]] = []
    original = repe.RePE.eval_agent

    def eval_agent(self, loader, task, mode="valid"):
        accs = original(self, loader, task, mode)  # THEIR task-IL evaluation; leaves the model in eval mode
        til_rows.append([float(v) for v in accs])
        with torch.no_grad():
            self.model.eval()
            h = torch.cat([self.model.return_hidden(tx[i:i + 500]) for i in range(0, len(tx), 500)])
            heads = [self.prototypes.heads[str(t)].weight for t in range(n_tasks)]
            seen = F.normalize(torch.cat(heads[: task + 1]), dim=1)
            pred = (F.normalize(h, dim=1) @ seen.T).argmax(1)
            pred_all = self._classify_CI(h).argmax(1)  # their class-IL head: every prototype row, future included
        mask = ty < (task + 1) * cpt
        all_protos_acc.append(100.0 * float((pred_all[mask] == ty[mask]).float().mean()))
        correct.append([int(((pred == ty) & (ty // cpt == j)).sum()) for j in range(n_tasks)])
        total.append([int((ty // cpt == j).sum()) for j in range(n_tasks)])
        proto_norms.append([round(w.norm().item(), 6) for w in heads[: task + 1]])
        proto_cos.append([round((F.normalize(w[:1], dim=1) @ F.normalize(w[1:], dim=1).T).max().item(), 6)
                          for w in heads[: task + 1]])
        return accs

    repe.RePE.eval_agent = eval_agent

    log_dir = Path("outputs").resolve()
    sys.argv = ["main.py", "--method=repe", "--dataset=cifar10", "--data_root=unused", "--model=resnet18",
                f"--nf={spec['nf']}", "--use_augs=1", f"--projection_size={spec['proj_dim']}",
                f"--projection_hidden_size={spec['proj_hidden']}", "--task_incremental=1", "--keep_training_data=0",
                "--multilinear_eval=0", "--singlelinear_eval=1", f"--n_tasks={n_tasks}",
                f"--n_epochs={spec['epochs']}", f"--n_warmup_epochs={spec['warmup']}",
                f"--batch_size={spec['batch_size']}", f"--lr={spec['lr']}",
                f"--supcon_temperature={spec['temperature']}", f"--distill_coef={spec['lambda_d']}",
                f"--prototypes_coef={spec['lambda_p']}", f"--prototypes_lr={spec['lr']}",
                f"--distill_temp={spec['distill_t']}", f"--lr_decay_epochs={','.join(map(str, spec['milestones']))}",
                "--num_workers=0", f"--seed={a.seed}", f"--log_path={log_dir}/", "--snapshot_path=snapshots/"]
    import main as official_main

    official_main.main()

    matrix = [[100.0 * c[j] / n[j] if j <= i else None for j in range(n_tasks)]
              for i, (c, n) in enumerate(zip(correct, total))]
    til_matrix = [[v if j <= i else None for j, v in enumerate(r)] for i, r in enumerate(til_rows)]
    res = RunResult(row=a.row, side="official", seed=a.seed, acc=seen_accuracy(correct, total), wall_s=0.0,
                    matrix=matrix,
                    extra={"til_matrix": til_matrix,
                           "til_acc": [float(np.mean(r[: i + 1])) for i, r in enumerate(til_rows)],
                           "cil_all_protos_acc": all_protos_acc, "proto_norms": proto_norms,
                           "proto_max_cos": proto_cos})
    import json

    res.write(a.out)


if __name__ == "__main__":
    main()
