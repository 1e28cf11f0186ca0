"""DEQFusion: the fused feature is the fixed point of the fusion map f (``fusion_map.py``, paper Eq. 7-12),
solved jointly from zero (Eq. 14-17) by a root solver (``solvers.py``) and differentiated by the chosen
backward mode (``gradients.py``)."""
from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence

import torch

from .contraction import spectral_radius, warn_if_not_contractive
from .fusion_map import FusionMap, GateTrace, Injection, RowMap
from .gradients import WEIGHT_TIED, get_gradient
from .jacobian import attach_aux_loss, get_jac_schedule
from .norms import apply_norm, normalised_once
from .solvers import SolveConfig
from .stats import SolveResult, SolverStats

__all__ = ["DEQFusion", "DEQFusionOutput"]

# Defaults the paper does not state, chosen by measurement (docs/convergence.md, issue 10): forward cap 40 in training
# and at least EVAL_MAX_ITER in evaluation, relative tolerance 1e-2 (the paper's Fig. 4 reads convergence at 1e-2),
# the implicit backward truncated at 10 steps / 1e-3 (solved tighter, it let the spectral radius of df/dz grow past 1).
EVAL_MAX_ITER = 100

# torch.compile modes for ``compile_f``; the compiled f of each module, kept beside it (not copied or saved with it)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# DEQFusion's argument names for the fields of its two solve configs (error messages name them)
FORWARD_ARGS = dict(solver="solver", max_iter="f_max_iter", tol="f_tol", stop="f_stop", options="solver_options")
BACKWARD_ARGS = dict(solver="b_solver", max_iter="b_max_iter", tol="b_tol", stop="b_stop", options="b_solver_options")


class DEQFusionOutput(NamedTuple):
    fused: torch.Tensor       # [B, dim]
    jac_loss: torch.Tensor    # scalar; zero when not training or disabled
    stats: SolverStats


def _setting(config: str, key: str, doc: str):
    """A DEQFusion attribute that reads and (validated) replaces one field of one of its solve configs."""
    def get(self):
        return getattr(getattr(self, config), key)

    def set(self, value):
        setattr(self, config, getattr(self, config).replace(**{key: value}))
    return property(get, set, doc=doc)


class DEQFusion(FusionMap):
    """Deep Equilibrium multimodal fusion of N modality features [B, d_i] into one [B, dim].

    Args:
        input_dims, dim, num_groups, dropout, modality_blocks, fuse_block, gating: the fixed-point map
            (:class:`~deqfusion_core.fusion_map.FusionMap`): widths, GroupNorm groups, variational dropout
            inside f, and the paper's ablations of Tables 5-7.
        equilibrium: ``False``: ``num_layers`` weight-tied applications of f from zero, back-propagated
            layer by layer (``num_layers=0``: the weighted sum x_fuse), the paper's Table 5 ablation.
        solver, f_max_iter, f_tol, f_stop, solver_options: forward root solver (``anderson``, ``broyden``,
            ``fixed_point``), its cap, tolerance, stopping on ``rel`` or ``abs`` residual, and its options
            (e.g. ``{"m": 6, "lam": 1e-4, "beta": 1.0}`` for Anderson). Kept as ``forward_solve``.
        backward: ``implicit`` (implicit differentiation with its own solver ``b_solver``, ``b_max_iter``,
            ``b_tol``, ``b_solver_options``, kept as ``backward_solve``), ``phantom`` (``phantom_steps`` damped
            unrolled steps from z*, damping ``phantom_damping``), ``onestep`` (Jacobian-free: one step of f
            from z*) or ``unrolled`` (plain fixed-point iteration recorded by autograd: the paper's
            weight-tied comparison). See ``gradients.py``.
        jac_samples: Hutchinson probes for the Jacobian term (0 disables it). Zero in eval mode.
        jac_term: ``full`` (||df/dz||_F^2, the paper's, appendix C after Bai et al. 2021) or ``diagonal`` (ours: only the blocks d f_i / d z_i and
            d f_fuse / d z_fuse, which decide the spectral radius; the cross-modal d f_fuse / d z_i is not penalised;
            see ``jacobian.jacobian_loss`` and docs/convergence.md).
        jac_weight: if > 0, ``jac_weight * jac_loss`` is attached to the fused tensor's backward so an
            unmodified ``loss.backward()`` includes it (then do not add ``jac_loss`` to the loss yourself).
        track_gates: record the mean gate value per modality at each solver step (``stats.gates``).
        jac_schedule, jac_weight_final, jac_schedule_steps: the Jacobian weight over training (ours; the paper
            keeps it fixed): a schedule of ``jacobian.JAC_SCHEDULES`` (``constant``, ``linear``, ``cosine``) from
            the start weight (``jac_weight``, or an integration's own) to ``jac_weight_final`` over
            ``jac_schedule_steps`` training forwards. The count is the buffer ``jac_forwards`` (kept in
            checkpoints; only registered for a schedule other than ``constant``); ``current_jac_weight`` is the
            weight of the latest training forward, ``jac_weight_at(start)`` the same from another start weight.
        f_max_iter_eval: the forward iteration cap in eval mode (``not self.training``); ``None``: the larger of
            ``f_max_iter`` and 100.
            Ours (the paper uses one cap). ``stats.max_iter`` reports the cap a forward used.
        spectral_radius_iters: if > 0, after each forward solve estimate the spectral radius of df/dz at z*
            per sample by that many power iterations on the VJP (``contraction.spectral_radius``; no gradient,
            one f application and ``spectral_radius_iters`` VJPs) into ``stats.spectral_radius`` [B], and warn
            (:class:`~deqfusion_core.contraction.NotContractiveWarning`) when its max is >= 1. 0: off.
        norm, norm_options: a normalisation of f's parameters inside the fixed-point loop (``norms.NORMS``; None or
            ``"none"`` (to override an integration's default from the command line):
            none, the paper's f), with its options. ``weight`` and ``spectral``: torch's weight / spectral
            normalisation of lin1, lin2, gate and fuse, the usual DEQ norms; measured on this f they do NOT bound
            the spectral radius rho of df/dz at z* (every Linear is followed by a GroupNorm that undoes its
            scale). ``contractive`` (ours, not the paper's): every GroupNorm gain in f bounded by
            ``max_gain`` (default 0.25) as ``max_gain * tanh(w / max_gain)``, and spectral normalisation of lin2,
            gate and fuse (``spectral=True``); it scales the fused output's per-group spread down to at most
            ``max_gain``. Measured at dim 64, 4 groups, batch 32, float64, rho at the samples Anderson solves
            (100 power iterations), initial weights as they are and stressed (GroupNorm gains x2 to x4, Linear
            weights x3, GroupNorm biases N(0, 1)): plain and ``spectral`` rho up to 2.5, 8 to 19 of 32 samples
            reached by plain iteration as they are and none stressed; ``contractive`` rho max 0.91, every sample
            reached (``max_gain=0.5``: max 1.11, one sample not).
            A measured property, not a proof: the bound acts relative to the injection's scale. Changes the
            state_dict's names of the normalised parameters (``parametrizations.weight.original``, torch's names).
            Held without torch parametrizations (``norms``), so a normed model pickles (``torch.save(model)``).
        correction_steps: fixed-point correction (Bai et al. 2022, "Deep Equilibrium Optical Flow
            Estimation"; TorchDEQ's ``fp_correction``); 0: off. In training, the forward solve keeps its best
            iterate so far z_k after each of ``correction_steps`` evenly spaced steps inside the cap
            (``solvers.snapshot_steps``; a solve that stops earlier repeats its result), and
            ``stats.iterates`` holds, in solve order, the fused part of f(z_k) [B, dim] with z_k detached: a
            one-step gradient through f for each. Train on them with
            ``correction.correction_loss(loss_fn, [*out.stats.iterates, out.fused])`` (weights gamma^(K-k),
            the final output 1). Costs one f application per kept iterate; eval forwards keep none.

        compile_f: None (default) or a ``torch.compile`` mode (``default``, ``reduce-overhead``: CUDA graphs,
            ``max-autotune``...): f as the forward solver applies it, without autograd, is compiled
            (``loop_layer``); every gradient (implicit backward, Jacobian term, the other modes) applies eager f,
            so training gives eager's gradients (tests/test_cuda.py). For CUDA graphs give the solver fixed
            shapes: ``solver_options`` ``{"compact": False, "check_every": k}``. Ours (issue 14), not the paper's.

        modality_dropout: in training, each modality of each sample is dropped (marked absent, as by ``present``)
            with probability p in [0, 1), on top of any given mask; a sample whose draw would drop all its present
            modalities keeps one of them, chosen uniformly. No effect in eval. Ours (issue 13), not the paper's.

    ``forward(xs, z0=None, warm_start=None, present=None)`` returns ``DEQFusionOutput(fused, jac_loss, stats)``.
    ``present`` [B, N] bool marks which modality of each sample is there (None: all; an entry ``xs[i] = None``:
    modality i absent from the whole batch). For a sample, an absent modality takes no part in the equilibrium
    (its block is not applied and its state held at zero; it is left out of x_fuse and of the gate's sum, see
    ``fusion_map``), so whatever its input holds (zeros, NaN) changes nothing and its gradient is zero. Every
    sample needs at least one present modality (else ``ValueError``). A mask with every entry True is the same
    as None: bit-identical results (checking it costs one host synchronisation per forward with a mask).
    ``z0`` is an initial state (e.g. ``stats.state`` of an earlier call on the same samples);
    ``warm_start`` is an earlier call's stats, warm-starting both the forward and the backward solve; when
    that call was itself warm-started and both forward solves converged, the forward starts from the
    extrapolation ``2 z*_t - z*_{t-1}`` (a secant predictor: over training steps on the same samples the
    fixed point moves smoothly; ``extrapolate_warm_start=False`` starts from ``z*_t``).
    """

    solver = _setting("forward_solve", "solver", "forward root solver")
    f_max_iter = _setting("forward_solve", "max_iter", "forward iteration cap")
    f_tol = _setting("forward_solve", "tol", "forward tolerance")
    f_stop = _setting("forward_solve", "stop", "forward stopping rule: 'rel' or 'abs' residual")
    solver_options = _setting("forward_solve", "options", "forward solver options")
    b_solver = _setting("backward_solve", "solver", "backward (implicit) root solver")
    b_max_iter = _setting("backward_solve", "max_iter", "backward iteration cap")
    b_tol = _setting("backward_solve", "tol", "backward tolerance (relative residual)")
    b_solver_options = _setting("backward_solve", "options", "backward solver options")

    def __init__(self, input_dims: Sequence[int], dim: int | None = None, *, num_groups: int = 4,
                 dropout: float = 0.0, modality_blocks: bool = True, fuse_block: bool = True,
                 gating: bool | str = True, x_fuse: str = "weighted_sum", equilibrium: bool = True, num_layers: int = 1,
                 solver: str = "anderson", f_max_iter: int = 40, f_tol: float = 1e-2, f_stop: str = "rel",
                 solver_options: dict | None = None, backward: str = "implicit", b_solver: str | None = None,
                 b_max_iter: int = 10, b_tol: float = 1e-3, b_solver_options: dict | None = None,
                 phantom_steps: int = 5, phantom_damping: float = 0.8,
                 jac_samples: int = 1, jac_weight: float = 0.0, jac_term: str = "full", track_gates: bool = False,
                 extrapolate_warm_start: bool = True, f_max_iter_eval: int | None = None,
                 spectral_radius_iters: int = 0, jac_schedule: str = "constant",
                 jac_weight_final: float | None = None, jac_schedule_steps: int = 0, norm: str | None = None,
                 norm_options: dict | None = None, correction_steps: int = 0, modality_dropout: float = 0.0,
                 compile_f: str | None = None):
        super().__init__(input_dims, dim, num_groups=num_groups, dropout=dropout, modality_blocks=modality_blocks,
                         fuse_block=fuse_block, gating=gating, x_fuse=x_fuse)
        norm = None if norm == "none" else norm      # "none": no norm, where None means "not given" (-o norm=none)
        apply_norm(self, norm, norm_options)
        self.norm, self.norm_options = norm, dict(norm_options or {})
        self.forward_solve = SolveConfig(solver, f_max_iter, f_tol, f_stop, dict(solver_options or {}),
                                         argnames=FORWARD_ARGS)
        self.backward_solve = SolveConfig(b_solver or solver, b_max_iter, b_tol, "rel", dict(b_solver_options or {}),
                                          argnames=BACKWARD_ARGS)
        get_gradient(backward)
        if not isinstance(phantom_steps, int) or phantom_steps < 1:
            raise ValueError(f"phantom_steps: must be an int >= 1, got {phantom_steps!r}")
        if not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers: must be an int >= 0, got {num_layers!r}")
        if jac_term not in ("full", "diagonal"):
            raise ValueError(f"jac_term: 'full' or 'diagonal', got {jac_term!r}")
        self.jac_term = jac_term
        if not isinstance(jac_samples, int) or jac_samples < 0:
            raise ValueError(f"jac_samples: must be an int >= 0, got {jac_samples!r}")
        if jac_weight < 0:
            raise ValueError(f"jac_weight: must be >= 0, got {jac_weight!r}")
        if f_max_iter_eval is not None and (not isinstance(f_max_iter_eval, int) or isinstance(f_max_iter_eval, bool)
                                            or f_max_iter_eval < 1):
            raise ValueError(f"f_max_iter_eval: must be None or an int >= 1, got {f_max_iter_eval!r}")
        if not isinstance(spectral_radius_iters, int) or isinstance(spectral_radius_iters, bool) \
                or spectral_radius_iters < 0:
            raise ValueError(f"spectral_radius_iters: must be an int >= 0, got {spectral_radius_iters!r}")
        get_jac_schedule(jac_schedule)
        if jac_schedule != "constant":
            if not isinstance(jac_weight_final, (int, float)) or isinstance(jac_weight_final, bool) \
                    or jac_weight_final < 0:
                raise ValueError(f"jac_weight_final: schedule {jac_schedule!r} needs a number >= 0, "
                                 f"got {jac_weight_final!r}")
            if not isinstance(jac_schedule_steps, int) or isinstance(jac_schedule_steps, bool) \
                    or jac_schedule_steps < 1:
                raise ValueError(f"jac_schedule_steps: schedule {jac_schedule!r} needs an int >= 1, "
                                 f"got {jac_schedule_steps!r}")
            self.register_buffer("jac_forwards", torch.zeros((), dtype=torch.long))
        if not isinstance(correction_steps, int) or isinstance(correction_steps, bool) or correction_steps < 0:
            raise ValueError(f"correction_steps: must be an int >= 0, got {correction_steps!r}")
        if correction_steps and not equilibrium:
            raise ValueError("correction_steps: needs equilibrium=True (the weight-tied ablation has no solve)")
        if not isinstance(modality_dropout, (int, float)) or isinstance(modality_dropout, bool) \
                or not 0 <= modality_dropout < 1:
            raise ValueError(f"modality_dropout: must be a number in [0, 1), got {modality_dropout!r}")
        self.modality_dropout = float(modality_dropout)
        if compile_f is not None and compile_f not in COMPILE_MODES:
            raise ValueError(f"compile_f: expected None or one of {COMPILE_MODES} (torch.compile modes), got {compile_f!r}")
        self.compile_f = compile_f
        if not 0 < phantom_damping <= 1:
            raise ValueError(f"phantom_damping: must be in (0, 1], got {phantom_damping!r}")
        self.equilibrium, self.num_layers = equilibrium, num_layers
        self.backward, self.phantom_steps, self.phantom_damping = backward, phantom_steps, phantom_damping
        self.jac_samples, self.jac_weight, self.track_gates = jac_samples, jac_weight, track_gates
        self.extrapolate_warm_start = extrapolate_warm_start
        self.f_max_iter_eval, self.spectral_radius_iters = f_max_iter_eval, spectral_radius_iters
        self.correction_steps = correction_steps
        self.jac_schedule, self.jac_weight_final, self.jac_schedule_steps = jac_schedule, jac_weight_final, \
            jac_schedule_steps

    def extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, dim={self.dim}, solver={self.solver}, f_max_iter={self.f_max_iter}, "
                f"f_tol={self.f_tol}, backward={self.backward}")

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, xs: Sequence[torch.Tensor | None], z0: torch.Tensor | None = None,
                warm_start: SolverStats | None = None, present: torch.Tensor | None = None) -> DEQFusionOutput:
        # with a norm, the normalised weights are computed once per forward: the solve sees one fixed f
        if self.norm is None:
            return self._forward(xs, z0, warm_start, present)
        with normalised_once(self):
            return self._forward(xs, z0, warm_start, present)

    def _forward(self, xs, z0, warm_start, present) -> DEQFusionOutput:
        xs, present = self._check_inputs(xs, present)
        inj = self.inject(xs, present)
        if self.training and self.jac_schedule != "constant":
            with torch.no_grad():
                self.jac_forwards += 1
        z0 = self._initial_state(inj, z0, warm_start)
        gradient = get_gradient(self.backward) if self.equilibrium else WEIGHT_TIED
        z, res, jac, backward, solved = gradient(self, z0, inj, warm_start)
        previous = warm_start.state if solved and warm_start is not None and warm_start.converged else None
        rho = None
        if self.spectral_radius_iters and self.equilibrium:
            rho = spectral_radius(self.layer, res.z, inj, self.spectral_radius_iters)
            warn_if_not_contractive(rho)
        iterates = None
        if self.correction_steps and res.iterates and self.training and torch.is_grad_enabled():
            iterates = [self.fused(self.layer(zk.detach(), inj)) for zk in res.iterates]
        stats = self.active_solve.stats(res, state=res.z.detach(), previous_state=previous,
                                        backward_report=backward, spectral_radius=rho, iterates=iterates)
        fused = self.fused(z)
        if jac is None:
            jac = z.new_zeros(())
        elif self.current_jac_weight > 0:
            fused = attach_aux_loss(fused, jac, self.current_jac_weight)
        return DEQFusionOutput(fused, jac, stats)

    # torch.compile: the solver's data-dependent loop (per-sample stopping changes shapes every few steps)
    # is kept out of the compiled graph; the projections, x_fuse and the final f application are compiled.
    @torch.compiler.disable
    def solve(self, z0: torch.Tensor, inj: Injection) -> SolveResult:
        """The forward root solve from z0, without an autograd tape (``forward_solve`` settings)."""
        gates = GateTrace(z0.shape[0], self.num_modalities, z0.device, inj.present is not None) \
            if self.track_gates else None
        keep = self.correction_steps if self.training and torch.is_grad_enabled() else 0
        with torch.no_grad():
            res = self.active_solve.run(RowMap(self.loop_layer(), inj, gates), z0, keep)
        res.gates = [] if gates is None else gates.means
        return res

    def loop_layer(self):
        """f as the forward solver applies it: ``layer``, or with ``compile_f`` its torch.compile'd version
        (compiled once per module; applied without autograd only: gradients go through eager ``layer``). Under CUDA graphs (``reduce-overhead``) each call
        marks a new step and returns a copy of the graph's output, which the next replay overwrites."""
        if self.compile_f is None:
            return self.layer
        compiled = _COMPILED.get(self)
        if compiled is None:
            fn = torch.compile(self.layer, mode=self.compile_f)
            if self.compile_f == "reduce-overhead":
                def compiled(z, inj, gate_means=None, fn=fn):
                    torch.compiler.cudagraph_mark_step_begin()
                    return fn(z, inj, gate_means).clone()
            else:
                compiled = fn
            _COMPILED[self] = compiled
        return compiled

    def jac_weight_at(self, start: float) -> float:
        """The scheduled Jacobian weight of the latest training forward (before any: of the first), starting
        from ``start`` (``jac_weight``, or an integration adapter's own weight)."""
        if self.jac_schedule == "constant":
            return start
        step = max(int(self.jac_forwards) - 1, 0)
        return get_jac_schedule(self.jac_schedule)(start, self.jac_weight_final, step, self.jac_schedule_steps)

    @property
    def current_jac_weight(self) -> float:
        """``jac_weight`` as scheduled at the latest training forward (``jac_weight`` without a schedule)."""
        return self.jac_weight_at(self.jac_weight)

    @property
    def active_solve(self) -> SolveConfig:
        """The forward solve's settings for the current mode: ``forward_solve``, with the cap ``f_max_iter_eval``
        in eval mode when that is set."""
        cap = self.f_max_iter_eval
        if cap is None:
            cap = max(self.forward_solve.max_iter, EVAL_MAX_ITER)
        if self.training or cap == self.forward_solve.max_iter:
            return self.forward_solve
        cached = self.__dict__.get("_eval_solve")
        if cached is None or cached[0] is not self.forward_solve or cached[1] != cap:
            cached = (self.forward_solve, cap, self.forward_solve.replace(max_iter=cap))
            self.__dict__["_eval_solve"] = cached
        return cached[2]

    # -- inputs and the initial state -----------------------------------------------------------------
    def _check_inputs(self, xs, present=None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The inputs (a ``None`` entry: zeros, that modality absent from the whole batch) and the checked mask
        (None when every modality of every sample is present: then f is exactly the unmasked one)."""
        if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
            raise TypeError(f"xs: expected a list of {self.num_modalities} tensors [B, d_i], got {type(xs).__name__}")
        if len(xs) != self.num_modalities:
            raise ValueError(f"xs: expected {self.num_modalities} modality tensors (input_dims={self.input_dims}), "
                             f"got {len(xs)}")
        missing = [i for i, x in enumerate(xs) if x is None]
        if len(missing) == len(xs):
            raise ValueError("xs: every modality is None; at least one must be given")
        ref = self._check_tensors(xs)
        xs = [ref.new_zeros(ref.shape[0], d) if x is None else x for x, d in zip(xs, self.input_dims)]
        present = self._check_present(present, ref.shape[0], missing)
        return xs, self._drop_modalities(present, ref.shape[0])

    def _check_present(self, present, batch: int, missing: list[int]) -> torch.Tensor | None:
        n, device = self.num_modalities, self.bias.device
        if present is None and not missing:
            return None
        if present is None:
            present = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:
            if not isinstance(present, torch.Tensor):
                raise TypeError(f"present: expected a bool tensor [B, {n}], got {type(present).__name__}")
            if present.dtype != torch.bool:
                raise TypeError(f"present: expected dtype torch.bool, got {present.dtype}")
            if present.shape != (batch, n):
                raise ValueError(f"present: expected shape [{batch}, {n}] (batch, modalities), got "
                                 f"{list(present.shape)}")
            if present.device != device:
                raise TypeError(f"present: on {present.device}, but DEQFusion's parameters are on {device}")
            if missing:
                given = present[:, missing].any(0).tolist()
                if any(given):
                    i = missing[given.index(True)]
                    raise ValueError(f"present: marks modality {i} present for some sample, but xs[{i}] is None")
        if missing:
            present = present.clone()
            present[:, missing] = False
        everything, filled = torch.stack([present.all(), present.any(1).all()]).tolist()   # one host sync
        if not filled:
            rows = (~present.any(1)).nonzero()[:, 0].tolist()
            raise ValueError(f"present: sample(s) {rows[:10]} have no modality present; at least one is needed")
        return None if everything else present

    def _drop_modalities(self, present: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """``modality_dropout`` in training: each present modality of each sample dropped with probability p;
        a sample whose draw drops all keeps one of its present modalities, chosen uniformly."""
        p = self.modality_dropout
        if not (self.training and p > 0):
            return present
        ref = self.bias
        if present is None:
            present = torch.ones(batch, self.num_modalities, dtype=torch.bool, device=ref.device)
        kept = present & (torch.rand(present.shape, device=ref.device) >= p)
        pick = torch.rand(present.shape, device=ref.device).masked_fill(~present, -1.0).argmax(1, keepdim=True)
        rescue = ~kept.any(1, keepdim=True) & torch.zeros_like(present).scatter_(1, pick, True)
        return kept | rescue

    def _check_tensors(self, xs) -> torch.Tensor:
        """Check the given (not None) tensors; returns the first."""
        ref = None
        param = self.bias
        for i, (x, d) in enumerate(zip(xs, self.input_dims)):
            if x is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"xs[{i}]: expected a tensor, got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != d:
                raise ValueError(f"xs[{i}]: expected shape [B, {d}] (input_dims[{i}]), got {list(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"xs[{i}]: expected a floating-point tensor, got {x.dtype}")
            if x.device != param.device:
                raise TypeError(f"xs[{i}]: on {x.device}, but DEQFusion's parameters are on {param.device}")
            if ref is None:
                if x.shape[0] == 0:   # nothing to solve, and every statistic of the solve would be of no sample
                    raise ValueError(f"xs[{i}]: empty batch (shape {list(x.shape)}): DEQFusion needs at least one "
                                     "sample")
                ref, first = x, i
                continue
            if x.shape[0] != ref.shape[0]:
                raise ValueError(f"xs[{i}]: batch size {x.shape[0]} differs from xs[{first}]'s {ref.shape[0]}")
            if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"xs[{i}]: dtype {x.dtype} differs from xs[{first}]'s {ref.dtype}")
        return ref

    def _initial_state(self, inj: Injection, z0: torch.Tensor | None, warm: SolverStats | None) -> torch.Tensor:
        """z0, else the warm start's (extrapolated) state, else zeros; at least float32 (Anderson's small
        solves and the residuals need it). Absent modalities' parts are zero (``Injection.state_mask``): their
        states are held there, so they add nothing to the residual norms."""
        x_fuse = inj.x_fuse
        batch, dtype = x_fuse.shape[0], torch.promote_types(x_fuse.dtype, torch.float32)
        if warm is not None and z0 is None:
            z0 = self._warm_state(warm)
        if z0 is None:
            return torch.zeros(batch, self.state_width, dtype=dtype, device=x_fuse.device)
        if not isinstance(z0, torch.Tensor) or z0.shape != (batch, self.state_width):
            shape = list(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__
            raise ValueError(f"z0: expected a state of shape [{batch}, {self.state_width}], got {shape}")
        keep = inj.state_mask(self.dim)
        z0 = z0.detach().to(dtype)
        return z0 if keep is None else torch.where(keep, z0, 0.0)

    def _warm_state(self, warm: SolverStats) -> torch.Tensor | None:
        z, prev = warm.state, warm.previous_state
        if not self.extrapolate_warm_start or prev is None or z is None or prev.shape != z.shape \
                or not warm.converged:
            return z
        return torch.lerp(prev, z, 2.0)   # 2 z - prev
