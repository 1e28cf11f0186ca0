"""The robustness part of a study's summary (``summary.json["robustness"]``, its section of ``summary.md``) and
its picture (``robustness.png``), from the ``robustness`` entries of the runs (:mod:`.robustness`).

Per arm and condition: the test metric's mean and std over seeds, and its drop from the clean test metric of the
same run; per modality the noise curve and its area (:func:`.robustness.area_under_curve`); per fusion arm and
baseline, paired over seeds, the difference in every condition both ran and in each area. A missing modality is
compared as each arm handles it (the fusion arm's mask against the baseline's zero-fill) and both zero-filled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .robustness import area_under_curve
from .statistics import describe, paired

__all__ = ["plot_robustness", "render_robustness", "summarize_robustness"]


def _curve(rob: dict, modality: str, metric: str) -> list[float] | None:
    names = ["clean"] + [f"noise:{modality}:{x:g}" for x in rob["levels"] if x > 0]
    values = [(rob["test"].get(n) or {}).get(metric) for n in names]
    return None if None in values else values


def _run_values(rob: dict, metric: str) -> dict[str, float]:
    """Condition -> the metric, plus ``auc:<m>`` (area under the noise curve) and ``remove:<m>:own`` (the mask
    where the fusion takes one, else zero-fill)."""
    out = {name: m.get(metric) for name, m in rob["test"].items() if m and m.get(metric) is not None}
    for mod in rob["modalities"]:
        curve = _curve(rob, mod, metric)
        if curve is not None and len(curve) > 1:
            out[f"auc:{mod}"] = area_under_curve([0.0] + [x for x in rob["levels"] if x > 0], curve)
        own = f"remove:{mod}:mask" if rob["takes_mask"] else f"remove:{mod}:zero_fill"
        if own in out:
            out[f"remove:{mod}:own"] = out[own]
    return out


def summarize_robustness(records: Sequence[dict], arms: Sequence[dict], metric: str) -> dict[str, Any] | None:
    """``arms``: ``[{"name", "fusion", "is_fusion"}]``; None when no run has a robustness entry."""
    runs = [r for r in records if r.get("robustness")]
    if not runs:
        return None
    first = runs[0]["robustness"]
    out: dict[str, Any] = {"metric": metric, "split": "test", "selection": runs[0]["selected_by"],
                           "modalities": first["modalities"], "levels": first["levels"],
                           "noise_on": first["noise_on"], "arms": {}, "paired": []}
    values: dict[str, dict[int, dict[str, float]]] = {}
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm["name"]), key=lambda r: r["seed"])
        if not rs:
            continue
        per_seed = {r["seed"]: _run_values(r["robustness"], metric) for r in rs}
        values[arm["name"]] = per_seed
        names = list(dict.fromkeys(n for v in per_seed.values() for n in v))
        out["arms"][arm["name"]] = {
            "fusion": arm["fusion"], "takes_mask": rs[0]["robustness"]["takes_mask"], "seeds": sorted(per_seed),
            "conditions": {n: describe([v.get(n) for v in per_seed.values()]) for n in names},
            "drop": {n: describe([None if v.get(n) is None or v.get("clean") is None else v[n] - v["clean"]
                                  for v in per_seed.values()])
                     for n in names if not n.startswith("auc:") and n != "clean"},
            # an arm with a mask: removing a modality with the mask against zero-filling it, paired over seeds
            "mask_minus_zero_fill": {m: paired([v.get(f"remove:{m}:mask") for v in per_seed.values()],
                                               [v.get(f"remove:{m}:zero_fill") for v in per_seed.values()])
                                     for m in out["modalities"]} if rs[0]["robustness"]["takes_mask"] else {},
        }
    for f in [a["name"] for a in arms if a["is_fusion"] and a["name"] in values]:
        for b in [a["name"] for a in arms if not a["is_fusion"] and a["name"] in values]:
            seeds = sorted(set(values[f]) & set(values[b]))
            names = [n for n in out["arms"][f]["conditions"] if n in out["arms"][b]["conditions"]]
            pair = {"arm": f, "baseline": b, "seeds": seeds,
                    "conditions": {n: paired([values[f][s].get(n) for s in seeds], [values[b][s].get(n) for s in seeds])
                                   for n in names}}
            out["paired"].append(pair)
    return out


def _ms(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:.4f}" + ("" if d.get("std") is None else f" ± {d['std']:.4f}")


def _ci(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['mean']:+.4f} " + ("[one seed]" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]")


def _label(name: str) -> str:
    if name == "clean":
        return "clean"
    kind, mod, rest = (name.split(":", 2) + [""])[:3]
    if kind == "remove":
        return f"{mod} removed ({'mask' if rest == 'mask' else 'zero-filled' if rest == 'zero_fill' else 'as the arm handles it: mask if it takes one, else zero-filled'})"
    if kind == "auc":
        return f"noise on {mod}: area under the curve / range"
    return f"noise on {mod}, sigma {rest}"


def _order(names, modalities, levels) -> list[str]:
    wanted = ["clean"]
    for m in modalities:
        wanted += [f"remove:{m}:own", f"remove:{m}:mask", f"remove:{m}:zero_fill"]
    for m in modalities:
        wanted += [f"noise:{m}:{x:g}" for x in levels if x > 0] + [f"auc:{m}"]
    return [n for n in wanted if n in names]


def render_robustness(rob: dict | None) -> list[str]:
    """The markdown lines of the robustness section (none without robustness runs)."""
    if not rob:
        return []
    arms = rob["arms"]
    names = _order({n for a in arms.values() for n in a["conditions"]}, rob["modalities"], rob["levels"])
    lines = ["", f"## Robustness: test {rob['metric']} of the {rob['selection']}-selected checkpoint under perturbations "
                 "of the test split (mean ± std over seeds)", "",
             f"Noise: x + sigma * std * N(0, 1) on {rob['noise_on']} (the input, not the encoder's features: the "
             "input is the same tensor for every arm, the features have each arm's own scale); std per feature over "
             "the training split; sigma "
             f"in {', '.join(f'{x:g}' for x in rob['levels'])}; one noise draw per (seed, modality, level), the same "
             "for every arm. A removed modality: `mask` marks it absent (the DEQ takes no part of it), `zero_fill` "
             "replaces its input by zeros without a mask (what a user of a fusion without a mask does; the only "
             "option for " + (", ".join(f"`{a}`" for a, v in arms.items() if not v["takes_mask"]) or "no arm") +
             "). Area: MultiBench's relative robustness (trapezoid area under the metric over sigma) divided by the "
             "range of sigma.", "",
             "| condition | " + " | ".join(f"{a} ({v['fusion']})" for a, v in arms.items()) + " | " +
             " | ".join(f"{p['arm']} − {p['baseline']} (paired, 95% CI)" for p in rob["paired"]) + " |",
             "|---|" + "---|" * (len(arms) + len(rob["paired"]))]
    for n in names:
        cells = []
        for v in arms.values():
            c = v["conditions"].get(n)
            drop = v["drop"].get(n)
            cells.append(_ms(c) + (f" ({drop['mean']:+.4f})" if drop and drop.get("mean") is not None else ""))
        cells += [_ci(p["conditions"].get(n)) for p in rob["paired"]]
        lines.append(f"| {_label(n)} | " + " | ".join(cells) + " |")
    lines += ["", "In parentheses: the mean change from the same runs' clean test metric."]
    for a, v in arms.items():
        if v["mask_minus_zero_fill"]:
            lines += ["", f"{a}: a removed modality masked − zero-filled (paired over seeds, 95% CI): " +
                      "; ".join(f"{m} {_ci(d)}" for m, d in v["mask_minus_zero_fill"].items()) + "."]
    return lines


def plot_robustness(rob: dict | None, path: Path, title: str = "") -> Path | None:
    """One panel per modality (the metric over sigma, mean ± std over seeds per arm) and one of the removals."""
    if not rob:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods, levels, arms = rob["modalities"], rob["levels"], rob["arms"]
    fig, axes = plt.subplots(1, len(mods) + 1, figsize=(3.8 * (len(mods) + 1), 3.4), squeeze=False)
    for ax, m in zip(axes[0], mods):
        for a, v in arms.items():
            names = ["clean"] + [f"noise:{m}:{x:g}" for x in levels if x > 0]
            ds = [v["conditions"].get(n) or {} for n in names]
            if any(d.get("mean") is None for d in ds):
                continue
            xs = [0.0] + [x for x in levels if x > 0]
            mean = [d["mean"] for d in ds]
            std = [d.get("std") or 0.0 for d in ds]
            line, = ax.plot(xs, mean, marker="o", label=f"{a} ({v['fusion']})")
            ax.fill_between(xs, [u - s for u, s in zip(mean, std)], [u + s for u, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("sigma (x per-feature std of the training split)")
        ax.set_ylabel(f"test {rob['metric']}")
        ax.set_title(f"Gaussian noise on {m}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    bars = [(a, v, how) for a, v in arms.items() for how in (("mask", "zero_fill") if v["takes_mask"] else ("zero_fill",))]
    width = 0.8 / max(len(bars), 1)
    for k, (a, v, how) in enumerate(bars):
        ds = [v["conditions"].get(f"remove:{m}:{how}") or {} for m in mods]
        means = [d.get("mean") if d.get("mean") is not None else float("nan") for d in ds]
        stds = [d.get("std") or 0.0 for d in ds]
        ax.bar([i + (k - (len(bars) - 1) / 2) * width for i in range(len(mods))], means, width, yerr=stds,
               label=f"{a} ({'mask' if how == 'mask' else 'zero-fill'})", capsize=2)
    clean = {a: (v["conditions"].get("clean") or {}).get("mean") for a, v in arms.items()}
    for a, c in clean.items():
        if c is not None:
            ax.axhline(c, lw=0.8, ls="--", color="0.4")
    ax.set_xticks(range(len(mods)), [f"{m} removed" for m in mods])
    ax.set_ylabel(f"test {rob['metric']}")
    ax.set_title("one modality removed (dashed: clean)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title or f"robustness, {rob['selection']}-selected checkpoints, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
