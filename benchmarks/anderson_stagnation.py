"""Where Anderson stops short and plain iteration does not: per-sample convergence of the forward solve on small
random DEQFusion models, for Anderson (defaults: history 5), with stagnation detection (``stall``: restart, then
damped or undamped fixed-point iteration from the best iterate), with history 3, and fixed-point iteration. A convergence study, not a test.

    .venv/bin/python benchmarks/anderson_stagnation.py [--seeds 10] [--out benchmarks/results/anderson_stagnation]

Models: DEQFusion([6, 8, 5], dim 8, 2 groups), the weights feeding back into the state (lin2, gate, fuse) scaled by
``scale`` (smaller: more contractive), and with ``norm="contractive"`` (unscaled); inputs N(0, 1), batch 32, float64,
eval mode; relative tolerance 1e-8, cap 200. Writes ``result.json`` (per configuration: samples not converged per
solver, those Anderson leaves unconverged where fixed-point iteration converges, with Anderson's final residuals
there, and the reverse count) and prints the same.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from deqfusion_core import DEQFusion

DIMS = [6, 8, 5]
SOLVERS = {"anderson": ("anderson", {}), "anderson stall=10": ("anderson", {"stall": 10}),
           "anderson stall=10 undamped fallback": ("anderson", {"stall": 10, "stall_damping": 1.0}),
           "anderson m=3": ("anderson", {"m": 3}), "fixed_point": ("fixed_point", {})}


def scaled(m: DEQFusion, scale: float) -> DEQFusion:
    with torch.no_grad():
        for blk in m.blocks:
            blk.lin2.weight.mul_(scale)
        m.fusion.fuse.weight.mul_(scale)
        m.fusion.gate.weight.mul_(scale)
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tol", type=float, default=1e-8)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/anderson_stagnation")
    args = p.parse_args(argv)
    rows = []
    # with norm="contractive" the scale is moot (the spectral norm of lin2, gate and fuse undoes it)
    for norm, scale in ((None, 0.2), (None, 0.5), (None, 1.0), ("contractive", 1.0)):
        row = dict(norm=norm, scale=scale, samples=0, not_converged={k: 0 for k in SOLVERS}, steps={k: 0 for k in SOLVERS},
                   anderson_short_where_fixed_point_converges=0, fixed_point_short_where_anderson_converges=0,
                   anderson_short_residuals=[])
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            m = scaled(DEQFusion(DIMS, dim=8, num_groups=2, f_tol=args.tol, f_max_iter=args.max_iter,
                                 jac_samples=0, **({"norm": norm} if norm else {})), scale).double().eval()
            g = torch.Generator().manual_seed(1000 + seed)
            xs = [torch.randn(32, d, generator=g, dtype=torch.float64) for d in DIMS]
            bad = {}
            for name, (solver, options) in SOLVERS.items():
                m.solver_options = {}
                m.solver = solver
                m.solver_options = options
                with torch.no_grad():
                    out = m(xs)
                bad[name] = out.stats.rel_residuals > args.tol
                if name == "anderson":
                    residuals = out.stats.rel_residuals
                row["not_converged"][name] += int(bad[name].sum())
                row["steps"][name] += out.stats.nstep
            row["samples"] += len(bad["anderson"])
            row["anderson_short_where_fixed_point_converges"] += int((bad["anderson"] & ~bad["fixed_point"]).sum())
            row["fixed_point_short_where_anderson_converges"] += int((bad["fixed_point"] & ~bad["anderson"]).sum())
            row["anderson_short_residuals"] += residuals[bad["anderson"] & ~bad["fixed_point"]].tolist()
        rows.append(row)
        print(f"norm {norm}, scale {scale}: not converged of {row['samples']}: "
              + ", ".join(f"{k} {v}" for k, v in row["not_converged"].items())
              + f"; Anderson short where fixed_point converges: {row['anderson_short_where_fixed_point_converges']}, "
              f"the reverse: {row['fixed_point_short_where_anderson_converges']}; Anderson's residuals there: "
              + ", ".join(f"{r:.1e}" for r in sorted(row["anderson_short_residuals"])),
              flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(dict(
        command="python benchmarks/anderson_stagnation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        commit=commit, machine=f"{platform.machine()}, torch {torch.__version__}", seeds=args.seeds, tol=args.tol,
        max_iter=args.max_iter, batch=32, rows=rows), indent=1))
    print(f"wrote {out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
