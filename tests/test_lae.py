"""LAE: what the learning / accumulation / ensemble parts promise, checked on real Lightning fits.

One in-process run on two tiny digit experiences records every optimizer step (a trainer callback) and checks:
only the online PET and the new head get gradients; the online PET is constant during the warm-up epochs; the
offline PET equals the online one when created and then follows the EMA recursion exactly, one update per step;
the backbone is bit-identical at the end; both phases of an experience share one Adam optimizer.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from cl.callbacks import base as cb_base
from cl.config import build_config
from cl.errors import UserError
from cl.peft import pet_state_dict
from cl.runner import Runner, build_scenario, build_strategy
from conftest import REPO, TINY, cl_cli

TINY_LAE = [*TINY, "strategy=lae", "backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16",
            "strategy.epochs=2", "strategy.num_freeze_epochs=1", "strategy.blocks=[0,1]", "strategy.lr=0.01",
            "trainer.limit_train_batches=6", "run.checkpoint=false"]
MU = 0.8  # a decay far from 1 so that every step visibly moves the offline copy


def _snap(module: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in pet_state_dict(module.backbone, name).items()}


class _Recorder(cb_base.CLCallback):
    fits: list[dict] = []

    def trainer_callbacks(self, ctx):
        rec = _Recorder

        class Steps(pl.Callback):
            def on_train_start(self, trainer, module):
                rec.fits.append({"exp": module.exp_index, "phase": module.phase.name, "steps": [],
                                 "optimizer": id(trainer.optimizers[0]), "grads": None,
                                 "online0": _snap(module, "online"),
                                 "offline0": _snap(module, "offline") if module.has_offline else None})

            def on_after_backward(self, trainer, module):
                fit = rec.fits[-1]
                if fit["grads"] is None:
                    fit["grads"] = sorted(n for n, p in module.named_parameters() if p.grad is not None)

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after optimizer step
                rec.fits[-1]["steps"].append((_snap(module, "online"),
                                              _snap(module, "offline") if module.has_offline else None))

            def on_train_end(self, trainer, module):
                rec.fits[-1]["ema_steps"] = module.ema_steps

        return [Steps()]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lae")
    cfg = build_config(None, [*TINY_LAE, f"strategy.ema_decay={MU}", f"run.dir={tmp / 'run'}"])
    _Recorder.fits = []
    saved = cb_base.CALLBACKS
    import cl.runner

    cb_base.CALLBACKS = cl.runner.CALLBACKS = saved + [_Recorder]
    try:
        # the backbone the run starts from: same seed, same construction
        from cl.utils import seed_everything

        seed_everything(cfg.seed)
        scenario = build_scenario(cfg)
        initial = {k: v.clone() for k, v in build_strategy(cfg, scenario).backbone.state_dict().items()
                   if "pet_modules" not in k}
        runner = Runner(cfg)
        results = runner.run()
    finally:
        cb_base.CALLBACKS = cl.runner.CALLBACKS = saved
    return runner, results, list(_Recorder.fits), initial


def test_phases_gradients_and_shared_optimizer(recorded_run):
    runner, _, fits, _ = recorded_run
    assert [(f["exp"], f["phase"]) for f in fits] == [(0, "joint"), (1, "warmup"), (1, "joint")]
    pet = lambda names: [n for n in names if "pet_modules.online." in n]  # noqa: E731
    heads = lambda names, k: [n for n in names if n.startswith(f"classifier.heads.{k}.")]  # noqa: E731
    # joint phases: the online PET and the current head, nothing else
    for f, head in ((fits[0], 0), (fits[2], 1)):
        assert f["grads"] and set(f["grads"]) == set(pet(f["grads"]) + heads(f["grads"], head))
        assert pet(f["grads"]) and heads(f["grads"], head)
    # warm-up: the new head only
    assert fits[1]["grads"] == ["classifier.heads.1.bias", "classifier.heads.1.weight"]
    assert fits[1]["optimizer"] == fits[2]["optimizer"] != fits[0]["optimizer"]  # one Adam per experience
    # the offline PET holds no parameters at all (EMA state lives in buffers, outside optimizers and DDP)
    assert not [n for n, _ in runner.model.named_parameters() if ".offline." in n]


def test_online_pet_constant_during_warmup(recorded_run):
    _, _, fits, _ = recorded_run
    warm = fits[1]
    assert warm["steps"], "the warm-up fit took no steps"
    for online, _ in warm["steps"]:
        for k, v in warm["online0"].items():
            assert torch.equal(online[k], v), k
    last_online = fits[2]["steps"][-1][0]
    assert any(not torch.equal(last_online[k], v) for k, v in warm["online0"].items()), "PET never trained"


def test_offline_copy_then_exact_ema_recursion(recorded_run):
    _, _, fits, _ = recorded_run
    assert fits[0]["offline0"] is None and all(off is None for _, off in fits[0]["steps"])  # task 0: no offline
    warm, joint = fits[1], fits[2]
    # created as an exact copy of the online PET at the start of the second experience
    assert set(warm["offline0"]) == set(warm["online0"])
    assert all(torch.equal(warm["offline0"][k], warm["online0"][k]) for k in warm["online0"])
    # then theta_off <- mu theta_off + (1 - mu) theta_on after EVERY step, warm-up included
    expected = {k: v.clone() for k, v in warm["offline0"].items()}
    n = 0
    for online, offline in warm["steps"] + joint["steps"]:
        for k in expected:
            expected[k] = expected[k].mul(MU).add(online[k], alpha=1 - MU)
            assert torch.equal(offline[k], expected[k]), k
        n += 1
    assert joint["ema_steps"] == n == 12  # ema_steps counts the whole experience: 2 epochs x 6 batches
    # the offline copy lags behind the final online PET
    online_end = joint["steps"][-1][0]
    assert any(not torch.equal(expected[k], online_end[k]) for k in expected)


def test_backbone_bit_identical_and_passes(recorded_run):
    runner, results, _, initial = recorded_run
    now = {k: v for k, v in runner.model.backbone.state_dict().items() if "pet_modules" not in k}
    assert set(now) == set(initial)
    assert all(torch.equal(now[k].cpu(), initial[k]) for k in initial)
    last = results.metrics["experiences"][-1]
    assert set(last["passes"]) == {"main", "online", "offline"}


def test_ensemble_is_elementwise_max_of_expert_softmax(recorded_run):
    runner, _, _, _ = recorded_run
    model = runner.model.cpu().eval()
    exp = runner.scenario.experiences[-1]
    x = model.eval_transform(torch.stack([exp.test.source[int(i)] for i in exp.test.indices[:16]]))
    with torch.no_grad():
        on, off, ens = model.online_logits(x), model.offline_logits(x), model(x)
    assert torch.equal(ens, torch.maximum(on.softmax(1), off.softmax(1)))
    assert not torch.equal(on, off)


@pytest.mark.parametrize("pet,n_params", [("adapter", 2 * (64 * 5 + 5 + 5 * 64 + 64 + 1)),
                                          ("lora", 2 * 2 * (5 * 64 + 64 * 5 + 1)),
                                          ("prefix", 2 * (2 * 10 * 64 + 2))])
def test_pet_variants_trainable_set(pet, n_params, tmp_path):
    cfg = build_config(None, [*TINY_LAE, f"strategy.pet={pet}", f"run.dir={tmp_path}"])
    model = build_strategy(cfg, build_scenario(cfg))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".pet_modules.online." in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == n_params


@pytest.mark.slow
def test_paper_preset_builds_on_vit_b16():
    """The CIFAR-100 preset on a randomly initialised ViT-B/16: PET in blocks 0-4, LAE's adapter size."""
    cfg = build_config(str(REPO / "configs/lae/cifar100.yaml"), ["backbone.pretrained=false"])
    from cl.backbones import build_backbone
    from cl.config import section
    from cl.registry import STRATEGIES

    backbone = build_backbone(section(cfg, "backbone"), (3, 224, 224))
    model = STRATEGIES.get("lae")(section(cfg, "strategy"), backbone, 100)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[2] for n in trainable} == {"0", "1", "2", "3", "4"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * (768 * 5 + 5 + 5 * 768 + 768 + 1)
    with pytest.raises(UserError, match="pretrained"):  # offline: the real download fails fast and clearly
        build_backbone(section(build_config(str(REPO / "configs/lae/cifar100.yaml")), "backbone"), (3, 224, 224))


PRESETS = ["cifar100", "imagenet_r_l2p", "imagenet_r_coda", "domainnet"]


def test_paper_presets_load_and_stop_on_missing_data(tmp_path):
    from cl.errors import DataError

    for preset in PRESETS:  # every preset is a valid config whose stream needs data that is not here
        cfg = build_config(str(REPO / f"configs/lae/{preset}.yaml"), [f"data.root={tmp_path}"])
        assert cfg.strategy.name == "lae" and cfg.backbone.model == "vit_base_patch16_224.orig_in21k"
        with pytest.raises(DataError, match="not found"):
            build_scenario(cfg)
    # and the CLI turns that into one line and exit code 2
    out = cl_cli(["train", "config=configs/lae/imagenet_r_coda.yaml", f"run.root={tmp_path}", f"data.root={tmp_path}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "ImageNet-R not found" in out.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    from cl.errors import ConfigError

    with pytest.raises(ConfigError, match="num_freeze_epochs"):
        build_config(None, [*TINY_LAE, "strategy.num_freeze_epochs=2"])
    cfg = build_config(None, [*TINY_LAE, "strategy.blocks=[0,5]", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="blocks"):
        build_strategy(cfg, build_scenario(cfg))


def test_epochs_null_means_trainer_max_epochs(tmp_path):
    """``strategy.epochs=null`` takes ``trainer.max_epochs`` like every strategy (it crashed with None - freeze)."""
    from types import SimpleNamespace

    from cl.errors import ConfigError

    cfg = build_config(None, [*TINY_LAE, "strategy.epochs=null", "trainer.max_epochs=3", f"run.dir={tmp_path}"])
    model = build_strategy(cfg, build_scenario(cfg))
    ctx = SimpleNamespace(cfg=cfg)
    assert [(p.name, p.epochs) for p in model.phases(None, ctx)] == [("joint", 3)]  # first experience: no warm-up
    model.known = 2  # a later experience
    assert [(p.name, p.epochs) for p in model.phases(None, ctx)] == [("warmup", 1), ("joint", 2)]
    short = build_config(None, [*TINY_LAE, "strategy.epochs=null", "trainer.max_epochs=1", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="num_freeze_epochs=1 must be < the epochs per experience"):
        list(model.phases(None, SimpleNamespace(cfg=short)))


@pytest.mark.slow
def test_offline_expert_keeps_old_classes_and_ensemble(tmp_path):
    """Proxy stream on the pre-trained ViT, 2 experiences x 5 classes: after the second, the offline expert is more
    accurate than the online one on the first experience, and the ensemble is at least as good as the weaker one."""
    ckpt = REPO / "assets/backbones/vit_p4_w64_d4_fmnist.pt"
    if not ckpt.is_file():
        pytest.skip("the pre-trained proxy ViT is not committed")
    cfg = build_config(str(REPO / "configs/lae/cpu.yaml"), [
        "scenario.n_experiences=2", "scenario.shift=none", "scenario.train_per_class=100", "run.checkpoint=false",
        f"run.dir={tmp_path / 'run'}", "seed=0"])
    results = Runner(cfg).run()
    last = results.metrics["experiences"][-1]["passes"]
    on, off, ens = last["online"], last["offline"], last["main"]
    assert off[0] > on[0], f"offline {off[0]:.3f} vs online {on[0]:.3f} on the old experience"
    seen = lambda acc: (acc[0] + acc[1]) / 2  # noqa: E731 - equal test sizes (1,000 images per class)
    assert seen(ens) >= min(seen(on), seen(off)), (ens, on, off)


def test_ensemble_and_experts_share_one_backbone_forward_per_expert(tmp_path):
    """Evaluation runs main (the ensemble), online and offline on each batch: two backbone forwards, not four,
    and the same counts as each pass computed on its own copy of the data."""
    from cl.distributed import Dist
    from cl.evaluation import evaluate

    runner = Runner(build_config(None, [*TINY_LAE, "run.checkpoint=false", f"run.dir={tmp_path / 'run'}"]))
    runner.run()
    model, exps = runner.model, runner.scenario.experiences
    assert model.has_offline
    calls = []
    hook = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    res = evaluate(model, exps, Dist(), torch.device("cpu"), batch_size=50)
    hook.remove()
    batches = sum(-(-len(e.test) // 50) for e in exps)
    assert len(calls) == 2 * batches
    model.eval()
    with torch.no_grad():
        x = model.eval_transform(torch.cat([e.test.source.batch(torch.as_tensor(e.test.indices)) for e in exps]))
        y = torch.cat([torch.as_tensor(e.test.targets) for e in exps])
        for name, fn in model.eval_passes().items():
            assert sum(res[name].correct) == int((fn(x.clone()).argmax(1) == y).sum()), name
