"""Shims (only those the installed MMF needs), then deqfusion's fusion, model and dataset into MMF's registry."""
from __future__ import annotations

from typing import Any, Mapping

from .flavour import MAIN, install_shims


def register(options: Mapping[str, Any] | None = None) -> dict[str, type]:
    """Idempotent. ``options``: DEQFusion keyword arguments (and ``jac_weight``) overriding every `deq`
    fusion's config params, e.g. from ``deqfusion run mmf --f-max-iter 50`` (None: keep those registered).
    Returns MMF's fusion registry."""
    info = install_shims()
    from mmf.common.registry import registry

    from .easy_vqa import EasyVQABuilder
    from .fusion import register_fusions
    from .model import FusionClassifier

    mapping = register_fusions(options)
    registry.mapping["model_name_mapping"]["fusion_classifier"] = FusionClassifier
    registry.mapping["builder_name_mapping"]["easy_vqa"] = EasyVQABuilder
    if info is not None and info.flavour == MAIN:   # `fusion:` in MMF main's concat/sum baselines
        from .baselines import patch

        patch()
    return mapping


def unregister() -> None:
    """Take `deq`, `fusion_classifier` and `easy_vqa` out of MMF's registry (MMF's own fusions stay), and MMF main's
    baselines as they were."""
    from mmf.common.registry import registry

    from .baselines import unpatch

    unpatch()

    for kind, name in (("fusion_name_mapping", "deq"), ("model_name_mapping", "fusion_classifier"),
                       ("builder_name_mapping", "easy_vqa")):
        registry.mapping[kind].pop(name, None)
