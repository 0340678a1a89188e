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
* **Whole-run replay** (``--check-run``, :func:`check_run`; ``--check-run-reverse``, :func:`check_run_reverse`):
  one side runs unmodified while wrappers record every loader shuffle and the initial values of every adapter,
  RD, router column and the classifier when it is created; the other side then runs with those draws loaded
  (their positions and ours mapped through the setup's indices). Measured on class orders 0 and 1 (their draws)
  and 0 (our draws): the same expansions at the same detection batches, parameters equal to ~5e-8 after every
  task, the same accuracy after every experience (``results/sema/replay/``).
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
from pathlib import Path
from typing import Any

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

    from benchmarks.parity.common import capturing_eval_cnn

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
        model._eval_cnn = capturing_eval_cnn(model._eval_cnn, captured)
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


# ------------------------------------------------------------------------------------------------ whole-run replay
def _official_names(prefix_block: int, k: int) -> dict[str, str]:
    """Our parameter name (within mixture ``prefix_block``) -> THEIR name, for adapter ``k`` of that block."""
    a = f"backbone.blocks.{prefix_block}.adapter_module.adapters.{k}."
    return {f"adapters.{k}.down.weight": a + "functional.down_proj.weight",
            f"adapters.{k}.down.bias": a + "functional.down_proj.bias",
            f"adapters.{k}.up.weight": a + "functional.up_proj.weight",
            f"adapters.{k}.up.bias": a + "functional.up_proj.bias",
            f"descriptors.{k}.enc.weight": a + "rd.encoder.weight", f"descriptors.{k}.enc.bias": a + "rd.encoder.bias",
            f"descriptors.{k}.dec.weight": a + "rd.decoder.weight", f"descriptors.{k}.dec.bias": a + "rd.decoder.bias"}


def _group(name: str) -> str:
    return {"adapters": "adapters", "descriptors": "rds", "router": "routers"}[name.split(".", 1)[0]]


def check_run(setup_path: str, seed: int, work: str = "sema_check_run") -> dict[str, Any]:
    """THEIR whole run, then ours replaying it: same initial weights of every module when it is created, same batches.

    1. THEIR learner runs the task loop of :func:`main` unmodified (seed ``seed``), while class-level wrappers only
       observe: the index order of every shuffled loader iteration (their ``BatchSampler`` over a
       ``RandomSampler``: the train loader's epochs, batch 32, and the detection passes, batch 128), the initial
       values of every adapter, RD and router column when it is created (``SEMAModules.__init__`` /
       ``add_adapter``), the classifier's before task 0 trains, every detection batch's z per RD, and after each
       task the state of every adapter, router row, RD, RD loss window and the classifier.
    2. Our :class:`~cl.runner.Runner` runs the same row with: ``RankBatchSampler.__iter__`` yielding THEIR index
       order of the same loader (per experience and batch size, in order; their dataset positions mapped to ours
       through the setup's indices), ``AdapterMixture.add`` loading THEIR initial values of the module it creates
       (same block, same adapter index), the classifier THEIR initial values at experience 0. Everything else is
       our code. At each experience end our parameters and windows are compared with THEIR snapshot of that task.

    If the two runs take different decisions, ours asks for a module or a shuffle their run never made: then it
    keeps its own (flagged in ``replay_misses``), so the report shows where the replay stopped being one.
    Returns the report (accuracies, adapters per block, expansions with batch and z, per-batch z differences,
    parameter and window differences per experience).
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

    sys.path.insert(0, str(official_source("sema")))
    setup = load_npz(Path(setup_path))
    n_tasks, cpt = int(setup["n_tasks"]), int(setup["classes_per_task"])
    spec = dict(ROWS["sema"]["official"])
    captured: dict = {}
    _install_shim(setup, spec, captured)
    import backbone.sema_block as sema_block
    import models.sema as sema_mod

    # ---- 1. THEIR run, observed
    task = {"t": 0}
    perms: dict[tuple[int, int], list[np.ndarray]] = {}
    inits: dict[Any, dict[str, Any]] = {}
    batch_iter = tsampler.BatchSampler.__iter__

    def batch_iter_recording(self):
        batches = list(batch_iter(self))  # the same draws at the same moment (first next of the loader)
        if isinstance(self.sampler, tsampler.RandomSampler):
            perms.setdefault((task["t"], self.batch_size), []).append(np.concatenate(batches))
        yield from batches

    mod_init, add_adapter = sema_block.SEMAModules.__init__, sema_block.SEMAModules.add_adapter

    def mod_init_recording(self, config, layer_id, writer):
        mod_init(self, config, layer_id, writer)
        inits[(layer_id, 0)]["router.weight"] = self.router.weight.detach().clone()
        inits[(layer_id, 0)]["router.bias"] = self.router.bias.detach().clone()

    def add_adapter_recording(self, initialize=False):
        add_adapter(self, initialize=initialize)
        k = len(self.adapters) - 1
        sd = {k_: v.detach().clone() for k_, v in self.adapters[k].state_dict().items()
              if k_.startswith(("functional.", "rd."))}
        entry = {ours: sd[theirs.split(f"adapters.{k}.", 1)[1]]
                 for ours, theirs in _official_names(self.layer_id, k).items()
                 if theirs.split(f"adapters.{k}.", 1)[1] in sd}
        entry = {n.split(".", 2)[0] + "." + n.split(".", 2)[2]: v for n, v in entry.items()}  # drop the index
        if not initialize:
            entry["router.weight"] = self.new_router.weight.detach().clone()
            entry["router.bias"] = self.new_router.bias.detach().clone()
        inits[(self.layer_id, k)] = entry

    train = sema_mod.Learner._train

    def train_recording(self, train_loader, test_loader):
        if self._cur_task == 0:
            inits["classifier"] = {k: v.detach().clone() for k, v in self._network.fc.state_dict().items()}
        return train(self, train_loader, test_loader)

    tsampler.BatchSampler.__iter__ = batch_iter_recording
    sema_block.SEMAModules.__init__ = mod_init_recording
    sema_block.SEMAModules.add_adapter = add_adapter_recording
    sema_mod.Learner._train = train_recording

    def their_state(model) -> dict[str, Any]:
        out: dict[str, Any] = {"params": {}, "windows": {}}
        for m in model._network.backbone.modules():
            if not isinstance(m, sema_block.SEMAModules):
                continue
            b = m.layer_id
            for k, ad in enumerate(m.adapters):
                sd = ad.state_dict()
                for ours, theirs in _official_names(b, k).items():
                    key = theirs.split(f"adapters.{k}.", 1)[1]
                    if key in sd:
                        out["params"][f"{b}.{ours}"] = sd[key].detach().clone()
                if ad.rd is not None:
                    out["windows"][f"{b}.{k}"] = ad.rd_loss_record.record[: ad.rd_loss_record.length].clone()
                    out["params"][f"{b}.router.{k}.weight"] = m.router.weight[k:k + 1].detach().clone()
                    out["params"][f"{b}.router.{k}.bias"] = m.router.bias[k:k + 1].detach().clone()
        out["params"]["classifier.weight"] = model._network.fc.weight.detach().clone()
        out["params"]["classifier.bias"] = model._network.fc.bias.detach().clone()
        return out

    import trainer
    import utils.factory as factory
    from utils.data_manager import DataManager

    start = time.process_time()
    Path("logs").mkdir(exist_ok=True)
    targs = _official_args(spec, seed)
    trainer._set_random(seed)
    trainer._set_device(targs)
    dm = DataManager(targs["dataset"], targs["shuffle"], targs["seed"], targs["init_cls"], targs["increment"], targs)
    model = factory.get_model_capturing(targs["model_name"], targs)
    theirs: list[dict] = []
    their_adapters: list[list[int]] = []
    for t in range(dm.nb_tasks):  # what trainer._train does per task (see main)
        task["t"] = captured["task"]["t"] = t
        captured["task"]["batch"] = 0
        model.incremental_train(dm)
        model.eval_task()
        model.after_task()
        theirs.append(their_state(model))
        their_adapters.append([m.num_adapters for m in model._network.backbone.modules()
                               if isinstance(m, sema_block.SEMAModules)])
    their_cpu = time.process_time() - start
    tsampler.BatchSampler.__iter__ = batch_iter
    their_acc, their_matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    their_z = {(d["task"], d["batch"], d["block"]): d["z"] for d in captured["detect"] if "z" in d}
    their_adds = [d for d in captured["detect"] if d.get("event") == "add"]

    # ---- 2. ours, replaying THEIR draws
    import strategies.sema as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    state: dict[str, Any] = {"exp": 0, "batch": 0, "model": None, "pos_of": None}
    train_y = np.asarray(setup["train_y"])
    their_pos = {t: np.concatenate([np.flatnonzero(train_y == c) for c in range(t * cpt, (t + 1) * cpt)])
                 for t in range(n_tasks)}  # THEIR dataset position -> setup index (DataManager._select, per class)
    misses: list[str] = []
    report_exps: list[dict[str, Any]] = []
    our_z: dict[tuple[int, int, int], list[float]] = {}
    our_adds: list[dict] = []
    sampler_iter = loaders.RankBatchSampler.__iter__

    def sampler_replay(self):
        queue = perms.get((state["exp"], self.batch), [])
        if not queue or len(queue[0]) != self.n:
            misses.append(f"exp {state['exp']}: a shuffle of batch {self.batch} their run never drew (own order)")
            yield from sampler_iter(self)
            return
        order = state["pos_of"][their_pos[state["exp"]][queue.pop(0)]]
        for b in range(len(self)):
            yield order[b * self.batch:(b + 1) * self.batch].tolist()

    start_fn, end_fn = ours_mod.SEMA.on_experience_start, ours_mod.SEMA.on_experience_end
    add_fn, z_fn = ours_mod.AdapterMixture.add, ours_mod.SEMA._batch_z_sums

    def start_replay(self, exp, ctx):
        pos_of = np.full(len(train_y), -1)
        pos_of[np.asarray(exp.train.indices)] = np.arange(len(exp.train.indices))
        state.update(exp=exp.index, batch=0, model=self, pos_of=pos_of)
        start_fn(self, exp, ctx)
        if exp.index == 0:
            with torch.no_grad():
                for k, v in inits["classifier"].items():
                    getattr(self.classifier, k).copy_(v)

    def add_replay(self, device=None):
        add_fn(self, device)
        b, k = state["model"].mixtures.index(self), len(self) - 1
        if state["exp"] > 0:
            our_adds.append({"task": state["exp"], "block": b, "batch": state["batch"] - 1})
        init = inits.get((b, k))
        if init is None:
            misses.append(f"exp {state['exp']}: block {b} adapter {k} that their run never created (own init)")
            return
        mods = {"adapters": self.adapters[k], "descriptors": self.descriptors[k] if self.expandable else None,
                "router": self.router[k] if self.expandable else None}
        with torch.no_grad():
            for name, v in init.items():
                head, rest = name.split(".", 1)
                if mods[head] is not None:
                    mods[head].get_parameter(rest).copy_(v)

    def z_replay(self, ctx, x, candidates):
        out = z_fn(self, ctx, x, candidates)
        for b, t in out.items():
            our_z[(state["exp"], state["batch"], b)] = (t[:-1] / t[-1]).tolist()
        state["batch"] += 1
        return out

    def end_replay(self, exp, ctx):
        end_fn(self, exp, ctx)
        t = exp.index
        ref = theirs[t] if t < len(theirs) else {"params": {}, "windows": {}}
        ours_params: dict[str, torch.Tensor] = {}
        for b, m in enumerate(self.mixtures):
            for name, p in m.named_parameters():  # adapters.K.down.weight, descriptors.K.enc.bias, router.K.weight
                ours_params[f"{b}.{name}"] = p.detach()
        ours_params["classifier.weight"] = self.classifier.weight.detach()
        ours_params["classifier.bias"] = self.classifier.bias.detach()
        diff: dict[str, float] = {}
        for name, p in ours_params.items():
            g = "classifier" if name.startswith("classifier") else _group(name.split(".", 1)[1])
            q = ref["params"].get(name)
            if q is None or q.shape != p.shape:
                diff[g] = float("inf")
                misses.append(f"exp {t}: our {name} has no counterpart in their model")
                continue
            diff[g] = max(diff.get(g, 0.0), float((p.cpu() - q).abs().max()))
        missing = sorted(set(ref["params"]) - set(ours_params))
        if missing:
            misses.append(f"exp {t}: their {', '.join(missing[:4])}... have no counterpart in ours")
        wdiff = 0.0
        for key, rec in ref["windows"].items():
            b, k = map(int, key.split("."))
            rd = self.mixtures[b].descriptors[k] if k < len(self.mixtures[b].descriptors) else None
            ours_rec = None if rd is None else rd.record[: int(rd.count)].cpu()
            if ours_rec is None or ours_rec.shape != rec.shape:
                wdiff = float("inf")
                continue
            wdiff = max(wdiff, float((ours_rec - rec).abs().max()))
        report_exps.append({"experience": t, "param_max_abs_diff": {k: diff[k] for k in sorted(diff)},
                            "window_max_abs_diff": wdiff,
                            "adapters_ours": [len(m) for m in self.mixtures]})

    loaders.RankBatchSampler.__iter__ = sampler_replay
    ours_mod.SEMA.on_experience_start, ours_mod.SEMA.on_experience_end = start_replay, end_replay
    ours_mod.AdapterMixture.add, ours_mod.SEMA._batch_z_sums = add_replay, z_replay
    cfg, work_dir = replay_config(ROWS["sema"]["ours"], setup_path, n_tasks, seed, work)
    start = time.process_time()
    try:
        metrics = Runner(cfg).run()
    finally:
        loaders.RankBatchSampler.__iter__ = sampler_iter
        ours_mod.SEMA.on_experience_start, ours_mod.SEMA.on_experience_end = start_fn, end_fn
        ours_mod.AdapterMixture.add, ours_mod.SEMA._batch_z_sums = add_fn, z_fn
    our_cpu = time.process_time() - start
    our_acc = seen_accuracy(metrics["correct"], metrics["total"])
    keys = sorted(set(their_z) & set(our_z))
    for e in report_exps:
        t = e["experience"]
        e["acc_official"], e["acc_ours"] = round(their_acc[t], 3), round(our_acc[t], 3)
        e["adapters_official"] = [int(n) for n in their_adapters[t]]
        e["expansions_official"] = [{"block": d["block"], "batch": d["batch"],
                                     "z": their_z.get((t, d["batch"], d["block"]))} for d in their_adds
                                    if d["task"] == t]
        e["expansions_ours"] = [{"block": d["block"], "batch": d["batch"],
                                 "z": [round(v, 4) for v in our_z.get((t, d["batch"], d["block"]), [])]}
                                for d in our_adds if d["task"] == t]
        zs = [max(abs(a - b) for a, b in zip(their_z[k], our_z[k])) for k in keys if k[0] == t
              and len(their_z[k]) == len(our_z[k])]
        e["detect_batches_compared"] = len(zs)
        e["z_max_abs_diff"] = max(zs) if zs else None
    same = not misses and all([(d["block"], d["batch"]) for d in e["expansions_official"]]
                              == [(d["block"], d["batch"]) for d in e["expansions_ours"]] for e in report_exps)
    return {"seed": seed, "setup_class_order": [int(c) for c in setup.get("class_order", [])],
            "identical_decisions": bool(same), "replay_misses": misses,
            # their shuffles ours never asked for: only the last detection pass of an experience in which every
            # expandable block grew (their recursion makes one more pass that can add nothing; ours stops)
            "unused_shuffles": {f"exp{t}/batch{bs}": len(q) for (t, bs), q in sorted(perms.items()) if q},
            "acc_official": [round(a, 3) for a in their_acc], "acc_ours": [round(a, 3) for a in our_acc],
            "matrix_official": their_matrix, "matrix_ours": [[None if v is None else 100.0 * v for v in r]
                                                             for r in metrics["accuracy_matrix"]],
            "cpu_s": {"official": round(their_cpu, 1), "ours": round(our_cpu, 1)}, "experiences": report_exps}

def check_run_reverse(setup_path: str, seed: int, work: str = "sema_check_run_reverse") -> dict[str, Any]:
    """The replay the other way round: OUR run (seed ``seed``) first, then THEIR code fed our draws.

    Ours runs unmodified while wrappers record the index order of every training / detection loader iteration
    (``RankBatchSampler``) and the initial values of every adapter, RD, router column (``AdapterMixture.add``) and
    of the classifier. THEIR learner then runs the task loop of :func:`main` with their ``BatchSampler`` over a
    ``RandomSampler`` yielding our order of the same loader (per task and batch size, in order) and every module
    they create loaded with our initial values (same block, same adapter index). A loader of theirs that ours never
    drew (their extra last detection pass once every block grew) keeps their own shuffle (``their_own_shuffles``).
    Answers whether a run of ours that ends low (seed 0: 42.8 %) ends as low in their code from the same draws.
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

    # ---- 1. ours, observed
    import strategies.sema as ours_mod
    from cl.data import loaders
    from cl.runner import Runner

    state: dict[str, Any] = {"exp": 0, "batch": 0, "model": None, "indices": None}
    perms: dict[tuple[int, int], list[np.ndarray]] = {}
    inits: dict[Any, dict[str, torch.Tensor]] = {}
    our_adds: list[dict] = []
    sampler_iter, start_fn = loaders.RankBatchSampler.__iter__, ours_mod.SEMA.on_experience_start
    add_fn, z_fn = ours_mod.AdapterMixture.add, ours_mod.SEMA._batch_z_sums

    def sampler_recording(self):
        batches = list(sampler_iter(self))  # eagerly: the detection scan may stop early
        perms.setdefault((state["exp"], self.batch), []).append(state["indices"][np.concatenate(batches)])
        yield from batches

    def start_recording(self, exp, ctx):
        state.update(exp=exp.index, batch=0, model=self, indices=np.asarray(exp.train.indices))
        if exp.index == 0:
            inits["classifier"] = {k: v.detach().clone() for k, v in self.classifier.state_dict().items()}
        start_fn(self, exp, ctx)

    def add_recording(self, device=None):
        add_fn(self, device)
        b, k = state["model"].mixtures.index(self), len(self) - 1
        if state["exp"] > 0:
            our_adds.append({"task": state["exp"], "block": b, "batch": state["batch"] - 1})
        sd = {f"adapters.{k}.{n}": v for n, v in self.adapters[k].state_dict().items()}
        if self.expandable:
            sd.update({f"descriptors.{k}.{n}": v for n, v in self.descriptors[k].named_parameters()})
            sd.update({f"router.{n}": v for n, v in self.router[k].named_parameters()})
        inits[(b, k)] = {n: v.detach().clone() for n, v in sd.items()}

    def z_counting(self, ctx, x, candidates):
        out = z_fn(self, ctx, x, candidates)
        state["batch"] += 1
        return out

    loaders.RankBatchSampler.__iter__ = sampler_recording
    ours_mod.SEMA.on_experience_start, ours_mod.AdapterMixture.add = start_recording, add_recording
    ours_mod.SEMA._batch_z_sums = z_counting
    cfg, work_dir = replay_config(ROWS["sema"]["ours"], setup_path, n_tasks, seed, work)
    start = time.process_time()
    try:
        runner = Runner(cfg)
        metrics = runner.run()
    finally:
        loaders.RankBatchSampler.__iter__ = sampler_iter
        ours_mod.SEMA.on_experience_start, ours_mod.AdapterMixture.add = start_fn, add_fn
        ours_mod.SEMA._batch_z_sums = z_fn
    our_cpu = time.process_time() - start
    our_acc = seen_accuracy(metrics["correct"], metrics["total"])
    recs = metrics["records"] if "records" in metrics.metrics else {}
    our_adapters = [recs[k]["sema/adapters_per_block"] for k in sorted(recs, key=int)] if recs else []
    our_final = {f"{b}.{n}": p.detach().clone() for b, m in enumerate(runner.model.mixtures)
                 for n, p in m.named_parameters()}
    our_final["classifier.weight"] = runner.model.classifier.weight.detach().clone()

    # ---- 2. THEIR code, fed our draws
    sys.path.insert(0, str(official_source("sema")))
    spec = dict(ROWS["sema"]["official"])
    captured: dict = {}
    _install_shim(setup, spec, captured)
    import backbone.sema_block as sema_block
    import models.sema as sema_mod

    task = {"t": 0}
    own: list[str] = []
    # their dataset position p of task t is setup index their_pos[t][p] (DataManager._select, class by class)
    their_of = {}
    for t in range(n_tasks):
        pos = np.concatenate([np.flatnonzero(train_y == c) for c in range(t * cpt, (t + 1) * cpt)])
        inv = np.full(len(train_y), -1)
        inv[pos] = np.arange(len(pos))
        their_of[t] = inv
    batch_iter = tsampler.BatchSampler.__iter__

    def batch_iter_replay(self):
        queue = perms.get((task["t"], self.batch_size), [])
        if not isinstance(self.sampler, tsampler.RandomSampler):
            yield from batch_iter(self)
            return
        if not queue or len(queue[0]) != len(self.sampler.data_source):
            own.append(f"task {task['t']}: their loader of batch {self.batch_size} (own shuffle)")
            yield from batch_iter(self)
            return
        order = their_of[task["t"]][queue.pop(0)].tolist()
        for i in range(0, len(order), self.batch_size):
            yield order[i:i + self.batch_size]

    def load(module, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, v in values.items():
                module.get_parameter(n).copy_(v)

    def to_theirs(b: int, k: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Our initial values of (block b, adapter k) as (AdapterModule state, router column)."""
        init = inits[(b, k)]
        names = _official_names(b, k)
        mod = {names[n].split(f"adapters.{k}.", 1)[1]: v for n, v in init.items() if n in names}
        col = {n.split(".", 1)[1]: v for n, v in init.items() if n.startswith("router.")}
        return mod, col

    mod_init, add_adapter = sema_block.SEMAModules.__init__, sema_block.SEMAModules.add_adapter

    def mod_init_loading(self, config, layer_id, writer):
        mod_init(self, config, layer_id, writer)
        _, col = to_theirs(layer_id, 0)
        if col:
            load(self.router, col)

    def add_adapter_loading(self, initialize=False):
        add_adapter(self, initialize=initialize)
        k = len(self.adapters) - 1
        if (self.layer_id, k) not in inits:
            own.append(f"task {task['t']}: block {self.layer_id} adapter {k} ours never created (own init)")
            return
        mod, col = to_theirs(self.layer_id, k)
        load(self.adapters[k], mod)
        if not initialize:
            load(self.new_router, col)

    train = sema_mod.Learner._train

    def train_loading(self, train_loader, test_loader):
        if self._cur_task == 0:
            load(self._network.fc, inits["classifier"])
        return train(self, train_loader, test_loader)

    tsampler.BatchSampler.__iter__ = batch_iter_replay
    sema_block.SEMAModules.__init__, sema_block.SEMAModules.add_adapter = mod_init_loading, add_adapter_loading
    sema_mod.Learner._train = train_loading
    import trainer
    import utils.factory as factory
    from utils.data_manager import DataManager

    start = time.process_time()
    targs = _official_args(spec, seed)
    trainer._set_random(seed)
    trainer._set_device(targs)
    dm = DataManager(targs["dataset"], targs["shuffle"], targs["seed"], targs["init_cls"], targs["increment"], targs)
    model = factory.get_model_capturing(targs["model_name"], targs)
    their_adapters: list[list[int]] = []
    try:
        for t in range(dm.nb_tasks):
            task["t"] = captured["task"]["t"] = t
            captured["task"]["batch"] = 0
            model.incremental_train(dm)
            model.eval_task()
            model.after_task()
            their_adapters.append([m.num_adapters for m in model._network.backbone.modules()
                                   if isinstance(m, sema_block.SEMAModules)])
    finally:
        tsampler.BatchSampler.__iter__ = batch_iter
    their_cpu = time.process_time() - start
    their_acc, their_matrix = counts_from_predictions(captured["evals"], n_tasks, cpt)
    their_adds = [{"task": d["task"], "block": d["block"], "batch": d["batch"]} for d in captured["detect"]
                  if d.get("event") == "add"]
    sd = model._network.state_dict()
    diff = 0.0
    for name, p in our_final.items():
        b, rest = name.split(".", 1)
        if rest.startswith("router."):
            k = int(rest.split(".")[1])
            q = sd[f"backbone.blocks.{b}.adapter_module.router.{rest.split('.')[2]}"][k:k + 1]
        elif name.startswith("classifier"):
            q = sd["fc.weight"]
        else:
            k = int(rest.split(".")[1])
            q = sd[_official_names(int(b), k)[rest]]
        diff = max(diff, float((p - q).abs().max()))
    return {"seed": seed, "direction": "ours first, their code fed our draws",
            "identical_decisions": their_adds == our_adds and their_adapters == our_adapters,
            "acc_ours": [round(a, 3) for a in our_acc], "acc_official_on_our_draws": [round(a, 3) for a in their_acc],
            "matrix_ours": [[None if v is None else 100.0 * v for v in r] for r in metrics["accuracy_matrix"]],
            "matrix_official_on_our_draws": their_matrix,
            "adapters_ours": our_adapters, "adapters_official": their_adapters,
            "expansions_ours": our_adds, "expansions_official": their_adds,
            "final_param_max_abs_diff": diff, "their_own_shuffles": own,
            "cpu_s": {"ours": round(our_cpu, 1), "official": round(their_cpu, 1)}}

def _official_args(spec: dict, seed: int) -> dict[str, Any]:
    """THEIR ``args`` dict (what ``main.py`` loads from ``exps/sema_*.json``) for the row's values and ``seed``."""
    return {"prefix": "parity", "dataset": "parity_setup", "memory_size": 0, "memory_per_class": 0,
            "fixed_memory": False, "shuffle": False, "model_name": "sema",
            "backbone_type": "pretrained_vit_b16_224_adapter", "device": [-1], "seed": seed,
            "optimizer": "sgd", "min_lr": 0, "ffn_adapter_type": "adaptmlp", "vpt_type": "shallow",
            "prompt_token_num": 5, **spec}


def main() -> None:
    ap = argparse.ArgumentParser(description="official SEMA on the parity setup")
    ap.add_argument("--row", default="sema", choices=list(ROWS))
    ap.add_argument("--setup", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hp", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override hyperparameters of the row (experiments only; JSON values)")
    ap.add_argument("--tasks", type=int, default=0, help="stop after this many tasks (diagnostics only)")
    ap.add_argument("--check-run", action="store_true",
                    help="replay: THEIR run, then ours with their initial weights and batch order (check_run)")
    ap.add_argument("--check-run-reverse", action="store_true",
                    help="replay the other way: ours, then THEIR code with our initial weights and batch order")
    args = ap.parse_args()
    if args.check_run_reverse:
        report = check_run_reverse(args.setup, args.seed)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print({k: v for k, v in report.items() if not k.startswith("matrix")})
        return
    if args.check_run:
        report = check_run(args.setup, args.seed)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        for e in report["experiences"]:
            print(f"exp {e['experience']}: acc {e['acc_official']:.2f} | {e['acc_ours']:.2f}  adapters "
                  f"{e['adapters_official']} | {e['adapters_ours']}  z diff {e['z_max_abs_diff']}  params "
                  f"{e['param_max_abs_diff']}  windows {e['window_max_abs_diff']:.2e}")
        print("identical decisions:", report["identical_decisions"], "| misses:", report["replay_misses"])
        return

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
    targs = _official_args(spec, args.seed)
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
    res.write(args.out)
    np.testing.assert_allclose(acc[-1], float(cnn_accy["top1"]), atol=0.01)  # their own top-1 (2 decimals)


if __name__ == "__main__":
    main()
