"""Normalisations of the fixed-point map f (``DEQFusion(norm=...)``).

A norm is a function ``norm(fmap, **options)`` registered by name (``register_norm``, ``get_norm``; the timm
way) that normalises weights of a :class:`~deqfusion_core.fusion_map.FusionMap` inside the fixed-point
loop: the modality blocks' ``lin1``, ``lin2``, GroupNorms ``gn1``-``gn3`` and the fuse block's ``gate``, ``fuse``
and ``gn``. The input projections and x_fuse's weights act on the injection only and are left alone.

- ``weight``: weight normalisation (torch's ``weight_norm`` maths, :class:`WeightNorm`) of lin1, lin2, gate, fuse.
- ``spectral``: spectral normalisation (torch's ``spectral_norm`` maths, :class:`SpectralNorm`: power
  iteration, one step per training forward) of lin1, lin2, gate, fuse.
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

How a norm is held (ours, in place of torch's parametrizations, whose dynamically created classes cannot be
pickled: ``torch.save(model)``, which MultiBench's ``train()`` does, failed). :func:`normalise` moves a layer's
``weight`` Parameter into ``layer.parametrizations.weight`` (a :class:`Normalised`: the raw parameter(s) and one
:class:`Normaliser`) and changes the layer's class to a module-level subclass (:class:`NormedLinear`,
:class:`NormedGroupNorm`) whose ``weight`` is a property computing the normalised weight. Pickling,
``copy.deepcopy`` and ``state_dict`` work as for any module, and the state_dict names are torch's:
``parametrizations.weight.original`` (weight norm: ``original0`` = g, ``original1`` = v) and, for the spectral
norm, the power iteration's ``parametrizations.weight.0._u``/``_v``; so checkpoints of the parametrization-based
norms load. The maths is torch's (``weight_norm``, ``spectral_norm`` with its 15 + n initial power iterations).

One difference, named: the spectral norm's power iteration advances once per training forward of DEQFusion
(:func:`normalised_once`), not at every computation of the weight in training mode, so the weight is a pure
function of the parameters and buffers, and an implicit backward that re-applies f sees the forward's f. In a
forward, DEQFusion computes the normalised weights once (:func:`normalised_once`), so the solve sees one fixed f.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import registry
from .fusion_map import GroupNorm

__all__ = ["NORMS", "register_norm", "get_norm", "apply_norm", "normalised_once", "normalise", "is_normalised",
           "Normaliser", "WeightNorm", "SpectralNorm", "GainBound", "Normalised", "NormedLinear", "NormedGroupNorm",
           "loop_linears", "loop_group_norms"]

NORMS: dict[str, Callable[..., None]] = {}
register_norm, get_norm = registry(NORMS, "norm", "norm")


# -- the normalisers: raw parameter(s) -> weight -------------------------------------------------------------------
class Normaliser(nn.Module):
    """A map from a layer's raw parameter(s) to its weight. ``originals(weight)``: the raw parameters that
    give ``weight`` now (default: itself); ``forward(*raw)``: the weight; ``step(*raw)``: advance any state
    (once per training forward of DEQFusion; default: nothing)."""

    def originals(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (weight,)

    def step(self, *raw: torch.Tensor) -> None:
        pass


class WeightNorm(Normaliser):
    """torch's weight normalisation, per output row: w = g v / ||v|| (raw: ``original0`` = g, ``original1`` = v)."""

    def originals(self, weight):
        return torch.norm_except_dim(weight, 2, 0), weight

    def forward(self, g, v):
        return torch._weight_norm(v, g, 0)


class SpectralNorm(Normaliser):
    """torch's spectral normalisation: w / sigma with sigma = u^T w v, u and v (buffers ``_u``, ``_v``) from power
    iteration, ``n_power_iterations`` steps per training forward; at construction 15 + n steps, as torch's
    ``spectral_norm`` (15, and the n of its registration check). The gradient treats u and v as constants."""

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SpectralNorm: expected a 2-d weight, got shape {list(weight.shape)}")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        h, w = weight.shape
        u, v = weight.new_empty(h).normal_(0, 1), weight.new_empty(w).normal_(0, 1)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
        self.power_iteration(weight, 15 + n_power_iterations)

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            F.normalize(torch.mv(weight, self._v), dim=0, eps=self.eps, out=self._u)
            F.normalize(torch.mv(weight.H, self._u), dim=0, eps=self.eps, out=self._v)

    def step(self, weight):
        if self.training:
            self.power_iteration(weight, self.n_power_iterations)

    def forward(self, weight):
        # clones: a later step updates u and v in place, which the graph of an earlier forward must not see
        sigma = torch.vdot(self._u.clone(), torch.mv(weight, self._v.clone()))
        return weight / sigma

    def extra_repr(self) -> str:
        return f"n_power_iterations={self.n_power_iterations}"


class GainBound(Normaliser):
    """w -> max_gain * tanh(w / max_gain): a gain in (-max_gain, max_gain), about w for |w| << max_gain. The raw
    parameter keeps the stored values (no inverse), so a gain of 1 reads as max_gain * tanh(1 / max_gain)
    (0.250 for max_gain 0.25)."""

    def __init__(self, max_gain: float):
        super().__init__()
        self.max_gain = float(max_gain)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.max_gain * torch.tanh(w / self.max_gain)

    def extra_repr(self) -> str:
        return f"max_gain={self.max_gain}"


# -- holding a normalised weight -----------------------------------------------------------------------------------
class Normalised(nn.ModuleList):
    """``layer.parametrizations.weight``: the raw parameter ``original`` (or ``original0``, ``original1``, ...)
    and the normaliser at index 0 (the names of torch's ParametrizationList). Called: the weight."""

    def __init__(self, normaliser: Normaliser, weight: nn.Parameter):
        super().__init__([normaliser])
        raw = normaliser.originals(weight.detach())
        if len(raw) == 1:
            self.original = weight                # the same Parameter: optimisers built before still hold it
        else:
            for i, r in enumerate(raw):
                self.register_parameter(f"original{i}", nn.Parameter(r.clone(), weight.requires_grad))

    def raw(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._parameters.values())

    def forward(self) -> torch.Tensor:
        return self[0](*self.raw())

    def step(self) -> None:
        with torch.no_grad():
            self[0].step(*self.raw())


class _NormedWeight:
    """A layer whose ``weight`` is computed by ``parametrizations.weight`` (inside :func:`normalised_once`: the
    value computed on entry)."""

    @property
    def weight(self) -> torch.Tensor:
        fixed = self.__dict__.get("_fixed_weight")
        return self.parametrizations.weight() if fixed is None else fixed


class NormedLinear(_NormedWeight, nn.Linear):
    """nn.Linear with a normalised weight (:func:`normalise`)."""


class NormedGroupNorm(_NormedWeight, GroupNorm):
    """GroupNorm (fusion_map's) with a normalised gain (:func:`normalise`)."""


NORMED = {nn.Linear: NormedLinear, GroupNorm: NormedGroupNorm}


def normalise(layer: nn.Module, normaliser: Normaliser) -> nn.Module:
    """Normalise ``layer.weight`` by ``normaliser``, in place: the Parameter becomes the raw parameter of
    ``layer.parametrizations.weight`` and the layer's class the normed one of ``NORMED``. Returns ``layer``."""
    cls = NORMED.get(type(layer))
    if cls is None:
        raise TypeError(f"normalise: a {', '.join(c.__name__ for c in NORMED)} without a norm is needed, "
                        f"got {type(layer).__name__}")
    weight = layer._parameters.pop("weight")
    layer.__class__ = cls
    layer.parametrizations = nn.ModuleDict({"weight": Normalised(normaliser, weight)})
    return layer


def is_normalised(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is normalised (:func:`normalise`)."""
    return isinstance(layer, _NormedWeight)


@contextlib.contextmanager
def normalised_once(module: nn.Module):
    """Within: every normalised weight of ``module`` is computed once, now, in the caller's grad mode, and reused;
    so a forward's tape-free solve and its differentiable f application see the same weights, and those carry
    the graph to the raw parameters. On entry, in training mode, the normalisers' state advances one step
    (the spectral norm's power iteration)."""
    layers = [sub for sub in module.modules() if is_normalised(sub)]
    try:
        for layer in layers:
            layer.parametrizations.weight.step()
            layer.__dict__["_fixed_weight"] = layer.parametrizations.weight()
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_fixed_weight", None)


def apply_norm(fmap: nn.Module, name: str | None, options: dict | None = None) -> nn.Module:
    """Normalise ``fmap`` (a FusionMap) with the norm ``name`` and its ``options`` (``norm_options``), in
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


def _spectral(layer: nn.Linear, n_power_iterations: int = 1) -> None:
    normalise(layer, SpectralNorm(layer.weight.detach(), n_power_iterations))


@register_norm("weight")
def weight(fmap):
    """torch's weight normalisation of lin1, lin2, gate and fuse (w = g v / ||v||, per output row)."""
    for layer in loop_linears(fmap):
        normalise(layer, WeightNorm())


@register_norm("spectral")
def spectral(fmap, *, n_power_iterations: int = 1):
    """torch's spectral normalisation of lin1, lin2, gate and fuse (w / sigma_max(w), sigma by power iteration)."""
    if not isinstance(n_power_iterations, int) or isinstance(n_power_iterations, bool) or n_power_iterations < 1:
        raise ValueError(f"norm_options: n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    for layer in loop_linears(fmap):
        _spectral(layer, n_power_iterations)


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
            normalise(gn, GainBound(max_gain))
    if spectral:
        for layer in loop_linears(fmap, ("lin2", "gate", "fuse")):
            _spectral(layer)
