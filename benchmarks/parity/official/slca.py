"""Official SLCA (``GengDavid/SLCA@169d4e6``) on the shared parity setup, run unmodified through a run-time shim.

    python benchmarks/parity/official/slca.py --row slca --setup SETUP.npz --seed 0 --out result.json

The official code is PyCIL-based: ``trainer._train`` builds ``utils.data_manager.DataManager`` over an ``iData``
class of ``utils/data.py``, ``utils.factory.get_model`` builds ``models.slca.SLCA`` (``FinetuneIncrementalNet`` of
``utils/inc_net.py``: ``convs/vits.py`` ViT + ``convs/linears.py`` ``SimpleContinualLinear`` heads), and every task
runs ``incremental_train`` (stage 1 slow learner, class statistics, classifier alignment), ``eval_task`` and
``after_task`` (restores the stage-1 heads). We call THEIR ``trainer._train`` with a dict of arguments, as their
``main.py`` does from a JSON file; nothing of their code is copied or edited. What the shim swaps in at run time
(``_install_shim``), and why:

* **timm 0.5.4 API** -> timm 1.0: ``convs/vits.py`` imports ``timm.models.helpers``, ``timm.models.layers`` and
  ``timm.models.registry``; timm 1.0 still ships these as deprecated aliases (``build_model_with_cfg``,
  ``named_apply``, ``adapt_input_conv``, ``PatchEmbed``, ``Mlp``, ``DropPath``, ``trunc_normal_``,
  ``lecun_normal_``, ``register_model``), so only their deprecation warnings are silenced. ``register_model`` of
  timm 1.0 accepts their ``vit_*`` names (it warns about overwriting timm's own registrations: harmless, we never
  build by name). ``convs/linears.py`` imports ``timm.models.layers.weight_init``, which timm 1.0 no longer
  has: it is aliased to ``timm.layers.weight_init`` in ``sys.modules``. ``scipy`` (``models/base.py``) is in
  the main Python already; nothing is installed for this row.
* **Backbone**: ``utils.inc_net.get_convnet`` (the ``vit-b-p16`` factory, ``vit_base_patch16_224_in21k``:
  ViT-B/16 with ImageNet-21k weights from the internet) is replaced by a factory that builds THEIR
  ``convs.vits.VisionTransformer`` at the tiny size of the setup (img 32, patch 4, in_chans 1, width 64, depth 4,
  heads 2, mlp 4, qkv_bias, ``num_classes=0``), loads the committed pre-trained weights
  (``assets/backbones/vit_p4_w64_d4_fmnist.pt``: timm key names are their key names, every key matches), then
  does what their factory does after loading: ``del model.head; del model.norm;
  model.norm = nn.LayerNorm(embed_dim)`` (a fresh LayerNorm, eps 1e-5, like ours). Their ``Attention`` and
  ``Block`` are the timm-0.5.4 ones, numerically identical to timm 1.0's for these weights (checked: features of
  both models agree to 1e-6 before the norm swap).
* **Data**: ``utils.data_manager._get_idata`` returns an ``iData`` over the setup arrays (uint8 grey (N, 32, 32),
  PIL mode 'L' via their ``DummyDataset``), labels already in class-order positions, so ``shuffle=False`` (their
  ``DataManager`` then keeps ``class_order = [0..9]``); ``init_cls = increment = 2`` (5 tasks). Transforms:
  ``train_trsf = test_trsf = []`` (no augmentation, no resize: the images are already 32 px) and ``common_trsf =
  [ToTensor(), Normalize(setup mean, setup std)]`` = our ``normalized`` input convention.
* **Device**: ``trainer._set_device`` maps device ``"0"`` to ``cuda:0``; it is replaced by CPU
  (``args['device'] = [torch.device('cpu')]``, one device, so no ``nn.DataParallel``).
* **Seed**: ``trainer._set_random`` (``torch.manual_seed(1)`` for every run) is replaced by
  ``torch.manual_seed(seed)``, so the three parity seeds vary heads' init and loader shuffles on this side as
  ``seed=`` does on ours (parity is statistical over seeds 0 1 2; the class order is the setup's).
  ``--torch-seed N`` sets it apart from the setup seed (``--torch-seed 1`` = their fixed seed), to measure the
  spread of one side over torch seeds on one class order (``results/slca/noise_setup0.json``).
* **Loaders**: ``models.slca`` and ``models.base`` build ``DataLoader(..., num_workers=8 / 4)``; on the 1-thread
  CPU harness the worker processes only cost start-up time, so ``DataLoader`` in those two modules is wrapped to
  force ``num_workers=0`` (same batches, same order: the shuffle draws from the main process's torch RNG either
  way). ``drop_last`` stays False (their loaders keep the last partial batch; ours: ``data.drop_last=false``).
* **Hyperparameters**: through their ``args`` (``epochs``, ``milestones``, ``lr``, ``bcb_lrscale``,
  ``ca_epochs``, ``ca_with_logit_norm``) and their module globals ``models.slca.batch_size`` (128 -> 32; also the
  test loader's batch) and ``models.slca.num_workers``. Not configurable in their code and therefore matched on
  OUR side: 256 pseudo-features per class per CA epoch (``num_sampled_pcls = 256``, a local), momentum 0.9,
  weight decay 5e-4, MultiStepLR gamma 0.1, covariance ridge 1e-4, CA lr = stage-1 head lr.
* **Evaluation**: THEIR ``eval_task`` (``_eval_cnn`` top-1 over all seen classes, aligned heads, before
  ``after_task``); the per-experience matrix is computed from the same ``(y_pred, y_true)`` that ``_eval_cnn``
  returns (wrapped to keep a copy). Their ``save_checkpoint`` writes to ``logs/`` under the temporary cwd.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

#: rows of the parity table: our ``cl train`` overrides and the official runner's arguments, the same values
ROWS: dict[str, dict] = {
    "slca": {
        "ours": ["strategy=slca", "backbone=vit_p4_w64_d4",
                 "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt",
                 "strategy.lr=0.01", "strategy.bcb_lrscale=0.01", "strategy.momentum=0.9",
                 "strategy.weight_decay=0.0005", "strategy.epochs=3", "strategy.milestones=[2]",
                 "strategy.lr_decay=0.1", "strategy.ca_epochs=2", "strategy.ca_samples_per_class=256",
                 "strategy.ca_logit_norm=0.1", "strategy.cov_ridge=0.0001", "strategy.mean_shrink=official",
                 "strategy.fresh_norm=true", "strategy.input_convention=normalized", "data.batch_size=32",
                 "data.drop_last=false"],
        "official": {"epochs": 3, "milestones": [2], "lr": 0.01, "bcb_lrscale": 0.01, "ca_epochs": 2,
                     "ca_with_logit_norm": 0.1, "batch_size": 32, "init_cls": 2, "increment": 2},
    },
}


def _install_shim(setup: dict, spec: dict, seed: int, captured: dict) -> None:
    """Swap in the CPU / tiny-setup pieces (see the module docstring) after importing their modules."""
    import numpy as np
    import torch
    from torch import nn
    from torchvision import transforms

    from benchmarks.parity.common import capturing_eval_cnn

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import timm.layers.weight_init
    import timm.models.layers  # noqa: F401  (timm 1.0's deprecated alias package of timm.layers)

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)
    import convs.vits as vits
    import models.base as base
    import models.slca as slca_mod
    import trainer
    import utils.data as udata
    import utils.data_manager as dm
    import utils.factory as factory
    import utils.inc_net as inc_net

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    # --- data: an iData over the setup arrays
    class iSetup(udata.iData):
        use_path = False
        train_trsf: list = []
        test_trsf: list = []
        common_trsf = [transforms.ToTensor(),
                       transforms.Normalize(mean=tuple(float(v) for v in setup["mean"]),
                                            std=tuple(float(v) for v in setup["std"]))]
        class_order = list(range(int(setup["n_tasks"]) * int(setup["classes_per_task"])))

        def download_data(self) -> None:
            self.train_data, self.train_targets = setup["train_x"], setup["train_y"].astype(np.int64)
            self.test_data, self.test_targets = setup["test_x"], setup["test_y"].astype(np.int64)

    dm._get_idata = lambda name: iSetup()

    # --- backbone: their VisionTransformer at the tiny size, our pre-trained weights, then their fresh norm
    def get_convnet(cfg: dict, pretrained: bool = False) -> nn.Module:
        a = VIT_ARCH
        model = vits.VisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                                       num_classes=0, embed_dim=a["embed_dim"], depth=a["depth"],
                                       num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True)
        missing, unexpected = model.load_state_dict(vit_state_dict(), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        del model.head  # as vit_base_patch16_224_in21k does after loading
        del model.norm
        model.norm = nn.LayerNorm(a["embed_dim"])
        return model

    inc_net.get_convnet = get_convnet

    # --- device, seed, loaders, module-level hyperparameters
    def set_device(args: dict) -> None:
        args["device"] = [torch.device("cpu")]

    trainer._set_device = set_device
    trainer._set_random = lambda: torch.manual_seed(seed)

    def loader(*args, **kwargs):
        kwargs["num_workers"] = 0
        return torch.utils.data.DataLoader(*args, **kwargs)

    slca_mod.DataLoader = loader
    base.DataLoader = loader
    slca_mod.batch_size = int(spec["batch_size"])
    slca_mod.num_workers = 0

    # --- capture the learner (for the per-experience matrix from THEIR eval predictions)
    get_model = factory.get_model

    def get_model_capturing(name: str, args: dict):
        model = get_model(name, args)
        model._eval_cnn = capturing_eval_cnn(model._eval_cnn, captured)
        captured["model"] = model
        return model

    trainer.factory.get_model = get_model_capturing


def main() -> None:
    ap = argparse.ArgumentParser(description="official SLCA on the parity setup")
    ap.add_argument("--row", default="slca", choices=list(ROWS))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--torch-seed", type=int, default=None,
                    help="torch seed (default: --seed; 1 = their trainer's fixed seed), for noise measurements")
    args = ap.parse_args()

    from benchmarks.parity.common import RunResult, counts_from_predictions, load_npz, official_source

    src = official_source("slca")
    sys.path.insert(0, str(src))
    setup = load_npz(Path(args.setup))
    spec = ROWS[args.row]["official"]
    captured: dict = {}
    start = time.perf_counter()
    _install_shim(setup, spec, args.seed if args.torch_seed is None else args.torch_seed, captured)
    import numpy as np
    import trainer

    Path("logs").mkdir(exist_ok=True)
    targs = {"prefix": "parity", "dataset": "parity_setup", "memory_size": 0, "memory_per_class": 0,
             "fixed_memory": False, "shuffle": False, "init_cls": spec["init_cls"], "increment": spec["increment"],
             "model_name": "slca_parity", "model_postfix": f"seed{args.seed}", "convnet_type": "vit-b-p16",
             "device": ["cpu"], "seed": args.seed, "run_id": 0, "epochs": spec["epochs"],
             "ca_epochs": spec["ca_epochs"],
             "ca_with_logit_norm": spec["ca_with_logit_norm"], "milestones": list(spec["milestones"]),
             "lr": spec["lr"], "bcb_lrscale": spec["bcb_lrscale"]}
    final, avg = trainer._train(targs)

    cpt = int(setup["classes_per_task"])
    n_tasks = int(setup["n_tasks"])
    acc, matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    wall = time.perf_counter() - start
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=round(wall, 2), matrix=matrix,
                    extra={"official_final_top1": float(final), "official_avg_top1": float(avg),
                           "hyperparameters": spec, "torch_seed": args.seed if args.torch_seed is None
                           else args.torch_seed})
    res.write(args.out)
    np.testing.assert_allclose(acc[-1], final, atol=0.01)  # their own top-1 (rounded to 2 decimals)


if __name__ == "__main__":
    main()
