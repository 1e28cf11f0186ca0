"""ROSMAP study: MM-Dynamics (concatenation) vs MM-Dynamics + DEQ fusion, over seeds, under both protocols.

Each (model, protocol, seed) is one run of the upstream training script (``train_test.train``) through the
mmdynamics integration, in a worker process with one torch thread (``--workers`` of them: 2 for 2 cores).
Reported per model: accuracy / F1 / AUC mean +- std over seeds for

- paper protocol, best test score of the periodic evaluations (the paper's selection: optimistic),
- paper split, final epoch,
- fair protocol (stratified seeded validation split off the training files), validation-selected epoch,
- fair protocol, final epoch,

and the wall time per training epoch. With ``DEQFUSION_REFERENCE_ROOT`` set, the DEQ model is also trained
for a few epochs with deqfusion's module and with the paper authors' reference DEQ module in its place,
each alone on one thread (time per epoch only).

    DEQFUSION_MMDYNAMICS_ROOT=~/mmdynamics python benchmarks/rosmap_study.py --seeds 10 --epochs 300 \\
        --deq-hidden 100 --out benchmarks/results/rosmap_study.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))       # benchmarks/reference.py
DATA = HERE.parents[1] / "shared" / "data" / "rosmap"
ROWS = [("paper", "paper_best", "paper protocol: best test of the evaluations"),
        ("paper", "final", "paper split: final epoch"),
        ("fair", "val_selected", "fair protocol: validation-selected epoch"),
        ("fair", "final", "fair protocol: final epoch")]
_integ = None


def _worker_init(root: str, fusion_options: dict) -> None:
    global _integ
    import torch

    torch.set_num_threads(1)
    from deqfusion_patches.mmdynamics import plugin

    _integ = plugin.INTEGRATION
    _integ.apply(_integ.locate(root), dict(fusion_options))


def _one_run(task: dict) -> dict:
    argv = ["--data-folder", task["data"], "--fusion", task["fusion"], "--protocol", task["protocol"],
            "--seed", str(task["seed"]), "--epochs", str(task["epochs"]), "--eval-every", str(task["eval_every"]),
            "--modelpath", task["modelpath"], "--quiet"]
    if task.get("hidden"):
        argv += ["--hidden", str(task["hidden"])]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):      # the per-run summary: collected in the table instead
        run = _integ.run(argv)
    summary = run.summary
    summary.pop("history", None)
    summary["wall_s"] = time.perf_counter() - start
    if task["fusion"] == "deq":
        head = run.model.MMClasifier
        train_key = next(k for k, v in run.split_keys.items() if v == "train")
        stats = head.split_solves[train_key]
        summary["deq_last_train_solve"] = {"nstep": stats.nstep, "rel_residual": stats.rel_residual,
                                           "converged": stats.converged}
    return summary


def timed_epochs(root: str, data: str, epochs: int, hidden: int, options: dict, reference: bool) -> float:
    """Seconds per training epoch of the DEQ model, one thread, alone: with deqfusion's module, or with the
    paper authors' reference module (jinhong-ni/DEQFusion, loaded by benchmarks/reference.py) in its place."""
    import torch

    from deqfusion_core.integration import Patches
    from deqfusion_patches.mmdynamics import head, plugin

    torch.set_num_threads(1)
    integ = plugin.INTEGRATION
    integ.apply(integ.locate(root), dict(options))
    with Patches() as patches:
        if reference:
            make, upstream_init = reference_fusion(options), head.DEQHead.__init__

            def __init__(self, views, hidden_, num_class, linear_layer, fusion_options):
                upstream_init(self, views, hidden_, num_class, linear_layer, fusion_options)
                self.deq = make(views, hidden_)     # the head's adapter attaches its Jacobian term

            patches.set(head.DEQHead, "__init__", __init__)
        argv = ["--data-folder", data, "--epochs", str(epochs - 1), "--eval-every", str(epochs), "--hidden",
                str(hidden), "--modelpath", tempfile.mkdtemp(prefix="rosmap_timing_"), "--quiet"]
        with contextlib.redirect_stdout(io.StringIO()):
            summary = integ.run(argv).summary
    return summary["epoch_time_s"]


def reference_fusion(options: dict):
    """A factory of the reference's DEQFusion behind deqfusion's call signature (fused, jac, stats), for the
    head's ``deq`` (the head weights and attaches the Jacobian term)."""
    import torch
    from reference import load_reference

    R = load_reference()

    class Stats:            # the reference reports no per-call statistics the head could use
        state, nstep, rel_residual, converged = None, -1, float("nan"), True

    class ReferenceFusion(torch.nn.Module):
        def __init__(self, views, dim):
            super().__init__()
            self.ref = R.DEQFusion(dim, views, f_thres=options["f_max_iter"], b_thres=options["b_max_iter"],
                                   stop_mode="rel")

        def forward(self, xs, z0=None):
            fused, jac, _ = self.ref(list(xs))
            return fused, (jac.mean() if self.training else fused.new_zeros(())), Stats()

    return ReferenceFusion


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def table(results: list[dict], seeds: int) -> str:
    lines = ["| model | protocol / reported epoch | accuracy | F1 | AUC | epoch (mean) |",
             "|---|---|---|---|---|---|"]
    for fusion, name in (("concat", "MM-Dynamics (concat)"), ("deq", "MM-Dynamics + DEQ")):
        for proto, key, label in ROWS:
            runs = [r for r in results if r["fusion"] == fusion and r["protocol"] == proto]
            if not runs:
                continue
            cells = [mean_std([r[key][m] for r in runs]) for m in ("acc", "f1", "auc")]
            epoch = np.mean([r[key]["epoch"] for r in runs])
            lines.append(f"| {name} | {label} | {' | '.join(cells)} | {epoch:.0f} |")
    lines.append("")
    lines.append("| model | wall time per training epoch (ms, mean over runs) | runs |")
    lines.append("|---|---|---|")
    for fusion, name in (("concat", "MM-Dynamics (concat)"), ("deq", "MM-Dynamics + DEQ")):
        runs = [r for r in results if r["fusion"] == fusion]
        if runs:
            lines.append(f"| {name} | {1000 * np.mean([r['epoch_time_s'] for r in runs]):.1f} | {len(runs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", default=os.environ.get("DEQFUSION_MMDYNAMICS_ROOT"),
                   help="mmdynamics checkout (default: DEQFUSION_MMDYNAMICS_ROOT)")
    p.add_argument("--data", default=str(DATA), help="ROSMAP folder (MOGONET layout)")
    p.add_argument("--seeds", type=int, default=10)
    # defaults sized for the goal "10 seeds, both models, both protocols in under an hour on 2 CPU cores":
    # measured 12.5 min for 150 epochs at DEQ hidden 100 (a shared 2-core machine), so 300 epochs is ~25 min;
    # the upstream's 1000 epochs or the paper's hidden 500 (~10x the DEQ cost per epoch) would not fit.
    p.add_argument("--epochs", type=int, default=300, help="epochs per run (the upstream's is 1000)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--deq-hidden", type=int, default=100, help="hidden width of the DEQ model (paper: 500)")
    p.add_argument("--baseline-hidden", type=int, help="hidden width of the baseline (default: upstream 1000)")
    p.add_argument("--protocols", default="paper,fair")
    p.add_argument("--models", default="concat,deq")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    p.add_argument("--f-max-iter", type=int, default=30)
    p.add_argument("--b-max-iter", type=int, default=30)
    p.add_argument("--f-tol", type=float, default=1e-3)
    p.add_argument("--reference-epochs", type=int, default=5, help="epochs timed with the reference module")
    p.add_argument("--out", help="write the results as JSON here (the table goes next to it as .md)")
    args = p.parse_args(argv)
    if not args.upstream:
        p.error("--upstream: give the mmdynamics checkout or set DEQFUSION_MMDYNAMICS_ROOT")
    options = {"f_max_iter": args.f_max_iter, "b_max_iter": args.b_max_iter, "f_tol": args.f_tol}
    tmp = tempfile.mkdtemp(prefix="rosmap_study_")
    tasks = [dict(root=args.upstream, data=args.data, fusion=fusion, protocol=proto, seed=seed, epochs=args.epochs,
                  eval_every=args.eval_every, modelpath=os.path.join(tmp, f"{fusion}_{proto}_{seed}"),
                  hidden=args.deq_hidden if fusion == "deq" else args.baseline_hidden)
             for fusion in args.models.split(",") for proto in args.protocols.split(",") for seed in range(args.seeds)]
    tasks.sort(key=lambda t: t["fusion"] != "deq")     # the long runs first
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=_worker_init, initargs=(args.upstream, options)) as pool:
        results = []
        for r in pool.map(_one_run, tasks):
            results.append(r)
            print(f"  {r['fusion']:6s} {r['protocol']:5s} seed {r['seed']}: final test acc {r['final']['acc']:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    total = time.perf_counter() - start
    report = {"command": " ".join([sys.executable, *sys.argv]), "args": vars(args), "total_wall_s": total,
              "cpu_count": os.cpu_count(), "runs": results}
    text = table(results, args.seeds)
    from reference import reference_root      # benchmarks/reference.py: the CPU loader of the reference

    if reference_root() is None:
        report["reference"] = "skipped: DEQFUSION_REFERENCE_ROOT is unset"
    else:       # both timed alone, one after the other, on one thread, for the same epochs
        n = args.reference_epochs
        ours = timed_epochs(args.upstream, args.data, n, args.deq_hidden, options, reference=False)
        ref = timed_epochs(args.upstream, args.data, n, args.deq_hidden, options, reference=True)
        report["reference"] = {"epochs": n, "deqfusion_epoch_time_s": ours, "reference_epoch_time_s": ref}
        text += (f"\n\nDEQ module timing, {n} training epochs each, alone on one thread: deqfusion "
                 f"{1000 * ours:.1f} ms per epoch, the paper authors' reference module (jinhong-ni/DEQFusion, same "
                 f"f/b iteration caps, its own relative stop) {1000 * ref:.1f} ms per epoch.")
    text += (f"\n\n{args.seeds} seeds, {args.epochs} epochs (evaluations every {args.eval_every}), DEQ hidden "
             f"{args.deq_hidden}, baseline hidden {args.baseline_hidden or '1000 (upstream)'}, {args.workers} workers x 1 thread; whole study {total / 60:.1f} min.")
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
