"""`deq` in MMF's fusion registry, with MMF's fusion convention, and building any registered fusion by name.

MMF's fusions (``mmf/modules/fusions.py``) are built as ``cls(input_dims, output_dim, **params)`` and called
as ``fusion([x1, x2, ...]) -> Tensor``. :class:`DEQFusionMMF` follows it; the Jacobian term and the solver
statistics of its last call stay on the module (``last_jac_loss``, ``last_stats``) for the model to report.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from deqfusion_core.integration import FusionAdapter
from deqfusion_core.options import FusionOptions


class DEQFusionMMF(FusionAdapter):
    """DEQ fusion with MMF's fusion signature: ``(input_dims, output_dim, **DEQFusion options)``.

    ``jac_weight``: weight of the Jacobian term. A model that knows this fusion (``FusionClassifier``) sets
    ``jacobian = "report"`` and puts ``jac_weight * last_jac_loss`` into MMF's ``losses`` dict; any other
    model gets the term attached to the fused tensor's backward, so MMF's unchanged ``loss.backward()``
    includes it either way. ``command_line``: the options of ``deqfusion run mmf`` (``--f-max-iter ...``),
    ``mmf-demo -o`` and ``compare mmf -o``, which override the config's params, any DEQFusion keyword whether
    the config lists it or not (MMF's command line can only override keys its config has);
    :func:`register_fusions` registers a subclass that carries them.
    """

    label = "MMF"
    command_line: Mapping[str, Any] = {}

    def __init__(self, input_dims: Sequence[int], output_dim: int, **params):
        super().__init__(list(input_dims), int(output_dim), _layer(params, self.command_line))

    def forward(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        """``present`` [B, N] bool: which modality of each sample is there (DEQFusion's mask; None: all)."""
        return self.fuse(xs, present=present)


def _layer(params: Mapping[str, Any], command_line: Mapping[str, Any]) -> FusionOptions:
    return FusionOptions(params, where="fusion.params").updated(command_line, where="command-line fusion option")


def params_with_options(params: Mapping[str, Any], command_line: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fusion.params`` a `deq` fusion registered with ``command_line`` is built with: the options over the
    params (the same layering :class:`DEQFusionMMF` applies); keys set to None stay (DEQFusion's default), so a
    recorded configuration shows them. Unknown keys raise :class:`~deqfusion_core.options.OptionError`."""
    params, command_line = dict(params), dict(command_line)
    built = _layer(params, command_line).given()
    return {k: v for k, v in {**params, **command_line}.items() if v is None or k in built}


def register_fusions(options: Mapping[str, Any] | None = None) -> dict[str, type]:
    """Register `deq` (a :class:`DEQFusionMMF` with ``options`` from the command line; None: keep the one
    registered) and MMF's own fusions (rc10 never imports mmf.modules.fusions). Returns the registry."""
    import mmf.modules.fusions  # noqa: F401 - registers block, mutan, linear_sum, ... as a side effect
    from mmf.common.registry import registry

    mapping = registry.mapping.setdefault("fusion_name_mapping", {})
    registered = mapping.get("deq")
    if options is not None or not (isinstance(registered, type) and issubclass(registered, DEQFusionMMF)):
        given = dict(options.given() if isinstance(options, FusionOptions) else options or {})
        registry.register_fusion("deq")(type("DEQFusionMMF", (DEQFusionMMF,), {"command_line": given}))
    return mapping


def build_fusion(config: Any, input_dims: Sequence[int], output_dim: int, key: str = "fusion") -> nn.Module:
    """Build ``{type: NAME, params: {...}}`` from MMF's fusion registry; errors name the config ``key``."""
    mapping = register_fusions()
    if config is None:
        raise KeyError(f"{key}: missing; set {key}.type to one of: {', '.join(sorted(mapping))}")
    name = config.get("type") if hasattr(config, "get") else None
    if not name:
        raise KeyError(f"{key}.type: missing; one of: {', '.join(sorted(mapping))}")
    if name not in mapping:
        raise KeyError(f"{key}.type: unknown fusion {name!r}; MMF's fusion registry has: {', '.join(sorted(mapping))}")
    params = config.get("params", None)
    if params is None:
        raise KeyError(f"{key}.params: missing (use {{}} for {name!r}'s defaults)")
    params = dict(_to_container(params))
    cls = mapping[name]
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise KeyError(f"{key}.params.{unknown[0]}: not a parameter of fusion {name!r}; "
                           f"it takes {', '.join(p for p in accepted if p not in ('self', 'input_dims', 'output_dim'))}")
    try:
        return cls(list(input_dims), int(output_dim), **params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key}.params: fusion {name!r} rejected them: {exc}") from exc


def _to_container(node):
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(node):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return node


def add_jacobian_loss(model: nn.Module, fusion: nn.Module, sample_list, output: dict) -> None:
    """Training with `deq` and ``jac_weight > 0``: ``output["losses"]`` = MMF's losses of ``model`` plus the entry
    ``<split>/<dataset>/deq_jacobian`` = ``jac_weight`` x the Jacobian term, so it is part of MMF's total loss."""
    if not isinstance(fusion, DEQFusionMMF):
        return
    jac = fusion.last_jac_loss
    if model.training and jac is not None and fusion.current_jac_weight > 0:
        losses = model.losses(sample_list, output)
        losses[f"{sample_list.dataset_type}/{sample_list.dataset_name}/deq_jacobian"] = (fusion.current_jac_weight * jac).view(1)
        output["losses"] = losses
