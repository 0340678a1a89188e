"""Official side of the L2P row: JH-LEE-KR/l2p-pytorch@f7bc994 (``main.py`` + ``engine.py``), run unmodified.

    python benchmarks/parity/official/l2p.py --row l2p --setup SETUP.npz --seed 0 --out result.json

Their ``main.main(args)`` runs as ``main.py`` does it, with ``args`` from their own parser (``configs/
cifar100_l2p.py``: the paper's values; the tiny-setup values are given as their own command-line flags, see
:func:`official_argv`): their ``create_model`` calls, freezing, ``lr * batch / 256`` scaling, ``create_optimizer``
(timm's Adam), ``engine.train_and_evaluate`` (masked CE minus ``pull_constraint_coeff * reduce_sim``, gradient
clipping, a new optimizer per task) and ``evaluate_till_now``. Nothing in the source tree is edited or copied; the
runner swaps in, at run time (:func:`install_shims`):

* Backbone: ``main.create_model`` (timm's registry with the ImageNet weights download) -> THEIR
  ``vision_transformer.VisionTransformer`` (with their ``Prompt`` pool / DualPrompt's ``EPrompt`` and
  ``PreT_Attention``) at the tiny size (img 32, patch 4, in_chans 1, width 64, depth 4, heads 2, mlp 4, qkv bias)
  with every keyword their ``main`` passes, loaded with the committed tiny ViT's weights through THEIR
  ``checkpoint_filter_fn`` (which resizes ``pos_embed`` as for the real weights: the class token's position is
  expanded to the prompt positions). Only prompt/head parameters may be missing; nothing may be unexpected.
* Data: ``datasets.get_dataset`` -> a torchvision-style data set over the setup arrays (grey 32x32 PIL images,
  ``targets``, ``classes``; labels already in class order), so THEIR ``split_single_dataset`` (natural order, 2
  classes per task), class masks, ``RandomSampler``/``SequentialSampler`` loaders and batch sizes are used.
  ``datasets.build_transform`` (RandomResizedCrop(scale 0.05-1) + flip + ToTensor / Resize + CenterCrop +
  ToTensor) -> ``ToTensor()`` alone: the ``unit`` convention, no augmentation on either side (common.py).
* ``torch.cuda.synchronize`` (called after every step in ``train_one_epoch``) -> a no-op on CPU.
* Config values (command-line flags, not code): ``--device cpu``, ``--num_workers 0``, ``--no-pin-mem``,
  ``--output_dir ''`` (no checkpoint files), ``--input-size 32``, ``--num_tasks 5``, the tiny hyper-parameters.
  Their boolean flags use ``type=bool`` (any string is True), so only flags whose official default is kept are
  left out; none is passed as ``False``.
* Recording only (no effect on training): ``engine.evaluate_till_now`` is wrapped to open one record per call (after
  each task) and ``engine.accuracy`` to keep, inside ``evaluate`` (no-grad), the argmax over all classes (their
  prediction) and, as an extra, the argmax over the seen classes only (ours). The seen accuracy written to ``--out``
  is checked against their own per-task ``Acc@1``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

#: the tiny hyper-parameters (identical on both sides; the paper's CIFAR-100 values except the epochs)
HPARAMS: dict[str, Any] = {
    "batch_size": 16,  # the official per-device batch; lr = 0.03 * 16 / 256 = 0.001875 (their main scales it)
    "epochs": 2,  # smoke-scale substitute for 5
    "size": 10, "length": 5, "top_k": 5,  # pool, prompt length, selected prompts (the paper's)
}

ROWS: dict[str, dict] = {
    "l2p": {
        "ours": ["strategy=l2p", "backbone=vit_p4_w64_d4",
                 "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt",
                 "strategy.lr=0.001875", f"strategy.epochs={HPARAMS['epochs']}",
                 f"strategy.pool_size={HPARAMS['size']}", f"strategy.prompt_length={HPARAMS['length']}",
                 f"strategy.top_k={HPARAMS['top_k']}", "strategy.batchwise_prompt=always", "strategy.pull_coeff=0.1",
                 "strategy.head_type=prompt", f"data.batch_size={HPARAMS['batch_size']}",
                 f"data.eval_batch_size={HPARAMS['batch_size']}", "data.drop_last=false"],
        "official": {"name": "l2p", "config": "cifar100_l2p",
                     "flags": ["--batch-size", str(HPARAMS["batch_size"]), "--epochs", str(HPARAMS["epochs"]),
                               "--size", str(HPARAMS["size"]), "--length", str(HPARAMS["length"]),
                               "--top_k", str(HPARAMS["top_k"])]},
    },
}


def official_argv(spec: dict, setup: dict, seed: int) -> list[str]:
    n_tasks = int(setup["n_tasks"])
    return [spec["config"], "--model", "vit_parity_tiny", "--dataset", "Split-Parity", "--data-path", ".",
            "--num_tasks", str(n_tasks), "--input-size", "32", "--device", "cpu", "--num_workers", "0",
            "--no-pin-mem", "--output_dir", "", "--seed", str(seed), *spec["flags"]]


def install_shims(setup: dict, captured: dict) -> None:
    """Swap in the CPU / tiny-setup pieces (see the module docstring) after importing their modules."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    warnings.filterwarnings("ignore")
    import datasets
    import engine
    import main
    import vision_transformer

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    class SetupData(torch.utils.data.Dataset):
        def __init__(self, x: np.ndarray, y: np.ndarray, transform: Any) -> None:
            self.x, self.targets, self.transform = x, [int(v) for v in y], transform
            self.classes = [str(c) for c in range(int(setup["n_tasks"]) * int(setup["classes_per_task"]))]

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            return self.transform(Image.fromarray(self.x[i], mode="L")), self.targets[i]

    def get_dataset(name: str, transform_train: Any, transform_val: Any, args: Any) -> tuple[Any, Any]:
        assert name == "Parity", name
        return (SetupData(setup["train_x"], setup["train_y"], transform_train),
                SetupData(setup["test_x"], setup["test_y"], transform_val))

    datasets.get_dataset = get_dataset
    datasets.build_transform = lambda is_train, args: transforms.ToTensor()
    torch.cuda.synchronize = lambda *a, **k: None

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        a = VIT_ARCH
        kwargs.pop("drop_block_rate", None)
        model = vision_transformer.VisionTransformer(
            img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"], embed_dim=a["embed_dim"],
            depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True, **kwargs)
        state = vision_transformer.checkpoint_filter_fn(vit_state_dict(), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all(k.startswith(("head.", "prompt.", "e_prompt.", "g_prompt")) for k in missing), missing
        captured.setdefault("missing", sorted(missing))
        return model

    main.create_model = create_model

    evaluate_till_now = engine.evaluate_till_now
    accuracy = engine.accuracy

    def evaluate_till_now_recording(*args: Any, **kwargs: Any) -> Any:
        captured.setdefault("evals", []).append({"pred": [], "pred_seen": [], "true": []})
        captured["task"] = int(kwargs.get("task_id", args[4] if len(args) > 4 else -1))
        out = evaluate_till_now(*args, **kwargs)
        acc_matrix = kwargs.get("acc_matrix")
        captured.setdefault("their_acc", []).append([float(v) for v in acc_matrix[: captured["task"] + 1,
                                                                                    captured["task"]]])
        return out

    def accuracy_recording(output: torch.Tensor, target: torch.Tensor, topk: tuple = (1,)) -> Any:
        if not torch.is_grad_enabled() and captured.get("evals"):
            rec = captured["evals"][-1]
            seen = (captured["task"] + 1) * int(setup["classes_per_task"])
            rec["pred"].append(output.argmax(1).numpy().copy())
            rec["pred_seen"].append(output[:, :seen].argmax(1).numpy().copy())
            rec["true"].append(target.numpy().copy())
        return accuracy(output, target, topk=topk)

    engine.evaluate_till_now = evaluate_till_now_recording
    engine.accuracy = accuracy_recording


def _official_args(source: str, spec: dict, setup: dict, seed: int) -> argparse.Namespace:
    """Their config parser, built as their ``__main__`` block builds it, on :func:`official_argv`."""
    parser = argparse.ArgumentParser(f"{source} training and evaluation configs")
    subparser = parser.add_subparsers(dest="subparser_name")
    config_mod = __import__(f"configs.{spec['config']}", fromlist=["get_args_parser"])
    config_mod.get_args_parser(subparser.add_parser(spec["config"]))
    return parser.parse_args(official_argv(spec, setup, seed))


def _copy_ours_into_theirs(source: str, ours: Any, theirs: Any) -> None:
    """Our pool / G-prompt / head values into their modules, in their layouts."""
    import torch

    with torch.no_grad():
        theirs.head.load_state_dict(ours.head.state_dict())
        if source == "l2p":
            theirs.prompt.prompt.copy_(ours.pool.prompt)
            theirs.prompt.prompt_key.copy_(ours.pool.key)
            return
        h = theirs.blocks[0].attn.num_heads
        e = ours.pool.prompt  # (pool, layers, 2, L, D) -> (layers, 2, pool, L, heads, hd)
        theirs.e_prompt.prompt.copy_(e.permute(1, 2, 0, 3, 4).reshape(*e.shape[1:3], e.shape[0], e.shape[3], h, -1))
        theirs.e_prompt.prompt_key.copy_(ours.pool.key)
        for i, b in enumerate(ours.g_layers):  # (layers, 2, L, heads, hd)
            g = ours.backbone.blocks[b].attn.pet_modules["g_prompt"]
            theirs.g_prompt[i, 0].copy_(g.key.reshape(g.key.shape[0], h, -1))
            theirs.g_prompt[i, 1].copy_(g.value.reshape(g.value.shape[0], h, -1))


def check_forward(source: str, rows: dict, row: str, setup_path: str) -> None:
    """Our model and theirs with the same values: logits and pull term on test batches, training and test mode.

    Their model is built by THEIR ``main``'s ``create_model`` call sequence (shimmed as in the runs) and ours by
    ``cl``'s factory with the row's overrides; ours are copied into theirs (:func:`_copy_ours_into_theirs`). The
    forward passes are the ones their ``engine`` makes: ``original_model(x)['pre_logits']`` as the query, then
    ``model(x, task_id, cls_features, train)``.
    """
    import torch

    from benchmarks.parity.common import REPO, load_npz, official_source
    from cl.config import build_config
    from cl.runner import build_scenario, build_strategy

    src = official_source(source)
    sys.path.insert(0, str(src))
    setup = load_npz(Path(setup_path))
    spec = rows[row]["official"]
    captured: dict = {}
    install_shims(setup, captured)
    import main as their_main

    oargs = _official_args(source, spec, setup, 0)
    built: list = []
    create_model = their_main.create_model

    def capture_model(name: str, **kwargs: Any) -> Any:  # their two create_model calls, then stop their main
        built.append(create_model(name, **kwargs))
        if len(built) == 2:
            raise StopIteration
        return built[-1]

    their_main.create_model = capture_model
    try:
        their_main.main(oargs)
    except StopIteration:
        pass
    original, theirs = built[0].eval(), built[1]
    cfg = build_config(None, ["scenario=npz", f"scenario.path={setup_path}", "scenario.n_experiences=5",
                              "trainer.accelerator=cpu", *[o.replace("assets/", f"{REPO}/assets/")
                                                           for o in rows[row]["ours"]]])
    ours = build_strategy(cfg, build_scenario(cfg))
    _copy_ours_into_theirs(source, ours, theirs)
    x = torch.stack([torch.from_numpy(setup["test_x"][i]).float().div(255).unsqueeze(0) for i in range(48)])
    ours.n_seen, ours.exp_index = int(setup["n_tasks"]) * int(setup["classes_per_task"]), 1
    worst = 0.0
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        with torch.no_grad():
            q = original(x)["pre_logits"]
            out = theirs(x, task_id=1, cls_features=q, train=training)
            mine, pull = ours.prompted(x)
        d_logits = (mine - out["logits"]).abs().max().item()
        d_pull = abs(pull.item() - out["reduce_sim"].item())
        same_idx = torch.equal(ours.last_idx, out["prompt_idx"])
        print(f"{row} train={training}: max |logits diff| {d_logits:.2e}, |pull diff| {d_pull:.2e}, "
              f"same prompt ids {same_idx}")
        worst = max(worst, d_logits, d_pull)
        assert same_idx
    assert worst < 1e-4, worst


#: THEIR trainable tensors -> ours (``VisionTransformer.prompt`` is their ``Prompt``; ours :class:`cl.peft.PromptPool`)
REPLAY_NAMES: dict[str, str] = {"prompt.prompt": "pool.prompt", "prompt.prompt_key": "pool.key",
                                "head.weight": "head.weight", "head.bias": "head.bias"}


def _their_trainables(model: Any) -> dict[str, Any]:
    """The trainable tensors of THEIR prompted model, by the names of :data:`REPLAY_NAMES`."""
    return {"prompt.prompt": model.prompt.prompt, "prompt.prompt_key": model.prompt.prompt_key,
            "head.weight": model.head.weight, "head.bias": model.head.bias}


def _step_divergence(theirs: list[dict[str, Any]], ours: list[dict[str, Any]]) -> dict[str, Any]:
    """Per optimiser step (both runs' steps in order): max |ours - theirs| over the trainable tensors after the step,
    and the first step past each threshold (None: never)."""
    n = min(len(theirs), len(ours))
    diffs = [max(float((ours[i][k] - theirs[i][k]).abs().max()) for k in theirs[i]) for i in range(n)]
    first = {f"{t:g}": next((i for i, d in enumerate(diffs) if d > t), None) for t in (1e-6, 1e-4, 1e-2)}
    return {"steps_official": len(theirs), "steps_ours": len(ours), "first_step_over": first,
            "max": max(diffs, default=0.0), "per_step": diffs}


def check_run(setup_path: str, seed: int, work: str = "l2p_check_run", ours_overrides: tuple[str, ...] = ()
              ) -> dict[str, Any]:
    """THEIR whole run, then ours replaying it: the same initial pool, keys and head, the same batches.

    1. THEIR ``main.main`` runs unmodified (:func:`install_shims`, seed ``seed``) while wrappers only observe: the
       index order of every shuffled loader iteration (``BatchSampler`` over a ``RandomSampler``: one per task and
       epoch, batch 16, the last partial batch kept), the initial prompts, keys and head of the prompted model (its
       ``create_model`` call, before training), the trainable tensors after every optimiser step (``Adam.step``)
       and after each task, and the accuracy matrix (argmax over all classes, theirs, and over the seen ones, ours).
    2. Our :class:`~cl.runner.Runner` runs the ``l2p`` row with ``RankBatchSampler.__iter__`` yielding THEIR order of
       the same (experience, epoch) (their dataset positions are the task's indices in the setup's natural order,
       ``split_single_dataset``; mapped to ours through ``exp.train.indices``) and the pool, keys and head loaded
       with THEIR initial values at experience 0. Everything else is our code. Our trainable tensors are compared
       with THEIR snapshot after every step and at each experience end.

    A shuffle ours asks for and their run never drew keeps our own order (flagged in ``replay_misses``).
    ``ours_overrides`` are appended to our row's config (experiments, and the test that a changed setting is
    caught: the replay must then diverge).
    """
    import numpy as np
    import torch
    import torch.utils.data.sampler as tsampler

    from benchmarks.parity.common import (
        counts_from_predictions,
        load_npz,
        official_source,
        replay_config,
        seen_accuracy,
    )

    sys.path.insert(0, str(official_source("l2p")))
    setup = load_npz(Path(setup_path))
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    spec = ROWS["l2p"]["official"]
    captured: dict = {}
    install_shims(setup, captured)
    import engine
    import main as their_main

    # ---- 1. THEIR run, observed
    where = {"task": 0, "epoch": 0}
    perms: dict[tuple[int, int], np.ndarray] = {}
    inits: dict[str, torch.Tensor] = {}
    their_end: list[dict[str, torch.Tensor]] = []
    steps: dict[str, list[dict[str, torch.Tensor]]] = {"official": [], "ours": []}
    watch: dict[str, Any] = {"side": None, "tensors": None}  # whose tensors the Adam.step wrapper snapshots
    batch_iter, adam_step = tsampler.BatchSampler.__iter__, torch.optim.Adam.step

    def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def batch_iter_recording(self):
        batches = list(batch_iter(self))  # the same draws at the same moment (first next of the loader)
        if isinstance(self.sampler, tsampler.RandomSampler):
            assert (where["task"], where["epoch"]) not in perms, where
            perms[(where["task"], where["epoch"])] = np.concatenate(batches)
        yield from batches

    def adam_step_recording(self, *args: Any, **kwargs: Any) -> Any:
        out = adam_step(self, *args, **kwargs)
        if watch["tensors"] is not None:
            steps[watch["side"]].append(snapshot(watch["tensors"]()))
        return out

    create_model, train_one_epoch = their_main.create_model, engine.train_one_epoch
    evaluate_till_now = engine.evaluate_till_now
    built: list = []

    def their_tensors() -> dict[str, torch.Tensor]:
        return _their_trainables(built[1])

    def create_model_recording(name: str, **kwargs: Any) -> Any:
        built.append(create_model(name, **kwargs))
        if len(built) == 2:  # the prompted model: its pool, keys and head as drawn, before any training
            inits.update(snapshot(their_tensors()))
            watch.update(side="official", tensors=their_tensors)
        return built[-1]

    def train_one_epoch_recording(*args: Any, **kwargs: Any) -> Any:
        where.update(task=int(kwargs["task_id"]), epoch=int(kwargs["epoch"]))
        return train_one_epoch(*args, **kwargs)

    def evaluate_till_now_recording(*args: Any, **kwargs: Any) -> Any:
        their_end.append(snapshot(their_tensors()))  # the state the evaluation sees: the task's end
        return evaluate_till_now(*args, **kwargs)

    their_main.create_model = create_model_recording
    engine.train_one_epoch, engine.evaluate_till_now = train_one_epoch_recording, evaluate_till_now_recording
    tsampler.BatchSampler.__iter__, torch.optim.Adam.step = batch_iter_recording, adam_step_recording
    oargs = _official_args("l2p", spec, setup, seed)
    start = time.process_time()
    try:
        their_main.main(oargs)
    finally:
        tsampler.BatchSampler.__iter__ = batch_iter
        their_main.create_model = create_model
        engine.train_one_epoch, engine.evaluate_till_now = train_one_epoch, evaluate_till_now
        watch.update(side=None, tensors=None)
    their_cpu = time.process_time() - start
    their_trainable = sorted(n for n, p in built[1].named_parameters() if p.requires_grad)
    evals = [(np.concatenate(e["pred"]), np.concatenate(e["true"])) for e in captured["evals"]]
    evals_seen = [(np.concatenate(e["pred_seen"]), np.concatenate(e["true"])) for e in captured["evals"]]
    their_acc, their_matrix = counts_from_predictions(evals, n_tasks, cpt)
    their_acc_seen, their_matrix_seen = counts_from_predictions(evals_seen, n_tasks, cpt)

    # ---- 2. ours, replaying THEIR draws
    import strategies.l2p as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    train_y = np.asarray(setup["train_y"])
    their_pos = {t: np.flatnonzero((train_y >= t * cpt) & (train_y < (t + 1) * cpt)) for t in range(n_tasks)}
    state: dict[str, Any] = {"exp": 0, "epoch": 0, "pos_of": None, "model": None}
    misses: list[str] = []
    report_exps: list[dict[str, Any]] = []
    sampler_iter = loaders.RankBatchSampler.__iter__

    def our_tensors() -> dict[str, torch.Tensor]:
        m = state["model"]
        return {theirs: m.get_parameter(ours) for theirs, ours in REPLAY_NAMES.items()}

    def sampler_replay(self):
        if not self.shuffle:  # evaluation loaders: natural order, as their SequentialSampler
            yield from sampler_iter(self)
            return
        key = (state["exp"], state["epoch"])
        state["epoch"] += 1
        perm = perms.pop(key, None)
        if perm is None or len(perm) != self.n:
            misses.append(f"exp {key[0]} epoch {key[1]}: a shuffle their run never drew (own order)")
            yield from sampler_iter(self)
            return
        order = state["pos_of"][their_pos[key[0]][perm]]
        assert (order >= 0).all() and len(self) == -(-self.n // self.batch), (self.n, self.batch, len(self))
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch].tolist()

    start_fn, end_fn = ours_mod.L2P.on_experience_start, ours_mod.L2P.on_experience_end

    def start_replay(self, exp, ctx):
        pos_of = np.full(len(train_y), -1)
        pos_of[np.asarray(exp.train.indices)] = np.arange(len(exp.train.indices))
        state.update(exp=exp.index, epoch=0, pos_of=pos_of, model=self)
        start_fn(self, exp, ctx)
        if exp.index == 0:
            with torch.no_grad():
                for theirs, p in our_tensors().items():
                    p.copy_(inits[theirs])
            watch.update(side="ours", tensors=our_tensors)
            extra = sorted(n for n, p in self.named_parameters() if p.requires_grad
                           and n not in REPLAY_NAMES.values())
            if extra:
                misses.append(f"our trainable {extra} have no counterpart in theirs")

    def end_replay(self, exp, ctx):
        end_fn(self, exp, ctx)
        t = exp.index
        ref = their_end[t] if t < len(their_end) else {}
        diff = {k: float((p.detach().cpu() - ref[k]).abs().max()) if k in ref else float("inf")
                for k, p in our_tensors().items()}
        report_exps.append({"experience": t, "param_max_abs_diff": diff, "steps_ours": len(steps["ours"])})

    loaders.RankBatchSampler.__iter__ = sampler_replay
    ours_mod.L2P.on_experience_start, ours_mod.L2P.on_experience_end = start_replay, end_replay
    torch.optim.Adam.step = adam_step_recording
    cfg, work_dir = replay_config(ROWS["l2p"]["ours"], setup_path, n_tasks, seed, work, tuple(ours_overrides))
    start = time.process_time()
    try:
        metrics = Runner(cfg).run()
    finally:
        loaders.RankBatchSampler.__iter__ = sampler_iter
        ours_mod.L2P.on_experience_start, ours_mod.L2P.on_experience_end = start_fn, end_fn
        torch.optim.Adam.step = adam_step
        watch.update(side=None, tensors=None)
    our_cpu = time.process_time() - start
    our_acc = seen_accuracy(metrics["correct"], metrics["total"])
    our_matrix = [[None if v is None else 100.0 * v for v in r] for r in metrics["accuracy_matrix"]]
    per_step = _step_divergence(steps["official"], steps["ours"])
    bounds = np.cumsum([0] + [len(their_pos[t]) // HPARAMS["batch_size"] + bool(len(their_pos[t])
                                                                              % HPARAMS["batch_size"])
                              for t in range(n_tasks)]) * HPARAMS["epochs"]
    for e in report_exps:
        t = e["experience"]
        seg = per_step["per_step"][bounds[t]:bounds[t + 1]]
        e["step_max_abs_diff"] = max(seg, default=None)
        e["acc_official"], e["acc_official_seen"] = round(their_acc[t], 3), round(their_acc_seen[t], 3)
        e["acc_ours"] = round(our_acc[t], 3)
    same_matrix = all(a == b or (a is not None and b is not None and abs(a - b) < 1e-9)
                      for ra, rb in zip(their_matrix_seen, our_matrix) for a, b in zip(ra, rb))
    return {"seed": seed, "setup_class_order": [int(c) for c in setup.get("class_order", [])],
            "ours_overrides": list(ours_overrides), "replay_misses": misses,
            "unused_shuffles": [list(k) for k in sorted(perms)],
            "trainable_official": their_trainable, "same_matrix_seen": bool(same_matrix),
            "step_divergence": {k: v for k, v in per_step.items() if k != "per_step"},
            "step_max_abs_diff": [float(f"{d:.3g}") for d in per_step["per_step"]],
            "acc_official": [round(a, 3) for a in their_acc],
            "acc_official_seen": [round(a, 3) for a in their_acc_seen], "acc_ours": [round(a, 3) for a in our_acc],
            "matrix_official": their_matrix, "matrix_official_seen": their_matrix_seen, "matrix_ours": our_matrix,
            "cpu_s": {"official": round(their_cpu, 1), "ours": round(our_cpu, 1)}, "experiences": report_exps}


def check_run_reverse(setup_path: str, seed: int, work: str = "l2p_check_run_reverse") -> dict[str, Any]:
    """The replay the other way round: OUR run (seed ``seed``) first, then THEIR code fed OUR draws.

    1. Our :class:`~cl.runner.Runner` runs the ``l2p`` row unmodified while wrappers only observe: the order of every
       shuffled training pass (``RankBatchSampler``, per experience and epoch, as setup indices through
       ``exp.train.indices``), the initial pool, keys and head (at experience 0's start, before any step), the
       trainable tensors after every Adam step and the accuracy matrix.
    2. THEIR ``main.main`` then runs (:func:`install_shims`) with the prompted model's pool, keys and head loaded with
       OUR initial values right after their ``create_model`` draws them, and their ``BatchSampler`` over the
       ``RandomSampler`` of task ``t``, epoch ``e`` yielding OUR order of (t, e) mapped to their ``Subset`` positions
       (``split_single_dataset``: the task's setup indices in natural order), 16 per batch, the last partial batch
       kept. Everything else is their code. Their trainable tensors are compared with ours after every step.

    Answers whether a run of ours that ends low ends as low in THEIR code from the same draws: if it does, the
    draw is what is low, not our code.
    """
    import numpy as np
    import torch
    import torch.utils.data.sampler as tsampler

    from benchmarks.parity.common import (
        counts_from_predictions,
        load_npz,
        official_source,
        replay_config,
        seen_accuracy,
    )

    setup = load_npz(Path(setup_path))
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    train_y = np.asarray(setup["train_y"])
    steps: dict[str, list[dict[str, torch.Tensor]]] = {"official": [], "ours": []}
    watch: dict[str, Any] = {"side": None, "tensors": None}
    adam_step = torch.optim.Adam.step

    def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def adam_step_recording(self, *args: Any, **kwargs: Any) -> Any:
        out = adam_step(self, *args, **kwargs)
        if watch["tensors"] is not None:
            steps[watch["side"]].append(snapshot(watch["tensors"]()))
        return out

    # ---- 1. ours, observed
    import strategies.l2p as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    state: dict[str, Any] = {"exp": 0, "epoch": 0, "indices": None, "model": None}
    perms: dict[tuple[int, int], np.ndarray] = {}  # (experience, epoch) -> setup indices in our batch order
    inits: dict[str, torch.Tensor] = {}
    sampler_iter, start_fn = loaders.RankBatchSampler.__iter__, ours_mod.L2P.on_experience_start

    def our_tensors() -> dict[str, torch.Tensor]:
        m = state["model"]
        return {theirs: m.get_parameter(ours) for theirs, ours in REPLAY_NAMES.items()}

    def sampler_recording(self):
        batches = list(sampler_iter(self))
        if self.shuffle:
            key = (state["exp"], state["epoch"])
            state["epoch"] += 1
            assert key not in perms, key
            perms[key] = state["indices"][np.concatenate(batches)]
        yield from batches

    def start_recording(self, exp, ctx):
        state.update(exp=exp.index, epoch=0, indices=np.asarray(exp.train.indices), model=self)
        start_fn(self, exp, ctx)
        if exp.index == 0:
            inits.update(snapshot(our_tensors()))
            watch.update(side="ours", tensors=our_tensors)

    loaders.RankBatchSampler.__iter__, ours_mod.L2P.on_experience_start = sampler_recording, start_recording
    torch.optim.Adam.step = adam_step_recording
    cfg, _ = replay_config(ROWS["l2p"]["ours"], setup_path, n_tasks, seed, work)
    start = time.process_time()
    try:
        metrics = Runner(cfg).run()
    finally:
        loaders.RankBatchSampler.__iter__, ours_mod.L2P.on_experience_start = sampler_iter, start_fn
        watch.update(side=None, tensors=None)
    our_cpu = time.process_time() - start
    our_acc = seen_accuracy(metrics["correct"], metrics["total"])
    our_matrix = [[None if v is None else 100.0 * v for v in r] for r in metrics["accuracy_matrix"]]

    # ---- 2. THEIR code, fed our draws
    src = official_source("l2p")
    clash = [m for m in ("main", "engine", "datasets", "utils", "models", "prompt", "vision_transformer")
             if m in sys.modules and not str(getattr(sys.modules[m], "__file__", "")).startswith(str(src))]
    assert not clash, f"modules {clash} already imported from elsewhere: their import would not be theirs"
    sys.path.insert(0, str(src))
    captured: dict = {}
    install_shims(setup, captured)
    import engine
    import main as their_main

    where = {"task": 0, "epoch": 0}
    their_of = {}  # setup index -> position in THEIR Subset of task t (natural order)
    for t in range(n_tasks):
        pos = np.flatnonzero((train_y >= t * cpt) & (train_y < (t + 1) * cpt))
        inv = np.full(len(train_y), -1)
        inv[pos] = np.arange(len(pos))
        their_of[t] = inv
    own: list[str] = []
    built: list = []
    batch_iter = tsampler.BatchSampler.__iter__
    create_model, train_one_epoch = their_main.create_model, engine.train_one_epoch

    def their_tensors() -> dict[str, torch.Tensor]:
        return _their_trainables(built[1])

    def create_model_loading(name: str, **kwargs: Any) -> Any:
        built.append(create_model(name, **kwargs))
        if len(built) == 2:  # the prompted model, as drawn: overwrite with our initial values
            with torch.no_grad():
                for k, p in their_tensors().items():
                    p.copy_(inits[k])
            watch.update(side="official", tensors=their_tensors)
        return built[-1]

    def train_one_epoch_recording(*args: Any, **kwargs: Any) -> Any:
        where.update(task=int(kwargs["task_id"]), epoch=int(kwargs["epoch"]))
        return train_one_epoch(*args, **kwargs)

    def batch_iter_replay(self):
        if not isinstance(self.sampler, tsampler.RandomSampler):
            yield from batch_iter(self)
            return
        key = (where["task"], where["epoch"])
        perm = perms.pop(key, None)
        if perm is None or len(perm) != len(self.sampler.data_source):
            own.append(f"task {key[0]} epoch {key[1]}: a shuffle ours never drew (their own order)")
            yield from batch_iter(self)
            return
        order = their_of[key[0]][perm]
        assert (order >= 0).all() and not self.drop_last, key
        for i in range(0, len(order), self.batch_size):
            yield order[i:i + self.batch_size].tolist()

    their_main.create_model = create_model_loading
    engine.train_one_epoch = train_one_epoch_recording
    tsampler.BatchSampler.__iter__ = batch_iter_replay
    start = time.process_time()
    try:
        their_main.main(_official_args("l2p", ROWS["l2p"]["official"], setup, seed))
    finally:
        tsampler.BatchSampler.__iter__ = batch_iter
        their_main.create_model, engine.train_one_epoch = create_model, train_one_epoch
        torch.optim.Adam.step = adam_step
        watch.update(side=None, tensors=None)
    their_cpu = time.process_time() - start
    evals_seen = [(np.concatenate(e["pred_seen"]), np.concatenate(e["true"])) for e in captured["evals"]]
    their_acc_seen, their_matrix_seen = counts_from_predictions(evals_seen, n_tasks, cpt)
    per_step = _step_divergence(steps["official"], steps["ours"])
    same_matrix = all(a == b or (a is not None and b is not None and abs(a - b) < 1e-9)
                      for ra, rb in zip(their_matrix_seen, our_matrix) for a, b in zip(ra, rb))
    return {"seed": seed, "direction": "ours first, then THEIR code on our draws",
            "setup_class_order": [int(c) for c in setup.get("class_order", [])],
            "their_own_shuffles": own, "unused_shuffles": [list(k) for k in sorted(perms)],
            "same_matrix_seen": bool(same_matrix),
            "step_divergence": {k: v for k, v in per_step.items() if k != "per_step"},
            "step_max_abs_diff": [float(f"{d:.3g}") for d in per_step["per_step"]],
            "acc_ours": [round(a, 3) for a in our_acc], "acc_official_seen": [round(a, 3) for a in their_acc_seen],
            "matrix_ours": our_matrix, "matrix_official_seen": their_matrix_seen,
            "cpu_s": {"ours": round(our_cpu, 1), "official": round(their_cpu, 1)}}


def run(source: str, rows: dict, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=f"official {source} on the parity setup")
    ap.add_argument("--row", required=True, choices=list(rows))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-forward", action="store_true",
                    help="compare one forward of both models with the same values instead of a run")
    ap.add_argument("--check-run", action="store_true",
                    help="replay: THEIR run, then ours with their initial pool/keys/head and batch order (l2p only)")
    ap.add_argument("--check-run-reverse", action="store_true",
                    help="reverse replay: OUR run, then THEIR code with our initial pool/keys/head and batch order")
    ap.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE",
                    help="--check-run only: extra overrides of our side (experiments)")
    args = ap.parse_args(argv)
    if args.check_run_reverse:
        if source != "l2p":
            ap.error("--check-run-reverse is implemented for the l2p row only")
        work = tempfile.mkdtemp(prefix="l2p_check_run_reverse_")
        try:
            report = check_run_reverse(args.setup, args.seed, work=work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print("ours:", report["acc_ours"], "| their code on our draws:", report["acc_official_seen"])
        print("step divergence:", report["step_divergence"], "| same matrix (seen):", report["same_matrix_seen"],
              "| their own shuffles:", report["their_own_shuffles"], "| unused:", report["unused_shuffles"])
        return
    if args.check_run:
        if source != "l2p":
            ap.error("--check-run is implemented for the l2p row only")
        work = tempfile.mkdtemp(prefix="l2p_check_run_")
        try:
            report = check_run(args.setup, args.seed, work=work, ours_overrides=tuple(args.ours))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        for e in report["experiences"]:
            print(f"exp {e['experience']}: acc official {e['acc_official']:.2f} (seen {e['acc_official_seen']:.2f})"
                  f" | ours {e['acc_ours']:.2f}  step diff {e['step_max_abs_diff']:.2e}  end params "
                  + " ".join(f"{k} {v:.2e}" for k, v in e["param_max_abs_diff"].items()))
        print("step divergence:", report["step_divergence"], "| same matrix (seen):", report["same_matrix_seen"],
              "| misses:", report["replay_misses"], "| unused shuffles:", report["unused_shuffles"])
        return
    if args.check_forward:
        check_forward(source, rows, args.row, args.setup)
        return

    from benchmarks.parity.common import RunResult, counts_from_predictions, load_npz, official_source

    src = official_source(source)
    sys.path.insert(0, str(src))
    setup = load_npz(Path(args.setup))
    spec = rows[args.row]["official"]
    captured: dict = {}
    start = time.perf_counter()
    install_shims(setup, captured)
    import numpy as np
    from main import main as official_main

    official_main(_official_args(source, spec, setup, args.seed))

    cpt, n_tasks = int(setup["classes_per_task"]), int(setup["n_tasks"])
    evals = [(np.concatenate(e["pred"]), np.concatenate(e["true"])) for e in captured["evals"]]
    evals_seen = [(np.concatenate(e["pred_seen"]), np.concatenate(e["true"])) for e in captured["evals"]]
    acc, matrix = counts_from_predictions(evals, n_tasks, cpt)
    acc_seen, _ = counts_from_predictions(evals_seen, n_tasks, cpt)
    for t, theirs in enumerate(captured["their_acc"]):  # our counts reproduce their own per-task Acc@1
        np.testing.assert_allclose([matrix[t][j] for j in range(t + 1)], theirs, atol=1e-6)
    wall = round(time.perf_counter() - start, 2)
    extra = {"acc_argmax_over_seen_classes": acc_seen, "flags": spec["flags"],
             "missing_keys": captured.get("missing", [])}
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=wall, matrix=matrix, extra=extra)
    res.write(args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    run("l2p", ROWS)
