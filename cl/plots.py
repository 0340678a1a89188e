"""Plots of accuracy matrices (matplotlib on the Agg canvas: headless, in CI and in notebooks).

Every function takes the accuracy matrix ``R`` as an array (rows = after training experience i, columns =
evaluated on experience j, fractions, NaN where not evaluated), returns the :class:`~matplotlib.figure.Figure`
and, with ``path``, also saves it as a PNG. Figures are made without pyplot on an Agg canvas, so nothing needs a
display; in a notebook (``%matplotlib inline``) the returned figure displays itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_matrix", "plot_accuracy_over_time", "plot_forgetting", "forgetting_per_experience",
           "plot_compare", "save"]


def _as_array(matrix: Any) -> np.ndarray:
    r = np.asarray(getattr(matrix, "values", matrix), dtype=float)
    if r.ndim != 2:
        raise ValueError(f"an accuracy matrix must be 2-D, got shape {r.shape}")
    return r


def save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Save ``fig`` as a PNG at ``path`` (folders created) and return it; ``path=None`` only returns it."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return fig


def _new(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    # Not pyplot: no global figure list to leak in a long report, no GUI backend; the Agg canvas renders PNGs
    # headless, and a notebook (``%matplotlib inline``) displays the returned figure.
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _heatmap(r: np.ndarray, *, cmap: str, label: str, xlabel: str, ylabel: str, annotate: bool) -> tuple:
    """A percent heatmap of the fractions ``r`` (NaN cells blank), numbers in the cells when ``annotate``."""
    n_rows, n_cols = r.shape
    fig, ax = _new((1.2 + 0.55 * max(n_cols, 3), 1.0 + 0.5 * max(n_rows, 3)))
    im = ax.imshow(np.ma.masked_invalid(100 * r), vmin=0, vmax=100, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(n_cols), [str(j) for j in range(n_cols)])
    ax.set_yticks(range(n_rows), [str(i) for i in range(n_rows)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                if not np.isnan(r[i, j]):
                    ax.text(j, i, f"{100 * r[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if r[i, j] < 0.6 else "black")
    return fig, ax


def plot_matrix(matrix: Any, title: str = "", path: str | os.PathLike | None = None,
                annotate: bool | None = None) -> Figure:
    """Heatmap of ``R[i][j]`` in percent; cells never evaluated are blank. Numbers in cells up to 12 x 12."""
    r = _as_array(matrix)
    fig, ax = _heatmap(r, cmap="viridis", label="accuracy (%)", xlabel="evaluated on experience j",
                       ylabel="after training experience i",
                       annotate=max(r.shape) <= 12 if annotate is None else annotate)
    ax.set_title(title or "accuracy matrix")
    return save(fig, path)


def plot_accuracy_over_time(matrix: Any, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """One line per experience j: its accuracy after each training experience i >= j (how it is forgotten)."""
    r = _as_array(matrix)
    fig, ax = _new((6.0, 3.6))
    steps = np.arange(r.shape[0])
    for j in range(r.shape[1]):
        ys = r[:, j]
        if np.all(np.isnan(ys)):
            continue
        ax.plot(steps, 100 * ys, marker="o", label=f"exp{j}")
    ax.set_xlabel("after training experience i")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xticks(steps)
    if r.shape[1] <= 20:
        ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title(title or "accuracy per experience over time")
    return save(fig, path)


def forgetting_per_experience(matrix: Any) -> np.ndarray:
    """``f_j = max_{j<=i<T-1} R[i][j] - R[T-1][j]`` for j < T-1 (the terms of ``cl/forgetting``), NaN otherwise."""
    r = _as_array(matrix)
    last = r.shape[0] - 1
    out = np.full(r.shape[1], np.nan)
    for j in range(min(last, r.shape[1])):
        past = r[j:last, j]
        if not np.all(np.isnan(past)) and not np.isnan(r[last, j]):
            out[j] = np.nanmax(past) - r[last, j]
    return out


def plot_forgetting(matrix: Any, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """Bars of the forgetting of each experience at the end of the stream (percentage points)."""
    f = forgetting_per_experience(matrix)
    fig, ax = _new((6.0, 3.2))
    idx = np.arange(len(f))
    ax.bar(idx, 100 * np.nan_to_num(f), color="tab:red")
    ax.set_xticks(idx, [f"exp{j}" for j in idx], fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("forgetting (pp)")
    ax.set_title(title or "forgetting per experience")
    return save(fig, path)


def plot_compare(labels: Sequence[str], means: Sequence[float], stds: Sequence[float] | None = None,
                 metric: str = "last_acc", path: str | os.PathLike | None = None) -> Figure:
    """Bars of one summary metric (fractions, shown in %) per run group, with ± std error bars."""
    m = 100 * np.asarray(means, dtype=float)
    s = None if stds is None else 100 * np.nan_to_num(np.asarray(stds, dtype=float))
    fig, ax = _new((1.5 + 0.8 * max(len(labels), 2), 3.4))
    ax.bar(np.arange(len(m)), np.nan_to_num(m), yerr=s, capsize=3, color="tab:blue")
    ax.set_xticks(np.arange(len(m)), list(labels), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(metric)
    return save(fig, path)


def plot_exp_confusion(confusion: Any, title: str = "", path: str | os.PathLike | None = None) -> Figure:
    """Row-normalised experience confusion in percent: of the test samples of experience j (rows), the share
    predicted as a class of experience k (columns). Mass right of the diagonal is the pull of newer classes."""
    c = _as_array(confusion).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = c / c.sum(1, keepdims=True)
    fig, ax = _heatmap(r, cmap="magma", label="share of the experience's test samples (%)",
                       xlabel="predicted as a class of experience k", ylabel="test samples of experience j",
                       annotate=r.shape[0] <= 12)
    ax.set_title(title or "experience confusion after the last experience")
    return save(fig, path)
