"""Shims (only those the installed MMF needs), then deqfusion's fusion, model and dataset into MMF's registry."""
from __future__ import annotations

from typing import Any, Mapping

from deqfusion_compat import mmf_rc10


def register(options: Mapping[str, Any] | None = None) -> dict[str, type]:
    """Idempotent. ``options``: DEQFusion keyword arguments (and ``jac_weight``) overriding every `deq`
    fusion's config params, e.g. from ``deqfusion run mmf --f-max-iter 50`` (None: keep those registered).
    Returns MMF's fusion registry."""
    mmf_rc10.install()
    from mmf.common.registry import registry

    from .easy_vqa import EasyVQABuilder
    from .fusion import register_fusions
    from .model import FusionClassifier

    mapping = register_fusions(options)
    registry.mapping["model_name_mapping"]["fusion_classifier"] = FusionClassifier
    registry.mapping["builder_name_mapping"]["easy_vqa"] = EasyVQABuilder
    return mapping


def unregister() -> None:
    """Take `deq`, `fusion_classifier` and `easy_vqa` out of MMF's registry (MMF's own fusions stay)."""
    from mmf.common.registry import registry

    for kind, name in (("fusion_name_mapping", "deq"), ("model_name_mapping", "fusion_classifier"),
                       ("builder_name_mapping", "easy_vqa")):
        registry.mapping[kind].pop(name, None)
