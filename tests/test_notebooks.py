"""Every notebook in notebooks/ runs top to bottom (nbclient) without an error.

Each runs in a temporary working directory (its run directories land there, not in the repository), with a cell
injected after the one tagged ``parameters`` that shrinks the runs (``trainer.limit_train_batches``, fewer
strategies), the way papermill does; ``CL_NOTEBOOKS_FULL=1`` runs them as stored (minutes each). The notebooks are
stored without outputs; a stored output would fail :func:`test_notebooks_are_stored_without_outputs`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# What CI runs instead of the notebooks' defaults: the same cells, fewer batches and strategies.
SMOKE = {
    "01_quickstart.ipynb": 'EXTRA = ["trainer.limit_train_batches=2", "trainer.enable_progress_bar=false"]',
    "02_compare_strategies.ipynb": 'EXTRA = ["trainer.limit_train_batches=2"]\n'
                                   'CANDIDATES = ["finetune", "slca", "no_such_strategy"]',
    # SLCA trains; LAE, SEMA and PRD take 20-60 CPU-seconds each even with one batch per epoch, so CI runs their
    # "not selected" path (their numbers are tested in their own test files). CL_NOTEBOOKS_FULL=1 runs them all.
    "03_inside_a_strategy.ipynb": 'EXTRA = ["trainer.limit_train_batches=1"]\nSECTIONS = ["slca"]',
}
FULL = os.environ.get("CL_NOTEBOOKS_FULL") == "1"


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, capture_output=True)
    return "python3"


def test_every_notebook_is_listed() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_compare_strategies.ipynb", "03_inside_a_strategy.ipynb"} <= names
    assert names <= set(SMOKE), f"add a smoke setting for {names - set(SMOKE)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_are_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear outputs before committing"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    if not FULL:
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(SMOKE[path.name]))
    client = NotebookClient(nb, timeout=1800 if FULL else 300, kernel_name=_kernel_name(), allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert list((tmp_path / "runs_notebooks").rglob("metrics.json")), "the notebook wrote no run"
    assert not (REPO / "notebooks" / "runs_notebooks").exists()
    if path.name.startswith("01"):
        images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(images) >= 3, "the heatmap and the two other plots should display"
        assert "last accuracy" in text
    if path.name.startswith("02") and not FULL:
        assert "skipping no_such_strategy: not registered" in text
        assert (tmp_path / "runs_notebooks" / "report" / "report.md").is_file()
