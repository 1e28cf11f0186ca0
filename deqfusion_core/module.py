"""DEQFusion: the fixed point of per-modality residual blocks and a purify-then-combine fusion block.

Paper (Ni et al., DEQ multimodal fusion), section 2.2. For modality features x_1..x_N (projected to a
common width d), the state z = (z_1, ..., z_N, z_fuse) is the fixed point of f = (f_1, ..., f_N, f_fuse):

    f_i(z_i; x_i)     = GN(ReLU(GN(W2 ReLU(GN(W1 z_i)) + x_i) + z_i))              Eq. 7-8 (+ residual)
    alpha_i           = W_a (z_fuse + f_i) + b_a                                     Eq. 9
    f_fuse(z; x)      = GN(ReLU(W_f sum_i alpha_i * z_fuse + x_fuse))                Eq. 10-11
    x_fuse            = sum_i w_i x_i + b                                            Eq. 12

solved jointly from zero (Eq. 14-17); the fused state z_fuse* is the output.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .jacobian import attach_aux_loss, jacobian_loss
from .solvers import SOLVERS, get_solver
from .stats import SolveResult, SolverStats

BACKWARD_MODES = ("implicit", "phantom", "onestep", "unrolled")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict) that computes [B, C] inputs as a layer norm over
    [B, G, C/G] and a per-channel affine: torch's group_norm kernel has no spatial extent to vectorise
    over here and is 1.7x slower forward, 3x slower backward on CPU (measured at 612 x 500, 4 groups).
    The layer norm gets a weight of ones: torch's CPU kernel without one is 2.2x slower (same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        b, c = x.shape
        y = F.layer_norm(x.view(b, self.num_groups, c // self.num_groups), (c // self.num_groups,),
                         x.new_ones(c // self.num_groups), eps=self.eps).view(b, c)
        return torch.addcmul(self.bias, y, self.weight) if self.affine else y


class ModalityBlock(nn.Module):
    """f_theta_i (Eq. 7-8): Linear, GroupNorm, ReLU, Linear, + x_i, GroupNorm, + z (residual), ReLU, GroupNorm."""

    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gn1, self.gn2, self.gn3 = (GroupNorm(num_groups, dim) for _ in range(3))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # in place where the producer's backward does not need its output: fewer [B, dim] buffers per f
        out = F.relu(self.gn1(self.lin1(z)), inplace=True)
        out = self.gn2(self.lin2(out).add_(x))
        return self.gn3(F.relu(out.add_(z), inplace=True))


class FuseBlock(nn.Module):
    """f_fuse (Eq. 9-11): purify z_fuse with a soft gate per modality, combine, inject x_fuse.

    The gate is one Linear shared by the modalities, so sum_i alpha_i * z_fuse equals
    z_fuse * (W_a (N z_fuse + sum_i z_i) + N b_a): one matrix product instead of N.
    """

    def __init__(self, dim: int, num_groups: int, gating: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, dim) if gating else None
        self.fuse = nn.Linear(dim, dim)
        self.gn = GroupNorm(num_groups, dim)

    def forward(self, z_fuse, zs, x_fuse, gate_mask=None, fuse_mask=None, gate_means=None):
        if self.gate is None:                       # Table 6 ablation: z'_i = z_i
            purified = sum(zs)
        else:
            n = len(zs)
            gates = F.linear(n * z_fuse + sum(zs), self.gate.weight, n * self.gate.bias)
            if gate_mask is not None:
                gates = gates * gate_mask
            purified = z_fuse * gates
            if gate_means is not None:              # per-sample mean alpha_i per modality [b, N], for Fig. 3
                w, b = self.gate.weight.mean(0), self.gate.bias.mean()
                gate_means.append(torch.stack([(z_fuse + z) @ w + b for z in zs], 1).detach().float())
        out = self.fuse(purified)
        if fuse_mask is not None:
            out = out * fuse_mask
        return self.gn(F.relu(out + x_fuse, inplace=True))


class DEQFusionOutput(NamedTuple):
    fused: torch.Tensor       # [B, dim]
    jac_loss: torch.Tensor    # scalar; zero when not training or disabled
    stats: SolverStats


class _Injection:
    """The per-forward constants of f: projected inputs, x_fuse and the dropout masks; row-selectable."""

    def __init__(self, xs, x_fuse, gate_mask, fuse_mask):
        self.xs, self.x_fuse, self.gate_mask, self.fuse_mask = xs, x_fuse, gate_mask, fuse_mask

    def select(self, rows):
        pick = lambda t: None if t is None else t[rows]
        return _Injection([x[rows] for x in self.xs], self.x_fuse[rows], pick(self.gate_mask), pick(self.fuse_mask))


class _ImplicitGrad(torch.autograd.Function):
    """Identity on f(z*); its backward solves g = g J_f(z*) + grad with a root solver and hands g to
    f's graph (implicit function theorem, paper Eq. 5-6). No hooks are registered anywhere."""

    @staticmethod
    def forward(ctx, fz, z, backward_solve):
        ctx.fz, ctx.z, ctx.backward_solve = fz, z, backward_solve
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad):
        fz, z = ctx.fz, ctx.z

        def vjp(v):
            return torch.autograd.grad(fz, z, v, retain_graph=True)[0]

        return ctx.backward_solve(vjp, grad), None, None


class DEQFusion(nn.Module):
    """Deep Equilibrium multimodal fusion of N modality features [B, d_i] into one [B, dim].

    Args:
        input_dims: width of each modality's feature; widths other than ``dim`` get a Linear projection.
        dim: common width (default: the input width, when all are equal).
        num_groups: GroupNorm groups; must divide ``dim``.
        dropout: variational dropout on the gate and fuse outputs inside f (one mask per forward,
            fixed over solver steps so that the fixed point is well defined).
        modality_blocks, fuse_block, gating, equilibrium: the paper's ablations (Tables 5-7):
            ``modality_blocks=False``: z_i = x_i; ``fuse_block=False``: z_fuse = sum_i z_i;
            ``gating=False``: z'_i = z_i; ``equilibrium=False``: ``num_layers`` weight-tied applications
            of f from zero, back-propagated layer by layer (``num_layers=0``: the weighted sum x_fuse).
        solver, f_max_iter, f_tol, f_stop, solver_options: forward root solver (``anderson``, ``broyden``,
            ``fixed_point``), its cap, tolerance, stopping on ``rel`` or ``abs`` residual, and its options
            (e.g. ``{"m": 6, "lam": 1e-4, "beta": 1.0}`` for Anderson).
        backward: ``implicit`` (implicit differentiation with its own solver ``b_solver``, ``b_max_iter``,
            ``b_tol``), ``phantom`` (``phantom_steps`` damped unrolled steps from z*, damping
            ``phantom_damping``), ``onestep`` (Jacobian-free: one step of f from z*) or ``unrolled``
            (plain fixed-point iteration recorded by autograd: the paper's weight-tied comparison).
        jac_samples: Hutchinson probes for the Jacobian term (0 disables it). Zero in eval mode.
        jac_weight: if > 0, ``jac_weight * jac_loss`` is attached to the fused tensor's backward so an
            unmodified ``loss.backward()`` includes it (then do not add ``jac_loss`` to the loss yourself).
        track_gates: record the mean gate value per modality at each solver step (``stats.gates``).

    ``forward(xs, z0=None, warm_start=None)`` returns ``DEQFusionOutput(fused, jac_loss, stats)``.
    ``z0`` is an initial state (e.g. ``stats.state`` of an earlier call on the same samples);
    ``warm_start`` is an earlier call's stats, warm-starting both the forward and the backward solve; when
    that call was itself warm-started and both forward solves converged, the forward starts from the
    extrapolation ``2 z*_t - z*_{t-1}`` (a secant predictor: over training steps on the same samples the
    fixed point moves smoothly; ``extrapolate_warm_start=False`` starts from ``z*_t``).
    """

    def __init__(self, input_dims: Sequence[int], dim: int | None = None, *, num_groups: int = 4,
                 dropout: float = 0.0, modality_blocks: bool = True, fuse_block: bool = True,
                 gating: bool = True, equilibrium: bool = True, num_layers: int = 1,
                 solver: str = "anderson", f_max_iter: int = 30, f_tol: float = 1e-3, f_stop: str = "rel",
                 solver_options: dict | None = None, backward: str = "implicit", b_solver: str | None = None,
                 b_max_iter: int = 30, b_tol: float = 1e-4, b_solver_options: dict | None = None,
                 phantom_steps: int = 5, phantom_damping: float = 0.8,
                 jac_samples: int = 1, jac_weight: float = 0.0, track_gates: bool = False,
                 extrapolate_warm_start: bool = True):
        super().__init__()
        if isinstance(input_dims, int) or not all(isinstance(d, int) and d > 0 for d in input_dims):
            raise TypeError(f"input_dims: expected a sequence of positive ints, got {input_dims!r}")
        input_dims = list(input_dims)
        if not input_dims:
            raise ValueError("input_dims: at least one modality is needed")
        if dim is None:
            if len(set(input_dims)) != 1:
                raise ValueError(f"dim: required when input_dims differ ({input_dims})")
            dim = input_dims[0]
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(num_groups, int) or num_groups <= 0 or dim % num_groups:
            raise ValueError(f"num_groups: must be a positive divisor of dim={dim}, got {num_groups!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
        for name, value in (("solver", solver), ("b_solver", b_solver or solver)):
            if value not in SOLVERS:
                raise ValueError(f"{name}: unknown solver {value!r}; known: {', '.join(sorted(SOLVERS))}")
        if backward not in BACKWARD_MODES:
            raise ValueError(f"backward: expected one of {BACKWARD_MODES}, got {backward!r}")
        if f_stop not in ("rel", "abs"):
            raise ValueError(f"f_stop: expected 'rel' or 'abs', got {f_stop!r}")
        for name, value in (("f_max_iter", f_max_iter), ("b_max_iter", b_max_iter), ("phantom_steps", phantom_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        for name, value in (("f_tol", f_tol), ("b_tol", b_tol)):
            if not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value!r}")
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers: must be an int >= 0, got {num_layers!r}")
        if not isinstance(jac_samples, int) or jac_samples < 0:
            raise ValueError(f"jac_samples: must be an int >= 0, got {jac_samples!r}")
        if jac_weight < 0:
            raise ValueError(f"jac_weight: must be >= 0, got {jac_weight!r}")
        if not 0 < phantom_damping <= 1:
            raise ValueError(f"phantom_damping: must be in (0, 1], got {phantom_damping!r}")

        self.input_dims, self.dim, self.num_modalities = input_dims, dim, len(input_dims)
        self.num_groups, self.dropout = num_groups, dropout
        self.modality_blocks, self.fuse_block, self.gating = modality_blocks, fuse_block, gating
        self.equilibrium, self.num_layers = equilibrium, num_layers
        self.solver, self.f_max_iter, self.f_tol, self.f_stop = solver, f_max_iter, f_tol, f_stop
        self.solver_options = dict(solver_options or {})
        self.backward, self.b_solver, self.b_max_iter, self.b_tol = backward, b_solver or solver, b_max_iter, b_tol
        self.b_solver_options = dict(b_solver_options or {})
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.jac_samples, self.jac_weight, self.track_gates = jac_samples, jac_weight, track_gates
        self.extrapolate_warm_start = extrapolate_warm_start

        self.proj = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(d, dim) for d in input_dims)
        self.blocks = nn.ModuleList(ModalityBlock(dim, num_groups) for _ in input_dims) if modality_blocks else None
        self.fusion = FuseBlock(dim, num_groups, gating) if fuse_block else None
        self.weights = nn.Parameter(torch.ones(len(input_dims)))   # w_i of x_fuse (Eq. 12)
        self.bias = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, dim={self.dim}, solver={self.solver}, f_max_iter={self.f_max_iter}, "
                f"f_tol={self.f_tol}, backward={self.backward}")

    @property
    def state_width(self) -> int:
        return (self.num_modalities + 1) * self.dim

    # -- the fixed-point map --------------------------------------------------------------------------
    def layer(self, z: torch.Tensor, inj: _Injection, gate_means: list | None = None) -> torch.Tensor:
        """One application of f to the flat state z [b, (N+1)*dim]."""
        b, n, d = z.shape[0], self.num_modalities, self.dim
        zs = z.view(b, n + 1, d).unbind(1)
        if self.blocks is None:
            new = list(inj.xs)
        else:
            new = [blk(zi, xi) for blk, zi, xi in zip(self.blocks, zs[:n], inj.xs)]
        if self.fusion is None:
            z_fuse = sum(new)
        else:
            z_fuse = self.fusion(zs[n], new, inj.x_fuse, inj.gate_mask, inj.fuse_mask, gate_means)
        return torch.stack([*new, z_fuse], 1).view(b, -1).to(z.dtype)

    # -- input checks ---------------------------------------------------------------------------------
    def _check_inputs(self, xs) -> list[torch.Tensor]:
        if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs: expected a list of {self.num_modalities} tensors [B, d_i], got {type(xs).__name__}")
        if len(xs) != self.num_modalities:
            raise ValueError(f"xs: expected {self.num_modalities} modality tensors (input_dims={self.input_dims}), "
                             f"got {len(xs)}")
        ref = None
        param = self.weights
        for i, (x, d) in enumerate(zip(xs, self.input_dims)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"xs[{i}]: expected a tensor, got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != d:
                raise ValueError(f"xs[{i}]: expected shape [B, {d}] (input_dims[{i}]), got {list(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"xs[{i}]: expected a floating-point tensor, got {x.dtype}")
            if x.device != param.device:
                raise TypeError(f"xs[{i}]: on {x.device}, but DEQFusion's parameters are on {param.device}")
            if ref is None:
                ref = x
                continue
            if x.shape[0] != ref.shape[0]:
                raise ValueError(f"xs[{i}]: batch size {x.shape[0]} differs from xs[0]'s {ref.shape[0]}")
            if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"xs[{i}]: dtype {x.dtype} differs from xs[0]'s {ref.dtype}")
        return list(xs)

    def _warm_state(self, warm: SolverStats) -> torch.Tensor | None:
        z, prev = warm.state, warm.previous_state
        if not self.extrapolate_warm_start or prev is None or z is None or prev.shape != z.shape \
                or not warm.converged:
            return z
        return torch.lerp(prev, z, 2.0)   # 2 z - prev

    def _check_state(self, z0, name, batch, dtype) -> torch.Tensor | None:
        if z0 is None:
            return None
        if not isinstance(z0, torch.Tensor) or z0.shape != (batch, self.state_width):
            shape = list(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"{name}: expected a state of shape [{batch}, {self.state_width}], got {shape}")
        return z0.detach().to(dtype)

    def inject(self, xs: Sequence[torch.Tensor]) -> _Injection:
        """The constants of f for one forward: projected inputs, x_fuse (Eq. 12) and the dropout masks."""
        xs = [p(x) for p, x in zip(self.proj, xs)]
        x_fuse = sum(w * x for w, x in zip(self.weights, xs)) + self.bias
        return _Injection(xs, x_fuse, *self._dropout_masks(x_fuse))

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, xs: Sequence[torch.Tensor], z0: torch.Tensor | None = None,
                warm_start: SolverStats | None = None) -> DEQFusionOutput:
        inj = self.inject(self._check_inputs(xs))
        xs, x_fuse = inj.xs, inj.x_fuse
        B = x_fuse.shape[0]
        # The solver state is at least float32: Anderson's small solves and the residuals need it.
        dtype = torch.promote_types(x_fuse.dtype, torch.float32)
        if warm_start is not None and z0 is None:
            z0 = self._warm_state(warm_start)
        z0 = self._check_state(z0, "z0", B, dtype)
        if z0 is None:
            z0 = torch.zeros(B, self.state_width, dtype=dtype, device=x_fuse.device)
        training = self.training and torch.is_grad_enabled()
        if not self.equilibrium:
            return self._weight_tied(z0, inj, training)
        if self.backward == "unrolled" and training:
            return self._unrolled(z0, inj, training)

        gate_means: list | None = [] if self.track_gates else None
        with torch.no_grad():
            res = self._solve(z0, inj, gate_means)
        stats = self._stats(res, gate_means)
        if warm_start is not None and warm_start.converged:
            stats.previous_state = warm_start.state   # what the next warm start extrapolates from
        z_star = res.z
        needs_graph = torch.is_grad_enabled() and (any(x.requires_grad for x in xs) or
                                                   any(p.requires_grad for p in self.parameters()))
        if not needs_graph:
            return self._output(z_star, stats, jac=None)
        jac_needed = training and self.jac_samples > 0
        if self.backward == "phantom":
            out = z_star
            for _ in range(self.phantom_steps):
                out = torch.lerp(out, self.layer(out, inj), self.phantom_damping)
            fz = None
        z = z_star.detach().requires_grad_()
        if self.backward != "phantom" or jac_needed:
            fz = self.layer(z, inj)
        jac = jacobian_loss(fz, z, self.jac_samples) if jac_needed else None
        if self.backward == "implicit":
            g0 = None
            if warm_start is not None and warm_start.backward_state is not None \
                    and warm_start.backward_state.shape == fz.shape:
                g0 = warm_start.backward_state
            out = _ImplicitGrad.apply(fz, z, self._backward_solver(stats, g0, z_star, inj))
        elif self.backward != "phantom":  # onestep; and unrolled outside training, which needs no tape
            out = fz
        return self._output(out, stats, jac)

    # torch.compile: the solver's data-dependent loop (per-sample stopping changes shapes every few steps)
    # is kept out of the compiled graph; the projections, x_fuse and the final f application are compiled.
    @torch.compiler.disable
    def _solve(self, z0, inj, gate_means) -> SolveResult:
        cache = {"rows": None, "inj": inj}
        gates = None if gate_means is None else z0.new_zeros(z0.shape[0], self.num_modalities, dtype=torch.float32)

        def f(z, rows):
            if rows is not cache["rows"]:
                cache["rows"], cache["inj"] = rows, (inj if rows is None else inj.select(rows))
            if gates is None:
                return self.layer(z, cache["inj"])
            step = []
            out = self.layer(z, cache["inj"], step)
            gates[slice(None) if rows is None else rows] = step[0]   # stopped samples keep their last gates
            gate_means.append(gates.mean(0))
            return out

        return get_solver(self.solver)(f, z0, max_iter=self.f_max_iter, tol=self.f_tol, stop=self.f_stop,
                                       **self.solver_options)

    def _backward_solver(self, stats: SolverStats, g0, z_star, inj):
        """The closure _ImplicitGrad.backward calls: solves g = g J + grad, per sample.

        J is block-diagonal over samples (GroupNorm and the gates act per sample), so samples are
        independent. Converged samples stop; once the running ones are at most half of those in the
        current graph, f is re-applied to them alone, so later VJPs cost in proportion to them.
        """
        @torch.compiler.disable
        def backward_solve(vjp, grad):
            grad = grad.detach()
            # cold start at grad, the first iterate from zero (that step's VJP would be of zeros)
            g_init = grad.clone() if g0 is None else g0.to(grad)
            # the graph's batch: all rows, or those running when f was last re-applied ("inv" maps a
            # batch row to its position there); "pos": the positions of the rows the solver runs now
            graph = {"inv": None, "size": grad.shape[0], "vjp": vjp, "buf": g_init.clone(), "pos": None, "for": None}

            def position(rows):
                return rows if graph["inv"] is None else graph["inv"][rows]

            def h(g, rows):  # g -> g J + grad on the rows still running
                if rows is None:
                    return graph["vjp"](g) + grad
                if rows is not graph["for"]:
                    if 2 * rows.numel() <= graph["size"]:
                        with torch.enable_grad():
                            z = z_star[rows].detach().requires_grad_()
                            fz = self.layer(z, inj.select(rows))
                        inv = torch.empty(grad.shape[0], dtype=torch.long, device=rows.device)
                        inv[rows] = torch.arange(rows.numel(), device=rows.device)
                        graph.update(buf=graph["buf"][position(rows)], inv=inv, size=rows.numel(),
                                     vjp=lambda v, fz=fz, z=z: torch.autograd.grad(fz, z, v, retain_graph=True)[0])
                    graph["pos"] = position(rows)
                    graph["for"] = rows
                buf, pos = graph["buf"], graph["pos"]
                buf[pos] = g
                return graph["vjp"](buf)[pos] + grad[rows]

            with torch.no_grad():
                res = get_solver(self.b_solver)(h, g_init, max_iter=self.b_max_iter, tol=self.b_tol,
                                                stop="rel", **self.b_solver_options)
            stats.backward = SolverStats.from_result(res, self.b_solver, self.b_max_iter, self.b_tol, "rel")
            stats.backward_state = res.z.detach()
            return res.z
        return backward_solve

    def _dropout_masks(self, x_fuse):
        if not (self.training and self.dropout > 0 and self.fusion is not None):
            return None, None
        keep = 1.0 - self.dropout
        masks = [torch.bernoulli(torch.full_like(x_fuse, keep)) / keep for _ in range(2)]
        return (masks[0] if self.gating else None), masks[1]

    def _stats(self, res: SolveResult, gate_means) -> SolverStats:
        stats = SolverStats.from_result(res, self.solver, self.f_max_iter, self.f_tol, self.f_stop)
        if gate_means:
            stats.gates = torch.stack(gate_means)
        stats.state = res.z.detach()
        return stats

    def _output(self, z, stats, jac) -> DEQFusionOutput:
        fused = z.view(z.shape[0], self.num_modalities + 1, self.dim)[:, -1]
        if jac is None:
            jac = z.new_zeros(())
        elif self.jac_weight > 0:
            fused = attach_aux_loss(fused, jac, self.jac_weight)
        return DEQFusionOutput(fused, jac, stats)

    def _weight_tied(self, z0, inj, training) -> DEQFusionOutput:
        """equilibrium=False: num_layers applications of f from z0, back-propagated layer by layer."""
        if self.num_layers == 0:  # the weighted-sum baseline of Table 5
            z = z0.clone()
            z.view(z.shape[0], -1, self.dim)[:, -1] = inj.x_fuse
            res = _trace_free_result(z)
            return self._output(z, self._stats(res, None), None)
        return self._unrolled(z0, inj, training, steps=self.num_layers, tol=None)

    def _unrolled(self, z0, inj, training, steps=None, tol="default") -> DEQFusionOutput:
        """Plain fixed-point iteration recorded by autograd (stops at f_tol unless tol=None)."""
        tol = self.f_tol if tol == "default" else tol
        steps = steps or self.f_max_iter
        gate_means: list | None = [] if self.track_gates else None
        z, trace = z0, []
        for k in range(steps):
            step = None if gate_means is None else []
            fz = self.layer(z, inj, step)
            if step:
                gate_means.append(step[0].mean(0))
            g = (fz - z).detach()
            abs_res = g.norm(dim=1)
            rel_res = abs_res / (fz.detach().norm(dim=1) + 1e-8)
            trace.append(rel_res.max())
            z = fz
            if tol is not None and float((rel_res if self.f_stop == "rel" else abs_res).max()) <= tol:
                break
        res = SolveResult(z.detach(), k + 1, abs_res, rel_res, trace,
                          tol is not None and bool(((rel_res if self.f_stop == "rel" else abs_res) <= tol).all()))
        jac = None
        if training and self.jac_samples and self.equilibrium:
            zl = z.detach().requires_grad_()
            jac = jacobian_loss(self.layer(zl, inj), zl, self.jac_samples)
        return self._output(z, self._stats(res, gate_means), jac)


def _trace_free_result(z):
    zero = z.new_zeros(z.shape[0])
    return SolveResult(z.detach(), 0, zero, zero, [], True)
