"""Official RanPAC (``RanPAC/RanPAC@012927f``) on the shared parity setup, run unmodified through a run-time shim.

    python benchmarks/parity/official/ranpac.py --row ranpac --setup SETUP.npz --seed 0 --out result.json

The official code is PyCIL-based: ``trainer._train`` builds ``utils.data_manager.DataManager`` over an ``iData`` of
``utils/data.py`` and ``RanPAC.Learner`` (``inc_net.SimpleVitNet``: the ``petl/vision_transformer_adapter.py`` ViT
and a ``CosineLinear`` head that turns into the random-projection ridge head after phase 1), sets
``model.dil_init = False`` and ``model.is_dil = False`` (a CIL data set), and per task calls ``incremental_train``
(phase 1 on task 0, ``setup_RP``, ``replace_fc``: ``G``, ``Q``, lambda, ``Wo``), ``eval_task`` and ``after_task``.
Their ``trainer._train`` itself is not called (it writes log files and CSVs with pandas, and seeds torch with a
hard-coded 1); its task loop is reproduced in :func:`main` with their objects. Nothing of their code is copied or
edited. What the shim swaps in at run time (``_install_shim``), and why:

* **Backbone**: ``inc_net.get_convnet`` (the ``pretrained_vit_b16_224_in21k_adapter`` branch: ViT-B/16 weights from
  the internet through ``timm.create_model``, ``d_model=768`` and ``ffn_num=64`` hard-coded in its
  ``tuning_config``, the 768 slices of ``qkv`` in ``vit_base_patch16_224_in21k_adapter``) is replaced by a factory
  that builds THEIR ``petl.vision_transformer_adapter.VisionTransformer`` at the tiny size of the setup (img 32,
  patch 4, in_chans 1, width 64, depth 4, heads 2, mlp 4, qkv_bias, LayerNorm eps 1e-6, ``num_classes=0``,
  ``global_pool=False``, ``drop_path_rate=0``) with THEIR tuning config (``ffn_adapt=True``, ``ffn_option=
  "parallel"``, ``ffn_adapter_layernorm_option="none"``, ``ffn_adapter_init_option="lora"``,
  ``ffn_adapter_scalar="0.1"``, ``vpt_on=False``) except ``d_model`` = 64 (the tiny width) and ``ffn_num`` = the
  row's adapter width (the same value as ours, ``strategy.adapter_width``), as an attribute namespace (``easydict``
  is therefore not needed). It loads the committed pre-trained weights (``assets/backbones/vit_p4_w64_d4_fmnist.pt``)
  mapped the way their ``vit_base_patch16_224_in21k_adapter`` maps timm's (fused ``qkv`` split into
  ``q_proj``/``k_proj``/``v_proj`` at 64 instead of 768, ``mlp.fc1``/``mlp.fc2`` -> ``fc1``/``fc2``), and, as it,
  leaves only the missing keys (the adapters) trainable; ``out_dim = 64``.
* **Device**: ``.cuda()`` of modules (``CosineLinear(...).cuda()``) and tensors (``data.cuda()``) and
  ``Tensor.to(device='cuda')`` (``setup_RP``'s ``W_rand`` and head weight, ``replace_fc``'s ``Wo``) return the
  object unchanged / on the CPU in this process (no GPU); ``args['device'] = [cpu]`` (one device, no
  ``nn.DataParallel``).
* **Data**: ``utils.data_manager._get_idata`` returns an ``iData`` over the setup arrays (uint8 grey (N, 32, 32), PIL
  mode 'L' via their ``DummyDataset``), labels already in class-order positions, so ``shuffle=False`` (their
  ``DataManager`` keeps ``class_order = [0..9]``); ``init_cls = increment = 2`` (5 tasks). Transforms:
  ``train_trsf = test_trsf = []`` (no augmentation: the setup's rule; no resize: the images are 32 px) and
  ``common_trsf = [ToTensor()]`` = raw [0, 1] inputs, their ``use_input_norm=False`` (ours: ``unit``).
* **Loaders**: ``RanPAC`` builds ``DataLoader(..., num_workers=8)``; its module global ``num_workers`` is set to 0
  (1-thread CPU harness; same batches, the shuffles draw from the main process's torch RNG either way).
* **Seed**: their ``trainer._set_random`` seeds torch with 1 for every run; here ``torch.manual_seed(seed)`` with
  the parity seed 0 / 1 / 2 (it draws the adapters' and head's init, the loader shuffles, the 80/20 split of
  ``replace_fc``'s shuffled loader and ``W_rand``); the class order is the setup's. Ours: ``seed=<seed>``.
* **Hyperparameters**: through their ``args`` (``tuned_epoch``, ``body_lr``, ``weight_decay``, ``min_lr``,
  ``batch_size``, ``M``, ``use_RP=True``, ``model_name="adapter"``). Not configurable in their code and matched on
  our side: momentum 0.9, the lambda grid ``10^-8 .. 10^8``, the 80/20 split, adapter dropout 0.1 and scale 0.1.
* **Observation only**: ``optimise_ridge_parameter`` is wrapped to record the lambda it returns per task
  (``extra['ridge']``); the per-experience matrix comes from the ``(y_pred, y_true)`` of THEIR ``_eval_cnn``
  (wrapped to keep a copy). ``--save-projection PATH`` writes their ``W_rand`` (``torch.save``) for the
  same-projection check (``strategy.projection_file`` on our side).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

#: the shared hyperparameters (both sides equal; scaled-down values of ``args/cifar224_publish.csv`` row 7)
_HP = {"tuned_epoch": 5, "body_lr": 0.01, "weight_decay": 0.0005, "min_lr": 0.0, "batch_size": 48, "M": 500,
       "ffn_num": 16, "init_cls": 2, "increment": 2}

#: rows of the parity table: our ``cl train`` overrides and the official runner's arguments, the same values
ROWS: dict[str, dict] = {
    "ranpac": {
        "ours": ["strategy=ranpac", "backbone=vit_p4_w64_d4",
                 "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt", "strategy.adapt=adapter",
                 f"strategy.epochs={_HP['tuned_epoch']}", f"strategy.lr={_HP['body_lr']}", "strategy.momentum=0.9",
                 f"strategy.weight_decay={_HP['weight_decay']}", f"strategy.min_lr={_HP['min_lr']}",
                 f"strategy.adapter_width={_HP['ffn_num']}", "strategy.adapter_scale=0.1",
                 "strategy.adapter_dropout=0.1", f"strategy.projection_dim={_HP['M']}",
                 "strategy.ridge_criterion=mse", "strategy.ridge_every=experience",
                 "strategy.ridge_val_fraction=0.2", "strategy.input_convention=unit",
                 f"data.batch_size={_HP['batch_size']}", "data.drop_last=false"],
        "official": dict(_HP),
    },
}


def map_vit_state(width: int) -> dict:
    """The committed ViT's weights under THEIR adapter-ViT key names (``qkv`` split, ``mlp.`` dropped), as their
    ``vit_base_patch16_224_in21k_adapter`` maps timm's (at ``width`` instead of 768)."""
    from benchmarks.parity.common import vit_state_dict

    state = {}
    for k, v in vit_state_dict().items():
        if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
            kind = k.rsplit(".", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split(width, dim=0)):
                state[k.replace(f"qkv.{kind}", f"{name}.{kind}")] = part.clone()
        else:
            state[k.replace("mlp.", "")] = v
    return state


def build_adapter_vit(vit_module, ffn_num: int):
    """THEIR adapter ``VisionTransformer`` (``vit_module``: their ``vision_transformer_adapter``) at the tiny size,
    with the committed weights; only the adapters trainable, as their factory."""
    from functools import partial
    from types import SimpleNamespace

    from torch import nn

    from benchmarks.parity.common import VIT_ARCH

    a = VIT_ARCH
    width = int(a["embed_dim"])
    cfg = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                          ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=int(ffn_num),
                          d_model=width, vpt_on=False, vpt_num=0)
    model = vit_module.VisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                                         embed_dim=width, depth=a["depth"], num_heads=a["num_heads"],
                                         mlp_ratio=a["mlp_ratio"], qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                                         global_pool=False, drop_path_rate=0.0, tuning_config=cfg)
    msg = model.load_state_dict(map_vit_state(width), strict=False)
    assert not msg.unexpected_keys, msg.unexpected_keys
    assert all("adaptmlp" in k for k in msg.missing_keys), msg.missing_keys
    for name, p in model.named_parameters():  # as their factory: freeze all but the adapters
        p.requires_grad = name in msg.missing_keys
    model.out_dim = width
    return model.eval()


def install_cpu_shim() -> None:
    """``.cuda()`` of modules and tensors and ``Tensor.to('cuda')`` stay on the CPU (no GPU in this process)."""
    import torch
    from torch import nn

    nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False: self
    to = torch.Tensor.to

    def is_cuda(d) -> bool:
        return (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")

    def to_cpu(self, *args, **kwargs):
        if "device" in kwargs and is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        args = tuple("cpu" if is_cuda(x) else x for x in args)
        return to(self, *args, **kwargs)

    torch.Tensor.to = to_cpu


def setup_idata(base: type, setup: dict) -> type:
    """An ``iData`` subclass of THEIR ``base`` over the setup arrays: raw [0, 1] inputs, no augmentation."""
    import numpy as np
    from torchvision import transforms

    class iSetup(base):  # noqa: N801  (their naming)
        use_path = False
        train_trsf: list = []
        test_trsf: list = []
        common_trsf = [transforms.ToTensor()]
        class_order = list(range(int(setup["n_tasks"]) * int(setup["classes_per_task"])))

        def __init__(self, *args, **kwargs) -> None:  # RanPAC's iData take use_input_norm; it stays False here
            pass

        def download_data(self) -> None:
            self.train_data, self.train_targets = setup["train_x"], setup["train_y"].astype(np.int64)
            self.test_data, self.test_targets = setup["test_x"], setup["test_y"].astype(np.int64)

    return iSetup


def _install_shim(setup: dict, spec: dict, captured: dict) -> None:
    """Swap in the CPU / tiny-setup pieces (see the module docstring) after importing their modules."""
    from benchmarks.parity.common import capturing_eval_cnn

    for cat in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)
    install_cpu_shim()

    import inc_net
    import petl.vision_transformer_adapter as vit_adapter
    import RanPAC
    import utils.data as udata
    import utils.data_manager as dm

    iSetup = setup_idata(udata.iData, setup)
    dm._get_idata = lambda name, use_input_norm=False: iSetup()

    def get_convnet(args: dict, pretrained: bool = False):
        assert "_adapter" in args["convnet_type"] and args["model_name"] == "adapter", args["convnet_type"]
        return build_adapter_vit(vit_adapter, spec["ffn_num"])

    inc_net.get_convnet = get_convnet
    RanPAC.num_workers = 0

    optimise = RanPAC.Learner.optimise_ridge_parameter

    def optimise_logged(self, features, y):
        ridge = optimise(self, features, y)
        captured.setdefault("ridge", []).append(float(ridge))
        return ridge

    RanPAC.Learner.optimise_ridge_parameter = optimise_logged
    RanPAC.Learner._eval_cnn = capturing_eval_cnn(RanPAC.Learner._eval_cnn, captured)


def same_weights_check(setup_npz: Path, seed: int = 0) -> dict:
    """Their model and ours on the same weights: features, then lambda and ``Wo`` given the same features.

    Their adapter ViT (``build_adapter_vit``) and our strategy built from the row's overrides get the same adapter
    weights (their lora init for ``down``, a N(0, 0.5^2) ``up`` so the adapters contribute); the features of the
    setup's test images are compared in eval mode. Then, on THEIR features of experience 0's training images and
    one ``W_rand`` (copied into our buffer), THEIR ``optimise_ridge_parameter`` + ``solve`` (float32, the first 80 %
    of the rows fit) against our ``ridge_scores`` + ``solve`` (float64 sums) on the same 80/20 rows.
    """
    import numpy as np
    import torch

    from benchmarks.parity.common import VIT_CKPT, load_npz, official_source
    from cl.config import build_config
    from cl.peft import pet_named_parameters
    from cl.runner import build_scenario, build_strategy
    from strategies.ranpac import RIDGE_GRID

    sys.path.insert(0, str(official_source("ranpac")))
    setup = load_npz(setup_npz)
    captured: dict = {}
    _install_shim(setup, ROWS["ranpac"]["official"], captured)
    import petl.vision_transformer_adapter as vit_adapter
    import RanPAC

    torch.manual_seed(seed)
    theirs = build_adapter_vit(vit_adapter, _HP["ffn_num"])
    with torch.no_grad():
        for b in theirs.blocks:
            b.adaptmlp.up_proj.weight.normal_(0, 0.5)
            b.adaptmlp.up_proj.bias.normal_(0, 0.5)
    cfg = build_config(None, ["scenario=npz", f"scenario.path={setup_npz}", "scenario.n_experiences=5",
                              "scenario.augment=false", *ROWS["ranpac"]["ours"], f"backbone.checkpoint={VIT_CKPT}"])
    ours = build_strategy(cfg, build_scenario(cfg)).eval()
    copied = 0
    with torch.no_grad():
        for name, p in pet_named_parameters(ours.backbone):
            block = int(name.split("blocks.")[1].split(".")[0])
            leaf = name.rsplit(".", 2)[-2:]  # ("down" | "up", "weight" | "bias")
            p.copy_(getattr(theirs.blocks[block].adaptmlp, f"{leaf[0]}_proj").__getattr__(leaf[1]))
            copied += 1
    x = torch.from_numpy(setup["test_x"]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        f_theirs, f_ours = theirs(x), ours.features(x)
    feat_diff = float((f_theirs - f_ours).abs().max())

    # ridge given the same features: experience 0's training images in one shuffled order (their loader's role)
    keep = np.flatnonzero(setup["train_y"] < int(setup["classes_per_task"]))
    perm = torch.randperm(len(keep))
    xt = torch.from_numpy(setup["train_x"][keep]).float().div(255).unsqueeze(1)[perm]
    yt = torch.from_numpy(setup["train_y"][keep])[perm]
    with torch.no_grad():
        feats = theirs(xt)
    w_rand = torch.randn(feats.shape[1], _HP["M"])
    h = torch.relu(feats @ w_rand)
    y = torch.nn.functional.one_hot(yt, 10).float()
    learner = RanPAC.Learner.__new__(RanPAC.Learner)
    lam_theirs = float(RanPAC.Learner.optimise_ridge_parameter(learner, h, y))
    n_fit = int(h.shape[0] * 0.8)
    h64, y64 = h.double(), y.double()
    g_fit, q_fit = h64[:n_fit].t() @ h64[:n_fit], h64[:n_fit].t() @ y64[:n_fit]
    g_val, q_val = h64[n_fit:].t() @ h64[n_fit:], h64[n_fit:].t() @ y64[n_fit:]
    ours.w_rand.copy_(w_rand)
    scores = ours.ridge_scores(g_fit, q_fit[:, :2], g_val, q_val[:, :2], h.shape[0] - n_fit, None, None, None)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    lam_ours = float(RIDGE_GRID[best])
    g, q = h.t() @ h, h.t() @ y
    wo_theirs = torch.linalg.solve(g + lam_theirs * torch.eye(g.shape[0]), q).T[:2]
    ours.gram.copy_(h64.t() @ h64)
    ours.q = (h64.t() @ y64)[:, :2].clone()
    ours.ridge.fill_(lam_theirs)
    ours.solve()
    logits_theirs, logits_ours = h @ wo_theirs.T, ours.project(feats) @ ours.weight.t()
    their_losses = []
    for lam in RIDGE_GRID:  # their per-lambda MSE (float32) for the record, over their 10 one-hot columns
        wo = torch.linalg.solve(g_fit.float() + lam * torch.eye(g.shape[0]), q_fit.float()).T
        their_losses.append(float(torch.nn.functional.mse_loss(h[n_fit:] @ wo.T, y[n_fit:])))
    return {"adapter_tensors_copied": copied, "feature_max_abs_diff": feat_diff,
            "feature_max_abs": float(f_theirs.abs().max()), "lambda_theirs": lam_theirs, "lambda_ours": lam_ours,
            "mse_theirs_float32": their_losses, "mse_ours_float64": [-s * 2 / 10 for s in scores],
            "logits_max_abs_diff_same_lambda": float((logits_theirs - logits_ours).abs().max()),
            "logits_max_abs": float(logits_theirs.abs().max()),
            "same_argmax": float((logits_theirs.argmax(1) == logits_ours.argmax(1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description="official RanPAC on the parity setup")
    ap.add_argument("--row", default="ranpac", choices=list(ROWS))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hp", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override hyperparameters of the row (experiments only; JSON values)")
    ap.add_argument("--save-projection", default=None, help="torch.save their W_rand (D, M) here")
    ap.add_argument("--check", action="store_true",
                    help="the same-weights check instead of a run (same_weights_check; JSON to --out)")
    args = ap.parse_args()
    if args.check:
        Path(args.out).write_text(json.dumps(same_weights_check(Path(args.setup), args.seed), indent=1) + "\n")
        return

    from benchmarks.parity.common import RunResult, counts_from_predictions, load_npz, official_source

    src = official_source("ranpac")
    sys.path.insert(0, str(src))
    setup = load_npz(Path(args.setup))
    spec = {**ROWS[args.row]["official"], **{k: json.loads(v) for k, v in (a.split("=", 1) for a in args.hp)}}
    captured: dict = {}
    start = time.perf_counter()
    _install_shim(setup, spec, captured)
    import torch
    from RanPAC import Learner
    from utils.data_manager import DataManager

    targs = {"dataset": "parity_setup", "shuffle": False, "seed": args.seed, "model_name": "adapter",
             "convnet_type": "pretrained_vit_b16_224_in21k_adapter", "device": [torch.device("cpu")],
             "use_RP": True, "use_input_norm": False, "head_lr": spec["body_lr"], "do_not_save": True, **spec}
    # what trainer._train does, minus its log files and CSVs: seed, learner, data manager, the task loop
    torch.manual_seed(args.seed)
    model = Learner(targs)
    model.dil_init = False
    model.is_dil = False
    data_manager = DataManager(targs["dataset"], targs["shuffle"], targs["seed"], targs["init_cls"],
                               targs["increment"], use_input_norm=targs["use_input_norm"])
    top1 = []
    for _ in range(data_manager.nb_tasks):
        model.incremental_train(data_manager)
        acc_total, _, _, _ = model.eval_task()
        model.after_task()
        top1.append(float(acc_total))
    if args.save_projection:
        torch.save(model.W_rand.detach().cpu().clone(), args.save_projection)

    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    acc, matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    wall = time.perf_counter() - start
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=round(wall, 2), matrix=matrix,
                    extra={"ridge": captured.get("ridge", []), "official_top1": top1, "hyperparameters": spec})
    res.write(args.out)
    import numpy as np

    np.testing.assert_allclose(acc, top1, atol=0.01)  # their own top-1 curve (2 decimals)


if __name__ == "__main__":
    main()
