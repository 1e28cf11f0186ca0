"""Root solvers for z = f(z), batched per sample.

Every solver has the signature ``solver(f, z0, *, max_iter, tol, stop, **options) -> SolveResult`` where
``f(z_rows, rows)`` evaluates the fixed-point map on the rows ``rows`` of the batch (``None``: all rows)
and ``z0`` is ``[B, L]``. Per-sample behaviour:

- each sample stops when its residual reaches ``tol`` (``stop="rel"``: ||f(z)-z|| / ||f(z)||;
  ``"abs"``: ||f(z)-z||); a stopped sample no longer changes and is no longer evaluated
  (the solver's working set is compacted to the samples still running);
- the returned iterate of each sample is the one with the lowest residual seen;
- the only host synchronisation per step is the one the stopping test needs, and it also
  detects non-finite residuals (:class:`DEQConvergenceError`); every solver takes ``check_every=k``
  (default 1): the test (and so that sync) runs every k steps and at the cap; in between, every sample
  iterates on and each still returns its best iterate (on a GPU, k > 1 keeps the host from waiting each step);
  ``compact=False``: the working set is never compacted (fixed shapes, e.g. for CUDA graphs): stopped samples
  iterate on until all have stopped, each returning its best iterate.

Solvers are registered by name (``register_solver``) in the timm way; ``get_solver(name)``. A new solver
builds on :class:`Tracker`, which owns the residuals, the stopping rule and the working set. A solve's
settings (solver, cap, tolerance, stopping rule, options) travel as one validated :class:`SolveConfig`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional

import torch

from . import kernels
from ._registry import registry
from .stats import DEQConvergenceError, SolveResult, SolverStats

__all__ = ["SOLVERS", "register_solver", "get_solver", "solve", "SolveConfig", "Tracker",
           "fixed_point", "anderson", "broyden",
           "Stagnation", "snapshot_steps"]

FixedPointMap = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
SOLVERS: dict[str, Callable[..., SolveResult]] = {}
_SOLVE_ARGS = ("max_iter", "tol", "stop", "keep")   # what solvers take besides their own options
register_solver, get_solver = registry(SOLVERS, "solver", "solver")


def solve(f: FixedPointMap, z0: torch.Tensor, solver: str = "anderson", **kwargs) -> SolveResult:
    return get_solver(solver)(f, z0, **kwargs)


@dataclass(frozen=True)
class SolveConfig:
    """The settings of one root solve: solver name, iteration cap, tolerance, stopping rule (``"rel"`` or
    ``"abs"`` residual) and the solver's own options. Validated on construction and on ``replace``;
    errors name the argument the value came from (``argnames`` maps a field to it, e.g. ``f_max_iter``)."""

    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-3
    stop: str = "rel"
    options: Mapping = field(default_factory=dict)
    argnames: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        name = lambda key: self.argnames.get(key, key)
        if self.solver not in SOLVERS:
            raise ValueError(f"{name('solver')}: unknown solver {self.solver!r}; known: {', '.join(sorted(SOLVERS))}")
        if self.stop not in ("rel", "abs"):
            raise ValueError(f"{name('stop')}: expected 'rel' or 'abs', got {self.stop!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"{name('max_iter')}: must be an int >= 1, got {self.max_iter!r}")
        if not self.tol > 0:
            raise ValueError(f"{name('tol')}: must be > 0, got {self.tol!r}")
        params = inspect.signature(SOLVERS[self.solver]).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            known = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _SOLVE_ARGS]
            unknown = sorted(set(self.options) - set(known))
            if unknown:
                raise ValueError(f"{name('options')}: {self.solver} takes no option {', '.join(map(repr, unknown))}; "
                                 f"its options: {', '.join(known) or 'none'}")

    def replace(self, **changes) -> "SolveConfig":
        return replace(self, **changes)

    def run(self, f: FixedPointMap, z0: torch.Tensor, keep: int = 0) -> SolveResult:
        """Solve from ``z0``; ``keep`` > 0: also keep that many iterates of the trajectory
        (``SolveResult.iterates``, see :class:`Tracker`), for a solver that takes ``keep``."""
        extra = {}
        if keep:
            if "keep" not in inspect.signature(SOLVERS[self.solver]).parameters:
                raise ValueError(f"correction_steps: solver {self.solver!r} does not keep iterates (no 'keep')")
            extra["keep"] = keep
        return SOLVERS[self.solver](f, z0, max_iter=self.max_iter, tol=self.tol, stop=self.stop, **extra,
                                    **self.options)

    def stats(self, res: SolveResult, **extra) -> SolverStats:
        """The report of a solve run with these settings (the one place a SolveResult becomes statistics)."""
        return SolverStats.from_result(res, self.solver, self.max_iter, self.tol, self.stop, **extra)


class Tracker:
    """Residuals, per-sample stopping, best iterates and the trace, shared by all solvers.

    ``autograd=True`` is for a caller that records every step for autograd and returns its last iterate
    (unrolled differentiation, weight-tied layers): every sample keeps running until all have stopped (no
    working-set compaction), and the result reports the last step instead of the best iterate.

    ``keep`` > 0 (fixed-point correction): after each of the steps ``snapshot_steps(max_iter, keep)`` a copy of
    the best iterate so far of every sample (``autograd``: the step's iterate) is kept, [B, L] each; a solve
    that ends before such a step keeps its result there. ``SolveResult.iterates``: the ``keep`` copies in order.
    """

    def __init__(self, z0: torch.Tensor, tol: float, stop: str, max_iter: int, eps: float = 1e-8, *,
                 autograd: bool = False, keep: int = 0, check_every: int = 1, compact: bool = True):
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(f"check_every: must be an int >= 1, got {check_every!r}")
        if not isinstance(compact, bool):
            raise ValueError(f"compact: must be True or False, got {compact!r}")
        if stop not in ("rel", "abs"):
            raise ValueError(f"stop: expected 'rel' or 'abs', got {stop!r}")
        if max_iter < 1:
            raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
        B = z0.shape[0]
        self.tol, self.stop, self.max_iter, self.eps, self.autograd = tol, stop, max_iter, eps, autograd
        self.check_every, self.compact = check_every, compact
        self.best = None if autograd else z0.clone()
        inf = torch.full((B,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.best_abs, self.best_rel = inf.clone(), inf.clone()
        self.rows: torch.Tensor | None = None  # global indices of the working set; None: all rows
        self.trace: list[torch.Tensor] = []
        self.nstep = 0
        self.done = False
        self.keep_at = snapshot_steps(max_iter, keep) if keep else []
        self.iterates: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor | None = None,
               norms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Record step ``x -> fx`` (residual ``g = fx - x``; ``norms``: its row norms and fx's, when the caller
        has them) for the working set. When some samples stopped, returns ``compact``: the caller applies it
        to each of its per-sample tensors (dim 0 = working set)."""
        self.nstep += 1
        rows = self.rows
        if norms is None:
            g = fx - x if g is None else g
            norms = g.norm(dim=1), fx.norm(dim=1)
        abs_res = norms[0]
        rel_res = abs_res / (norms[1] + self.eps)
        res = rel_res if self.stop == "rel" else abs_res
        self.last_res = res   # this step's residual per working-set row (before any compaction)
        if self.autograd:  # the caller returns its last iterate: report its step
            self.best_abs, self.best_rel = abs_res, rel_res
        else:
            self._keep_best(x, res, abs_res, rel_res, rows)
        if self.keep_at:
            for _ in range(self.keep_at.count(self.nstep)):
                self.iterates.append(x.detach().clone() if self.autograd else self.best.clone())
        self.trace.append(self.best_rel.max())
        if self.nstep % self.check_every and self.nstep < self.max_iter:
            return None   # the stopping test and its host sync run every check_every steps
        keep = ~(res <= self.tol)  # NaN never counts as converged
        n_keep, total = torch.stack([keep.sum().to(res.dtype), res.sum()]).tolist()  # the one sync
        n_keep = int(n_keep)
        n_bad = 0 if math.isfinite(total) else int((~torch.isfinite(res)).sum())
        if n_bad:
            where = "the inputs or parameters contain NaN/Inf" if self.nstep == 1 else "the solver diverged"
            raise DEQConvergenceError(
                f"non-finite residual in {n_bad} sample(s) at solver step {self.nstep}: {where}")
        if n_keep == 0 or self.nstep >= self.max_iter:
            self.done = True
            return None
        if n_keep == keep.numel() or self.autograd or not self.compact:
            return None
        compact = _compaction(keep, n_keep)
        full = torch.arange(keep.numel(), device=keep.device) if rows is None else rows.clone()
        self.rows = compact(full)
        return compact

    def _keep_best(self, x, res, abs_res, rel_res, rows):
        best_res = self.best_rel if self.stop == "rel" else self.best_abs
        prev = best_res if rows is None else best_res[rows]
        better = res < prev
        if kernels.usable(x) and x.stride(1) == self.best.stride(1) == 1:   # the CPU: copy only the rows improved
            kernels.copy_rows(x, better, rows, self.best)
        elif rows is None:  # torch.where keeps this free of host syncs; in place: no new [B, L] buffer per step
            torch.where(better[:, None], x, self.best, out=self.best)
        else:
            self.best[rows] = torch.where(better[:, None], x, self.best[rows])
        if rows is None:
            self.best_abs = torch.where(better, abs_res, self.best_abs)
            self.best_rel = torch.where(better, rel_res, self.best_rel)
        else:
            self.best_abs[rows] = torch.where(better, abs_res, self.best_abs[rows])
            self.best_rel[rows] = torch.where(better, rel_res, self.best_rel[rows])

    def result(self, z: torch.Tensor | None = None) -> SolveResult:
        """The best iterate per sample and how it got there (``z``: the caller's last iterate instead)."""
        res = self.best_rel if self.stop == "rel" else self.best_abs
        converged = bool((res <= self.tol).all())
        z = self.best if z is None else z
        iterates = self.iterates + [z.detach()] * (len(self.keep_at) - len(self.iterates))
        return SolveResult(z, self.nstep, self.best_abs, self.best_rel, self.trace, converged,
                           iterates=iterates)


def snapshot_steps(max_iter: int, keep: int) -> list[int]:
    """The solver steps after which a Tracker keeps an iterate: ``keep`` evenly spaced steps strictly inside
    the cap, ``j * max_iter // (keep + 1)`` for j = 1..keep (at least step 1; repeated when keep >= max_iter)."""
    return [max(1, j * max_iter // (keep + 1)) for j in range(1, keep + 1)]


def _compaction(keep: torch.Tensor, n_keep: int):
    """Drop the stopped samples from the working set: the last running samples move into the places of
    stopped ones below ``n_keep`` and the set is truncated to a view, so a step copies as many rows as
    stopped, not the whole set (the working set's order is not the batch order; ``rows`` maps it).
    No host sync: stopped-first ``argsort`` pairs the ascending stopped with the descending running."""
    stopped = keep.numel() - n_keep
    order = torch.argsort(keep.to(torch.uint8), stable=True)
    c = min(stopped, n_keep)
    holes, fillers = order[:c], order[stopped:].flip(0)[:c]   # holes >= n_keep land in the cut-off part

    def compact(t: torch.Tensor) -> torch.Tensor:
        t[holes] = t[fillers]
        return t[:n_keep]
    return compact


@register_solver("fixed_point")
def fixed_point(f: FixedPointMap, z0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3,
                stop: str = "rel", damping: float = 1.0, keep: int = 0, check_every: int = 1,
                compact: bool = True) -> SolveResult:
    """Plain (optionally damped) fixed-point iteration z <- (1 - damping) z + damping f(z)."""
    t = Tracker(z0, tol, stop, max_iter, keep=keep, check_every=check_every, compact=compact)
    x = z0
    while True:
        fx = f(x, t.rows)
        compact = t.update(x, fx)
        if t.done:
            return t.result()
        x = fx if damping == 1.0 else torch.lerp(x, fx, damping)
        if compact is not None:
            x = compact(x)


@register_solver("anderson")
def anderson(f: FixedPointMap, z0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, stop: str = "rel",
             m: int = 5, lam: float = 1e-4, beta: float = 1.0, stall: int = 0, stall_factor: float = 0.9,
             stall_damping: float = 0.5, keep: int = 0, check_every: int = 1, compact: bool = True) -> SolveResult:
    """Anderson acceleration (type II) with history ``m``, Tikhonov regularisation ``lam`` (relative to the
    mean squared residual in the history) and mixing ``beta``.

    Each sample's mixing coefficients come from its own ``(m+1) x (m+1)`` bordered least-squares system.
    The histories of f(x) and of the residuals g = f(x) - x are kept, and their Gram matrix is updated
    one row per step, so a step reads the history twice (one Gram row, one mixing) besides evaluating f.

    Stagnation (ours; ``stall`` > 0, :class:`Stagnation`): a sample whose residual has not fallen below
    ``stall_factor`` times its best one for ``stall`` steps has stalled. The first time, its history is
    dropped (a restart from its current iterate); the second time, it leaves Anderson for damped
    fixed-point iteration z <- z + ``stall_damping`` (f(z) - z), from its best iterate so far. ``SolveResult.restarted`` / ``fell_back``
    count the samples. Samples that never stall get bit-identical iterates to ``stall=0``.
    """
    if m < 1:
        raise ValueError(f"m: Anderson history must be >= 1, got {m}")
    t = Tracker(z0, tol, stop, max_iter, keep=keep, check_every=check_every, compact=compact)
    watch = Stagnation(z0, m, stall, stall_factor, stall_damping) if stall else None
    B, L = z0.shape
    F = z0.new_zeros(B, m, L)      # f(x) history
    G = z0.new_zeros(B, m, L)      # residual history
    # the bordered system [[0, 1^T], [1, G G^T]] of every sample, kept across steps: a step writes one row and
    # one column of the Gram matrix G G^T (H[:, 1:, 1:]); the border is written once
    H = z0.new_zeros(B, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    GG = H[:, 1:, 1:]
    ridge_at = torch.eye(m + 1, dtype=z0.dtype, device=z0.device)
    ridge_at[0, 0] = 0                        # the ridge goes on the Gram block's diagonal only
    y = torch.zeros(m + 1, 1, dtype=z0.dtype, device=z0.device)
    y[0] = 1
    x = z0
    k = 0
    while True:
        fx = f(x, t.rows)
        j = k % m
        if kernels.usable(fx) and fx.stride(1) == x.stride(1) == 1:   # the CPU: one pass for all four
            g, norms = G[:, j], kernels.residual(fx, x, G[:, j], F[:, j])
        else:
            F[:, j] = fx
            g, norms = torch.sub(fx, x, out=G[:, j]), None
        compact = t.update(x, fx, g, norms)
        if t.done:
            return t.result() if watch is None else watch.report(t.result())
        if watch is not None:
            watch.step(t.last_res, j)
        if compact is not None:
            F, G, H = compact(F), compact(G), compact(H)
            GG = H[:, 1:, 1:]
            if watch is not None:
                watch.compact(compact)
        k += 1
        n = min(k, m)
        # the new residual against the history, as a row vector times G^T (10x faster than G @ g on CPU)
        row = torch.bmm(G[:, j, None, :], G[:, :n].transpose(1, 2))[:, 0]
        GG[:, j, :n], GG[:, :n, j] = row, row
        if n == 1:
            x = F[:, j] if beta == 1.0 else F[:, j] - (1 - beta) * G[:, j]
            if watch is not None:
                x = watch.damp(x, F[:, j], G[:, j], t)
            continue
        # Regularise relative to the residuals' scale, so the mixing stays sharp as they shrink.
        ridge = GG[:, :n, :n].diagonal(dim1=1, dim2=2).mean(1, keepdim=True).mul_(lam).add_(torch.finfo(GG.dtype).tiny)
        Hn = torch.addcmul(H[:, :n + 1, :n + 1], ridge[:, :, None], ridge_at[:n + 1, :n + 1])
        if watch is not None:
            watch.mask(Hn, n)
        # solve_ex: no check of the factorisation's status (that check is a host sync on a GPU); the ridge keeps
        # Hn nonsingular
        alpha = torch.linalg.solve_ex(Hn, y[:n + 1])[0][:, 1:].transpose(1, 2)  # [b, 1, n], sums to 1
        x = torch.bmm(alpha, F[:, :n])[:, 0]                     # beta * alpha F + (1 - beta) * alpha X,
        if beta != 1.0:                                          # with X = F - G
            x = x - (1 - beta) * torch.bmm(alpha, G[:, :n])[:, 0]
        if watch is not None:
            x = watch.damp(x, F[:, j], G[:, j], t)


class Stagnation:
    """Per-sample stagnation detection for :func:`anderson` (``stall`` > 0), restart and fallback.

    Each working-set row keeps ``mark``, its residual at its last improvement (a residual below ``factor``
    times ``mark``), and ``since``, the steps since then. At ``since == stall`` the row stalls: the first
    time its history slots are marked invalid except the newest (``valid``: the Anderson system gives them
    zero weight, so the next mix is a plain step from the current iterate), the second time it falls back to
    damped fixed-point iteration (``phase`` 2) from its best iterate so far. Everything is tensor work without host syncs; rows that
    never stall keep their exact Anderson iterates (``torch.where`` picks the unmodified values).
    """

    def __init__(self, z0: torch.Tensor, m: int, stall: int, factor: float, damping: float):
        if not isinstance(stall, int) or isinstance(stall, bool) or stall < 0:
            raise ValueError(f"stall: must be an int >= 0, got {stall!r}")
        if not 0 < factor <= 1:
            raise ValueError(f"stall_factor: must be in (0, 1], got {factor!r}")
        if not 0 < damping <= 1:
            raise ValueError(f"stall_damping: must be in (0, 1], got {damping!r}")
        B = z0.shape[0]
        self.stall, self.factor, self.damping = stall, factor, damping
        self.mark = torch.full((B,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.since = torch.zeros(B, dtype=torch.long, device=z0.device)
        self.phase = torch.zeros(B, dtype=torch.long, device=z0.device)   # 0 Anderson, 1 restarted, 2 damped
        self.valid = torch.ones(B, m, dtype=torch.bool, device=z0.device)
        self.jump = torch.zeros(B, dtype=torch.bool, device=z0.device)   # rows falling back at this step
        self.restarted = torch.zeros((), dtype=torch.long, device=z0.device)
        self.fell_back = torch.zeros((), dtype=torch.long, device=z0.device)

    def step(self, res: torch.Tensor, j: int) -> None:
        """Record this step's residuals ``res`` (working set) whose f(x), residual went into slot ``j``."""
        self.valid[:, j] = True
        better = res < self.factor * self.mark
        self.mark = torch.where(better, res, self.mark)
        self.since = torch.where(better, torch.zeros_like(self.since), self.since + 1)
        stalled = (self.since >= self.stall) & (self.phase < 2)
        restart = stalled & (self.phase == 0)
        self.restarted += restart.sum()
        self.jump = stalled & (self.phase == 1)
        self.fell_back += self.jump.sum()
        self.phase = self.phase + stalled.long()
        self.since = torch.where(stalled, torch.zeros_like(self.since), self.since)
        keep_slot = torch.zeros_like(self.valid)
        keep_slot[:, j] = True
        self.valid &= ~restart[:, None] | keep_slot

    def compact(self, compact) -> None:
        self.mark, self.since, self.phase, self.valid, self.jump = (
            compact(t) for t in (self.mark, self.since, self.phase, self.valid, self.jump))

    def mask(self, H: torch.Tensor, n: int) -> None:
        """Give the invalid slots of the bordered system ``H`` [b, n+1, n+1] zero weight, in place: their row
        and column become those of the identity (alpha_i = 0 exactly)."""
        bad = torch.cat([torch.zeros_like(self.valid[:, :1]), ~self.valid[:, :n]], 1)   # the border stays
        eye = torch.eye(n + 1, dtype=H.dtype, device=H.device).expand_as(H)
        H.copy_(torch.where(bad[:, :, None] | bad[:, None, :], eye, H))

    def damp(self, x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, t: Tracker) -> torch.Tensor:
        """Rows that fell back take the damped step ``fx - (1 - damping) g`` instead of ``x``; at the step they
        fall back, they go back to their best iterate instead (a cycling Anderson may have left it far)."""
        best = t.best if t.rows is None else t.best[t.rows]
        x = torch.where((self.phase == 2)[:, None], fx - (1 - self.damping) * g, x)
        return torch.where(self.jump[:, None], best, x)

    def report(self, res: SolveResult) -> SolveResult:
        res.restarted, res.fell_back = int(self.restarted), int(self.fell_back)
        return res


@register_solver("broyden")
def broyden(f: FixedPointMap, z0: torch.Tensor, *, max_iter: int = 50, tol: float = 1e-3, stop: str = "rel",
            memory: int = 16, keep: int = 0, check_every: int = 1, compact: bool = True) -> SolveResult:
    """Good Broyden's method on g(z) = f(z) - z, batched per sample, without line search.

    The inverse-Jacobian estimate -I + U V^T keeps at most ``memory`` rank-one updates and restarts
    from -I when full, so memory does not grow with the number of steps.
    """
    if memory < 1:
        raise ValueError(f"memory: must be >= 1, got {memory}")
    t = Tracker(z0, tol, stop, max_iter, keep=keep, check_every=check_every, compact=compact)
    B, L = z0.shape
    UTs = z0.new_zeros(B, memory, L)   # U^T and V^T: products with them are row vector x [n, L] matrix
    VTs = z0.new_zeros(B, memory, L)   # (10x faster on CPU than [L, n] or [n, L] x column vector)
    n = 0

    def dot(v, M):  # per sample: row vector v [B, L] times M[:, :n]^T -> [B, 1, n]
        return torch.bmm(v[:, None], M[:, :n].transpose(1, 2))

    def matvec(v):   # (-I + U V^T) v
        if n == 0:
            return -v
        return -v + torch.bmm(dot(v, VTs), UTs[:, :n])[:, 0]

    def rmatvec(v):  # v^T (-I + U V^T)
        if n == 0:
            return -v
        return -v + torch.bmm(dot(v, UTs), VTs[:, :n])[:, 0]

    x = z0
    fx = f(x, t.rows)
    gx = fx - x
    compact = t.update(x, fx)
    if t.done:
        return t.result()
    if compact is not None:
        x, gx, UTs, VTs = compact(x), compact(gx), compact(UTs), compact(VTs)
    update = gx
    while True:
        x_new = x + update
        fx = f(x_new, t.rows)
        g_new = fx - x_new
        compact = t.update(x_new, fx)
        if t.done:
            return t.result()
        dx, dg = x_new - x, g_new - gx
        x, gx = x_new, g_new
        if n == memory:
            n = 0
        vT = rmatvec(dx)
        denom = (vT * dg).sum(1, keepdim=True)
        u = (dx - matvec(dg)) / torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
        UTs[:, n], VTs[:, n] = u, vT
        n += 1
        if compact is not None:
            x, gx, UTs, VTs = compact(x), compact(gx), compact(UTs), compact(VTs)
        update = -matvec(gx)
