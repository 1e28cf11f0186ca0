"""Shims (only those the installed MMF needs), then deqfusion's fusion, model and dataset into MMF's registry."""
from __future__ import annotations

from typing import Any

from .flavour import MAIN, install_shims


def register(options: dict[str, Any] | None = None) -> dict[str, type]:
    """Idempotent. ``options``: DEQFusion keyword arguments (and ``jac_weight``) overriding every `deq`
    fusion's config params, e.g. from ``deqfusion run mmf --f-max-iter 50``. Returns MMF's fusion registry."""
    info = install_shims()
    from .fusion import OVERRIDES, register_fusions

    if options is not None:
        OVERRIDES.clear()
        OVERRIDES.update(options)
    mapping = register_fusions()
    from . import easy_vqa, model  # noqa: F401 - registers `fusion_classifier` and `easy_vqa`

    if info is not None and info.flavour == MAIN:   # `fusion:` in MMF main's concat/sum baselines
        from .baselines import patch

        patch()

    return mapping
