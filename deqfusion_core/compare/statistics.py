"""Mean, standard deviation and the paired t-interval over seeds, with no dependency beyond the standard library."""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["describe", "paired", "t_quantile", "t_two_sided"]


def t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer ``df`` degrees of freedom (exact finite series)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df: expected a positive integer, got {df!r}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:   # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 1.0    # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = ``confidence`` (0.95 -> 12.706 at df 1, 2.262 at df 9), by bisection."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    lo, hi = 0.0, 1.0
    while t_two_sided(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def describe(values: Sequence[float]) -> dict:
    """``{"mean", "std" (sample, n-1; None for one value), "n"}``; None values are left out."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"mean": mean, "std": std, "n": len(xs)}


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """The mean of ``a - b`` over pairs with its t-interval (``ci95``: None below two pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}")
    d = describe([x - y for x, y in zip(a, b) if x is not None and y is not None])
    d["ci95"] = None
    if d["n"] > 1:
        half = t_quantile(confidence, d["n"] - 1) * d["std"] / math.sqrt(d["n"])
        d["ci95"] = [d["mean"] - half, d["mean"] + half]
    return d
