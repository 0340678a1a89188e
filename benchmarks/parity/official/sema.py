"""Official SEMA (``huiyiwang01/SEMA-CL@5a45512``) on the shared parity setup, run unmodified through a run-time shim.

    python benchmarks/parity/official/sema.py --row sema --setup SETUP.npz --seed 0 --out result.json

The official code is LAMDA-PILOT-based: ``utils.data_manager.DataManager`` over an ``iData`` of ``utils/data.py``,
``utils.factory.get_model("sema")`` = ``models.sema.Learner`` (``utils.inc_net.SEMAVitNet``: ``backbone/vit_sema.py``
ViT whose blocks hold ``backbone/sema_block.SEMAModules`` built from ``backbone/sema_components.py``). Per task we
call what their ``trainer._train`` calls: ``incremental_train`` (detection / expansion / training), ``eval_task``,
``after_task``. Their ``trainer._train`` itself is not called because it returns nothing (it only logs); its loop
is three lines, reproduced in :func:`main` with their objects. Nothing of their code is copied or edited. What the
shim swaps in at run time (``_install_shim``), and why:

* **Backbone**: ``utils.inc_net.get_backbone`` (the ``pretrained_vit_b16_224_adapter`` branch: ViT-B/16 weights from
  the internet, ``d_model=768`` hard-coded) is replaced by a factory that builds THEIR
  ``backbone.vit_sema.VisionTransformer`` at the tiny size of the setup (img 32, patch 4, in_chans 1, width 64,
  depth 4, heads 2, mlp 4, qkv_bias, LayerNorm eps 1e-6, ``num_classes=0``, ``global_pool=False``,
  ``drop_path_rate=0``) with THEIR tuning config keys (``ffn_option="parallel"``, ``ffn_adapter_layernorm_option=
  "none"``, ``ffn_adapter_init_option="lora"``, ``ffn_adapter_scalar="0.1"`` (unused by their forward), ``d_model=
  64``, ``ffn_num``, ``rd_dim``, ``buffer_size``, ``exp_threshold``, ``adapt_start_layer``/``adapt_end_layer``) as
  an attribute dict (``easydict`` is therefore not needed), and loads the committed pre-trained weights
  (``assets/backbones/vit_p4_w64_d4_fmnist.pt``) mapped the way their ``vit_base_patch16_224_sema`` maps timm's:
  fused ``qkv`` split into ``q_proj``/``k_proj``/``v_proj``, ``mlp.fc1``/``mlp.fc2`` -> ``fc1``/``fc2``; then it
  freezes every loaded key and leaves the missing (adapter / RD / router) keys trainable, as theirs does.
* **Classifier width**: ``models.sema.Learner.incremental_train`` creates ``nn.Linear(768, nb_classes)``; the
  ``nn`` name of ``models.sema`` is replaced by a proxy of ``torch.nn`` whose ``Linear`` maps an input width of
  768 to the tiny ViT's 64 (everything else is ``torch.nn`` itself; their kaiming-uniform(sqrt 5) / zero-bias
  init runs unchanged).
* **Device**: their routers are created with ``.cuda()`` (``backbone/sema_block.py``); ``torch.nn.Module.cuda``
  returns the module unchanged in this process (no GPU). ``args['device'] = [cpu]`` (their ``trainer._set_device``
  with device -1).
* **Data**: ``utils.data_manager._get_idata`` returns an ``iData`` over the setup arrays (uint8 grey (N, 32, 32),
  PIL mode 'L' via their ``DummyDataset``), labels already in class-order positions, so ``shuffle=False`` (their
  ``DataManager`` keeps ``class_order = [0..9]``); ``init_cls = increment = 2`` (5 tasks). Transforms:
  ``train_trsf = test_trsf = []`` (no augmentation: the setup's rule; no resize: the images are 32 px) and
  ``common_trsf = [ToTensor()]`` = raw [0, 1] inputs, their convention (ours: ``strategy.input_convention=unit``).
* **Loaders**: ``models.sema`` builds ``DataLoader(..., num_workers=8)``; its module global ``num_workers`` is set
  to 0 (1-thread CPU harness; same batches, the shuffles draw from the main process's torch RNG either way).
  ``drop_last`` stays False (their loaders keep the last partial batch; ours: ``data.drop_last=false``).
* **Evaluation**: their ``eval_task`` uses ``topk = 5``, which ``torch.topk`` refuses with 2 seen classes (their
  configs start with 10); the learner's ``topk`` is set to 1 (top-1 is what is compared). The per-experience
  matrix comes from the ``(y_pred, y_true)`` of THEIR ``_eval_cnn`` (wrapped to keep a copy).
* **Seed**: their ``trainer._set_random(seed)`` (``torch.manual_seed(seed)``; their configs pass 1993, which is also
  their class-order seed) is called with the parity seed 0 / 1 / 2: it draws the adapters', RDs', routers' and
  classifier's init and the loader shuffles; the class order is the setup's. Our side runs with ``seed=<seed>``.
* **Observation only** (no behaviour change): ``SEMAModules.add_adapter`` and ``AdapterModule.forward`` are
  wrapped to log when and where an adapter is added and the batch-mean z-score of every RD during detection
  (``extra['detect']``); the adapters per block after each task go to ``extra['adapters']``; mean logits of each
  class group on the test set go to ``extra['logits']``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

#: the shared hyperparameters (both sides equal; scaled-down values of the official CIFAR config, spec (g)/(j))
_HP = {"func_epoch": 3, "rd_epoch": 5, "init_lr": 0.005, "rd_lr": 0.01, "weight_decay": 0.0005, "batch_size": 32,
       "ffn_num": 8, "rd_dim": 16, "buffer_size": 500, "detect_batch_size": 128, "exp_threshold": 0.6,
       "adapt_start_layer": 2, "adapt_end_layer": 3, "init_cls": 2, "increment": 2}

#: rows of the parity table: our ``cl train`` overrides and the official runner's arguments, the same values
ROWS: dict[str, dict] = {
    "sema": {
        "ours": ["strategy=sema", "backbone=vit_p4_w64_d4",
                 "backbone.checkpoint=assets/backbones/vit_p4_w64_d4_fmnist.pt",
                 f"strategy.lr={_HP['init_lr']}", f"strategy.rd_lr={_HP['rd_lr']}", "strategy.momentum=0.9",
                 f"strategy.weight_decay={_HP['weight_decay']}", f"strategy.epochs={_HP['func_epoch']}",
                 f"strategy.rd_epochs={_HP['rd_epoch']}", f"strategy.adapter_dim={_HP['ffn_num']}",
                 f"strategy.rd_dim={_HP['rd_dim']}", f"strategy.window={_HP['buffer_size']}",
                 f"strategy.detect_batch={_HP['detect_batch_size']}", f"strategy.threshold={_HP['exp_threshold']}",
                 f"strategy.expandable_blocks=[{_HP['adapt_start_layer']},{_HP['adapt_end_layer']}]",
                 "strategy.input_convention=unit", f"data.batch_size={_HP['batch_size']}", "data.drop_last=false"],
        "official": dict(_HP),
    },
}


def annotate_ours(path: Path) -> list[list[int]]:
    """Copy our adapters per block after each experience (``records[i]['sema/adapters_per_block']``, written by
    ``SEMA.on_experience_end``) and the detection z-scores into ``extra['adapters']`` / ``extra['detect_z']`` of an
    ``ours_seed<s>.json`` (``run_ours`` keeps them only under ``extra['records']``), so both sides read alike::

        python -c "from benchmarks.parity.official.sema import annotate_ours as a; from pathlib import Path; \
                   [a(p) for p in Path('benchmarks/parity/results/sema').glob('ours_seed*.json')]"
    """
    res = json.loads(Path(path).read_text())
    recs = res["extra"]["records"]
    order = sorted(recs, key=int)
    res["extra"]["adapters"] = [recs[k]["sema/adapters_per_block"] for k in order]
    res["extra"]["detect_z"] = {k: recs[k].get("sema/detect_z", {}) for k in order}
    Path(path).write_text(json.dumps(res, indent=1) + "\n")
    return res["extra"]["adapters"]


class _NNProxy:
    """``torch.nn`` with ``Linear(768, n)`` built as ``Linear(width, n)`` (their classifier's hard-coded input)."""

    def __init__(self, width: int) -> None:
        import torch.nn

        self._nn, self._width = torch.nn, width

    def __getattr__(self, name: str):
        return getattr(self._nn, name)

    def Linear(self, in_features: int, out_features: int, *args, **kwargs):  # noqa: N802  (mirrors torch.nn)
        return self._nn.Linear(self._width if in_features == 768 else in_features, out_features, *args, **kwargs)


def _install_shim(setup: dict, spec: dict, captured: dict) -> None:
    """Swap in the CPU / tiny-setup pieces (see the module docstring) after importing their modules."""
    from functools import partial
    from types import SimpleNamespace

    import numpy as np
    import torch
    from torch import nn
    from torchvision import transforms

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    nn.Module.cuda = lambda self, device=None: self  # their routers call .cuda(); no GPU here

    import backbone.sema_block as sema_block
    import backbone.vit_sema as vit_sema
    import models.sema as sema_mod
    import utils.data as udata
    import utils.data_manager as dm
    import utils.factory as factory
    import utils.inc_net as inc_net

    from benchmarks.parity.common import VIT_ARCH, vit_state_dict

    a = VIT_ARCH
    width = int(a["embed_dim"])

    # --- data: an iData over the setup arrays
    class iSetup(udata.iData):
        use_path = False
        train_trsf: list = []
        test_trsf: list = []
        common_trsf = [transforms.ToTensor()]
        class_order = list(range(int(setup["n_tasks"]) * int(setup["classes_per_task"])))

        def download_data(self) -> None:
            self.train_data, self.train_targets = setup["train_x"], setup["train_y"].astype(np.int64)
            self.test_data, self.test_targets = setup["test_x"], setup["test_y"].astype(np.int64)

    dm._get_idata = lambda name, args=None: iSetup()

    # --- backbone: their VisionTransformer at the tiny size, our weights mapped to their key names
    def get_backbone(args: dict, pretrained: bool = False) -> nn.Module:
        cfg = SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                              ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=args["ffn_num"],
                              ffn_adapter_type=args["ffn_adapter_type"], d_model=width, vpt_on=False, vpt_num=0,
                              exp_threshold=args["exp_threshold"], adapt_start_layer=args["adapt_start_layer"],
                              adapt_end_layer=args["adapt_end_layer"], rd_dim=args["rd_dim"],
                              buffer_size=args["buffer_size"])
        model = vit_sema.VisionTransformer(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"],
                                           embed_dim=width, depth=a["depth"], num_heads=a["num_heads"],
                                           mlp_ratio=a["mlp_ratio"], qkv_bias=True,
                                           norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                                           global_pool=False, drop_path_rate=0.0, tuning_config=cfg)
        state = {}
        for k, v in vit_state_dict().items():
            if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias"):
                kind = k.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.split(width, dim=0)):
                    state[k.replace(f"qkv.{kind}", f"{name}.{kind}")] = part.clone()
            else:
                state[k.replace("mlp.", "")] = v
        msg = model.load_state_dict(state, strict=False)
        assert not msg.unexpected_keys, msg.unexpected_keys
        assert all(("adapter_module" in k) for k in msg.missing_keys), msg.missing_keys
        for name, p in model.named_parameters():  # as their factory: freeze all but the adapter modules
            p.requires_grad = name in msg.missing_keys
        model.out_dim = width
        return model.eval()

    inc_net.get_backbone = get_backbone
    sema_mod.nn = _NNProxy(width)
    sema_mod.num_workers = 0

    # --- observation: expansions and detection z-scores
    task = {"t": 0, "batch": 0}
    detect: list[dict] = captured.setdefault("detect", [])
    add_adapter = sema_block.SEMAModules.add_adapter

    def add_adapter_logged(self, initialize=False):
        if not initialize:
            detect.append({"task": task["t"], "event": "add", "block": self.layer_id, "batch": task["batch"]})
        return add_adapter(self, initialize=initialize)

    sema_block.SEMAModules.add_adapter = add_adapter_logged
    mod_forward = sema_block.SEMAModules.forward

    def mod_forward_logged(self, x):
        eligible = (self.detecting_outlier and not self.added_for_task
                    and self.adapt_start_layer <= self.layer_id <= self.adapt_end_layer)
        if eligible:
            with torch.no_grad():
                zs = [ad.get_z_score_deviation(ad.rd.compute_reconstruction_loss(x)).mean().item()
                      for ad in self.adapters]
            detect.append({"task": task["t"], "block": self.layer_id, "batch": task["batch"],
                           "z": [round(z, 4) for z in zs]})
        return mod_forward(self, x)

    sema_block.SEMAModules.forward = mod_forward_logged

    # --- capture the learner (per-experience matrix from THEIR eval predictions, topk 1)
    get_model = factory.get_model

    def get_model_capturing(name: str, args: dict):
        model = get_model(name, args)
        model.topk = 1
        eval_cnn = model._eval_cnn

        def eval_cnn_capturing(loader):
            y_pred, y_true = eval_cnn(loader)
            captured.setdefault("evals", []).append((y_pred[:, 0].copy(), y_true.copy()))
            return y_pred, y_true

        model._eval_cnn = eval_cnn_capturing
        network_forward = model._network.forward

        def forward_counting(x):
            out = network_forward(x)
            if any(m.detecting_outlier for m in model._network.backbone.modules()
                   if isinstance(m, sema_block.SEMAModules)):
                task["batch"] += 1
            return out

        model._network.forward = forward_counting
        captured["model"] = model
        captured["task"] = task
        return model

    factory.get_model_capturing = get_model_capturing


def main() -> None:
    ap = argparse.ArgumentParser(description="official SEMA on the parity setup")
    ap.add_argument("--row", default="sema", choices=list(ROWS))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hp", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override hyperparameters of the row (experiments only; JSON values)")
    ap.add_argument("--tasks", type=int, default=0, help="stop after this many tasks (diagnostics only)")
    args = ap.parse_args()

    from benchmarks.parity.common import RunResult, counts_from_predictions, load_npz, official_source

    src = official_source("sema")
    sys.path.insert(0, str(src))
    setup = load_npz(Path(args.setup))
    spec = {**ROWS[args.row]["official"], **{k: json.loads(v) for k, v in (a.split("=", 1) for a in args.hp)}}
    captured: dict = {}
    start = time.perf_counter()
    _install_shim(setup, spec, captured)
    import numpy as np
    import torch
    import trainer
    import utils.factory as factory
    from backbone.sema_block import SEMAModules
    from utils.data_manager import DataManager

    Path("logs").mkdir(exist_ok=True)
    targs = {"prefix": "parity", "dataset": "parity_setup", "memory_size": 0, "memory_per_class": 0,
             "fixed_memory": False, "shuffle": False, "model_name": "sema",
             "backbone_type": "pretrained_vit_b16_224_adapter", "device": [-1], "seed": args.seed,
             "optimizer": "sgd", "min_lr": 0, "ffn_adapter_type": "adaptmlp", "vpt_type": "shallow",
             "prompt_token_num": 5, **spec}
    # what trainer._train does, minus its log files: seed, device, data manager, learner, the task loop
    trainer._set_random(args.seed)
    trainer._set_device(targs)
    data_manager = DataManager(targs["dataset"], targs["shuffle"], targs["seed"], targs["init_cls"],
                               targs["increment"], targs)
    targs["nb_classes"] = data_manager.nb_classes
    targs["nb_tasks"] = data_manager.nb_tasks
    model = factory.get_model_capturing(targs["model_name"], targs)
    adapters: list[list[int]] = []
    windows: list[dict] = []  # per expandable block, per RD: [count, mean, std] of its loss window

    def ad_has_rd(m) -> bool:
        return m.adapters[0].rd is not None

    logits: list[list[float]] = []
    heads: list[list[list[float]]] = []  # [after t][test group j][head k]: mean over j's samples of head k's max logit
    cpt = int(setup["classes_per_task"])
    for t in range(data_manager.nb_tasks):
        captured["task"]["t"], captured["task"]["batch"] = t, 0
        model.incremental_train(data_manager)
        cnn_accy, _ = model.eval_task()
        model.after_task()
        mods = [m for m in model._network.backbone.modules() if isinstance(m, SEMAModules)]
        adapters.append([m.num_adapters for m in mods])
        windows.append({str(m.layer_id): [[ad.rd_loss_record.length, round(float(ad.rd_loss_record.mean), 5),
                                           round(float(ad.rd_loss_record.stddev), 5)] for ad in m.adapters]
                        for m in mods if ad_has_rd(m)})
        # diagnostics: mean logit of each seen class group (over that group's test samples, its own classes)
        net = model._network.eval()
        with torch.no_grad():
            xs = torch.from_numpy(setup["test_x"]).float().div(255).unsqueeze(1)
            ys = torch.from_numpy(setup["test_y"])
            keep = ys < (t + 1) * cpt
            out = torch.cat([net(xb)["logits"][:, : (t + 1) * cpt] for xb in xs[keep].split(256)])
            yk = ys[keep]
            logits.append([round(out[yk // cpt == j].max(1).values.mean().item(), 3) for j in range(t + 1)])
            heads.append([[round(out[yk // cpt == j][:, k * cpt:(k + 1) * cpt].max(1).values.mean().item(), 3)
                           for k in range(t + 1)] for j in range(t + 1)])
        if args.tasks and t + 1 >= args.tasks:
            break

    n_tasks = int(setup["n_tasks"])
    acc, matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    wall = time.perf_counter() - start
    res = RunResult(row=args.row, side="official", seed=args.seed, acc=acc, wall_s=round(wall, 2), matrix=matrix,
                    extra={"adapters": adapters, "rd_windows": windows, "detect": captured["detect"],
                           "max_logit_per_group": logits, "head_logits": heads,
                           "official_last_top1": float(cnn_accy["top1"]), "hyperparameters": spec})
    Path(args.out).write_text(json.dumps(asdict(res), indent=1) + "\n")
    np.testing.assert_allclose(acc[-1], float(cnn_accy["top1"]), atol=0.01)  # their own top-1 (2 decimals)


if __name__ == "__main__":
    main()
