"""`deqfusion bench`: solver steps and timings of DEQFusion at given shapes (default: BRCA's).

The side-by-side comparison with the paper authors' reference, TorchDEQ and unrolled autograd is
``benchmarks/bench_core.py``; both start from :func:`contractive_problem`.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .module import DEQFusion


def contractive_problem(batch=612, input_dims=(500, 500, 500), dim=500, classes=5, warmup_steps=10,
                        jac_weight=100.0, device="cpu", seed=0):
    """A DEQFusion at the given shapes whose f was made contractive by a few Jacobian-regularised
    training steps (weight 100, the reference BRCA code's default), with fixed inputs, a frozen linear
    head and labels. Returns (fusion, xs, head, labels)."""
    torch.manual_seed(seed)
    fusion = DEQFusion(list(input_dims), dim, num_groups=4, jac_samples=2, f_max_iter=30, b_max_iter=30,
                       jac_weight=jac_weight).to(device)
    xs = [torch.randn(batch, d, device=device) for d in input_dims]
    head = torch.nn.Linear(dim, classes).to(device)
    labels = torch.randint(0, classes, (batch,), device=device)
    opt = torch.optim.Adam(list(fusion.parameters()) + list(head.parameters()), lr=1e-3)
    for _ in range(warmup_steps):
        opt.zero_grad()
        F.cross_entropy(head(fusion(xs).fused), labels).backward()
        opt.step()
    fusion.jac_weight = 0.0
    head.requires_grad_(False)
    return fusion, xs, head, labels


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(args) -> int:
    fusion, xs, head, labels = contractive_problem(args.batch, args.dims, args.dim, device=args.device)
    print(f"DEQFusion input_dims={args.dims} dim={args.dim} batch={args.batch} on {args.device} "
          f"({torch.get_num_threads()} threads), after 10 Jacobian-regularised steps")
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
        print(f"f_tol {f_tol:g} b_tol {b_tol:g}: forward {f:.3f}s backward {b:.3f}s (train step {f + b:.3f}s, backward/forward {b / f:.2f}); "
              f"{stats}")
    return 0
