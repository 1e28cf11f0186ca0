"""How DEQFusion's output gets its gradient: one object per backward mode, registered by name.

A mode is called as ``mode(m, z0, inj, warm)`` with the :class:`~.module.DEQFusion` ``m`` (f as ``m.layer``,
the tape-free solve ``m.solve`` and the settings), the initial state, the injection of this forward and the
warm-start stats (or None); it returns an :class:`Equilibrium`: the output state whose autograd graph carries the
gradient, the forward solve's result, the Jacobian term and, for the implicit mode, where its backward
solve reports.

- ``implicit`` (default): implicit differentiation (paper Eq. 5-6): the backward solves g = g J_f(z*) + dl/dz*
  with its own root solver, per sample, on the samples still running (:class:`RowCompactingVJP`).
- ``phantom``: a few damped steps of f from z*, differentiated by autograd.
- ``onestep``: Jacobian-free: one step of f from z*.
- ``unrolled``: plain fixed-point iteration recorded by autograd (the paper's weight-tied comparison);
  outside training it solves and takes one step, as ``onestep``.

``WEIGHT_TIED`` (not a backward mode) is the ``equilibrium=False`` ablation: ``num_layers`` applications of f.
A new mode subclasses :class:`Gradient` (or :class:`SolveThenDifferentiate`) and registers itself with
``@register_gradient(name)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .fusion_map import GateTrace, Injection, RowMap
from .jacobian import jacobian_loss
from .solvers import SolveConfig, Tracker
from .stats import BackwardReport, SolveResult, SolverStats
from .vjp import FusedVJP, tape_for

__all__ = ["GRADIENTS", "register_gradient", "get_gradient", "Gradient", "SolveThenDifferentiate", "Implicit",
           "Phantom", "OneStep", "Unrolled", "WeightTied", "WEIGHT_TIED", "RowCompactingVJP", "ImplicitBackward",
           "Equilibrium", "unroll"]

GRADIENTS: dict[str, "Gradient"] = {}


def register_gradient(name: str):
    """Class decorator: register one instance of the class as the backward mode ``name``."""
    def deco(cls):
        cls.name = name
        GRADIENTS[name] = cls()
        return cls
    return deco


def get_gradient(name: str) -> "Gradient":
    try:
        return GRADIENTS[name]
    except KeyError:
        raise ValueError(f"backward: expected one of {tuple(GRADIENTS)}, got {name!r}") from None


class Equilibrium(NamedTuple):
    z: torch.Tensor                       # [B, L] output state; its graph carries the gradient
    result: SolveResult                   # how the forward got there
    jac: torch.Tensor | None              # Jacobian term, or None (not training, disabled)
    backward: BackwardReport | None = None  # where a backward that runs later reports
    solved: bool = True                   # z came from a tape-free root solve: a later warm start from
                                          # this call may extrapolate along it


class Gradient:
    """A backward mode: from z0 and f, the output state and its gradient path (see the module docstring)."""

    name = ""

    def __call__(self, m, z0: torch.Tensor, inj: Injection, warm: SolverStats | None) -> Equilibrium:
        raise NotImplementedError


def _training(m) -> bool:
    return m.training and torch.is_grad_enabled()


def _at(m, z_star: torch.Tensor, inj: Injection, tape=None):
    """f applied once at the fixed point, on a fresh leaf: (z, f(z)); ``tape``: f records its VJP's inputs there."""
    z = z_star.detach().requires_grad_()
    return z, (m.layer(z, inj) if tape is None else m.layer(z, inj, tape=tape))


def _jacobian_at(m, z_star: torch.Tensor, inj: Injection) -> torch.Tensor:
    """The Jacobian term at z*, from a fresh application of f there."""
    z, fz = _at(m, z_star, inj)
    return jacobian_loss(fz, z, m.jac_samples, blocks=_jac_blocks(m))


def _jac_blocks(m) -> int | None:
    """``jac_term="diagonal"``: the Jacobian term's diagonal blocks only (see ``jacobian_loss``)."""
    return m.num_modalities + 1 if getattr(m, "jac_term", "full") == "diagonal" else None


class SolveThenDifferentiate(Gradient):
    """Solve without an autograd tape, then attach the gradient at z* (``attach``)."""

    def __call__(self, m, z0, inj, warm):
        needs_graph = torch.is_grad_enabled() and (any(x.requires_grad for x in inj.xs) or
                                                   any(p.requires_grad for p in m.parameters()))
        res = m.solve(z0, inj)
        if not needs_graph:
            return Equilibrium(res.z, res, None)
        jac_needed = _training(m) and m.jac_samples > 0
        return self.attach(m, res, inj, warm, jac_needed)

    def attach(self, m, res: SolveResult, inj: Injection, warm, jac_needed: bool) -> Equilibrium:
        """The output state with its gradient path at the solution ``res.z`` (and the Jacobian term there
        when ``jac_needed``)."""
        raise NotImplementedError


@register_gradient("implicit")
class Implicit(SolveThenDifferentiate):
    """Implicit differentiation: the output is f(z*) through :class:`_ImplicitGrad`, whose backward solves
    g = g J_f(z*) + grad with the solver settings ``m.backward_solve``, warm-started from the warm-start
    stats' backward solution when its shape fits."""

    def attach(self, m, res, inj, warm, jac_needed):
        tape = tape_for(m, res.z, inj)    # where f's hand-derived VJP applies, f records what it reads
        z, fz = _at(m, res.z, inj, tape)    # eager f: compile_f compiles only the tape-free solve
        jac = jacobian_loss(fz, z, m.jac_samples, blocks=_jac_blocks(m)) if jac_needed else None
        g0 = None if warm is None else warm.backward_state
        if g0 is not None and g0.shape != fz.shape:
            g0 = None
        keep = inj.state_mask(m.dim)
        if g0 is not None and keep is not None:   # absent parts of g stay zero: start them there
            g0 = torch.where(keep, g0, 0.0)
        report = BackwardReport(m.backward_solve)
        fast = None if tape is None else FusedVJP(m, res.z, inj, tape)
        backward = ImplicitBackward(m.layer, res.z, inj, m.backward_solve, g0, fast)
        return Equilibrium(_ImplicitGrad.apply(fz, z, backward, report), res, jac, report)


@register_gradient("phantom")
class Phantom(SolveThenDifferentiate):
    """``m.phantom_steps`` damped steps z <- lerp(z, f(z), ``m.phantom_damping``) from z*, by autograd."""

    def attach(self, m, res, inj, warm, jac_needed):
        out = res.z
        for _ in range(m.phantom_steps):
            out = torch.lerp(out, m.layer(out, inj), m.phantom_damping)
        return Equilibrium(out, res, _jacobian_at(m, res.z, inj) if jac_needed else None)


@register_gradient("onestep")
class OneStep(SolveThenDifferentiate):
    """Jacobian-free: the output is one step of f from z*, differentiated by autograd."""

    def attach(self, m, res, inj, warm, jac_needed):
        z, fz = _at(m, res.z, inj)
        return Equilibrium(fz, res, jacobian_loss(fz, z, m.jac_samples, blocks=_jac_blocks(m)) if jac_needed else None)


class _ImplicitGrad(torch.autograd.Function):
    """Identity on f(z*); its backward solves g = g J_f(z*) + grad with a root solver and hands g to
    f's graph (implicit function theorem, paper Eq. 5-6). No hooks are registered anywhere."""

    @staticmethod
    def forward(ctx, fz, z, backward: "ImplicitBackward", report: BackwardReport):
        ctx.fz, ctx.z, ctx.backward, ctx.report = fz, z, backward, report
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad):
        res = ctx.backward.solve(ctx.fz, ctx.z, grad)
        ctx.report.done(res)
        return res.z, None, None, None


class ImplicitBackward:
    """The implicit gradient's backward solve, with what it needs from the forward: f (``layer``), the
    fixed point z*, the injection, the solver settings, the warm start g0 (None: cold) and f's hand-derived VJP
    at z* where it applies (a :class:`~deqfusion_core.vjp.FusedVJP`; None: autograd's)."""

    def __init__(self, layer, z_star: torch.Tensor, inj: Injection, config: SolveConfig,
                 g0: torch.Tensor | None = None, fast: FusedVJP | None = None):
        self.layer, self.z_star, self.inj, self.config, self.g0 = layer, z_star, inj, config, g0
        self.fast = fast

    @torch.compiler.disable
    def solve(self, fz: torch.Tensor, z: torch.Tensor, grad: torch.Tensor) -> SolveResult:
        """Solve g = g J + grad, per sample, where J = d fz / d z (fz = f(z) on all rows)."""
        grad = grad.detach()
        # cold start at grad, the first iterate from zero (that step's VJP would be of zeros)
        g_init = grad.clone() if self.g0 is None else self.g0.to(grad)
        with torch.no_grad():
            h = RowCompactingVJP(self.layer, self.z_star, self.inj, fz, z, grad, g_init, self.fast)
            return self.config.run(h, g_init)


class RowCompactingVJP:
    """``h(g, rows) = g J + grad`` on the rows the backward solver still runs (``None``: all).

    J is block-diagonal over samples (GroupNorm and the gates act per sample), so samples are independent.
    Converged samples stop; once the running ones are at most half of those in the current graph, f is
    re-applied to them alone, so later VJPs cost in proportion to them.

    The VJP is f's hand-derived one (``fast``, :mod:`~deqfusion_core.vjp`) where it applies, else autograd's
    through the graph ``fz = f(z)``; re-applying f to fewer rows is then selecting the hand VJP's rows.

    State: the current graph (``fz = f(z)``, or the hand VJP ``fast`` at z) over a batch of ``size`` rows (all rows,
    or those running when f was last re-applied); ``inv`` maps a batch row to its position in that graph (None: identity); ``buf``
    holds one g per graph row (rows that stopped keep their last g, which no running row depends on);
    ``pos`` are the graph positions of ``rows``, the working set the solver passed last.
    """

    def __init__(self, layer, z_star: torch.Tensor, inj: Injection, fz: torch.Tensor, z: torch.Tensor,
                 grad: torch.Tensor, g_init: torch.Tensor, fast: FusedVJP | None = None):
        self.layer, self.z_star, self.inj, self.grad = layer, z_star, inj, grad
        self.fz, self.z, self.fast, self.all_rows_fast = fz, z, fast, fast
        self.size, self.inv = grad.shape[0], None
        self.buf = g_init.clone()
        self.rows = self.pos = None

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(v)
        return torch.autograd.grad(self.fz, self.z, v, retain_graph=True)[0]

    def position(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.inv is None else self.inv[rows]

    def __call__(self, g: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            return self.vjp(g) + self.grad
        if rows is not self.rows:
            if 2 * rows.numel() <= self.size:
                self.reapply(rows)
            self.pos, self.rows = self.position(rows), rows
        self.buf[self.pos] = g
        return self.vjp(self.buf)[self.pos] + self.grad[rows]

    def reapply(self, rows: torch.Tensor):
        """Re-apply f to the rows ``rows`` alone (the hand VJP: select its rows); later VJPs run on that smaller graph."""
        if self.fast is not None:
            self.fast, z, fz = self.all_rows_fast.select(rows), None, None
        else:
            with torch.enable_grad():
                z = self.z_star[rows].detach().requires_grad_()
                fz = self.layer(z, self.inj.select(rows))
        inv = torch.empty(self.grad.shape[0], dtype=torch.long, device=rows.device)
        inv[rows] = torch.arange(rows.numel(), device=rows.device)
        self.buf = self.buf[self.position(rows)]
        self.fz, self.z, self.inv, self.size = fz, z, inv, rows.numel()


def unroll(m, z0: torch.Tensor, inj: Injection, max_iter: int, tol: float, stop: str, keep: int = 0):
    """Plain fixed-point iteration recorded by autograd: every sample runs until all reached ``tol``
    (``-inf``: exactly ``max_iter`` steps). Returns the last iterate, with its graph, and the SolveResult
    (``keep``: with that many detached iterates, as :class:`~deqfusion_core.solvers.Tracker` keeps them)."""
    gates = GateTrace(z0.shape[0], m.num_modalities, z0.device, inj.present is not None) if m.track_gates else None
    f = RowMap(m.layer, inj, gates)
    t = Tracker(z0, tol, stop, max_iter, autograd=True, keep=keep)
    z = z0
    while not t.done:
        fz = f(z, None)
        t.update(z.detach(), fz.detach())
        z = fz
    res = t.result(z.detach())
    res.gates = [] if gates is None else gates.means
    return z, res


@register_gradient("unrolled")
class Unrolled(SolveThenDifferentiate):
    """In training, plain fixed-point iteration to ``m.f_tol`` (cap ``m.f_max_iter``) recorded by autograd;
    otherwise the solve and one step of f, as ``onestep``."""

    def __call__(self, m, z0, inj, warm):
        if not _training(m):
            return super().__call__(m, z0, inj, warm)
        cfg = m.forward_solve
        z, res = unroll(m, z0, inj, cfg.max_iter, cfg.tol, cfg.stop, m.correction_steps)
        return Equilibrium(z, res, _jacobian_at(m, z, inj) if m.jac_samples else None, solved=False)

    attach = OneStep.attach


class WeightTied(Gradient):
    """``equilibrium=False``: ``m.num_layers`` weight-tied applications of f from z0, back-propagated layer
    by layer (the paper's Table 5); ``num_layers=0`` is the weighted sum x_fuse. No Jacobian term."""

    def __call__(self, m, z0, inj, warm):
        if m.num_layers == 0:
            z = z0.clone()
            z.view(z.shape[0], -1, m.dim)[:, -1] = inj.x_fuse
            zero = z.new_zeros(z.shape[0])
            return Equilibrium(z, SolveResult(z.detach(), 0, zero, zero, [], True), None, solved=False)
        return Equilibrium(*unroll(m, z0, inj, m.num_layers, float("-inf"), m.forward_solve.stop), None,
                           solved=False)


WEIGHT_TIED = WeightTied()
