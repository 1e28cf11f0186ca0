"""Missing views in MM-Dynamics' data (issue 13): a row of a view's file that is all NaN means that view is absent
for that sample.

- The upstream loader (``prepare_trte_data``) min-max scales each feature over the training files with ``np.min``
  / ``np.max``, which a single NaN turns into NaN for the whole column. While it runs, its ``np`` is numpy with
  ``min``/``max`` replaced by ``nanmin``/``nanmax`` (:func:`nan_aware_numpy`): identical on complete data; on data
  with absent rows, the scaling of the present rows is the one computed over the present rows.
- Each view's absent rows become the mask ``present`` [samples, views] (:func:`view_mask`) and are zero-filled, so
  that the upstream's own encoders never see NaN (the DEQ takes no part of them). A row with only some features
  NaN, and a sample with every view absent, are errors.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["nan_aware_numpy", "view_mask"]


@contextlib.contextmanager
def nan_aware_numpy(module) -> Iterator[None]:
    """``module.np`` is numpy with ``min``/``max`` ignoring NaN for the duration."""
    proxy = types.ModuleType("numpy_nan_aware")
    proxy.__dict__.update({k: v for k, v in vars(np).items() if not k.startswith("__")})
    proxy.min, proxy.max = np.nanmin, np.nanmax
    original = module.np
    module.np = proxy
    try:
        yield
    finally:
        module.np = original


def view_mask(views: Sequence[torch.Tensor], names: Sequence[str], split: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(views with absent rows zero-filled, present [samples, views] bool)``; ``present`` is None when every view
    of every sample is there. ``names``: each view's file, for the errors; ``split``: the split's name."""
    absent = []
    for x, name in zip(views, names):
        nan = torch.isnan(x)
        rows = nan.all(1)
        partial = (nan.any(1) & ~rows).nonzero().flatten().tolist()
        if partial:
            raise ValueError(f"--data-folder: {name} ({split}) rows {partial[:5]} have some features NaN and some not; "
                             f"a view is absent for a sample only when its whole row is NaN")
        absent.append(rows)
    present = ~torch.stack(absent, 1)
    empty = (~present.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"--data-folder: samples {empty[:5]} of the {split} split have every view NaN (absent)")
    if bool(present.all()):
        return list(views), None
    filled = [torch.where(present[:, i, None], x, torch.zeros((), dtype=x.dtype)) for i, x in enumerate(views)]
    return filled, present
