"""Fusions by name, in the timm way: ``create(name, input_dims, **kw)``, ``get(name)``, ``list_fusions()``.

Every factory takes the encoders' output widths (``input_dims``) and returns an ``nn.Module`` that follows
MultiBench's fusion contract (``forward(list_of_tensors)``) and carries ``output_dim``, the width of what
reaches the head, so a head can be sized without knowing the fusion::

    fusion = create("deq", [512, 512], dim=512)           # works without MultiBench
    fusion = create("low_rank_tensor", [512, 512], output_dim=512, rank=128)   # from the user's checkout
    head = Linear(fusion.output_dim, 23)

The MultiBench names are always listed; creating one needs the checkout (``root=``, ``use_checkout`` or
``$DEQFUSION_MULTIBENCH_ROOT``) and otherwise raises ``MultiBenchNotFound`` saying so.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from deqfusion_core.integration import FusionAdapter
from deqfusion_core.options import FusionOptions

from .checkout import import_multibench


@dataclass(frozen=True)
class FusionEntry:
    name: str
    factory: Callable[..., nn.Module]
    source: str  # "deqfusion", or the MultiBench class it builds
    summary: str


FUSIONS: dict[str, FusionEntry] = {}   # name -> entry (the integration re-registers `deq` with its options)


def register_fusion(name: str, source: str = "deqfusion", summary: str = ""):
    """Decorator: register ``factory(input_dims, **kw) -> nn.Module with .output_dim`` under ``name``."""
    def deco(factory):
        if name in FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered (by {FUSIONS[name].source})")
        FUSIONS[name] = FusionEntry(name, factory, source, summary or (factory.__doc__ or "").strip().split("\n")[0])
        return factory
    return deco


def list_fusions(filter: str = "") -> list[str]:
    """Registered names, sorted; ``filter`` is a shell pattern (``"concat*"``)."""
    return sorted(n for n in FUSIONS if not filter or fnmatch.fnmatch(n, filter))


def get(name: str) -> Callable[..., nn.Module]:
    """The factory registered under ``name``."""
    if name not in FUSIONS:
        raise KeyError(f"unknown fusion {name!r}; registered: {', '.join(list_fusions())}")
    return FUSIONS[name].factory


def entry(name: str) -> FusionEntry:
    get(name)
    return FUSIONS[name]


def create(name: str, input_dims: Sequence[int], **kwargs) -> nn.Module:
    """Build fusion ``name`` for encoders of widths ``input_dims``; the result has ``output_dim``."""
    dims = list(input_dims) if not isinstance(input_dims, int) else None
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise TypeError(f"input_dims: expected a non-empty sequence of positive ints, got {input_dims!r}")
    module = get(name)(dims, **kwargs)
    if getattr(module, "output_dim", None) is None:
        raise TypeError(f"fusion {name!r}: its factory returned a module without output_dim")
    return module


# -- deq ---------------------------------------------------------------------------------------------

class MultiBenchDEQ(FusionAdapter):
    """DEQ fusion under MultiBench's fusion contract.

    ``forward`` returns a plain tuple ``(fused, jac_loss, stats)``: MultiBench's ``MMDL`` sends element 0
    to the head and keeps the whole tuple in ``objective_args_dict['fused']``, where
    ``training.DEQObjective`` finds the Jacobian term and weights it. (A NamedTuple would not do: ``MMDL``
    tests ``type(out) is tuple``.)
    """

    label, jacobian = "MultiBench", "report"

    def __init__(self, input_dims: Sequence[int], dim: int | None = None, options=None):
        super().__init__(input_dims, dim, options)
        self.output_dim = self.deq.dim

    def forward(self, modalities):
        fused = self.fuse(modalities)
        return (fused, self.last_jac_loss, self.last_stats)


@register_fusion("deq")
def deq(input_dims, dim=None, defaults=None, **deq_kwargs):
    """Deep Equilibrium fusion (DEQFusion); ``dim`` defaults to the common input width."""
    # defaults: the options of `deqfusion run multibench --solver ...` (the integration binds them)
    return MultiBenchDEQ(input_dims, dim, FusionOptions.coerce(defaults).updated(deq_kwargs, where="deq"))


# -- MultiBench's fusions (fusions/common_fusions.py and fusions/mult.py of the user's checkout) -------

def _fusions(root, name):
    return getattr(import_multibench("fusions.common_fusions", root), name)


def _with_width(module: nn.Module, width) -> nn.Module:
    module.output_dim = width
    return module


def _require(name: str, value, what: str):
    if value is None:
        raise TypeError(f"{name}: required ({what})")
    return value


def _modalities(fusion: str, dims, n: int):
    if len(dims) != n:
        raise ValueError(f"input_dims: {fusion} fuses exactly {n} modalities, got {len(dims)} ({dims})")


@register_fusion("concat", "Concat", "concatenation (flattens each input); width sum(input_dims)")
def concat(input_dims, root=None):
    return _with_width(_fusions(root, "Concat")(), sum(input_dims))


@register_fusion("concat_early", "ConcatEarly", "concatenation of sequences [B, T, d_i] on the feature axis")
def concat_early(input_dims, root=None):
    return _with_width(_fusions(root, "ConcatEarly")(), sum(input_dims))


@register_fusion("stack", "Stack", "stack equal-width inputs to [B, d, N]; output_dim is (d, N)")
def stack(input_dims, root=None):
    if len(set(input_dims)) != 1:
        raise ValueError(f"input_dims: stack needs equal widths, got {input_dims}")
    return _with_width(_fusions(root, "Stack")(), (input_dims[0], len(input_dims)))


@register_fusion("concat_linear", "ConcatWithLinear", "concatenation, then Linear to output_dim")
def concat_linear(input_dims, output_dim=None, root=None):
    output_dim = _require("output_dim", output_dim, "width of ConcatWithLinear's Linear")
    return _with_width(_fusions(root, "ConcatWithLinear")(sum(input_dims), output_dim), output_dim)


@register_fusion("tensor", "TensorFusion", "outer product of [1, x_i]; width prod(d_i + 1)")
def tensor(input_dims, root=None):
    width = input_dims[0] if len(input_dims) == 1 else math.prod(d + 1 for d in input_dims)
    return _with_width(_fusions(root, "TensorFusion")(), width)


@register_fusion("low_rank_tensor", "LowRankTensorFusion", "low-rank tensor fusion to output_dim (rank: 16)")
def low_rank_tensor(input_dims, output_dim=None, rank=16, flatten=True, root=None):
    output_dim = _require("output_dim", output_dim, "LowRankTensorFusion's output width")
    module = _fusions(root, "LowRankTensorFusion")(list(input_dims), output_dim, rank, flatten)
    return _with_width(module, output_dim)


@register_fusion("multiplicative_interactions", "MultiplicativeInteractions2Modal",
                 "2-modal multiplicative interactions; output 'matrix' (default), 'vector', 'scalar', 'matrix3D'")
def multiplicative_interactions(input_dims, output_dim=None, output="matrix", root=None, **kwargs):
    _modalities("multiplicative_interactions", input_dims, 2)
    widths = {"matrix": output_dim, "matrix3D": output_dim, "vector": input_dims[1], "scalar": input_dims[1]}
    if output not in widths:
        raise ValueError(f"output: expected one of {sorted(widths)}, got {output!r}")
    if output in ("matrix", "matrix3D"):
        _require("output_dim", output_dim, f"MultiplicativeInteractions2Modal's width for output={output!r}")
    width = tuple(output_dim) if output == "matrix3D" else widths[output]
    module = _fusions(root, "MultiplicativeInteractions2Modal")(list(input_dims), output_dim, output, **kwargs)
    return _with_width(module, width)


@register_fusion("multiplicative_interactions_3modal", "MultiplicativeInteractions3Modal",
                 "3-modal multiplicative interactions to output_dim (task='affect' for [B, d] inputs)")
def multiplicative_interactions_3modal(input_dims, output_dim=None, task="affect", root=None):
    _modalities("multiplicative_interactions_3modal", input_dims, 3)
    output_dim = _require("output_dim", output_dim, "MultiplicativeInteractions3Modal's output width")
    return _with_width(_fusions(root, "MultiplicativeInteractions3Modal")(list(input_dims), output_dim, task), output_dim)


@register_fusion("nl_gate", "NLgate", "non-local gate: x_0 as [thw_dim, c_dim] queries x_1; width thw_dim * c_dim")
def nl_gate(input_dims, thw_dim=None, c_dim=None, tf_dim=None, q_linear=None, k_linear=None, v_linear=None, root=None):
    _modalities("nl_gate", input_dims, 2)
    for name, value in (("thw_dim", thw_dim), ("c_dim", c_dim), ("tf_dim", tf_dim)):
        _require(name, value, "NLgate reshapes its inputs with thw_dim, c_dim and tf_dim")
    expected = (q_linear[0] if q_linear else thw_dim * c_dim, k_linear[0] if k_linear else c_dim * tf_dim)
    if tuple(input_dims) != expected:
        raise ValueError(f"input_dims: NLgate(thw_dim={thw_dim}, c_dim={c_dim}, tf_dim={tf_dim}) takes widths "
                         f"{list(expected)}, got {input_dims}")
    module = _fusions(root, "NLgate")(thw_dim, c_dim, tf_dim, q_linear, k_linear, v_linear)
    return _with_width(module, thw_dim * c_dim)


@register_fusion("mult", "MULTModel", "Multimodal Transformer over sequences [B, T, d_i] to output_dim (default 1)")
def mult(input_dims, output_dim=1, root=None, **hyper_params):
    MULTModel = import_multibench("fusions.mult", root).MULTModel
    unknown = set(hyper_params) - set(vars(MULTModel.DefaultHyperParams))
    if unknown:
        raise TypeError(f"mult: unknown hyper-parameters {sorted(unknown)}")
    params = type("HyperParams", (MULTModel.DefaultHyperParams,), {**hyper_params, "output_dim": output_dim})
    return _with_width(MULTModel(len(input_dims), list(input_dims), params), output_dim)
