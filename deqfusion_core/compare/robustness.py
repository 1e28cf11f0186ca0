"""``deqfusion compare --robustness``: the selected checkpoint of each run, evaluated on the test split with each
modality removed in turn and with Gaussian noise of increasing level on each modality (MultiBench's robustness
protocol: the metric over the noise levels, and the area under that curve).

An integration provides an :class:`Evaluator` (``Comparison.robustness_evaluator`` after ``train``): the
modalities, whether its fusion takes a per-sample mask, batches of the training split's encoder inputs (for the
noise scale) and a test evaluation under a transform of every test batch's encoder inputs. This module owns the
perturbations, their seeds and the figures:

- ``remove:<m>:mask``: modality m marked absent for every test sample (``present[:, m] = False``; its input
  zero-filled, which the DEQ never reads). Only for a fusion that takes a mask (``deq``).
- ``remove:<m>:zero_fill``: modality m's encoder input replaced by zeros, no mask: what a user of a fusion
  without a mask does. Every arm.
- ``noise:<m>:<sigma>``: ``x + sigma * std * N(0, 1)`` on modality m's encoder input, ``std`` its per-feature
  standard deviation over the training split (so sigma is in units of the data's own spread, for each feature).
  The noise is drawn from a generator seeded by (run seed, modality, level): at one seed, every arm sees the same
  noise on the same test batches (the test loader does not shuffle). Noise goes on the encoder input, not the
  encoder's output: the input is the same tensor for every arm, whereas each arm's features have their own scale.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

__all__ = ["NOISE_LEVELS", "Evaluator", "InputStats", "Perturbation", "Transform", "area_under_curve", "evaluate",
           "plan"]

NOISE_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0)   # sigma, in units of each feature's standard deviation (training split)
MISSING = ("mask", "zero_fill")


@dataclass(frozen=True)
class Perturbation:
    """One test-time condition: ``clean``, ``remove`` (``missing``: ``mask`` or ``zero_fill``) or ``noise``."""

    kind: str
    modality: int | None = None
    level: float = 0.0
    missing: str = ""

    def name(self, modalities: Sequence[str]) -> str:
        if self.kind == "clean":
            return "clean"
        m = modalities[self.modality]
        return f"remove:{m}:{self.missing}" if self.kind == "remove" else f"noise:{m}:{self.level:g}"


def plan(num_modalities: int, takes_mask: bool, levels: Sequence[float] = NOISE_LEVELS) -> list[Perturbation]:
    """Clean; each modality removed (mask, where the fusion takes one, and zero-fill); each modality under each
    noise level > 0 (level 0 is the clean evaluation)."""
    if num_modalities < 1:
        raise ValueError(f"num_modalities: expected >= 1, got {num_modalities}")
    bad = [x for x in levels if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0)]
    if bad or list(levels) != sorted(set(levels)):
        raise ValueError(f"levels: expected distinct increasing finite numbers >= 0, got {list(levels)}")
    out = [Perturbation("clean")]
    for m in range(num_modalities):
        out += [Perturbation("remove", m, missing=how) for how in MISSING if how != "mask" or takes_mask]
    for m in range(num_modalities):
        out += [Perturbation("noise", m, float(x)) for x in levels if x > 0]
    return out


class InputStats:
    """Per-feature mean and standard deviation of each modality's encoder input, accumulated over batches
    (float64 sums; the population standard deviation)."""

    def __init__(self):
        self.n = 0
        self.sums: list[torch.Tensor] | None = None
        self.squares: list[torch.Tensor] | None = None

    def add(self, inputs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> None:
        """One batch: ``inputs[m]`` [B, ...]; rows where ``present[:, m]`` is False are left out."""
        if self.sums is None:
            self.sums = [torch.zeros(x.shape[1:], dtype=torch.float64) for x in inputs]
            self.squares = [torch.zeros(x.shape[1:], dtype=torch.float64) for x in inputs]
            self.counts = [0] * len(inputs)
        for m, x in enumerate(inputs):
            x = x.detach().to("cpu", torch.float64)
            if present is not None:
                x = x[present[:, m].cpu()]
            self.sums[m] += x.sum(0)
            self.squares[m] += (x * x).sum(0)
            self.counts[m] += x.shape[0]
        self.n += 1

    def std(self) -> list[torch.Tensor]:
        if self.sums is None:
            raise ValueError("InputStats: no batch was added")
        out = []
        for s, q, c in zip(self.sums, self.squares, self.counts):
            if c == 0:
                raise ValueError("InputStats: a modality is absent from every training sample")
            mean = s / c
            out.append((q / c - mean * mean).clamp(min=0).sqrt().float())
        return out


def seed_of(run_seed: int, modality: int, level: float) -> int:
    text = f"{run_seed}:{modality}:{level!r}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


class Transform:
    """``transform(inputs, present) -> (inputs, present)`` for one perturbation, applied to every test batch in
    turn (its noise generator advances batch by batch). ``present`` None means every modality is there."""

    def __init__(self, p: Perturbation, std: Sequence[torch.Tensor] | None = None, run_seed: int = 0):
        if p.kind == "noise" and std is None:
            raise ValueError("std: needed for a noise perturbation")
        self.p, self.std = p, std
        self.generator = torch.Generator().manual_seed(seed_of(run_seed, p.modality, p.level)) \
            if p.kind == "noise" else None

    def __call__(self, inputs: Sequence[torch.Tensor], present: torch.Tensor | None):
        p, inputs = self.p, list(inputs)
        if p.kind == "clean":
            return inputs, present
        x = inputs[p.modality]
        if p.kind == "remove":
            inputs[p.modality] = torch.zeros_like(x)
            if p.missing == "mask":
                if present is None:
                    present = torch.ones(x.shape[0], len(inputs), dtype=torch.bool, device=x.device)
                present = present.clone()
                present[:, p.modality] = False
            return inputs, present
        std = self.std[p.modality]
        if tuple(std.shape) != tuple(x.shape[1:]):
            raise ValueError(f"std: modality {p.modality} has feature shape {list(std.shape)}, the batch "
                             f"{list(x.shape[1:])}")
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
        inputs[p.modality] = x + (p.level * std * noise).to(x.device, x.dtype)
        return inputs, present


class Evaluator(Protocol):
    """What an integration provides for the robustness evaluation of one trained run (its selected checkpoint)."""

    modalities: list[str]      # in the fusion's order
    takes_mask: bool           # the fusion takes a per-sample mask (``present``)
    noise_on: str              # what the noise is added to, in words

    def train_inputs(self) -> Iterable[tuple[list[torch.Tensor], torch.Tensor | None]]:
        """Batches of the training split's encoder inputs, per modality, with their mask (None: all present)."""

    def evaluate(self, transform: Callable) -> dict[str, float]:
        """The test split's metrics with ``transform(inputs, present)`` applied to every test batch."""


def evaluate(evaluator: Evaluator, run_seed: int, levels: Sequence[float] = NOISE_LEVELS,
             on_condition: Callable[[str, int, int], None] = lambda name, k, n: None) -> dict[str, Any]:
    """Every condition of :func:`plan` on the evaluator's test split: the ``robustness`` entry of a run's record."""
    stats = InputStats()
    for inputs, present in evaluator.train_inputs():
        stats.add(inputs, present)
    std = stats.std()
    conditions = plan(len(evaluator.modalities), evaluator.takes_mask, levels)
    results = {}
    for k, p in enumerate(conditions):
        name = p.name(evaluator.modalities)
        on_condition(name, k + 1, len(conditions))
        results[name] = evaluator.evaluate(Transform(p, std, run_seed))
    return {"modalities": list(evaluator.modalities), "takes_mask": bool(evaluator.takes_mask),
            "levels": [float(x) for x in levels], "noise_on": evaluator.noise_on,
            "noise_seed": f"per (run seed {run_seed}, modality, level)", "train_batches_for_std": stats.n,
            "test": results}


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
    """MultiBench's relative robustness (trapezoid area under the metric over the noise levels), divided by the
    levels' range: the curve's mean height, in the metric's units (the clean metric when nothing changes)."""
    if len(levels) != len(values) or len(levels) < 2:
        raise ValueError(f"levels, values: expected two equally long sequences of >= 2, got {len(levels)} and "
                         f"{len(values)}")
    area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(levels, levels[1:], values, values[1:]))
    return area / (levels[-1] - levels[0])
