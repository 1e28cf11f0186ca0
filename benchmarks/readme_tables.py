"""The README's result tables, generated from the committed ``summary.json`` files (never typed by hand).

    python benchmarks/readme_tables.py           # rewrite every generated table in README.md and docs/*.md
    python benchmarks/readme_tables.py --check   # exit 1 when a table differs from its summary.json

A generated table is the text between the lines ``<!-- results: benchmarks/results/<study>/summary.json -->`` and
``<!-- /results -->``; the summary comes from ``deqfusion compare`` (``../shared/RESULTS.md``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from end_to_end import converged_cell  # noqa: E402 - the one formatter of end_to_end's convergence cell
BLOCK = re.compile(r"^(<!-- results: (?P<path>\S+)(?: (?P<view>robustness|end_to_end|bench_runs))? -->\n)(?P<body>.*?)"
                   r"^(<!-- /results -->)",
                   re.S | re.M)


def _ms(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "–"
    return f"{d['mean']:.{digits}f}" + ("" if d.get("std") is None else f" ± {d['std']:.{digits}f}")


def _ci(d: dict | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "–"
    ci = d.get("ci95")
    return f"{d['mean']:+.{digits}f}" + (f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else " (one seed)")


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def render(summary: dict, source: str) -> str:
    """One table: per arm, the headline metric (mean ± std over seeds) under each selection, the DEQ's
    convergence and the wall time per run; per baseline, the paired difference with its 95% interval."""
    metric, primary = summary["metric"], summary["primary_selection"]
    others = [s for s in summary["selections"] if s != primary]
    cols = [(primary, "val"), (primary, "test")] + [(s, "test") for s in others]
    names = {"val": "val-selected", "final": "final", "test": "test-selected"}
    head = [f"{split} {metric}, {names.get(sel, sel)}" for sel, split in cols]
    lines = ["| arm (fusion) | " + " | ".join(head) + " | DEQ converged: train (last quarter) / eval | "
             "implicit backward converged (last quarter) | mean solver steps (train) | wall time per run |",
             "|---|" + "---|" * (len(cols) + 4)]
    for name, arm in summary["arms"].items():
        cells = [_ms(arm["metrics"].get(sel, {}).get(split, {}).get(metric)) for sel, split in cols]
        sv = arm["solver"]
        conv = "–" if not sv else (f"{_ms(sv['train_converged_fraction_last_quarter'], 2)} / "
                                   f"{_ms(sv['eval_converged_fraction'], 2)}")
        back = ("–" if not sv else "not recorded" if "backward_converged_fraction_last_quarter" not in sv
                else _ms(sv["backward_converged_fraction_last_quarter"], 2))   # older summaries lack it
        steps = "–" if not sv else _ms(sv['mean_steps'], 1)   # max_iter in the summary is the evaluation cap
        lines.append(f"| {name} ({arm['fusion']}) | " + " | ".join(cells) + f" | {conv} | {back} | {steps} | "
                     f"{_time(arm['wall_s']['mean'])} |")
    for pair in summary["paired"]:
        cells = [_ci(pair["metrics"].get(sel, {}).get(split, {}).get(metric)) for sel, split in cols]
        lines.append(f"| {pair['arm']} − {pair['baseline']} (paired, 95% CI) | " + " | ".join(cells) + " | | | | |")
    return "\n".join(lines + _provenance(summary, source)) + "\n"


def _provenance(summary: dict, source: str) -> list[str]:
    seeds = summary["seeds"]
    commits = ", ".join(str(c)[:10] for c in summary["commits"])
    return ["", f"{len(seeds)} seed{'s' * (len(seeds) != 1)} ({', '.join(map(str, seeds))}); "
                f"{'; '.join(summary['machines'])}; commit {commits}; "
                f"`{'`, `'.join(summary['commands'])}`; from [{source}]({source}) "
                f"(details: [summary.md]({source.rsplit('/', 1)[0]}/summary.md))."]


def render_robustness(summary: dict, source: str) -> str:
    """The robustness table (``<!-- results: PATH robustness -->``): per arm the test metric of the selected
    checkpoints clean, with each modality removed (each arm's own way, and zero-filled) and the area under each
    modality's noise curve; the paired difference of the fusion arm against the first baseline."""
    rob = summary["robustness"]
    arms, pair = rob["arms"], rob["paired"][0]
    fusion_arm, base = arms[pair["arm"]], arms[pair["baseline"]]
    top = max(rob["levels"])
    rows = [("clean", "clean", "clean", "clean")]
    for m in rob["modalities"]:
        rows.append((f"{m} removed: {pair['arm']} masked, {pair['baseline']} zero-filled", f"remove:{m}:own",
                     f"remove:{m}:own", f"remove:{m}:own"))
        rows.append((f"{m} removed: both zero-filled", f"remove:{m}:zero_fill", f"remove:{m}:zero_fill",
                     f"remove:{m}:zero_fill"))
    for m in rob["modalities"]:
        rows.append((f"noise on {m}: area under the curve, sigma 0-{top:g}", f"auc:{m}", f"auc:{m}", f"auc:{m}"))
        rows.append((f"noise on {m}: sigma {top:g}", f"noise:{m}:{top:g}", f"noise:{m}:{top:g}", f"noise:{m}:{top:g}"))
    lines = [f"| test {rob['metric']} ({rob['selection']}-selected checkpoints) | {pair['baseline']} "
             f"({base['fusion']}) | {pair['arm']} ({fusion_arm['fusion']}) | {pair['arm']} − {pair['baseline']} "
             "(paired, 95% CI) |", "|---|---|---|---|"]
    for label, b, f, d in rows:
        lines.append(f"| {label} | {_ms(base['conditions'].get(b))} | {_ms(fusion_arm['conditions'].get(f))} | "
                     f"{_ci(pair['conditions'].get(d))} |")
    return "\n".join(lines + _provenance(summary, source)) + "\n"


def render_end_to_end(summary: dict, source: str) -> str:
    """The speed table (``<!-- results: PATH end_to_end -->``, benchmarks/end_to_end.py's summary): per upstream, the
    training step of deq against the upstream's own fusion, the DEQ's share of its step, and peak memory."""
    lines = ["| upstream (data) | baseline fusion | training step deq / baseline | DEQ fusion forward + backward, "
             "share of the deq step | peak memory deq / baseline | mean DEQ solver steps (training) | solves converged: "
             "training forward / implicit backward (last quarter) / evaluation |",
             "|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        step = r["step_s"]
        lines.append(f"| {name}: {r['data']} | {r['baseline_fusion']} | {r['step_ratio_deq_over_baseline']:.2f} "
                     f"({step['deq'] * 1e3:.1f} vs {step['baseline'] * 1e3:.1f} ms) | "
                     f"{r['fusion_share_of_deq_step']:.0%} | {r['peak_memory_ratio_deq_over_baseline']:.2f} | "
                     f"{r['deq_mean_solver_steps']:.1f} | {converged_cell(r)} |")
    commits = sorted({r["commit"][:10] for r in summary.values()})
    machines = sorted({r["machine"] for r in summary.values()})
    load = max(max(r["load_avg_1m"]) for r in summary.values())
    return "\n".join(lines + ["", f"{'; '.join(machines)}; load average up to {load:.1f}; commit {', '.join(commits)}; "
                              f"from [{source}]({source}) (details: [summary.md]({source.rsplit('/', 1)[0]}/summary.md))."]) + "\n"


def _fastest(steps: dict, prefix: str, bar: float):
    """(name, step seconds) of the fastest ``prefix`` configuration whose gradient error is <= ``bar``, or None."""
    ok = [(r["step_s"], name) for name, r in steps.items()
          if name.startswith(prefix) and "failed" not in r and r["grad_rel_err"] <= bar]
    return min(ok)[::-1] if ok else None


def render_bench_runs(runs: list, source: str) -> str:
    """Consecutive ``benchmarks/bench_core.py`` runs side by side (``<!-- results: GLOB bench_runs -->``, the GLOB
    matching their JSON files): f and its VJP against their matrix products in both regimes, the forward solve's
    overhead, and the training step at gradient error <= 1e-3 against the reference's fastest there, and at the
    lowest error both reach (the larger of the two sides' lowest: matched error where the problem has a floor above
    1e-3)."""
    cols = [f"run {i + 1}" for i in range(len(runs))]
    rows = {"its matrix products alone, {shape}": [], "one f / its matrix products": [],
            "one VJP / its matrix products": [],
            "one f at 64 x 6 x 64 (/ its 14 products)": [], "training step at 64 x 6 x 64, 30-step solves": [],
            "forward solve time / (f evaluations x one f)": [], "train step, our fastest at gradient error <= 1e-3": [],
            "the reference's fastest at <= 1e-3": [], "ratio (reference / ours)": [],
            "lowest gradient error, ours / the reference's": [],
            "at the lowest error both reach: ours / the reference's fastest, ratio": []}
    for r in runs:
        big, small, steps = r["cost"]["large"], r["cost"]["small"], r["train_step"]
        ours, ref = _fastest(steps, "deqfusion", 1e-3), _fastest(steps, "reference", 1e-3)
        low = {side: min((v["grad_rel_err"] for k, v in steps.items() if k.startswith(side) and "failed" not in v),
                         default=None)
               for side in ("deqfusion", "reference")}
        both = None if None in low.values() else max(low.values())
        at = both and (_fastest(steps, "deqfusion", both), _fastest(steps, "reference", both))
        vjp = f" ({big['vjp']})" if "vjp" in big else ""
        vals = [f"{big['matmuls_s'] * 1e3:.2f} ms", f"{big['f_over_matmuls']:.2f}", f"{big['vjp_over_matmuls']:.2f}{vjp}",
                f"{small['one_f_s'] * 1e3:.3f} ms ({small['f_over_matmuls']:.1f})", f"{small['train_step_s'] * 1e3:.1f} ms",
                f"{r['forward']['deqfusion (per-sample rel 1e-3)']['overhead']:.2f}",
                "not reached" if ours is None else f"{ours[1]:.2f} s ({ours[0].removeprefix('deqfusion ')})",
                "not reached" if ref is None else f"{ref[1]:.2f} s ({ref[0].removeprefix('reference ')})",
                "not defined" if ours is None or ref is None else f"**{ref[1] / ours[1]:.1f}x**",
                "-" if both is None else f"{low['deqfusion']:.1e} / {low['reference']:.1e}",
                "-" if not at else f"<= {both:.1e}: {at[0][1]:.2f} s / {at[1][1]:.2f} s, {at[1][1] / at[0][1]:.1f}x"]
        for row, v in zip(rows.values(), vals):
            row.append(v)
    big = runs[0]["cost"]["large"]
    shape = f"{big['batch']} x {big['modalities']} x {big['dim']} ({big['matmuls']} products)"
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name.format(shape=shape)} | " + " | ".join(v) + " |" for name, v in rows.items()]
    m = runs[0]["machine"]
    loads = [x for r in runs for x in (r["machine"]["load_avg_1m"], r.get("load_avg_1m_end", 0.0))]
    paths = sorted({r["machine"].get("f_solver_steps", "torch ops") for r in runs})
    commits = sorted({str(r["machine"]["commit"])[:10] for r in runs if r["machine"].get("commit")})
    cpu = sorted({r["machine"]["cpu"] for r in runs if r["machine"].get("cpu")})
    return "\n".join(lines + ["", f"torch {m['torch']}, {m['threads']} threads on {m['cpus']} CPUs"
                              + (f" ({'; '.join(cpu)})" if cpu else "") + ", load average "
                              f"{min(loads):.1f}-{max(loads):.1f}; f's solver steps: {'; '.join(paths)}; "
                              + (f"commit {', '.join(commits)}; " if commits else "") + f"from `{source}`."]) + "\n"


VIEWS = {None: render, "robustness": render_robustness, "end_to_end": render_end_to_end, "bench_runs": render_bench_runs}


def regenerate(text: str, root: Path = ROOT) -> str:
    def replace(m: re.Match) -> str:
        if m.group("view") == "bench_runs":     # a glob of run files, in name order
            paths = sorted(root.glob(m.group("path")))
            if not paths:
                raise FileNotFoundError(f"{m.group('path')}: no such result files")
            return m.group(1) + render_bench_runs([json.loads(p.read_text()) for p in paths], m.group("path")) + m.group(5)
        path = root / m.group("path")
        if not path.is_file():
            raise FileNotFoundError(f"{m.group('path')}: no such result file")
        return m.group(1) + VIEWS[m.group("view")](json.loads(path.read_text()), m.group("path")) + m.group(5)

    return BLOCK.sub(replace, text)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a table differs from its summary.json")
    args = p.parse_args(argv)
    stale = []
    for doc in documents():
        text = doc.read_text()
        new = regenerate(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"stale result tables in {', '.join(map(str, stale))}: run python benchmarks/readme_tables.py")
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale and not args.check else "result tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
