"""Missing modalities in ``fusion_classifier`` (issue 13): the per-sample mask a data set puts in the sample list.

A sample list may carry either

- ``modality_present``: bool [B, N], one column per encoder in the config's order, or
- ``<modality>_present``: bool [B] per modality (``image_present``, ``text_present``; a modality without one is
  present in every sample).

False marks the modality absent for that sample. No MMF import here (unit-tested on its own).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["PRESENT_FIELD", "modality_mask", "zero_absent"]

PRESENT_FIELD = "modality_present"


def _has(sample_list: Any, key: str) -> bool:
    try:
        return key in sample_list
    except TypeError:
        return False


def _as_bool(value: Any, field: str, shape: tuple[int, ...]) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.dtype != torch.bool:
        if value.dtype.is_floating_point or value.dtype.is_complex or not ((value == 0) | (value == 1)).all():
            raise TypeError(f"sample list field {field!r}: expected bool (or 0/1 integers), got {value.dtype}")
        value = value.bool()
    if tuple(value.shape) != shape:
        raise ValueError(f"sample list field {field!r}: expected shape {list(shape)}, got {list(value.shape)}")
    return value


def modality_mask(sample_list: Any, modalities: Sequence[str], batch_size: int) -> torch.Tensor | None:
    """The [B, N] bool mask the sample list carries (``modality_present`` or ``<modality>_present``), or None when
    it carries neither (every modality of every sample present). Errors name the field."""
    per_modality = [f"{m}_present" for m in modalities if _has(sample_list, f"{m}_present")]
    if _has(sample_list, PRESENT_FIELD):
        if per_modality:
            raise ValueError(f"sample list: both {PRESENT_FIELD!r} and {', '.join(map(repr, per_modality))}; "
                             f"give one of the two forms")
        present = _as_bool(sample_list[PRESENT_FIELD], PRESENT_FIELD, (batch_size, len(modalities)))
    elif per_modality:
        device = _as_bool(sample_list[per_modality[0]], per_modality[0], (batch_size,)).device
        present = torch.stack([_as_bool(sample_list[f"{m}_present"], f"{m}_present", (batch_size,)).to(device)
                               if _has(sample_list, f"{m}_present") else torch.ones(batch_size, dtype=torch.bool,
                                                                                     device=device)
                               for m in modalities], 1)
    else:
        return None
    empty = (~present.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sample list: samples {empty[:5]} of the batch have no modality present "
                         f"({PRESENT_FIELD} / <modality>_present)")
    return present


def zero_absent(x: torch.Tensor, present_column: torch.Tensor) -> torch.Tensor:
    """``x`` [B, ...] with the rows of absent samples replaced by zeros (NaN there included): what an encoder
    sees of an absent modality, so that nothing non-finite reaches its weights' gradients."""
    keep = present_column.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
