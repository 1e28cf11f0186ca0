"""ROSMAP and BRCA in MOGONET's layout (``{1,2,3}_{tr,te}.csv``, ``labels_{tr,te}.csv``) for MultiBench's own
``train``/``single_test``: batches ``[view_1, ..., view_k, label]`` as MultiBench's loaders give them, and a model of
MultiBench's parts (``MLP`` encoders per view, the fusion, ``Linear`` head).

Preprocessing as MOGONET and MM-Dynamics do it: each feature min-max scaled with the training files' minimum and
maximum. MultiBench's ``train`` selects on a validation split: a stratified one (``val_fraction``, seeded) is
carved off the training files; the test files are the test split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .checkout import import_multibench
from .registry import create

VIEWS = (1, 2, 3)       # 1 mRNA expression, 2 DNA methylation, 3 miRNA expression


def check_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    missing = [f for f in ("labels_tr.csv", "labels_te.csv", "1_tr.csv", "1_te.csv") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--data: {folder} has no {', '.join(missing)} (expected MOGONET's layout)")
    return folder


def load(folder: str | Path, views: Sequence[int] = VIEWS, val_fraction: float = 0.2, seed: int = 0):
    """``{split: ([view arrays], labels)}`` for ``train``, ``valid``, ``test``."""
    from sklearn.model_selection import train_test_split

    folder = check_folder(folder)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    read = (lambda name: np.loadtxt(folder / name, delimiter=","))
    labels_tr, labels_te = read("labels_tr.csv").astype(int), read("labels_te.csv").astype(int)
    tr, te = [], []
    for v in views:
        x_tr, x_te = read(f"{v}_tr.csv"), read(f"{v}_te.csv")
        lo = x_tr.min(0, keepdims=True)
        span = (x_tr - lo).max(0, keepdims=True) + 1e-10
        tr.append((x_tr - lo) / span)
        te.append((x_te - lo) / span)
    keep, val = train_test_split(np.arange(len(labels_tr)), test_size=val_fraction, stratify=labels_tr,
                                 random_state=seed)
    keep, val = np.sort(keep), np.sort(val)
    return {"train": ([x[keep] for x in tr], labels_tr[keep]), "valid": ([x[val] for x in tr], labels_tr[val]),
            "test": (te, labels_te)}


def dataloaders(folder, batch_size: int = 32, limit: int | None = None, workers: int = 0, *,
                val_fraction: float = 0.2, seed: int = 0, views: Sequence[int] = VIEWS):
    """Train, valid and test loaders (``limit``: the first N rows of each split)."""
    loaders = []
    for split, (xs, y) in load(folder, views, val_fraction, seed).items():
        n = len(y) if limit is None else min(limit, len(y))
        data = TensorDataset(*(torch.as_tensor(x[:n], dtype=torch.float32) for x in xs), torch.as_tensor(y[:n]))
        loaders.append(DataLoader(data, batch_size=batch_size, shuffle=split == "train", num_workers=workers))
    return loaders


def build_model(fusion: str, input_dims: Sequence[int], num_classes: int, dim: int = 100, root=None, **fusion_kwargs):
    """MultiBench's ``MLP(in, dim, dim)`` per view, the fusion, MultiBench's ``Linear`` head."""
    models = import_multibench("unimodals.common_models", root)
    encoders = [models.MLP(d, dim, dim) for d in input_dims]
    fusion_kwargs = {"dim": dim, **fusion_kwargs} if fusion == "deq" else {"root": root, **fusion_kwargs}
    fuse = create(fusion, [dim] * len(input_dims), **fusion_kwargs)
    if not isinstance(fuse.output_dim, int):
        raise ValueError(f"--fusion: {fusion} gives a {fuse.output_dim} output, the head needs a vector")
    return encoders, fuse, models.Linear(fuse.output_dim, num_classes)
