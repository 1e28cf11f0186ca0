"""``paired.png``: per seed, one line from the baseline's score to the fusion arm's (headline metric, primary
selection; one panel per split and baseline). Needs matplotlib (``pip install 'deqfusion[plot]'``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .summary import selections_of

__all__ = ["plot_paired"]


def plot_paired(records: Sequence[dict], summary: dict, path: Path) -> Path | None:
    """Draw the figure; None (nothing drawn) when there is no pair of runs or matplotlib is missing."""
    pairs = [p for p in summary["paired"] if p["seeds"]]
    if not pairs:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, sel = summary["metric"], summary["primary_selection"]
    splits = [sp for sp in ("val", "test")
              if any((selections_of(r)[sel].get(sp) or {}).get(metric) is not None for r in records)]
    if not splits:
        return None
    fig, axes = plt.subplots(len(pairs), len(splits), figsize=(3.6 * len(splits), 3.4 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        runs = {(r["arm"], r["seed"]): selections_of(r)[sel] for r in records}
        for col, sp in enumerate(splits):
            ax = axes[row][col]
            for seed in pair["seeds"]:
                ys = [(runs[(arm, seed)].get(sp) or {}).get(metric) for arm in (pair["baseline"], pair["arm"])]
                if None not in ys:
                    ax.plot([0, 1], ys, marker="o", color="0.55", lw=1)
                    ax.annotate(str(seed), (1, ys[1]), xytext=(4, 0), textcoords="offset points", fontsize=7,
                                va="center")
            d = pair["metrics"][sel][sp][metric]
            ci = d.get("ci95")
            title = f"{sp} {metric}: {pair['arm']} − {pair['baseline']}"
            if d.get("mean") is not None:
                title += f"\n{d['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (one seed)")
            ax.set_title(title, fontsize=9)
            fusion = summary["arms"]
            ax.set_xticks([0, 1], [f"{pair['baseline']}\n({fusion[pair['baseline']]['fusion']})",
                                   f"{pair['arm']}\n({fusion[pair['arm']]['fusion']})"])
            ax.set_xlim(-0.3, 1.3)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['study']} ({summary['integration']}), selected by {sel}, one line per seed", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
