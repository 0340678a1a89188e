"""Builds the accuracy matrix, logs it through Lightning loggers and writes ``metrics.json`` and
``accuracy_matrix.csv`` (rank 0, atomically) after every experience.

Per experience it also records the training wall time, peak memory and the size of the strategy's CL state.
Peak memory is ``torch.cuda.max_memory_allocated`` (reset at each experience start) on a GPU, and on a CPU the
process's peak resident set size (``ru_maxrss``, which only grows, so it is the peak of the run so far).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cl.callbacks.base import CALLBACKS, CLCallback
from cl.metrics.accuracy import AccuracyMatrix
from cl.utils import atomic_write_json, atomic_write_text, state_bytes

if TYPE_CHECKING:
    from cl.evaluation import PassCounts
    from cl.runner import RunContext
    from scenarios.base import Experience


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricsCallback(CLCallback):
    def __init__(self) -> None:
        self.matrix: AccuracyMatrix | None = None
        self.til: AccuracyMatrix | None = None
        self.experiences: list[dict[str, Any]] = []
        self._t0 = 0.0
        self.finished = False

    def on_run_start(self, ctx: RunContext) -> None:
        n = len(ctx.scenario)
        if self.matrix is None:
            self.matrix, self.til = AccuracyMatrix(n), AccuracyMatrix(n)

    def on_experience_start(self, exp: Experience, ctx: RunContext) -> None:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        self._t0 = time.perf_counter()

    def on_experience_end(self, exp: Experience, ctx: RunContext) -> None:
        train_time = time.perf_counter() - self._t0
        entry = {"index": exp.index, "classes": list(exp.classes), "train_time_s": round(train_time, 3),
                 "peak_memory_mb": round(_peak_memory_mb(ctx.device), 1),
                 "cl_state_bytes": state_bytes(ctx.model.cl_state_tensors())}
        self.experiences = [e for e in self.experiences if e["index"] != exp.index] + [entry]

    def on_evaluated(self, exp: Experience, results: dict[str, PassCounts], ctx: RunContext) -> None:
        assert self.matrix is not None and self.til is not None
        i, main = exp.index, results["main"]
        k = i + 1
        if ctx.initial_eval:
            self.matrix.set_initial(main.correct, main.total)
            self.til.set_initial(main.correct_til, main.total)
            return
        self.matrix.set_row(i, main.correct[:k] if not ctx.cfg.run.eval_unseen else main.correct,
                            main.total[:k] if not ctx.cfg.run.eval_unseen else main.total)
        self.til.set_row(i, main.correct_til[:k] if not ctx.cfg.run.eval_unseen else main.correct_til,
                         main.total[:k] if not ctx.cfg.run.eval_unseen else main.total)
        entry = next(e for e in self.experiences if e["index"] == i)
        entry["passes"] = {name: [round(c.acc(j), 6) for j in range(k)] for name, c in results.items()}
        entry["passes_seen_acc"] = {
            name: float(np.sum(c.correct[:k]) / max(1, np.sum(c.total[:k]))) for name, c in results.items()}
        entry["extra"] = dict(ctx.records.get(i, {}))
        if main.exp_confusion is not None:  # rows: true experience, columns: predicted experience (counts)
            rows = main.exp_confusion if ctx.cfg.run.eval_unseen else [r[:k] for r in main.exp_confusion[:k]]
            entry["exp_confusion"] = rows
        summary = self.matrix.summary()
        metrics: dict[str, float] = {f"eval/exp{j}/acc": main.acc(j) for j in range(k)}
        metrics.update({f"cl/{key}": v for key, v in summary.items() if v is not None})
        for name, acc in entry["passes_seen_acc"].items():
            metrics[f"eval/{name}/seen_acc"] = acc
        metrics["time/train_s"] = entry["train_time_s"]
        metrics["memory/peak_mb"] = entry["peak_memory_mb"]
        metrics["cl/state_bytes"] = entry["cl_state_bytes"]
        ctx.log_metrics(metrics)  # at the run's global step; the experience index is on every row
        self.write(ctx)

    def on_run_end(self, ctx: RunContext) -> None:
        self.finished = True
        self.write(ctx)

    def results(self, ctx: RunContext) -> dict[str, Any]:
        assert self.matrix is not None and self.til is not None
        out: dict[str, Any] = dict(self.matrix.summary())
        til = self.til.summary()
        out.update({f"til_{k}": v for k, v in til.items() if k in ("last_acc", "avg_acc", "forgetting")})
        out.update({
            "finished": self.finished,
            "strategy": ctx.cfg.strategy.name, "scenario": ctx.cfg.scenario.name, "seed": int(ctx.cfg.seed),
            "n_experiences": self.matrix.n, "world_size": ctx.dist.world_size,
            "accuracy_matrix": [[None if np.isnan(v) else round(float(v), 6) for v in row]
                                for row in self.matrix.matrix()[: self.matrix.rows_done]],
            "correct": self.matrix.correct[: self.matrix.rows_done].tolist(),
            "total": self.matrix.total[: self.matrix.rows_done].tolist(),
            "til_accuracy_matrix": [[None if np.isnan(v) else round(float(v), 6) for v in row]
                                    for row in self.til.matrix()[: self.til.rows_done]],
            "experiences": sorted(self.experiences, key=lambda e: e["index"]),
            "records": {str(k): v for k, v in sorted(ctx.records.items())},
        })
        return out

    def write(self, ctx: RunContext) -> None:
        if not ctx.dist.is_main or self.matrix is None:
            return
        atomic_write_json(ctx.run_dir / "metrics.json", self.results(ctx))
        atomic_write_text(ctx.run_dir / "accuracy_matrix.csv", self.matrix.to_csv())

    def state_dict(self) -> dict[str, Any]:
        assert self.matrix is not None and self.til is not None
        return {"matrix": self.matrix.state_dict(), "til": self.til.state_dict(),
                "experiences": self.experiences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrix = AccuracyMatrix(int(state["matrix"]["n"]))
        self.matrix.load_state_dict(state["matrix"])
        self.til = AccuracyMatrix(int(state["til"]["n"]))
        self.til.load_state_dict(state["til"])
        self.experiences = list(state["experiences"])


CALLBACKS.append(MetricsCallback)
