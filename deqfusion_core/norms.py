"""Normalisations of the fixed-point map f (``DEQFusion(norm=...)``), as torch parametrizations.

A norm is a function ``norm(fmap, **options)`` registered by name (``register_norm``, ``get_norm``; the timm
way) that parametrizes the parameters of a :class:`~deqfusion_core.fusion_map.FusionMap` inside the fixed-point
loop: the modality blocks' ``lin1``, ``lin2``, GroupNorms ``gn1``-``gn3`` and the fuse block's ``gate``, ``fuse``
and ``gn``. The input projections and x_fuse's weights act on the injection only and are left alone.

- ``weight``: torch's weight normalisation (``parametrizations.weight_norm``) of lin1, lin2, gate, fuse.
- ``spectral``: torch's spectral normalisation (``parametrizations.spectral_norm``: one power iteration per
  weight computation in training mode) of lin1, lin2, gate, fuse.
- ``contractive`` (ours, not the paper's): bounds every GroupNorm gain in f to (-``max_gain``, ``max_gain``)
  as ``max_gain * tanh(w / max_gain)`` (about the identity for |w| << max_gain; default 0.25, a quarter of
  the initial gain of 1), and, with ``spectral=True`` (default), spectral normalisation of lin2, gate and fuse.

What decides contraction here. Every Linear in f is followed by a GroupNorm, whose Jacobian is
``gain / sigma * (projection)`` with sigma the group's std of its input: f is invariant to the scale of lin1, and
the size of df/dz is set by the GroupNorm gains relative to the scale of what enters them from the injection
(x_i, x_fuse). Measured (dim 64, 4 groups, batch 32, float64, at initialisation; the previous measurement on
this branch): with ``weight`` or ``spectral`` the spectral radius of df/dz at z* is not bounded (rho median 0.91,
max 1.61 with none/weight; spectral: max 1.34; output gains x2: spectral max 4.7), while halving every
GroupNorm gain gives max 0.91. So ``weight`` and ``spectral`` are offered because they are the usual DEQ norms,
not because they make this f contractive; ``contractive`` is the one that does in our measurements (see
``DEQFusion``'s docstring for the numbers). It is a measured property, not a proof: the gain bound shrinks df/dz
relative to the injection's scale, so an injection of much smaller scale than 1 weakens it.

Applying a norm changes the parameters' names in the state_dict (torch's ``parametrizations.<name>.original``
and, for ``spectral``, the power iteration's ``_u``/``_v``), so a checkpoint loads into a DEQFusion with the
same ``norm``. In a forward, DEQFusion computes the parametrized weights once (:func:`normalised_once`), so the
solve sees one fixed f (an implicit backward that re-applies f to a subset of samples computes them anew).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from ._registry import registry

__all__ = ["NORMS", "register_norm", "get_norm", "apply_norm", "normalised_once", "GainBound", "loop_linears",
           "loop_group_norms"]

NORMS: dict[str, Callable[..., None]] = {}
register_norm, get_norm = registry(NORMS, "norm", "norm")


def apply_norm(fmap: nn.Module, name: str | None, options: dict | None = None) -> nn.Module:
    """Parametrize ``fmap`` (a FusionMap) with the norm ``name`` and its ``options`` (``norm_options``), in
    place; ``None``: nothing (then ``options`` must be empty). Returns ``fmap``."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"norm_options: expected a dict, got {type(options).__name__}")
    options = dict(options or {})
    if name is None:
        if options:
            raise ValueError(f"norm_options: given without a norm: {options!r}")
        return fmap
    fn = get_norm(name)
    params = inspect.signature(fn).parameters.values()
    known = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"norm_options: norm {name!r} takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known) or 'none'}")
    fn(fmap, **options)
    return fmap


@contextlib.contextmanager
def normalised_once(module: nn.Module):
    """Within: every parametrized tensor of ``module`` is computed once, now, in the caller's grad mode, and
    reused (``parametrize.cached``); so a forward's tape-free solve and its differentiable f application
    see the same weights, and those carry the graph to the parametrizations' originals."""
    with parametrize.cached():
        for sub in module.modules():
            if parametrize.is_parametrized(sub):
                for name in sub.parametrizations:
                    getattr(sub, name)
        yield


def loop_linears(fmap, which: tuple[str, ...] = ("lin1", "lin2", "gate", "fuse")) -> Iterator[nn.Linear]:
    """The Linear layers of f inside the fixed-point loop, among ``which``."""
    for blk in fmap.blocks or []:
        for name in ("lin1", "lin2"):
            if name in which:
                yield getattr(blk, name)
    if fmap.fusion is not None:
        for name in ("gate", "fuse"):
            layer = getattr(fmap.fusion, name)
            if name in which and layer is not None:
                yield layer


def loop_group_norms(fmap) -> Iterator[nn.GroupNorm]:
    """The GroupNorms of f (all of them are inside the fixed-point loop)."""
    for blk in fmap.blocks or []:
        yield from (blk.gn1, blk.gn2, blk.gn3)
    if fmap.fusion is not None:
        yield fmap.fusion.gn


@register_norm("weight")
def weight(fmap):
    """torch's weight normalisation of lin1, lin2, gate and fuse (w = g v / ||v||, per output row)."""
    for layer in loop_linears(fmap):
        parametrizations.weight_norm(layer)


@register_norm("spectral")
def spectral(fmap, *, n_power_iterations: int = 1):
    """torch's spectral normalisation of lin1, lin2, gate and fuse (w / sigma_max(w), sigma by power iteration)."""
    if not isinstance(n_power_iterations, int) or isinstance(n_power_iterations, bool) or n_power_iterations < 1:
        raise ValueError(f"norm_options: n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    for layer in loop_linears(fmap):
        parametrizations.spectral_norm(layer, n_power_iterations=n_power_iterations)


class GainBound(nn.Module):
    """The parametrization w -> max_gain * tanh(w / max_gain): a gain in (-max_gain, max_gain), about w for
    |w| << max_gain. No right inverse: registering it keeps the stored values, so a gain of 1 reads as
    max_gain * tanh(1 / max_gain) (0.250 for max_gain 0.25)."""

    def __init__(self, max_gain: float):
        super().__init__()
        self.max_gain = float(max_gain)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.max_gain * torch.tanh(w / self.max_gain)

    def extra_repr(self) -> str:
        return f"max_gain={self.max_gain}"


@register_norm("contractive")
def contractive(fmap, *, max_gain: float = 0.25, spectral: bool = True):
    """Ours: every GroupNorm gain in f bounded by ``max_gain`` (:class:`GainBound`) and, with ``spectral``,
    spectral normalisation of lin2, gate and fuse (lin1 is followed by a GroupNorm that undoes its scale)."""
    if not isinstance(max_gain, (int, float)) or isinstance(max_gain, bool) or not max_gain > 0:
        raise ValueError(f"norm_options: max_gain must be a number > 0, got {max_gain!r}")
    if not isinstance(spectral, bool):
        raise ValueError(f"norm_options: spectral must be True or False, got {spectral!r}")
    for gn in loop_group_norms(fmap):
        if gn.affine:
            parametrize.register_parametrization(gn, "weight", GainBound(max_gain))
    if spectral:
        for layer in loop_linears(fmap, ("lin2", "gate", "fuse")):
            parametrizations.spectral_norm(layer)
