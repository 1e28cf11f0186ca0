"""Side-by-side benchmark of the DEQ fusion core at BRCA shapes (not a test).

    DEQFUSION_REFERENCE_ROOT=~/upstream/deqfusion_ref python benchmarks/bench_core.py [--quick]

Compares, in one run on the same weights and inputs: deqfusion_core, the paper authors' reference
module (loaded in memory from DEQFUSION_REFERENCE_ROOT; skipped with a reason if unset), TorchDEQ
(pip `torchdeq`) driving our layer, and unrolled autograd. Weights are made contractive by a few
Jacobian-regularised training steps first. Reports medians over --repeats runs and ratios to the
reference; writes JSON to --out.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from reference import copy_weights_to_reference, load_reference, reference_grads, reference_root  # noqa: E402

from deqfusion_core import DEQConvergenceError  # noqa: E402
from deqfusion_core.bench import (CHECK, SMALL, contractive_problem, f_cost, fmt_cost,  # noqa: E402
                                  machine)


# ----------------------------------------------------------------------------------------------- setup
# --shape presets (batch, modalities, width): BRCA as the reference code runs it; an MM-IMDB-like and a VQA-like
# fusion (two modalities; widths of MultiBench's MM-IMDB late-fusion features and MCAN-small's flattened features)
SHAPES = {"brca": (612, 3, 500), "mmimdb": (128, 2, 512), "vqa": (64, 2, 1024)}
SYNC = [lambda: None]      # torch.cuda.synchronize on CUDA (main): every timing waits for the device


def now() -> float:
    SYNC[0]()
    return time.perf_counter()


def build(args):
    return contractive_problem(args.batch, [args.dim] * args.modalities, args.dim, args.classes,
                               args.warmup_steps, device=args.device, seed=args.seed,
                               max_warmup_steps=args.max_warmup_steps)


def loss_of(fused, head, labels):
    return F.cross_entropy(head(fused), labels)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = now()
        out = fn()
        times.append(now() - t)
    return statistics.median(times), out


def param_grads(m):
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------- methods
def unrolled_ground_truth(ours, xs, head, labels, steps=300, damping=0.5):
    """Gradient of the loss through `steps` weight-tied applications of the damped map
    z <- (1 - damping) z + damping f(z) from zero: unrolled autograd (checkpointed per step, which gives
    the same gradient in O(steps) states of memory). Damping keeps the samples on which plain iteration
    oscillates (the paper's Fig. 4 weight-tied curve) converging to the same fixed point.
    Returns (gradient, max relative residual of the last step)."""
    m = copy.deepcopy(ours)
    m.zero_grad()
    inj = m.inject(xs)
    z = xs[0].new_zeros(xs[0].shape[0], m.state_width)
    step = lambda s: torch.lerp(s, m.layer(s, inj), damping)
    for _ in range(steps):
        z = checkpoint(step, z, use_reentrant=False)
    with torch.no_grad():
        fz = m.layer(z, inj)
        resid = ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()
    loss_of(z.view(z.shape[0], -1, m.dim)[:, -1], head, labels).backward()
    return param_grads(m), resid


def ours_step(m, xs, head, labels, warm=None):
    m.zero_grad()
    t0 = now()
    out = m(xs, warm_start=warm)
    t1 = now()
    loss_of(out.fused, head, labels).backward()
    t2 = now()
    return out, t1 - t0, t2 - t1


def reference_step(ref, xs, head, labels):
    ref.zero_grad()
    t0 = now()
    fused, jac, result = ref(xs)
    t1 = now()
    loss_of(fused, head, labels).backward()
    t2 = now()
    return result, t1 - t0, t2 - t1


def torchdeq_step(m, xs, head, labels, tol, max_iter):
    from torchdeq import get_deq

    deq = get_deq(f_solver="anderson", f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel",
                  b_solver="anderson", b_max_iter=max_iter, b_tol=tol, b_stop_mode="rel", ift=True)
    m.zero_grad()
    t0 = now()
    inj = m.inject(xs)
    z0 = xs[0].new_zeros(xs[0].shape[0], m.state_width)
    z_out, info = deq(lambda z: m.layer(z, inj), z0)
    z = z_out[-1]
    t1 = now()
    loss_of(z.view(z.shape[0], -1, m.dim)[:, -1], head, labels).backward()
    t2 = now()
    return info, t1 - t0, t2 - t1


# ----------------------------------------------------------------------------------------------- parts
def count_calls(fn):
    def wrapped(*a, **k):
        wrapped.calls += 1
        return fn(*a, **k)
    wrapped.calls = 0
    return wrapped


def forward_solve(args, ours, xs, R, report):
    """f evaluations and time to relative residual 1e-3, and solver overhead over bare f evaluations."""
    m = copy.deepcopy(ours).eval()
    inj = m.inject(xs)
    z0 = xs[0].new_zeros(xs[0].shape[0], m.state_width)
    with torch.no_grad():
        t_f, _ = timed(lambda: m.layer(z0 + 0.1, inj), args.repeats * 3)
        rows = {}
        m.f_tol, m.f_max_iter = 1e-3, 105
        t, out = timed(lambda: m(xs), args.repeats)
        evals = out.stats.nstep
        rows["deqfusion (per-sample rel 1e-3)"] = dict(f_evals=evals, time_s=t, overhead=t / (evals * t_f),
                                                      rel_residual_max=out.stats.rel_residual)
        if R is not None:
            ref = R.DEQFusion(m.dim, m.num_modalities, f_thres=105, b_thres=106).to(args.device)
            copy_weights_to_reference(m, ref)
            fusion_feature = inj.x_fuse
            func = count_calls(lambda z: R.list2vec(ref.func_(R.vec2list(z, [m.dim] * (m.num_modalities + 1)),
                                                               list(xs) + [fusion_feature])))

            def run_ref():
                func.calls = 0
                return R.anderson(func, z0, threshold=105, eps=1e-3, stop_mode="rel")
            t, res = timed(run_ref, args.repeats)
            rows["reference (batch rel 1e-3)"] = dict(f_evals=func.calls, time_s=t,
                                                      overhead=t / (func.calls * t_f), rel_residual_batch=res["lowest"])
            t, res = timed(lambda: (setattr(func, "calls", 0), R.anderson(func, z0, threshold=105, eps=1e-3,
                                                                         stop_mode="abs"))[1], args.repeats)
            rows["reference defaults (abs 1e-3, cap 105)"] = dict(f_evals=func.calls, time_s=t,
                                                                  overhead=t / (func.calls * t_f))
        try:
            from torchdeq import get_deq
            f = count_calls(lambda z: m.layer(z, inj))
            deq = get_deq(f_solver="anderson", f_max_iter=105, f_tol=1e-3, f_stop_mode="rel")
            t, _ = timed(lambda: (setattr(f, "calls", 0), deq(f, z0))[1], args.repeats)
            rows["torchdeq anderson (batch rel 1e-3)"] = dict(f_evals=f.calls, time_s=t, overhead=t / (f.calls * t_f))
        except ImportError as exc:
            report["skipped"].append(f"torchdeq: {exc}")
    report["one_f_s"] = t_f
    report["forward"] = rows


# (forward tolerance, backward tolerance): the forward's sets the gradient error (ReLU kinks make it jump by
# orders of magnitude between 3e-5 and 1e-5 on this problem); the backward's adds about itself
TOLERANCES = ((1e-3, 1e-3), (1e-4, 1e-4), (3e-5, 3e-4), (1e-5, 3e-4), (3e-6, 1e-4), (1e-6, 3e-4), (1e-6, 1e-4),
              (1e-6, 1e-5))
OUR_SOLVERS = {"anderson": TOLERANCES, "fixed_point": TOLERANCES[3:]}
WARM_TOLERANCES = ((1e-6, 3e-4), (1e-6, 1e-4))


def step_row(samples, grad_err, **extra):
    fw, bw = statistics.median(s[1] for s in samples), statistics.median(s[2] for s in samples)
    return dict(step_s=statistics.median(s[1] + s[2] for s in samples), forward_s=fw, backward_s=bw,
                bwd_fwd_ratio=bw / fw, grad_rel_err=grad_err, **extra)


def ours_steps(args, m, xs, head, labels):
    """``args.repeats`` training steps of ``m``, or the solver's error when a solve diverged (a row of its own:
    one configuration's divergence is a result, not the end of the run)."""
    try:
        return [ours_step(m, xs, head, labels) for _ in range(args.repeats)]
    except DEQConvergenceError as e:
        return {"failed": str(e)}


def train_steps(args, ours, xs, head, labels, R, report):
    truth, resid = unrolled_ground_truth(ours, xs, head, labels, steps=args.unrolled_steps)
    report["ground_truth"] = dict(steps=args.unrolled_steps, damping=0.5, rel_residual_max=resid)
    rows = {}
    for solver, tolerances in OUR_SOLVERS.items():
        for f_tol, b_tol in tolerances:
            m = copy.deepcopy(ours).train()
            m.solver = m.b_solver = solver
            m.f_tol, m.b_tol = f_tol, b_tol
            m.f_max_iter = m.b_max_iter = 200
            samples, name = ours_steps(args, m, xs, head, labels), f"deqfusion {solver} f {f_tol:g} b {b_tol:g}"
            if isinstance(samples, dict):
                rows[name] = samples
                continue
            st = samples[-1][0].stats
            rows[name] = step_row(samples, rel_err(param_grads(m), truth), f_evals=st.nstep, b_evals=st.backward.nstep)
    if R is not None:
        # the reference as released (its defaults: forward abs 1e-3, backward rel 1e-3), and with its solves
        # stopping at our tolerance pairs (its `eps`, relative, over the whole batch)
        variants = {"reference defaults (f abs 1e-3, b rel 1e-3)": None}
        variants.update({f"reference f {f:g} b {b:g}": (f, b) for f, b in TOLERANCES[1:]})
        for name, eps in variants.items():
            ref = R.DEQFusion(ours.dim, ours.num_modalities, f_thres=105, b_thres=106,
                              stop_mode="abs" if eps is None else "rel").to(args.device)
            if eps is not None:
                ref.f_solver = functools.partial(R.anderson, eps=eps[0])
                ref.b_solver = functools.partial(R.anderson, eps=eps[1])
            copy_weights_to_reference(ours, ref)
            ref.train()
            samples = [reference_step(ref, xs, head, labels) for _ in range(args.repeats)]
            rows[name] = step_row(samples, rel_err(reference_grads(ours, ref), truth))
    try:
        for tol in (1e-4, 1e-5):
            m = copy.deepcopy(ours).train()
            samples = [torchdeq_step(m, xs, head, labels, tol, 105) for _ in range(args.repeats)]
            rows[f"torchdeq tol {tol:g}"] = step_row(samples, rel_err(param_grads(m), truth))
    except ImportError as exc:
        report["skipped"].append(f"torchdeq: {exc}")
    m = copy.deepcopy(ours).train()
    m.backward, m.f_tol, m.f_max_iter = "unrolled", 1e-5, 105
    samples = ours_steps(args, m, xs, head, labels)
    rows["unrolled autograd to rel 1e-5"] = samples if isinstance(samples, dict) else step_row(
        samples, rel_err(param_grads(m), truth), f_evals=samples[-1][0].stats.nstep)
    report["train_step"] = rows


def warm_started(args, ours, xs, head, labels, R, report):
    """Repeated full-batch training steps (MM-Dynamics style: Adam, lr 1e-4, the same inputs every step):
    each step's forward and backward solves start from the previous step's solutions (`warm_start=stats`;
    the forward from their extrapolation along the last step, and for comparison without it).
    The gradient error of the last step is measured against a fresh unrolled ground truth."""
    rows = {}
    runs = [(solver, tols, "warm start") for tols in WARM_TOLERANCES for solver in OUR_SOLVERS]
    runs += [(solver, WARM_TOLERANCES[-1], kind) for kind in ("warm start without extrapolation", "cold start")
             for solver in OUR_SOLVERS]
    for solver, (f_tol, b_tol), kind in runs:
        warm = kind != "cold start"
        m = copy.deepcopy(ours).train()
        m.solver = m.b_solver = solver
        m.f_tol, m.b_tol = f_tol, b_tol
        m.f_max_iter = m.b_max_iter = 200
        m.extrapolate_warm_start = kind == "warm start"
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        prev, times, forward, evals = None, [], [], []
        for i in range(args.repeats + 2):   # the first two steps cannot use both warm starts
            t = now()
            out, t_forward, _ = ours_step(m, xs, head, labels, warm=prev if warm else None)
            opt.step()
            times.append(now() - t)
            forward.append(t_forward)
            evals.append((out.stats.nstep, out.stats.backward.nstep))
            prev = out.stats
        row = dict(step_s=statistics.median(times[2:]), forward_s=statistics.median(forward[2:]), f_b_evals=evals[2:])
        if warm:
            ours_step(m, xs, head, labels, warm=prev)
            truth, _ = unrolled_ground_truth(m, xs, head, labels, steps=args.unrolled_steps)
            row["grad_rel_err_last_step"] = rel_err(param_grads(m), truth)
        rows[f"deqfusion {solver} {kind}, f {f_tol:g} b {b_tol:g}"] = row
    report["warm_start"] = rows


class PeakRSS:
    """Peak resident memory growth during a block, sampled from /proc/self/statm every 0.5 ms
    (getrusage's lifetime maximum cannot see a peak below an earlier one)."""

    def __enter__(self):
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.0005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth_mib = (self.peak - self.base) / 2**20


def memory_child(args):
    """Run one method's training step in this (fresh) process; print peak RSS growth in MiB."""
    ours, xs, head, labels, _, _ = build(args)
    kind, steps = args.memory_of.split(":")
    steps = int(steps)
    if kind == "deqfusion":
        ours.f_tol = ours.b_tol = 1e-30   # force exactly `steps` iterations
        ours.f_max_iter = ours.b_max_iter = steps
        run = lambda: ours_step(ours.train(), xs, head, labels)
    else:
        R = load_reference()
        ref = R.DEQFusion(ours.dim, ours.num_modalities, f_thres=steps, b_thres=steps + 1, stop_mode="abs")
        copy_weights_to_reference(ours, ref.to(args.device))
        run = lambda: reference_step(ref.train(), xs, head, labels)
    if args.device.startswith("cuda"):     # the peak of allocated device memory over the step's own start
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    with PeakRSS() as peak:
        run()
    print(peak.growth_mib)


def memory(args, report, have_ref):
    rows = {}
    methods = ["deqfusion:10", "deqfusion:100"] + (["reference:10", "reference:100"] if have_ref else [])
    for meth in methods:
        cmd = [sys.executable, __file__, "--memory-of", meth, "--batch", str(args.batch), "--dim", str(args.dim),
               "--modalities", str(args.modalities), "--warmup-steps", "0", "--max-warmup-steps", "0",
               "--device", args.device,
               "--seed", str(args.seed)]
        # A fixed mmap threshold makes glibc return freed tensors to the OS, so resident memory tracks live
        # tensors; with its default dynamic threshold, heap fragmentation makes RSS creep with every step.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            report["skipped"].append(f"memory {meth}: {out.stderr.strip().splitlines()[-1:]}")
            continue
        rows[meth.replace(":", f" steps=")] = dict(peak_rss_growth_mib=float(out.stdout.strip().splitlines()[-1]))
    report["memory"] = rows


def cost(args, report):
    """One f and one VJP against f's own matrix products, and a training step with 30-step solves, at these
    shapes and at small ones (``deqfusion_core.bench.f_cost``)."""
    report["cost"] = {name: f_cost(**shape, repeats=max(args.repeats * 4, 8), device=args.device)
                      for name, shape in (("large", dict(batch=args.batch, modalities=args.modalities, dim=args.dim)),
                                          ("small", SMALL))}


# ----------------------------------------------------------------------------------------------- main
def summary(report):
    """The targets of the core issue, as ratios to the reference measured in the same run: at each gradient
    error bar, our fastest configuration against the reference's fastest configuration reaching it."""
    out = {}
    train = report.get("train_step", {})
    ours = {k: v for k, v in train.items() if k.startswith("deqfusion")}
    refs = {k: v for k, v in train.items() if k.startswith("reference")}

    def fastest(rows, bar):
        ok = [(v["step_s"], k) for k, v in rows.items() if "failed" not in v and v["grad_rel_err"] <= bar]
        return min(ok) if ok else None

    for bar in (1e-3, 1e-4):
        mine, theirs = fastest(ours, bar), fastest(refs, bar)
        if mine is None:
            out[f"train step at grad error <= {bar:g}"] = "not reached by the tolerances tried"
            continue
        vs = (f", {theirs[0] / mine[0]:.1f}x faster than the reference's fastest at that error "
              f"({theirs[1]}: {theirs[0]:.2f} s)") if theirs else ""
        out[f"train step at grad error <= {bar:g}"] = f"{mine[0]:.2f} s ({mine[1]}){vs}"
    for name, row in train.items():
        if "failed" in row:
            out[f"failed: {name}"] = row["failed"]
    theirs = fastest(refs, 1e-3)
    for name, row in report.get("warm_start", {}).items():
        err = row.get("grad_rel_err_last_step")
        err = f", grad error of the last step {err:.1e}" if err is not None else ""
        vs = f", {theirs[0] / row['step_s']:.1f}x faster than {theirs[1]} ({theirs[0]:.2f} s)" if theirs else ""
        out[f"repeated full-batch steps: {name}"] = f"{row['step_s']:.2f} s/step{err}{vs}"
    for name, r in report.get("cost", {}).items():
        out[f"cost ({name})"] = fmt_cost(r)
    fwd = report.get("forward", {})
    for k, v in fwd.items():
        out[f"forward solve time / (f evals x one f): {k}"] = f"{v['overhead']:.2f}"
    mem = report.get("memory", {})
    if "deqfusion steps=100" in mem and "reference steps=100" in mem:
        out["peak memory, 100 steps, ours / reference"] = (
            f"{mem['deqfusion steps=100']['peak_rss_growth_mib'] / mem['reference steps=100']['peak_rss_growth_mib']:.2f}")
    if "deqfusion steps=10" in mem and "deqfusion steps=100" in mem:
        out["peak memory, ours, 100 vs 10 steps"] = (
            f"{mem['deqfusion steps=100']['peak_rss_growth_mib']:.0f} vs {mem['deqfusion steps=10']['peak_rss_growth_mib']:.0f} MiB")
    return out


def fmt(rows):
    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), help="batch, modalities and width of a preset "
                   f"({', '.join(f'{k}: {v}' for k, v in SHAPES.items())}); default brca")
    p.add_argument("--batch", type=int, default=612)
    p.add_argument("--dim", type=int, default=500)
    p.add_argument("--modalities", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (every timing synchronises the device)")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=10, help="Jacobian-regularised steps that make f contractive")
    p.add_argument("--max-warmup-steps", type=int, default=100, help="more steps, one at a time, while the forward "
                   f"solve does not {CHECK} "
                   "(deqfusion_core.bench.contractive_problem)")
    p.add_argument("--unrolled-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="the problem's seed (weights, inputs, labels)")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")
    p.add_argument("--skip", nargs="*", default=[], choices=["cost", "forward", "train", "warm", "memory"])
    p.add_argument("--out", default="benchmarks/results/core_cpu.json")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shape:
        args.batch, args.modalities, args.dim = SHAPES[args.shape]
    if args.quick:
        args.batch, args.dim, args.repeats = 64, 64, 2
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available here")
        SYNC[0] = torch.cuda.synchronize
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.memory_of:
        return memory_child(args)

    report = {"config": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(), "skipped": [],
              "machine": machine()}
    R = None
    if reference_root() is None:
        report["skipped"].append("reference: DEQFUSION_REFERENCE_ROOT is unset")
    else:
        R = load_reference()
    ours, xs, head, labels, warmup, converges = build(args)
    report["problem"] = {"warmup_steps": warmup, "forward_converges": converges}
    print(f"problem: {warmup} Jacobian-regularised steps; forward solves {CHECK.replace('reach', 'reaching', 1)}: "
          f"{converges}")
    parts = (("cost", "cost", lambda: cost(args, report)),
             ("forward", "forward", lambda: forward_solve(args, ours, xs, R, report)),
             ("train", "train_step", lambda: train_steps(args, ours, xs, head, labels, R, report)),
             ("warm", "warm_start", lambda: warm_started(args, ours, xs, head, labels, R, report)),
             ("memory", "memory", lambda: memory(args, report, R is not None)))
    for flag, key, run in parts:
        if flag not in args.skip:
            run()
            print(f"\n## {key}\n{fmt(report[key])}", flush=True)
    report["load_avg_1m_end"] = os.getloadavg()[0]
    report["summary"] = summary(report)
    print("\n## summary (ratios to the reference)")
    for k, v in report["summary"].items():
        print(f"- {k}: {v}")
    if "ground_truth" in report:
        print(f"\nground truth: {report['ground_truth']}")
    for s in report["skipped"]:
        print(f"skipped: {s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
