"""Plots of solver statistics: residual over solver steps (the paper's Fig. 4) and per-modality gate
values over solver steps (Fig. 3). Needs matplotlib (``pip install deqfusion[plot]``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .stats import SolverStats


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # optional dependency
        raise ImportError("plotting needs matplotlib: pip install 'deqfusion[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_convergence(stats: SolverStats | Sequence[SolverStats], path: str | Path,
                     title: str = "DEQ fusion: convergence to equilibrium") -> Path:
    """Relative residual (max over the batch) per solver step, log scale. Several stats (e.g. one per
    run or epoch) are drawn as their mean with a 95% interval, as in the paper's Fig. 4."""
    import numpy as np

    plt = _pyplot()
    runs = [stats] if isinstance(stats, SolverStats) else list(stats)
    traces = [s.trace for s in runs if s.trace]
    if not traces:
        raise ValueError("stats: no residual trace recorded")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if len(traces) == 1:
        ax.plot(range(1, len(traces[0]) + 1), traces[0], marker=".", label="forward solve")
    else:
        n = max(len(t) for t in traces)
        arr = np.array([t + [t[-1]] * (n - len(t)) for t in traces])   # a stopped run stays at its last value
        mean, half = arr.mean(0), 1.96 * arr.std(0) / np.sqrt(len(arr))
        steps = np.arange(1, n + 1)
        ax.plot(steps, mean, label=f"mean over {len(arr)} solves")
        ax.fill_between(steps, np.maximum(mean - half, 1e-12), mean + half, alpha=0.3, label="95% interval")
    tol = runs[-1].tol if runs[-1].stop == "rel" else None
    if tol:
        ax.axhline(tol, color="grey", ls="--", lw=1, label=f"tolerance {tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("solver step")
    ax.set_ylabel("relative residual ||f(z)-z|| / ||f(z)||")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gates(stats: SolverStats, path: str | Path, names: Sequence[str] | None = None,
               title: str = "DEQ fusion: gate per modality over solver steps") -> Path:
    """Mean gate value alpha_i per modality at each solver step, normalised to sum to one per step
    (the paper's Fig. 3). Needs a forward with ``track_gates=True``."""
    plt = _pyplot()
    if stats.gates is None:
        raise ValueError("stats: no gate values recorded; construct DEQFusion with track_gates=True")
    g = stats.gates.float().cpu()
    g = g.abs() / g.abs().sum(1, keepdim=True).clamp_min(1e-12)
    names = list(names or [f"modality {i + 1}" for i in range(g.shape[1])])
    if len(names) != g.shape[1]:
        raise ValueError(f"names: expected {g.shape[1]} names, got {len(names)}")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, name in enumerate(names):
        ax.plot(range(1, g.shape[0] + 1), g[:, i].tolist(), marker=".", label=name)
    ax.set_xlabel("solver step")
    ax.set_ylabel("normalised mean gate |alpha_i|")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
