"""`deqfusion bench`: what one f, one VJP and a training step cost at given shapes, against f's own matrix
products, in two regimes: the given shapes (default BRCA's: batch 612, 3 modalities, width 500) and small
ones (batch 64, 6 modalities x 64), where per-op overhead rather than arithmetic sets the cost.

The side-by-side comparison with the paper authors' reference, TorchDEQ and unrolled autograd is
``benchmarks/bench_core.py``; both start from :func:`contractive_problem`.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels
from .fusion_map import RowMap
from .module import DEQFusion
from .stats import DEQConvergenceError
from .vjp import FusedVJP, tape_for

SMALL = dict(batch=64, modalities=6, dim=64)
# what the bench sets itself in each measurement, so not a fusion option it takes (``deqfusion bench -o``)
BENCH_SETS = ("f_tol", "b_tol", "f_max_iter", "b_max_iter", "jac_weight", "jac_samples")


def check_options(options: dict) -> dict:
    """The fusion options a bench run takes (``-o KEY=VALUE``: solver, norm, gating, ...), or ValueError naming one
    that the bench sets itself or that DEQFusion does not take."""
    from .options import FusionOptions

    for key in options:
        if key in BENCH_SETS:
            raise ValueError(f"-o {key}: the bench sets the tolerances, caps and Jacobian term itself "
                             f"({', '.join(BENCH_SETS)}); give the other DEQFusion options")
    FusionOptions(options, where="-o")     # the names DEQFusion takes (OptionError, a ValueError, naming the key)
    return dict(options)


# the check that ends the warm-up: the tightest forward tolerance and the iteration cap `deqfusion bench` solves with
# (the fusion's own solver), and the cap benchmarks/bench_core.py gives plain fixed-point iteration (its fixed_point
# configurations and its unrolled ground truth iterate f itself, which converges only where f contracts)
CHECK_TOL, CHECK_MAX_ITER, CHECK_PLAIN_MAX_ITER = 1e-6, 105, 200
CHECK = f"reach {CHECK_TOL:g} within {CHECK_MAX_ITER} steps of its solver and {CHECK_PLAIN_MAX_ITER} of plain iteration"


class Problem(NamedTuple):
    fusion: DEQFusion
    xs: list
    head: torch.nn.Linear
    labels: torch.Tensor
    warmup_steps: int       # the Jacobian-regularised steps taken
    converged: bool | None  # the warm-up's check (problem_converges) held for every row (None: unchecked)


def forward_converges(fusion: DEQFusion, xs, tol: float = CHECK_TOL, max_iter: int = CHECK_MAX_ITER,
                      solver: str | None = None) -> bool:
    """Whether the fusion's own forward solver (``solver``: that one instead, without options), from zero, reaches
    ``tol`` within ``max_iter`` steps for every row (a solve that diverges to non-finite values does not)."""
    config = fusion.forward_solve.replace(tol=tol, max_iter=max_iter)
    if solver is not None:
        config = config.replace(solver=solver, options={})
    with torch.no_grad():
        inj = fusion.inject(xs)
        z0 = torch.zeros(xs[0].shape[0], fusion.state_width, device=xs[0].device, dtype=xs[0].dtype)
        try:
            return bool(config.run(RowMap(fusion.layer, inj), z0).converged)
        except DEQConvergenceError:
            return False


def problem_converges(fusion: DEQFusion, xs) -> bool:
    """The warm-up's check: the fusion's own solver reaches ``CHECK_TOL`` within ``CHECK_MAX_ITER`` steps, and plain
    fixed-point iteration within ``CHECK_PLAIN_MAX_ITER``, for every row. Anderson alone also converges at rows where
    f does not contract (spectral radius > 1 at the fixed point), where iterating f diverges."""
    return forward_converges(fusion, xs) and forward_converges(fusion, xs, max_iter=CHECK_PLAIN_MAX_ITER,
                                                               solver="fixed_point")


def contractive_problem(batch=612, input_dims=(500, 500, 500), dim=500, classes=5, warmup_steps=10,
                        jac_weight=100.0, device="cpu", seed=0, max_warmup_steps=100, **fusion_options) -> Problem:
    """A DEQFusion at the given shapes whose f was made contractive by Jacobian-regularised training steps
    (weight 100, the reference BRCA code's default), with fixed inputs, a frozen linear head and labels.

    ``warmup_steps`` steps first; then, while the forward solve at its inputs does not converge
    (:func:`problem_converges`: tolerance 1e-6 within 105 steps of the fusion's solver, what `deqfusion bench`
    solves with, and within 200 of plain iteration, what bench_core's fixed-point configurations get), one more
    step at a time, up to ``max_warmup_steps`` in all (<= ``warmup_steps``: no check). Ten steps suffice at BRCA's
    shapes (seeds 0 and 1); at batch 64 and width 64 some rows' f stays non-contractive after ten (spectral radius
    up to 1.5 at their fixed point) and the regulariser's Hutchinson estimate does not improve every step, so a
    fixed count either over-trains the large problem or leaves the small one unsolved. The steps run torch ops and
    autograd only (``kernels.torch_ops``), so the problem is the same whatever the CPU kernels' rounding.
    ``fusion_options``: other DEQFusion options (:func:`check_options`; default 4 groups)."""
    torch.manual_seed(seed)
    fusion = DEQFusion(list(input_dims), dim, **{"num_groups": 4, **check_options(fusion_options)}, jac_samples=2,
                       f_max_iter=30, b_max_iter=30, jac_weight=jac_weight).to(device)
    xs = [torch.randn(batch, d, device=device) for d in input_dims]
    head = torch.nn.Linear(dim, classes).to(device)
    labels = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.Adam(list(fusion.parameters()) + list(head.parameters()), lr=1e-3)
    steps, converged = 0, None

    def step():
        nonlocal steps
        opt.zero_grad()
        F.cross_entropy(head(fusion(xs).fused), labels).backward()
        opt.step()
        steps += 1

    with kernels.torch_ops():
        for _ in range(warmup_steps):
            step()
        if max_warmup_steps > warmup_steps:
            while not (converged := problem_converges(fusion, xs)) and steps < max_warmup_steps:
                step()
    fusion.jac_weight = 0.0
    head.requires_grad_(False)
    return Problem(fusion, xs, head, labels, steps, converged)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timer(device):
    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t
    return timed


def f_cost(batch: int, modalities: int, dim: int, *, steps: int = 30, repeats: int = 20, device="cpu",
           seed: int = 0, compile_f: str | None = None, **fusion_options) -> dict:
    """One application of f (no autograd, as in a forward solver step), one VJP of f in z as a backward solver
    step computes it (f's hand-derived VJP where it applies, :mod:`~deqfusion_core.vjp`, else autograd's; autograd's
    is timed too) and a training step whose forward and backward solves run exactly ``steps`` steps each (tolerance
    0, no Jacobian term), against f's own 2N+2 matrix products [batch, dim] x [dim, dim] (the VJP's are as
    many). Each repeat times them one after the other, so load changes them alike; medians in seconds."""
    torch.manual_seed(seed)
    m = DEQFusion([dim] * modalities, dim, **{"num_groups": 4, **check_options(fusion_options)}, f_max_iter=steps,
                  b_max_iter=steps, f_tol=1e-300, b_tol=1e-300, jac_samples=0, jac_weight=0.0).to(device)
    xs = [torch.randn(batch, dim, device=device) for _ in range(modalities)]
    head = torch.nn.Linear(dim, 5).to(device)
    labels = torch.randint(0, 5, (batch,), device=device)
    a, w = torch.randn(batch, dim, device=device), torch.randn(dim, dim, device=device)
    products = 2 * modalities + 2
    # ``compile_f``: one f torch.compile'd with that mode (as the forward solver applies it); the VJP and the training
    # step stay eager (DEQFusion's gradients always apply eager f, tests/test_cuda.py)
    layer = m.layer if compile_f is None else torch.compile(m.layer, mode=compile_f)
    with torch.no_grad():
        inj = m.inject(xs)
    z = torch.randn(batch, m.state_width, device=device)
    zg = z.clone().requires_grad_()
    tape = tape_for(m, z, inj)
    fz = m.layer(zg, inj, tape=tape)       # as the implicit backward applies f at z*
    v = torch.randn_like(fz)
    fast = None if tape is None else FusedVJP(m, z, inj, tape)
    autograd_vjp = lambda: torch.autograd.grad(fz, zg, v, retain_graph=True)
    solver_vjp = autograd_vjp if fast is None else (lambda: fast(v))
    parts = {"step": [], "forward": [], "backward": []}

    def step():
        m.zero_grad()
        t = time.perf_counter()
        out = m(xs)
        _sync(device)
        parts["forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        F.cross_entropy(head(out.fused), labels).backward()
        _sync(device)
        parts["backward"].append(time.perf_counter() - t)

    timed = _timer(device)
    rows = {"matmuls": [], "f": [], "vjp": [], "autograd_vjp": []}
    for i in range(repeats + 2):
        with torch.no_grad():
            t_mm = timed(lambda: [torch.mm(a, w) for _ in range(products)])
            t_f = timed(lambda: layer(z, inj))
        t_vjp = timed(solver_vjp)
        t_autograd = t_vjp if fast is None else timed(autograd_vjp)    # the solver's VJP is autograd's: once
        t_step = timed(step) if (i - 2) % 4 == 0 else None   # a step costs about 2 x steps f: fewer of them
        if i >= 2:   # warm-up
            rows["matmuls"].append(t_mm), rows["f"].append(t_f), rows["vjp"].append(t_vjp)
            rows["autograd_vjp"].append(t_autograd)
            if t_step is not None:
                parts["step"].append(t_step)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return dict(batch=batch, modalities=modalities, dim=dim, matmuls=products, device=str(device), compile_f=compile_f,
                one_f_s=med["f"], one_vjp_s=med["vjp"], vjp=("hand-derived" if fast is not None else "autograd"),
                autograd_vjp_s=med["autograd_vjp"], matmuls_s=med["matmuls"],
                f_over_matmuls=med["f"] / med["matmuls"], vjp_over_matmuls=med["vjp"] / med["matmuls"],
                train_step_steps=steps, train_step_s=statistics.median(parts["step"]),
                train_forward_s=statistics.median(parts["forward"][-len(parts["step"]):]),
                train_backward_s=statistics.median(parts["backward"][-len(parts["step"]):]))


def cpu_model() -> str:
    """The CPU's model name and widest vector unit (/proc/cpuinfo; else the platform's): ratios to matrix products
    depend on them."""
    info = kernels.cpu_info()
    flags = set(info.get("flags", "").split())
    simd = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    model = info.get("model name") or platform.processor() or platform.machine()
    return f"{model}, {simd}" if simd else model


def machine() -> dict:
    """Where a timing ran: torch, threads, the CPU model, the load average (timings under load > cores are noisy)
    and the project's commit (``+dirty`` with uncommitted changes; None outside a git checkout)."""
    from .compare.study import project_commit
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), cpu=cpu_model(),
                load_avg_1m=os.getloadavg()[0], f_solver_steps=kernels.status(), commit=project_commit())


def fmt_cost(r: dict) -> str:
    return (f"batch {r['batch']}, {r['modalities']} x {r['dim']}: one f {r['one_f_s'] * 1e3:.3f} ms "
            f"({r['f_over_matmuls']:.2f}x its {r['matmuls']} matrix products), one VJP {r['one_vjp_s'] * 1e3:.3f} ms "
            f"({r['vjp_over_matmuls']:.2f}x; {r.get('vjp', 'autograd')}"
            + (f", autograd's {r['autograd_vjp_s'] * 1e3:.3f} ms" if "autograd_vjp_s" in r else "")
            + f"), training step with {r['train_step_steps']}-step solves "
            f"{r['train_step_s'] * 1e3:.1f} ms (forward {r['train_forward_s'] * 1e3:.1f}, "
            f"backward {r['train_backward_s'] * 1e3:.1f})")


def main(args) -> int:
    dims = list(args.dims)
    try:
        options = check_options(dict(getattr(args, "fusion_option", None) or []))
    except ValueError as e:
        raise SystemExit(f"deqfusion bench: {e}") from None
    report = {"machine": machine(), "fusion_options": options, "cost": {}}
    print(f"{report['machine']}" + (f"\nfusion options: {options}" if options else ""))
    regimes = {"given": dict(batch=args.batch, modalities=len(dims), dim=args.dim), "small": SMALL}
    for name, shape in regimes.items():
        r = f_cost(**shape, repeats=args.repeats, device=args.device, compile_f=getattr(args, "compile_f", None),
                   **options)
        report["cost"][name] = r
        print(f"{name}: {fmt_cost(r)}", flush=True)
    fusion, xs, head, labels, warmup, converged = contractive_problem(args.batch, dims, args.dim, device=args.device,
                                                                      **options)
    print(f"\nsolves: DEQFusion input_dims={dims} dim={args.dim} batch={args.batch} on {args.device}, "
          f"after {warmup} Jacobian-regularised steps" + ("" if converged else
          f" (its forward solve still does not {CHECK}: f is not contractive "
          "at every row's fixed point; the timings below are of non-converged solves)"))
    report["problem"], report["solves"] = {"warmup_steps": warmup, "forward_converges": converged}, {}
    # (f_tol, b_tol): the defaults' speed end, and the pair that gave gradient error <= 1e-3 in benchmarks/
    for f_tol, b_tol in ((1e-3, 1e-3), (1e-4, 1e-4), (1e-6, 3e-4)):
        fusion.f_tol, fusion.b_tol = f_tol, b_tol
        fusion.f_max_iter = fusion.b_max_iter = 105
        fw, bw, stats = [], [], None
        for _ in range(args.repeats):
            fusion.zero_grad()
            _sync(args.device)
            t0 = time.perf_counter()
            out = fusion(xs)
            _sync(args.device)
            t1 = time.perf_counter()
            F.cross_entropy(head(out.fused), labels).backward()
            _sync(args.device)
            fw.append(t1 - t0)
            bw.append(time.perf_counter() - t1)
            stats = out.stats
        f, b = statistics.median(fw), statistics.median(bw)
        report["solves"][f"f_tol {f_tol:g} b_tol {b_tol:g}"] = dict(forward_s=f, backward_s=b, f_evals=stats.nstep,
                                                                   b_evals=stats.backward.nstep)
        print(f"f_tol {f_tol:g} b_tol {b_tol:g}: forward {f:.3f}s backward {b:.3f}s (train step {f + b:.3f}s, "
              f"backward/forward {b / f:.2f}); {stats}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0
