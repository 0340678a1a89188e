"""Official APER (``zhoudw-zdw/RevisitingCIL@a2e6b71``, ``aper_adapter``) on the shared parity setup, run unmodified
through a run-time shim.

    python benchmarks/parity/official/aper.py --row aper --setup SETUP.npz --seed 0 --out result.json

The official code is PyCIL-based: ``trainer._train`` builds ``utils.data_manager.DataManager`` over an ``iData`` of
``utils/data.py`` and ``utils.factory.get_model("aper_adapter")`` = ``models.aper_adapter.Learner``
(``utils.inc_net.SimpleVitNet``: the ``convs/vision_transformer_adapter.py`` ViT with a ``CosineLinear`` head; after
the first task ``MultiBranchCosineIncrementalNet``: a fresh pre-trained ViT and the tuned one, features
concatenated, a ``CosineLinear`` of class prototypes), and per task calls ``incremental_train`` (first-session
adapter training, ``construct_dual_branch_network``, ``replace_fc``), ``eval_task`` and ``after_task``. Their
``trainer._train`` is not called (it writes log files and seeds torch with a hard-coded 1); its task loop is
reproduced in :func:`main` with their objects. Nothing of their code is copied or edited. The adapter variant is
the row: it is the official default (``exps/aper_adapter``) and the only first-session module ours implements
(no SSF / VPT rows). What the shim swaps in at run time (``_install_shim``), and why:

* **Backbones**: ``utils.inc_net.get_convnet`` builds two things here, both replaced by factories at the tiny size
  of the setup with the committed pre-trained weights (``assets/backbones/vit_p4_w64_d4_fmnist.pt``):

  - the ``pretrained_vit_b16_224_in21k_adapter`` branch (ViT-B/16 from the internet, ``d_model=768`` hard-coded in
    its ``tuning_config``, the 768 slices of ``qkv`` in ``vit_base_patch16_224_in21k_adapter``): THEIR
    ``convs.vision_transformer_adapter.VisionTransformer`` (img 32, patch 4, in_chans 1, width 64, depth 4, heads 2,
    mlp 4, qkv_bias, LayerNorm eps 1e-6, ``num_classes=0``, ``global_pool=False``, ``drop_path_rate=0``) with THEIR
    tuning config (``ffn_option="parallel"``, ``ffn_adapter_layernorm_option="none"``,
    ``ffn_adapter_init_option="lora"``, ``ffn_adapter_scalar="0.1"``, ``ffn_num`` from ``args``) but ``d_model`` =
    64, the weights mapped as their factory maps timm's (``qkv`` split at 64, ``mlp.`` dropped), only the adapters
    trainable, ``out_dim = 64`` (the same helper as the RanPAC runner, ``official/ranpac.py``: the two files of
    the adapter ViT are identical but for two ``print`` lines);
  - the ``pretrained_vit_b16_224_in21k`` branch (``construct_dual_branch_network``'s pre-trained model,
    ``timm.create_model(..., pretrained=True, num_classes=0)``): a timm ``VisionTransformer`` of the committed
    architecture with the committed weights (strict load), ``out_dim = 64``, ``eval()``.

  ``MultiBranchCosineIncrementalNet.__init__`` also builds (and drops) one more adapter ViT, as theirs does.
* **Device**: ``.cuda()`` of modules and tensors stays on the CPU (the same shim as the RanPAC runner);
  ``args['device'] = [cpu]`` (one device, no ``nn.DataParallel``).
* **Data**: ``utils.data_manager._get_idata`` returns an ``iData`` over the setup arrays (uint8 grey (N, 32, 32), PIL
  mode 'L' via their ``DummyDataset``), labels already in class-order positions, so ``shuffle=False``;
  ``init_cls = increment = 2`` (5 tasks). Transforms: ``train_trsf = test_trsf = []`` (no augmentation: the setup's
  rule; no resize: the images are 32 px) and ``common_trsf = [ToTensor()]`` = raw [0, 1] inputs, as their ViT
  pipeline (``build_transform`` ends with ``ToTensor()``, no normalisation; ours: ``unit``).
* **Loaders**: ``models.aper_adapter`` builds ``DataLoader(..., num_workers=8)``; its module global
  ``num_workers`` is set to 0 (1-thread CPU harness; same batches, the shuffles draw from the main process's torch
  RNG either way).
* **Evaluation**: their ``BaseLearner`` uses ``topk = 5``, which ``torch.topk`` refuses with 2 seen classes; the
  learner's ``topk`` is set to 1 (top-1 is what is compared). The per-experience matrix comes from the
  ``(y_pred, y_true)`` of THEIR ``_eval_cnn`` (wrapped to keep a copy).
* **Seed**: their ``trainer._set_random`` seeds torch with 1 for every run; here ``torch.manual_seed(seed)`` with
  the parity seed 0 / 1 / 2 (adapter and head init, loader shuffles); the class order is the setup's. Ours:
  ``seed=<seed>``.
* **Hyperparameters**: through their ``args`` (``tuned_epoch``, ``init_lr``, ``weight_decay``, ``min_lr``,
  ``batch_size``, ``ffn_num``, ``optimizer="sgd"``). Not configurable in their code and matched on our side:
  momentum 0.9, adapter dropout 0.1 and scale 0.1.
* **Observation only**: the Frobenius norm of every block's adapter up projection after the first session
  (``extra['adapter_up_norms']``), to show how far the adapter moved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

#: the shared hyperparameters (both sides equal; scaled-down values of ``exps/aper_adapter/cifar224_5_5_vit-b_adapter``)
_HP = {"tuned_epoch": 5, "init_lr": 0.01, "weight_decay": 0.0005, "min_lr": 0, "batch_size": 48, "ffn_num": 16,
       "init_cls": 2, "increment": 2}

#: rows of the parity table: our ``cl train`` overrides and the official runner's arguments, the same values
ROWS: dict[str, dict] = {
    "aper": {
        "ours": ["strategy=aper", "backbone=vit_p4_w64_d4",
                 "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt", "strategy.adapt=adapter",
                 f"strategy.epochs={_HP['tuned_epoch']}", f"strategy.lr={_HP['init_lr']}", "strategy.momentum=0.9",
                 f"strategy.weight_decay={_HP['weight_decay']}", f"strategy.min_lr={_HP['min_lr']}",
                 f"strategy.adapter_width={_HP['ffn_num']}", "strategy.adapter_scale=0.1",
                 "strategy.adapter_dropout=0.1", "strategy.input_convention=unit",
                 f"data.batch_size={_HP['batch_size']}", "data.drop_last=false"],
        "official": dict(_HP),
    },
}


def build_pretrained_vit():
    """A timm ViT of the committed architecture with the committed weights (their ``timm.create_model`` branch)."""
    from timm.models.vision_transformer import VisionTransformer

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    model = VisionTransformer(**VIT_ARCH, num_classes=0)
    model.load_state_dict(vit_state_dict(), strict=True)
    model.out_dim = int(VIT_ARCH["embed_dim"])
    return model.eval()


def _install_shim(setup: dict, spec: dict, captured: dict) -> None:
    """Swap in the CPU / tiny-setup pieces (see the module docstring) after importing their modules."""
    from benchmarks.parity.common import capturing_eval_cnn

    for cat in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)

    from benchmarks.parity.official.ranpac import build_adapter_vit, install_cpu_shim, setup_idata

    install_cpu_shim()
    import convs.vision_transformer_adapter as vit_adapter
    import models.aper_adapter as aper_mod
    import utils.data as udata
    import utils.data_manager as dm
    import utils.factory as factory
    import utils.inc_net as inc_net

    iSetup = setup_idata(udata.iData, setup)
    dm._get_idata = lambda name: iSetup()

    def get_convnet(args: dict, pretrained: bool = False):
        name = args["convnet_type"].lower()
        if name == "pretrained_vit_b16_224_in21k_adapter":
            assert args["model_name"] == "aper_adapter", args["model_name"]
            return build_adapter_vit(vit_adapter, args["ffn_num"])
        assert name == "pretrained_vit_b16_224_in21k", name
        return build_pretrained_vit()

    inc_net.get_convnet = get_convnet
    aper_mod.num_workers = 0
    get_model = factory.get_model

    def get_model_capturing(name: str, args: dict):
        model = get_model(name, args)
        model.topk = 1
        model._eval_cnn = capturing_eval_cnn(model._eval_cnn, captured)
        return model

    factory.get_model_capturing = get_model_capturing


def main() -> None:
    ap = argparse.ArgumentParser(description="official APER (adapter) on the parity setup")
    ap.add_argument("--row", default="aper", choices=list(ROWS))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hp", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override hyperparameters of the row (experiments only; JSON values)")
    args = ap.parse_args()

    from benchmarks.parity.common import RunResult, counts_from_predictions, load_npz, official_source

    src = official_source("aper")
    sys.path.insert(0, str(src))
    setup = load_npz(Path(args.setup))
    spec = {**ROWS[args.row]["official"], **{k: json.loads(v) for k, v in (a.split("=", 1) for a in args.hp)}}
    captured: dict = {}
    start = time.perf_counter()
    _install_shim(setup, spec, captured)
    import numpy as np
    import torch
    import utils.factory as factory
    from utils.data_manager import DataManager

    Path("logs").mkdir(exist_ok=True)
    targs = {"prefix": "parity", "dataset": "parity_setup", "memory_size": 0, "memory_per_class": 0,
             "fixed_memory": False, "shuffle": False, "model_name": "aper_adapter",
             "convnet_type": "pretrained_vit_b16_224_in21k_adapter", "device": [torch.device("cpu")],
             "seed": args.seed, "optimizer": "sgd", "prompt_token_num": 30, **spec}
    # what trainer._train does, minus its log files: seed, data manager, learner, the task loop
    torch.manual_seed(args.seed)
    data_manager = DataManager(targs["dataset"], targs["shuffle"], targs["seed"], targs["init_cls"],
                               targs["increment"])
    model = factory.get_model_capturing(targs["model_name"], targs)
    top1, up_norms = [], []
    for t in range(data_manager.nb_tasks):
        model.incremental_train(data_manager)
        cnn_accy, _ = model.eval_task()
        model.after_task()
        top1.append(float(cnn_accy["top1"]))
        if t == 0:  # the tuned branch is convnets[1] of the dual-branch network
            tuned = model._network.convnets[1]
            up_norms = [round(float(b.adaptmlp.up_proj.weight.norm()), 5) for b in tuned.blocks]

    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    acc, matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    wall = time.perf_counter() - start
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=round(wall, 2), matrix=matrix,
                    extra={"official_top1": top1, "adapter_up_norms": up_norms, "hyperparameters": spec})
    res.write(args.out)
    np.testing.assert_allclose(acc, top1, atol=0.01)  # their own top-1 curve (2 decimals)


if __name__ == "__main__":
    main()
