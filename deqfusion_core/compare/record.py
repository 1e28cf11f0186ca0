"""The solver statistics of one training run, from every DEQFusion forward in the process.

A global module forward hook sees each :class:`deqfusion_core.DEQFusion` call and keeps the public fields of
its statistics, so no integration needs code for it. Convergence is per solve (a solve converged when every
sample of its batch reached the tolerance), the unit the project's recipes are judged by.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SolverRecorder"]


@dataclass
class _Solve:
    training: bool
    converged: bool
    nstep: int
    rel_residual: float


@dataclass
class SolverRecorder:
    solves: list[_Solve] = field(default_factory=list)
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
        rel = stats.rel_residual
        self.solves.append(_Solve(bool(training), bool(stats.converged), int(stats.nstep),
                                  float(rel) if math.isfinite(rel) else float("inf")))
        self.tol, self.stop = float(stats.tol), str(stats.stop)
        if training:
            self.max_iter = int(stats.max_iter)
        else:
            self.max_iter_eval = int(stats.max_iter)

    def summary(self) -> dict[str, Any] | None:
        """RESULTS.md's ``solver`` object; None when no DEQ ran. ``mean_steps`` and the training converged
        fraction are over the last quarter of the training solves (where a trained model's recipe shows)."""
        train = [s for s in self.solves if s.training]
        evals = [s for s in self.solves if not s.training]
        if not train and not evals:
            return None
        last = train[len(train) - max(1, math.ceil(len(train) / 4)):] if train else []
        frac = (lambda ss: sum(s.converged for s in ss) / len(ss) if ss else None)
        mean = (lambda ss: sum(s.nstep for s in ss) / len(ss) if ss else None)
        return {"train_converged_fraction_last_quarter": frac(last), "eval_converged_fraction": frac(evals),
                "mean_steps": mean(last), "mean_steps_eval": mean(evals),
                "max_rel_residual_eval": max((s.rel_residual for s in evals), default=None),
                "tol": self.tol, "max_iter": self.max_iter, "max_iter_eval": self.max_iter_eval, "stop": self.stop,
                "train_solves": len(train), "eval_solves": len(evals)}
