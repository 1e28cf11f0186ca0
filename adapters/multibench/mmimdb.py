"""MM-IMDB (``multimodal_imdb.hdf5``) for MultiBench's own code: the file's layout and checks, MultiBench's
``IMDBDataset`` loaders, MultiBench's MM-IMDB model around any fusion, and a file in the exact layout for tests.
The runner that trains and tests it: :mod:`deqfusion_adapters.multibench.runner`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from .checkout import import_multibench
from .registry import create

# The file's layout: key -> width (rows: N), and MultiBench's split by index (datasets/imdb/get_data.py).
N = 25959
LAYOUT = {"features": 300, "vgg_features": 4096, "genres": 23}
SPLITS = {"train": (0, 15552), "valid": (15552, 18160), "test": (18160, 25959)}


def check_file(path: str | Path) -> None:
    """Clear errors for a file that is not MM-IMDB's ``multimodal_imdb.hdf5`` (missing key, wrong shape)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: {path} does not exist (MM-IMDB's multimodal_imdb.hdf5)")
    with h5py.File(path, "r") as f:
        for key, width in LAYOUT.items():
            if key not in f:
                raise KeyError(f"{path}: no dataset {key!r} (keys: {sorted(f)}); expected MM-IMDB's "
                               f"{', '.join(LAYOUT)}")
            if f[key].ndim != 2 or f[key].shape[1] != width or f[key].shape[0] < N:
                raise ValueError(f"{path}: {key!r} has shape {f[key].shape}, expected ({N}, {width})")


def write_synthetic(path: str | Path, rows_per_split: int = 64, seed: int = 0) -> Path:
    """A file in MM-IMDB's exact layout (all N rows, chunked, so unwritten rows take no space) with
    ``rows_per_split`` learnable random samples at the start of each split: for smoke runs and tests."""
    import h5py

    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((LAYOUT["features"] + 32, LAYOUT["genres"])).astype(np.float32)
    with h5py.File(path, "w") as f:
        data = {k: f.create_dataset(k, (N, w), dtype="f4" if k != "genres" else "i1", chunks=(64, w), fillvalue=0)
                for k, w in LAYOUT.items()}
        f.create_dataset("imdb_ids", (N,), dtype="S7", chunks=(1024,))
        for lo, hi in SPLITS.values():
            n = min(rows_per_split, hi - lo)
            text = rng.standard_normal((n, LAYOUT["features"])).astype(np.float32)
            vgg = np.abs(rng.standard_normal((n, LAYOUT["vgg_features"]))).astype(np.float32)
            logits = np.concatenate([text, vgg[:, :32]], 1) @ mix
            data["features"][lo:lo + n] = text
            data["vgg_features"][lo:lo + n] = vgg
            data["genres"][lo:lo + n] = (logits > np.quantile(logits, 0.8, axis=0)).astype(np.int8)
            f["imdb_ids"][lo:lo + n] = [f"{i:07d}".encode() for i in range(lo, lo + n)]
    return Path(path)


def dataloaders(path, root=None, batch_size: int = 256, limit: int | None = None, workers: int = 0):
    """Train, valid and test loaders over MultiBench's ``IMDBDataset`` (VGG features), ``limit`` rows a split."""
    check_file(path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    IMDBDataset = import_multibench("datasets.imdb.get_data", root).IMDBDataset
    loaders = []
    for split, (lo, hi) in SPLITS.items():
        hi = hi if limit is None else min(hi, lo + limit)
        loaders.append(DataLoader(IMDBDataset(str(path), lo, hi, vggfeature=True), batch_size=batch_size,
                                  shuffle=split == "train", num_workers=workers))
    return loaders


def build_model(fusion: str = "deq", dim: int = 512, root=None, **fusion_kwargs):
    """The paper's model, MultiBench's MM-IMDB model: MaxOut-MLP encoders (text 300 -> dim, VGG 4096 -> dim, as
    MultiBench's examples/multimedia/mmimdb_*.py), the fusion, MultiBench's Linear head to 23 genres."""
    models = import_multibench("unimodals.common_models", root)
    encoders = [models.MaxOut_MLP(512, 512, LAYOUT["features"], dim, False),
                models.MaxOut_MLP(512, 1024, LAYOUT["vgg_features"], dim, False)]
    fusion_kwargs = {"dim": dim, **fusion_kwargs} if fusion == "deq" else {"root": root, **fusion_kwargs}
    fuse = create(fusion, [dim, dim], **fusion_kwargs)
    if not isinstance(fuse.output_dim, int):
        raise ValueError(f"--fusion: {fusion} gives a {fuse.output_dim} output, the head needs a vector")
    return encoders, fuse, models.Linear(fuse.output_dim, LAYOUT["genres"])
