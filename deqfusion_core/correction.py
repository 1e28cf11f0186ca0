"""Fixed-point correction (Bai et al. 2022, "Deep Equilibrium Optical Flow Estimation", and TorchDEQ's
``fp_correction``): the training loss is applied to several states along the solve, not only to its end.

With ``DEQFusion(correction_steps=k)``, a training forward's ``stats.iterates`` holds k fused tensors from the
solve's trajectory, each differentiable through one application of f; the final output is ``fused``:

    out = fusion(xs)
    loss = correction_loss(lambda fused: criterion(head(fused), y), [*out.stats.iterates, out.fused])
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["correction_loss", "correction_weights"]


def correction_weights(n: int, gamma: float = 0.8) -> list[float]:
    """The weights gamma^(n-k) of the n states k = 1..n: the last one 1, each earlier one gamma times the
    next (TorchDEQ's ``exp`` weight function, gamma 0.8 as in Bai et al.)."""
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma > 0:
        raise ValueError(f"gamma: must be a number > 0, got {gamma!r}")
    return [float(gamma) ** (n - k) for k in range(1, n + 1)]


def correction_loss(loss_fn: Callable[[torch.Tensor], torch.Tensor], iterates: Sequence[torch.Tensor],
                    gamma: float = 0.8) -> torch.Tensor:
    """sum_k gamma^(K-k) loss_fn(iterates[k-1]) over the K states ``iterates`` (k = 1..K; the last weighs 1).

    ``iterates``: fused tensors in solve order, e.g. ``[*out.stats.iterates, out.fused]`` of a training forward
    with ``correction_steps`` > 0. ``loss_fn`` maps one fused tensor to a scalar loss.
    """
    if iterates is None or isinstance(iterates, torch.Tensor) or len(iterates) == 0:
        raise ValueError("iterates: expected a non-empty sequence of fused tensors (stats.iterates is None "
                         "unless DEQFusion has correction_steps > 0 and the forward ran in training)")
    weights = correction_weights(len(iterates), gamma)
    return sum(w * loss_fn(z) for w, z in zip(weights, iterates))
