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
import sys
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


def run(source: str, rows: dict, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=f"official {source} on the parity setup")
    ap.add_argument("--row", required=True, choices=list(rows))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-forward", action="store_true",
                    help="compare one forward of both models with the same values instead of a run")
    args = ap.parse_args(argv)
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
