"""The solver statistics of one training run, from every DEQFusion forward in the process.

A global module forward hook sees each :class:`deqfusion_core.DEQFusion` call and keeps the public fields of
its statistics, so no integration needs code for it. Convergence is per solve (a solve converged when every
sample of its batch reached the tolerance), the unit the project's recipes are judged by. The implicit
backward's solves are recorded too, each as it ends (a listener on the training forward's ``BackwardReport``), so a
truncated backward shows as what it is.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SolverRecorder"]


@dataclass
class _Solve:
    training: bool
    converged: bool
    nstep: int
    residual: float     # the batch's largest: relative (forward); the stopping test's measure (backward)


@dataclass
class SolverRecorder:
    solves: list[_Solve] = field(default_factory=list)
    backward_solves: list[_Solve] = field(default_factory=list)   # the implicit backward's, in order run
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    tol: float | None = None
    max_iter: int | None = None          # the training solves' cap
    max_iter_eval: int | None = None     # the evaluation solves' cap (DEQFusion's f_max_iter_eval)
    stop: str | None = None
    _handle: Any = None

    def __enter__(self) -> "SolverRecorder":
        import torch

        from deqfusion_core import DEQFusion

        def hook(module, args, output):
            if isinstance(module, DEQFusion):
                self.add(module.training, output[2])

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def add(self, training: bool, stats) -> None:
        self.solves.append(_solve(training, stats, stats.rel_residual))
        if training and stats.backward_report is not None:
            stats.backward_report.listeners.append(self._backward)
        self.tol, self.stop = float(stats.tol), str(stats.stop)
        if training:
            self.max_iter = int(stats.max_iter)
        else:
            self.max_iter_eval = int(stats.max_iter)

    def _backward(self, report) -> None:
        """Record an implicit backward solve that just ended."""
        b = report.stats
        self.backward_solves.append(_solve(True, b, b.rel_residual if b.stop == "rel" else float(b.abs_residuals.max())))
        self.backward_tol, self.backward_max_iter = float(b.tol), int(b.max_iter)

    def summary(self) -> dict[str, Any] | None:
        """RESULTS.md's ``solver`` object; None when no DEQ ran. ``mean_steps`` and the training converged
        fraction are over the last quarter of the training solves (where a trained model's recipe shows); so
        are the backward figures (``backward_*``: None when no implicit backward solve ran)."""
        back = self.backward_solves[len(self.backward_solves) - max(1, math.ceil(len(self.backward_solves) / 4)):]
        train = [s for s in self.solves if s.training]
        evals = [s for s in self.solves if not s.training]
        if not train and not evals:
            return None
        last = train[len(train) - max(1, math.ceil(len(train) / 4)):] if train else []
        frac = (lambda ss: sum(s.converged for s in ss) / len(ss) if ss else None)
        mean = (lambda ss: sum(s.nstep for s in ss) / len(ss) if ss else None)
        return {"train_converged_fraction_last_quarter": frac(last), "eval_converged_fraction": frac(evals),
                "mean_steps": mean(last), "mean_steps_eval": mean(evals),
                "max_rel_residual_eval": max((s.residual for s in evals), default=None),
                "tol": self.tol, "max_iter": self.max_iter, "max_iter_eval": self.max_iter_eval, "stop": self.stop,
                "train_solves": len(train), "eval_solves": len(evals),
                "backward_converged_fraction_last_quarter": frac(back), "backward_mean_steps": mean(back),
                "backward_median_residual": _median([s.residual for s in back]),
                "backward_tol": self.backward_tol, "backward_max_iter": self.backward_max_iter,
                "backward_solves": len(self.backward_solves)}


def _solve(training: bool, stats, r: float) -> _Solve:
    return _Solve(bool(training), bool(stats.converged), int(stats.nstep), float(r) if math.isfinite(r) else float("inf"))


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
