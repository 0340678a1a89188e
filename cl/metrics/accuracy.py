"""The accuracy matrix and every summary number derived from it.

``R[i][j]`` is the accuracy on experience j after training experience i (rows follow training). Each cell is kept
as integer ``correct`` and ``total`` counts, summed over ranks, so the sample-weighted numbers and the
experience-averaged ones are both exact. With T experiences and final row T-1:

* ``last_acc``    sample-weighted accuracy over all test samples of experiences 0..T-1 after the last one
                  (the headline ``A_T``; PILOT and LAE report this).
* ``avg_acc``     mean over experiences of the final per-experience accuracies, ``mean_j R[T-1][j]``
                  (the task-averaged ``A_N`` of the SEMA paper).
* ``avg_inc_acc`` mean over rows i of the sample-weighted accuracy over experiences 0..i (``Ā``).
* ``forgetting``  ``mean_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])`` (Chaudhry et al., 2018: the best accuracy
                  an experience had before the end, minus its final one).
* ``stream_forgetting`` ``mean_{j<T-1} (R[j][j] - R[T-1][j])``: Avalanche's ``StreamForgetting`` (the accuracy right
                  after training an experience minus the final one); equals ``-bwt``. It differs from
                  ``forgetting`` when an experience's accuracy rises after its own training (backward transfer).
* ``bwt``         ``mean_{j<T-1} (R[T-1][j] - R[j][j])`` (negative = forgetting).
* ``fwt``         ``mean_{j>0} (R[j-1][j] - b_j)`` with ``b_j`` the accuracy on j before any training; needs
                  ``run.eval_unseen=true`` (in class-incremental streams unseen classes have no logits, so it is
                  only informative for task- and domain-incremental ones).

Numbers are fractions in [0, 1]; undefined ones (one experience, no unseen evaluation) are ``None``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class AccuracyMatrix:
    def __init__(self, n_experiences: int) -> None:
        t = n_experiences
        self.n = t
        self.correct = np.zeros((t, t), dtype=np.int64)
        self.total = np.zeros((t, t), dtype=np.int64)
        self.evaluated = np.zeros((t, t), dtype=bool)
        self.init_correct = np.zeros(t, dtype=np.int64)  # b_j: before any training (fwt)
        self.init_total = np.zeros(t, dtype=np.int64)
        self.rows_done = 0

    def set_row(self, i: int, correct: list[int] | np.ndarray, total: list[int] | np.ndarray) -> None:
        """Record the counts measured after training experience i (for the experiences evaluated)."""
        k = len(correct)
        self.correct[i, :k] = correct
        self.total[i, :k] = total
        self.evaluated[i, :k] = True
        self.rows_done = max(self.rows_done, i + 1)

    def set_initial(self, correct: list[int] | np.ndarray, total: list[int] | np.ndarray) -> None:
        self.init_correct[:] = correct
        self.init_total[:] = total

    def acc(self, i: int, j: int) -> float:
        return float(self.correct[i, j] / self.total[i, j]) if self.total[i, j] else float("nan")

    def matrix(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.correct / self.total
        r[~self.evaluated] = np.nan
        return r

    def seen_acc(self, i: int) -> float:
        """Sample-weighted accuracy over experiences 0..i after training experience i."""
        tot = self.total[i, : i + 1].sum()
        return float(self.correct[i, : i + 1].sum() / tot) if tot else float("nan")

    def summary(self) -> dict[str, float | None]:
        t = self.rows_done
        if t == 0:
            return {k: None for k in ("last_acc", "avg_acc", "avg_inc_acc", "forgetting", "stream_forgetting", "bwt",
                                      "fwt")}
        r = self.matrix()
        last = t - 1
        out: dict[str, float | None] = {
            "last_acc": self.seen_acc(last),
            "avg_acc": float(np.nanmean(r[last, : last + 1])),
            "avg_inc_acc": float(np.mean([self.seen_acc(i) for i in range(t)])),
            "forgetting": None,
            "stream_forgetting": None,
            "bwt": None,
            "fwt": None,
        }
        if last > 0:
            out["forgetting"] = float(np.mean([np.max(r[j:last, j]) - r[last, j] for j in range(last)]))
            out["stream_forgetting"] = float(np.mean([r[j, j] - r[last, j] for j in range(last)]))
            out["bwt"] = float(np.mean([r[last, j] - r[j, j] for j in range(last)]))
        if last > 0 and self.init_total[1:t].all() and self.evaluated[: last, 1:t].diagonal().all():
            b = self.init_correct / np.maximum(self.init_total, 1)
            out["fwt"] = float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct.tolist(), "total": self.total.tolist(),
                "evaluated": self.evaluated.tolist(), "init_correct": self.init_correct.tolist(),
                "init_total": self.init_total.tolist(), "rows_done": self.rows_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(int(state["n"]))
        self.correct[:] = state["correct"]
        self.total[:] = state["total"]
        self.evaluated[:] = state["evaluated"]
        self.init_correct[:] = state["init_correct"]
        self.init_total[:] = state["init_total"]
        self.rows_done = int(state["rows_done"])

    def to_csv(self) -> str:
        """Rows = after training experience i, columns = evaluated on experience j; empty cells not evaluated."""
        r = self.matrix()
        head = "trained\\evaluated," + ",".join(f"exp{j}" for j in range(self.n))
        lines = [head]
        for i in range(self.rows_done):
            lines.append(f"exp{i}," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in r[i]))
        return "\n".join(lines) + "\n"
