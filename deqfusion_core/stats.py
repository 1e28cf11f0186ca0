"""Solver statistics and the error raised when the fixed-point iteration produces non-finite values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class DEQConvergenceError(FloatingPointError):
    """The residual became NaN or Inf: non-finite inputs or parameters, or a diverging solver.

    Non-convergence within the iteration cap is NOT an error: the best iterate is returned and
    :attr:`SolverStats.converged` is False.
    """


@dataclass
class SolveResult:
    """What a root solver returns: the best iterate per sample and how it got there."""

    z: torch.Tensor                 # [B, L] best iterate per sample (lowest residual seen)
    nstep: int                      # function evaluations (= solver steps) run
    abs_residuals: torch.Tensor     # [B] ||f(z) - z|| per sample at the returned iterate
    rel_residuals: torch.Tensor     # [B] ||f(z) - z|| / ||f(z)|| per sample at the returned iterate
    trace: list[torch.Tensor]       # per step: max over the batch of the (best so far) relative residual
    converged: bool                 # every sample reached the tolerance
    gates: list[torch.Tensor] = field(default_factory=list)  # per step [N] mean gate per modality
    restarted: int | None = None    # samples whose history stagnation restarted (Anderson ``stall``; else None)
    fell_back: int | None = None    # samples that fell back to damped iteration after a second stall
    iterates: list[torch.Tensor] = field(default_factory=list)  # kept states [B, L] (Tracker ``keep``)


class BackwardReport:
    """Where a solve that runs after forward returned (the implicit backward's) reports.

    The forward's :class:`SolverStats` holds it and reads it as ``stats.backward``; the backward hands it the
    SolveResult its solve returned (:meth:`done`) when it runs, and ``listeners`` (callables taking this report,
    e.g. an adapter's non-convergence warning) are called then. ``config`` (a
    :class:`~deqfusion_core.solvers.SolveConfig`) turns that result into statistics.
    """

    __slots__ = ("config", "result", "_stats", "listeners")

    def __init__(self, config):
        self.config, self.result, self._stats, self.listeners = config, None, None, []

    def done(self, result: "SolveResult") -> None:
        """The backward's solve ended with ``result``: keep it and tell the listeners."""
        self.result = result
        for listener in self.listeners:
            listener(self)

    @property
    def stats(self) -> "SolverStats | None":
        if self.result is None:
            return None
        if self._stats is None or self._stats[0] is not self.result:
            self._stats = (self.result, self.config.stats(self.result))
        return self._stats[1]


@dataclass
class SolverStats:
    """Statistics of one DEQFusion forward and, once backward ran, of its backward solve (``backward``).

    Floats are computed lazily from device tensors, so reading them is the only host sync.

    Besides reporting, a SolverStats has one more job: it is the warm-start token of the next call on the
    same samples, ``fusion(xs, warm_start=stats)``. ``state``, ``previous_state`` and ``backward_state``
    serve that job only.
    """

    solver: str
    nstep: int
    max_iter: int
    tol: float
    stop: str
    converged: bool
    abs_residuals: torch.Tensor
    rel_residuals: torch.Tensor
    trace_tensor: torch.Tensor | None = None
    gates: torch.Tensor | None = None       # [steps, N] mean gate value per modality and step
    # -- the warm start of the next call ------------------------------------------------------------
    state: torch.Tensor | None = None       # detached solved state [B, (N+1)*dim]: pass as z0 to warm start
    previous_state: torch.Tensor | None = None  # the warm start's solved state (converged): for extrapolation
    backward_report: BackwardReport | None = field(default=None, repr=False)  # the implicit backward's
    # -- optional diagnostics -------------------------------------------------------------------------
    spectral_radius: torch.Tensor | None = None   # [B] estimate of rho(df/dz) at z* (``spectral_radius_iters``)
    restarted: int | None = None    # samples the solver restarted on stagnation (Anderson ``stall``; else None)
    fell_back: int | None = None    # samples that then fell back to damped iteration
    # fixed-point correction (``correction_steps``, training): the fused part of f(z_k) [B, dim] at the kept
    # iterates z_k of the solve (detached), in solve order, each differentiable once through f; else None
    iterates: list[torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_result(cls, res: SolveResult, solver: str, max_iter: int, tol: float, stop: str,
                    **extra) -> "SolverStats":
        return cls(solver=solver, nstep=res.nstep, max_iter=max_iter, tol=tol, stop=stop,
                   converged=res.converged, abs_residuals=res.abs_residuals.detach(),
                   rel_residuals=res.rel_residuals.detach(),
                   trace_tensor=torch.stack(res.trace).detach() if res.trace else None,
                   gates=torch.stack(res.gates).detach() if res.gates else None, restarted=res.restarted,
                   fell_back=res.fell_back, **extra)

    @property
    def backward(self) -> "SolverStats | None":
        """Statistics of the implicit backward's solve, once it ran (else None)."""
        return None if self.backward_report is None else self.backward_report.stats

    @property
    def backward_state(self) -> torch.Tensor | None:
        """The backward solve's solution, once it ran: the warm start of the next backward solve."""
        res = None if self.backward_report is None else self.backward_report.result
        return None if res is None else res.z.detach()

    @property
    def rel_residual(self) -> float:
        """Largest relative residual over the batch."""
        return float(self.rel_residuals.max()) if self.rel_residuals.numel() else 0.0

    @property
    def rel_residual_median(self) -> float:
        return float(self.rel_residuals.median()) if self.rel_residuals.numel() else 0.0

    @property
    def spectral_radius_max(self) -> float | None:
        """Largest spectral radius estimate over the batch (None when not estimated)."""
        r = self.spectral_radius
        return None if r is None or not r.numel() else float(r.max())

    @property
    def spectral_radius_median(self) -> float | None:
        r = self.spectral_radius
        return None if r is None or not r.numel() else float(r.median())

    @property
    def abs_residual(self) -> float:
        """Largest absolute residual over the batch."""
        return float(self.abs_residuals.max()) if self.abs_residuals.numel() else 0.0

    @property
    def trace(self) -> list[float]:
        """Per solver step, the largest relative residual over the batch (the paper's Fig. 4)."""
        return [] if self.trace_tensor is None else self.trace_tensor.float().cpu().tolist()

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        d: dict[str, Any] = {
            f"{prefix}nstep": self.nstep, f"{prefix}rel_residual": self.rel_residual,
            f"{prefix}rel_residual_median": self.rel_residual_median,
            f"{prefix}abs_residual": self.abs_residual, f"{prefix}converged": self.converged,
        }
        if self.restarted is not None:
            d[f"{prefix}restarted"], d[f"{prefix}fell_back"] = self.restarted, self.fell_back
        if self.spectral_radius is not None:
            d[f"{prefix}spectral_radius_max"] = self.spectral_radius_max
            d[f"{prefix}spectral_radius_median"] = self.spectral_radius_median
        if self.backward is not None:
            d.update(self.backward.as_dict(prefix=prefix + "backward_"))
        return d

    def __str__(self) -> str:
        s = (f"{self.solver}: {self.nstep}/{self.max_iter} steps, rel residual max {self.rel_residual:.2e} "
             f"median {self.rel_residual_median:.2e}, {'converged' if self.converged else 'NOT converged'} "
             f"(tol {self.tol:g} {self.stop})")
        if self.restarted:
            s += f", {self.restarted} restarted on stagnation ({self.fell_back} fell back to damped iteration)"
        if self.spectral_radius is not None:
            s += f", spectral radius max {self.spectral_radius_max:.3f} median {self.spectral_radius_median:.3f}"
        if self.backward is not None:
            s += f"; backward {self.backward}"
        return s
