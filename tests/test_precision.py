"""Mixed precision (``trainer.precision=bf16-mixed``) with every registered strategy: the run finishes, accuracies
are numbers, and the CL state that must stay in full precision (SLCA's class statistics, SEMA's z-score windows,
PRD's prototypes, buffers, LAE's offline copy) is float32/float64, never bfloat16."""

from __future__ import annotations

import math

import pytest
import torch

from cl.config import build_config
from cl.registry import STRATEGIES
from cl.runner import Runner
from conftest import TINY


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_bf16_mixed_runs_and_keeps_cl_state_in_full_precision(name, tmp_path):
    cls = STRATEGIES.get(name)
    cfg = build_config(None, [f"strategy={name}", *TINY, *cls.contract_overrides, "trainer.precision=bf16-mixed",
                              "run.checkpoint=false", f"run.dir={tmp_path / 'run'}"])
    runner = Runner(cfg)
    results = runner.run()
    assert all(math.isfinite(v) for row in results.accuracy_matrix for v in row if v is not None)
    low = [k for k, t in runner.model.cl_state_tensors().items() if t.dtype in (torch.bfloat16, torch.float16)]
    assert not low, f"CL state in half precision: {low[:5]}"
