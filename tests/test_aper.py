"""``aper``: the first session trains only the adapter and its head, then freezes them; the prototypes are the class
means of the pre-trained and adapted features concatenated; without adaptation it is exactly SimpleCIL (``ncm``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.config import build_config
from cl.peft import active_adapters, pet_named_parameters
from cl.runner import Runner
from conftest import TINY

VIT = ["backbone=vit_p4_w64_d4", "backbone.depth=2", "scenario.image_size=16", "strategy.adapter_width=4"]


def test_first_session_adapter_then_prototypes_of_concatenated_features(tmp_path):
    cfg = build_config(None, ["strategy=aper", *TINY, *VIT, "strategy.epochs=1", "strategy.lr=0.05",
                              "data.eval_batch_size=16", f"run.dir={tmp_path / 'run'}"])  # several feature batches
    runner = Runner(cfg)
    results = runner.run()
    model = runner.model.cpu().eval()
    pet = dict(pet_named_parameters(model.backbone))
    assert pet, "an adapter is injected into every block"
    assert any("up.weight" in n and p.abs().sum() > 0 for n, p in pet.items()), "phase 1 trained the adapter"
    for n, p in model.backbone.named_parameters():  # everything ends frozen (the contract test checks that the
        assert not p.requires_grad, n               # pre-trained weights did not move during the fit)
    assert model.adapt_head is not None
    assert model.adapt_head.weight.shape[0] == len(runner.scenario.experiences[0].classes)
    d = model.backbone.num_features
    assert model.means.shape == (runner.scenario.n_classes, 2 * d)
    with torch.no_grad():
        for exp in runner.scenario.experiences:
            x = model.eval_transform(exp.train.source.batch(torch.as_tensor(exp.train.indices)))
            y = torch.as_tensor(exp.train.targets)
            with active_adapters(model.backbone, []):
                pre = model.backbone(x)
            adapted = model.backbone(x)
            assert not torch.allclose(pre, adapted), "the adapted branch differs from the pre-trained one"
            f = torch.cat([pre, adapted], 1).double()
            for c in exp.classes:
                torch.testing.assert_close(model.sums[c], f[y == c].sum(0), rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(model.means[c], f[y == c].mean(0).float(), rtol=1e-5, atol=1e-5)
        # logits: cosine to the prototypes; the passes score each half alone
        exp = runner.scenario.experiences[-1]
        x = model.eval_transform(exp.test.source.batch(torch.as_tensor(exp.test.indices[:8])))
        with active_adapters(model.backbone, []):
            pre = model.backbone(x)
        adapted = model.backbone(x)
        cos = lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()  # noqa: E731
        torch.testing.assert_close(model(x), cos(torch.cat([pre, adapted], 1), model.means), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.pretrained_logits(x), cos(pre, model.means[:, :d]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.adapted_logits(x), cos(adapted, model.means[:, d:]), rtol=1e-5, atol=1e-5)
        # the evaluation loop (batches of 16, three passes sharing a feature cache) counts what these logits predict
        for j, exp in enumerate(runner.scenario.experiences):
            x = model.eval_transform(exp.test.source.batch(torch.as_tensor(exp.test.indices)))
            hand = int((model(x).argmax(1) == torch.as_tensor(exp.test.targets)).sum())
            assert results["correct"][-1][j] == hand, (j, results["correct"][-1][j], hand)


def test_without_adaptation_aper_is_simplecil(tmp_path):
    common = [*TINY, "backbone=mlp", "seed=5"]
    aper = Runner(build_config(None, ["strategy=aper", "strategy.adapt=none", *common, f"run.dir={tmp_path / 'a'}"]))
    ncm = Runner(build_config(None, ["strategy=ncm", *common, f"run.dir={tmp_path / 'n'}"]))
    ra, rn = aper.run(), ncm.run()
    assert ra["correct"] == rn["correct"], "same predictions as ncm: [f, f] has the cosines of f"
    exp = aper.scenario.experiences[-1]
    x = exp.test.source.batch(torch.as_tensor(exp.test.indices[:16]))
    a, n = aper.model.cpu().eval(), ncm.model.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(a(a.eval_transform(x)), n(n.eval_transform(x)), rtol=1e-5, atol=1e-5)
