"""`deqfusion mmf-demo`: train `fusion_classifier` on easy-VQA in real MMF on the CPU, then print validation
accuracy and DEQ solver statistics and save the convergence and gate plots (the paper's Fig. 4 and 3)."""
from __future__ import annotations

import builtins
import functools
import json
import sys
import time
from pathlib import Path

import torch

from . import CONFIG_DIR
from .progress import console, converged_fraction


def evaluate(model, dataset, batch_size: int = 64):
    """Accuracy of ``model`` on ``dataset`` and the DEQ stats of each batch (empty for other fusions); batches of
    ``batch_size`` (the demo passes ``training.batch_size``, the batches MMF's own validation solves)."""
    from mmf.common.sample import SampleList

    from .fusion import DEQFusionMMF

    model.eval()
    correct, stats = 0, []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = SampleList([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch.dataset_type, batch.dataset_name = "val", "easy_vqa"
            scores = model(batch)["scores"]
            correct += int((scores.argmax(1) == batch.targets).sum())
            if isinstance(model.fusion, DEQFusionMMF):
                stats.append(model.fusion.last_stats)
    return correct / len(dataset), stats


def main(args) -> int:
    # MMF's logger (training.stdout_capture) takes over sys.stdout: progress and results go to the real one
    print = functools.partial(builtins.print, file=sys.__stdout__, flush=True)  # noqa: A001
    from . import register

    options = dict(getattr(args, "fusion_option", None) or [])
    register(options or None)
    from mmf.common.registry import registry
    from mmf_cli.run import run

    from .easy_vqa import EasyVQABuilder
    from .model import FusionClassifier

    config = CONFIG_DIR / "experiments" / f"easy_vqa_{args.fusion}.yaml"
    if not config.is_file() or args.fusion == "common":   # easy_vqa_common.yaml: the settings the others include
        known = sorted(p.stem.removeprefix("easy_vqa_") for p in config.parent.glob("easy_vqa_*.yaml")
                       if p.stem != "easy_vqa_common")
        print(f"deqfusion mmf-demo: --fusion: no packaged config for {args.fusion!r}; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve() / args.fusion
    opts = [f"config={config}", "model=fusion_classifier", "dataset=easy_vqa", f"env.save_dir={out / 'save'}"]
    if args.max_updates:
        opts.append(f"training.max_updates={args.max_updates}")
    # Tiny ops: two threads were no faster than one on 2 idle cores, and spin-waited for minutes on busy ones.
    torch.set_num_threads(max(1, int(args.threads)))
    t0 = time.time()
    print(f"== training fusion {args.fusion} in MMF ({config.name}); MMF's full log: {out / 'save' / 'train.log'}")
    from deqfusion_core.compare.record import SolverRecorder

    with console(sys.__stdout__) as progress, SolverRecorder() as recorder:
        run(opts=opts + list(args.mmf_opts))
    model = FusionClassifier.last_built() if FusionClassifier.last_built else None
    if model is None:
        print("deqfusion mmf-demo: MMF did not build the model", file=sys.stderr)
        return 1
    val = EasyVQABuilder().load(registry.get("config").dataset_config.easy_vqa, "val")
    acc, stats = evaluate(model, val, int(registry.get("config").training.batch_size))
    from deqfusion_core.bench import machine

    result = {"command": "deqfusion " + " ".join(sys.argv[1:]), "fusion": args.fusion, "fusion_options": options,
              "val_accuracy": acc, "val_samples": len(val), "train_seconds": round(time.time() - t0, 1),
              "machine": machine()}     # torch, threads, CPU, load, the commit: where this figure came from
    print(f"\n== easy-VQA, fusion {args.fusion}: validation accuracy {acc:.4f} ({len(val)} questions, "
          f"best checkpoint), {result['train_seconds']} s")
    if stats:
        from deqfusion_core import plot_convergence, plot_gates

        residuals = torch.cat([s.rel_residuals if s.stop == "rel" else s.abs_residuals for s in stats])
        result["solver"] = {"mean_steps": sum(s.nstep for s in stats) / len(stats), "max_iter": stats[0].max_iter,
                            "max_rel_residual": max(s.rel_residual for s in stats), "tol": stats[0].tol,
                            "converged_batches": sum(s.converged for s in stats), "batches": len(stats),
                            "converged_samples": int((residuals <= stats[0].tol).sum()), "samples": len(residuals)}
        max_updates = int(registry.get("config").training.max_updates)
        result["solver"]["train_converged_fraction_last_quarter"] = converged_fraction(progress.solves, max_updates)
        back = recorder.summary() or {}
        result["solver"].update({k: back.get(k) for k in (
            "backward_converged_fraction_last_quarter", "backward_mean_steps", "backward_median_residual",
            "backward_tol", "backward_max_iter", "backward_solves")})
        result["solver_log"] = progress.solves
        solver = result["solver"]
        print(f"== DEQ solver on validation: mean steps {solver['mean_steps']:.1f}/{solver['max_iter']}, max rel "
              f"residual {solver['max_rel_residual']:.2e}, converged {solver['converged_batches']}/{len(stats)} batches, "
              f"{solver['converged_samples']}/{solver['samples']} questions (tol {solver['tol']:g} {stats[0].stop})")
        if solver["backward_solves"]:
            print(f"== implicit backward in training (last quarter): converged "
                  f"{100 * solver['backward_converged_fraction_last_quarter']:.1f}% of solves at tol "
                  f"{solver['backward_tol']:g}, mean steps {solver['backward_mean_steps']:.1f}/"
                  f"{solver['backward_max_iter']}, median residual {solver['backward_median_residual']:.2e}")
        conv = plot_convergence(stats, out / "convergence.png")
        print(f"== plots: {conv}", end="")
        if stats[0].gates is not None:
            print(f", {plot_gates(stats[0], out / 'gates.png', names=model.modalities)}", end="")
        print()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0
