"""The Jacobian regulariser (Hutchinson estimate of ||df/dz||_F^2) and a way to put any auxiliary
loss into an unmodified ``loss.backward()``, and schedules of the Jacobian term's weight over training."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._registry import registry

__all__ = ["jacobian_loss", "attach_aux_loss", "JAC_SCHEDULES", "register_jac_schedule", "get_jac_schedule"]

# schedule(start, final, step, steps) -> the weight at training forward ``step`` (0-based) of ``steps``
JAC_SCHEDULES: dict[str, Callable[[float, float, int, int], float]] = {}
register_jac_schedule, get_jac_schedule = registry(JAC_SCHEDULES, "jac_schedule", "schedule")


@register_jac_schedule("constant")
def constant(start: float, final: float, step: int, steps: int) -> float:
    """``start`` throughout (the paper's fixed weight)."""
    return start


@register_jac_schedule("linear")
def linear(start: float, final: float, step: int, steps: int) -> float:
    """From ``start`` to ``final`` linearly over ``steps`` training forwards, then ``final``."""
    return start + (final - start) * min(step / steps, 1.0)


@register_jac_schedule("cosine")
def cosine(start: float, final: float, step: int, steps: int) -> float:
    """From ``start`` to ``final`` along half a cosine over ``steps`` training forwards, then ``final``."""
    return final + (start - final) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))


def jacobian_loss(fz: torch.Tensor, z: torch.Tensor, samples: int = 1, create_graph: bool = True,
                  blocks: int | None = None) -> torch.Tensor:
    """Hutchinson estimate of ||J||_F^2 / numel(z) with J = d fz / d z, from ``samples`` Gaussian probes.

    ``fz`` must have been computed from ``z`` (which requires grad). E[||v^T J||^2] = ||J||_F^2 for
    v ~ N(0, I); dividing by the number of elements makes the term independent of batch and width.

    ``blocks``: the state is ``blocks`` equal parts z = (z_1, ..., z_N, z_fuse) and J is block lower-triangular
    as DEQ fusion's f makes it (f_i reads z_i only; f_fuse reads every part). Then only the diagonal blocks are
    estimated, sum_i ||J_ii||_F^2 (two probes per sample: one on the modality parts, read back on them, one on
    z_fuse, read back on it). The spectral radius of such a J is the largest of its diagonal blocks', so this is
    the part that decides convergence; the off-diagonal J_fuse,i, through which f_fuse reads the modalities (the
    cross-modal interaction), is left out of the penalty (``DEQFusion(jac_term="diagonal")``; ours, not the paper's).
    """
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    if blocks is not None and (blocks < 2 or fz.shape[-1] % blocks):
        raise ValueError(f"blocks: must be >= 2 and divide the state width {fz.shape[-1]}, got {blocks}")
    total = fz.new_zeros(())
    for _ in range(samples):
        v = torch.randn_like(fz)
        if blocks is None:
            (vj,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph)
            total = total + vj.float().pow(2).sum()
            continue
        parts = v.view(v.shape[0], blocks, -1)
        on_modalities = torch.cat([parts[:, :-1], torch.zeros_like(parts[:, -1:])], 1).view_as(v)
        on_fuse = torch.cat([torch.zeros_like(parts[:, :-1]), parts[:, -1:]], 1).view_as(v)
        (a,) = torch.autograd.grad(fz, z, on_modalities, retain_graph=True, create_graph=create_graph)
        (c,) = torch.autograd.grad(fz, z, on_fuse, retain_graph=True, create_graph=create_graph)
        total = total + a.view_as(parts)[:, :-1].float().pow(2).sum() + c.view_as(parts)[:, -1].float().pow(2).sum()
    return total / (samples * z.numel())


class _AttachAux(torch.autograd.Function):
    """Identity on ``x``; its backward also back-propagates ``weight * aux`` (a scalar)."""

    @staticmethod
    def forward(ctx, x, aux, weight):
        ctx.weight = weight
        ctx.aux_shape = aux.shape
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full(ctx.aux_shape, ctx.weight), None


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
    """Return ``x`` unchanged, such that any loss computed from it back-propagates ``weight * aux`` too.

    This is how the Jacobian term reaches a training loop that cannot be edited: ``loss.backward()``
    gives the same parameter gradients as ``(loss + weight * aux).backward()``, once per backward of
    ``x`` (the term is counted once however many heads use ``x``).
    """
    if aux.numel() != 1:
        raise ValueError(f"aux: expected a scalar loss term, got shape {tuple(aux.shape)}")
    if weight == 0 or not aux.requires_grad:
        return x
    return _AttachAux.apply(x, aux, float(weight))
