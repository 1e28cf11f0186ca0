"""``summary.json`` and ``summary.md`` of a study from its ``runs.jsonl`` records (``../shared/RESULTS.md``):
per arm and selection the mean and std over seeds of every metric, the paired difference of the fusion arm
against each baseline with its 95% t-interval over seeds, the convergence figures, wall time, what differs
between the arms, and the commands that ran it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from .statistics import describe, paired

__all__ = ["SOLVER_FIELDS", "duration", "render_markdown", "selections_of", "summarize", "write_summary"]

SOLVER_FIELDS = {   # runs.jsonl `solver` field -> how the summary names it
    "train_converged_fraction_last_quarter": "train converged (last quarter)",
    "eval_converged_fraction": "eval converged",
    "mean_steps": "mean steps (train, last quarter)",
    "mean_steps_eval": "mean steps (eval)",
    "max_rel_residual_eval": "max eval rel residual",
    "backward_converged_fraction_last_quarter": "implicit backward converged (train, last quarter)",
    "backward_mean_steps": "mean backward steps (last quarter)",
    "backward_median_residual": "median backward residual (last quarter)",
}


def selections_of(record: dict) -> dict[str, dict]:
    """``{selection: {"val": {...}, "test": {...}, "at": ...}}`` of one run: its primary and the others."""
    out = {record["selected_by"]: {"val": record.get("val"), "test": record.get("test"),
                                   "at": record.get("selected_at", "")}}
    out.update(record.get("also_selected_by") or {})
    return out


def _metric_names(records: Iterable[dict], headline: str) -> list[str]:
    names = {m for r in records for s in selections_of(r).values() for split in ("val", "test")
             for m in (s.get(split) or {})}
    return sorted(names, key=lambda m: (m != headline, m))


def summarize(records: Sequence[dict], *, study: str, integration: str, metric: str, arms: Sequence[dict],
              seeds: Sequence[int], differences: dict[str, list[dict]] | None = None,
              not_compared: dict[str, str] | None = None, allowed: Sequence[str] = ()) -> dict[str, Any]:
    """``arms``: ``[{"name", "fusion", "is_fusion"}]`` in plan order; records of other arms/seeds are ignored."""
    names = [a["name"] for a in arms]
    records = [r for r in records if r["arm"] in names and r["seed"] in seeds]
    by_arm = {a: sorted((r for r in records if r["arm"] == a), key=lambda r: r["seed"]) for a in names}
    metrics = _metric_names(records, metric)
    selection_names = list(dict.fromkeys(s for r in records for s in selections_of(r)))
    out: dict[str, Any] = {
        "study": study, "integration": integration, "metric": metric, "metrics": metrics,
        "primary_selection": records[0]["selected_by"] if records else None, "selections": selection_names,
        "seeds": sorted({r["seed"] for r in records}), "planned_seeds": list(seeds),
        "smoke": any(r.get("smoke") for r in records),
        "commands": list(dict.fromkeys(r["command"] for r in records)),
        "commits": list(dict.fromkeys(r.get("commit") for r in records)),
        "machines": list(dict.fromkeys(r.get("machine") for r in records)),
        "upstream": next((r.get("upstream") for r in records if r.get("upstream")), None),
        "arms": {}, "paired": [],
        "differences": differences or {}, "allowed_differences": list(allowed), "not_compared": not_compared or {},
        "behaviour_changes": list(dict.fromkeys(c for r in records for c in r.get("behaviour_changes") or [])),
        "shims": list(dict.fromkeys(c for r in records for c in r.get("shims") or [])),
        "total_wall_s": round(sum(r.get("wall_s") or 0 for r in records), 1),
        "total_process_s": round(sum(r.get("process_s") or r.get("wall_s") or 0 for r in records), 1),
    }
    for arm in arms:
        rs = by_arm[arm["name"]]
        entry: dict[str, Any] = {"fusion": arm["fusion"], "seeds": [r["seed"] for r in rs], "metrics": {},
                                 "wall_s": {**describe([r.get("wall_s") for r in rs]),
                                            "total": round(sum(r.get("wall_s") or 0 for r in rs), 1)}}
        for sel in selection_names:
            entry["metrics"][sel] = {split: {m: describe([(selections_of(r).get(sel, {}).get(split) or {}).get(m)
                                                          for r in rs]) for m in metrics}
                                     for split in ("val", "test")}
        solvers = [r["solver"] for r in rs if r.get("solver")]
        entry["solver"] = None
        if solvers:
            entry["solver"] = {f: describe([s.get(f) for s in solvers]) for f in SOLVER_FIELDS}
            worst = [s.get("max_rel_residual_eval") for s in solvers if s.get("max_rel_residual_eval") is not None]
            entry["solver"]["max_rel_residual_eval"]["max"] = max(worst) if worst else None
            entry["solver"]["tol"] = solvers[-1].get("tol")
            entry["solver"]["max_iter"] = solvers[-1].get("max_iter")
            entry["solver"]["max_iter_eval"] = solvers[-1].get("max_iter_eval")
            entry["solver"]["backward_tol"] = solvers[-1].get("backward_tol")
            entry["solver"]["backward_max_iter"] = solvers[-1].get("backward_max_iter")
        out["arms"][arm["name"]] = entry
    fusion_arms = [a["name"] for a in arms if a["is_fusion"]]
    for f in fusion_arms:
        for b in [a["name"] for a in arms if not a["is_fusion"]]:
            fs = {r["seed"]: selections_of(r) for r in by_arm[f]}
            bs = {r["seed"]: selections_of(r) for r in by_arm[b]}
            common = sorted(set(fs) & set(bs))
            pair: dict[str, Any] = {"arm": f, "baseline": b, "seeds": common, "metrics": {}}
            for sel in selection_names:
                pair["metrics"][sel] = {}
                for split in ("val", "test"):
                    pair["metrics"][sel][split] = {}
                    for m in metrics:
                        get = (lambda runs, s: (runs[s].get(sel, {}).get(split) or {}).get(m))
                        pair["metrics"][sel][split][m] = paired([get(fs, s) for s in common],
                                                                [get(bs, s) for s in common])
            out["paired"].append(pair)
    return out


# -- markdown -------------------------------------------------------------------------------------------------
def _num(x, digits=4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and (abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ms(d: dict, digits=4) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return _num(d["mean"], digits) + ("" if d.get("std") is None else f" ± {_num(d['std'], digits)}")


def _ci(d: dict, digits=4) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['mean']:+.{digits}f} " + ("[n/a: one seed]" if ci is None else
                                          f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else (f"{m} min {s} s" if m else f"{s} s")


def render_markdown(s: dict) -> str:
    arms = s["arms"]
    lines = [f"# {s['study']} in {s['integration']}: " +
             ", ".join(f"{a} ({v['fusion']})" for a, v in arms.items()), ""]
    seeds = ", ".join(map(str, s["seeds"])) or "none"
    lines.append(f"{len(s['seeds'])} seed(s) ({seeds}){' (of ' + str(len(s['planned_seeds'])) + ' planned)' if len(s['seeds']) < len(s['planned_seeds']) else ''}"
                 f"{'; SMOKE runs (a few updates on a few samples): not results' if s['smoke'] else ''}. "
                 f"Wall time: {duration(s['total_wall_s'])} of training, {duration(s.get('total_process_s'))} with each run's "
                 f"process start-up and evaluation set-up.")
    lines += ["", "Command(s):", ""] + [f"    {c}" for c in s["commands"]]
    lines += ["", f"Project commit(s): {', '.join(str(c) for c in s['commits'])}. "
                  f"Machine: {'; '.join(str(m) for m in s['machines'])}."]
    if s.get("upstream"):
        lines.append(f"Upstream: {s['upstream'].get('version') or ''} {s['upstream'].get('root') or ''}".rstrip() + ".")
    metrics = s["metrics"]
    lines += ["", "## Metrics (mean ± std over seeds)", "",
              "| arm (fusion) | selection | " + " | ".join(f"{sp} {m}" for sp in ("val", "test") for m in metrics) + " |",
              "|---|---|" + "---|" * (2 * len(metrics))]
    for sel in s["selections"]:
        for a, v in arms.items():
            cells = [_ms(v["metrics"][sel][sp][m]) for sp in ("val", "test") for m in metrics]
            lines.append(f"| {a} ({v['fusion']}) | {sel} | " + " | ".join(cells) + " |")
    if s["paired"]:
        lines += ["", "## Paired difference (mean over seeds, 95% t-interval over seeds)", "",
                  "| difference | selection | split | " + " | ".join(metrics) + " | seeds |",
                  "|---|---|---|" + "---|" * len(metrics) + "---|"]
        for p in s["paired"]:
            for sel in s["selections"]:
                for sp in ("val", "test"):
                    cells = [_ci(p["metrics"][sel][sp][m]) for m in metrics]
                    lines.append(f"| {p['arm']} − {p['baseline']} | {sel} | {sp} | " + " | ".join(cells) +
                                 f" | {len(p['seeds'])} |")
    solver_arms = {a: v["solver"] for a, v in arms.items() if v["solver"]}
    if solver_arms:
        lines += ["", "## Convergence of the DEQ solves (per solve: every sample of the batch within tolerance)", "",
                  "| arm | " + " | ".join(SOLVER_FIELDS.values()) + " | tol | max iter (train / eval) "
                  "| backward tol / max iter |",
                  "|---|" + "---|" * (len(SOLVER_FIELDS) + 3)]
        for a, sv in solver_arms.items():
            cells = [(_num(sv[f].get("max")) + " (max over seeds)") if f == "max_rel_residual_eval"
                     else _ms(sv.get(f), 3) for f in SOLVER_FIELDS]
            back = ("–" if sv.get("backward_tol") is None
                    else f"{_num(sv['backward_tol'])} / {sv.get('backward_max_iter')}")   # – : no implicit backward
            lines.append(f"| {a} | " + " | ".join(cells) + f" | {_num(sv['tol'])} | {sv['max_iter']} / "
                         f"{sv.get('max_iter_eval') or '–'} | {back} |")
    lines += ["", "## Wall time per run (mean ± std over seeds; total)", "", "| arm | per run | total |",
              "|---|---|---|"]
    for a, v in arms.items():
        lines.append(f"| {a} | {_ms(v['wall_s'], 1)} s | {duration(v['wall_s']['total'])} |")
    lines += ["", "## What differs between the arms (their effective configurations, key by key)", ""]
    for arm, diffs in s["differences"].items():
        if not diffs:
            continue
        base = next((k for k in diffs[0] if k not in ("key", "role", arm)), "baseline")
        lines += [f"| key | {base} | {arm} | what it is |", "|---|---|---|---|"]
        for d in diffs:
            lines.append(f"| `{d['key']}` | {_cell(d.get(base))} | {_cell(d.get(arm))} | {d['role']} |")
        lines.append("")
    if s["allowed_differences"]:
        lines.append("Differences beyond the fusion allowed with `--allow-diff`: " +
                     ", ".join(f"`{k}`" for k in s["allowed_differences"]) + ".")
    if s["behaviour_changes"]:
        lines += ["Changes to the upstream's behaviour, applied to both arms:", ""] + \
                 [f"- {c}" for c in s["behaviour_changes"]]
    if s.get("shims"):
        lines += ["", "Compatibility shims applied (each only where the thing it fixes is missing or broken): " +
                  ", ".join(f"`{x}`" for x in s["shims"]) + "."]
    if s["not_compared"]:
        lines += ["", "Not compared (where a run writes, or which file holds its settings):", ""] + \
                 [f"- `{k}`: {why}" for k, why in s["not_compared"].items()]
    from .robustness_report import render_robustness

    lines += render_robustness(s.get("robustness"))
    return "\n".join(lines).rstrip() + "\n"


def _cell(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|")


def write_summary(out: Path, summary: dict) -> None:
    out = Path(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render_markdown(summary))
