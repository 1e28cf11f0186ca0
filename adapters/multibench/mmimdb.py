"""MM-IMDB with DEQ fusion, trained and tested by MultiBench's own code (``train``, ``single_test``,
``IMDBDataset``) on ``multimodal_imdb.hdf5``.

    deqfusion run multibench --upstream ~/MultiBench -- --data multimodal_imdb.hdf5
    python -m deqfusion_adapters.multibench.mmimdb --root ~/MultiBench --data multimodal_imdb.hdf5 --limit 256

Uses the GPU when there is one (MultiBench's ``train`` picks ``cuda:0``; ``CUDA_VISIBLE_DEVICES=`` forces the
CPU). Reports micro/macro F1 of the checkpoint ``train`` selected on validation macro-F1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from deqfusion_compat.multibench import load_model
from deqfusion_core.options import FusionOptions, parse_fusion_option

from .checkout import import_multibench
from .registry import create
from .training import PAPER_MMIMDB, train_paper_mmimdb

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


def build_model(fusion: str = "deq", dim: int = PAPER_MMIMDB["dim"], root=None, **fusion_kwargs):
    """The paper's model: MultiBench MaxOut-MLP encoders (text 300 -> dim, VGG 4096 -> dim), the fusion,
    MultiBench's Linear head to 23 genres."""
    models = import_multibench("unimodals.common_models", root)
    encoders = [models.MaxOut_MLP(512, 512, LAYOUT["features"], dim, False),
                models.MaxOut_MLP(512, 1024, LAYOUT["vgg_features"], dim, False)]
    if fusion == "deq":
        fusion_kwargs = {"dim": dim, "solver": PAPER_MMIMDB["solver"], "f_max_iter": PAPER_MMIMDB["f_max_iter"],
                         "b_max_iter": PAPER_MMIMDB["b_max_iter"], **fusion_kwargs}
    else:
        fusion_kwargs.setdefault("root", root)
    fuse = create(fusion, [dim, dim], **fusion_kwargs)
    if not isinstance(fuse.output_dim, int):
        raise ValueError(f"--fusion: {fusion} gives a {fuse.output_dim} output, the head needs a vector")
    return encoders, fuse, models.Linear(fuse.output_dim, LAYOUT["genres"])


def run(data, root=None, *, fusion: str = "deq", fusion_kwargs: dict | None = None, dim: int = PAPER_MMIMDB["dim"],
        epochs: int = 1000, limit: int | None = None, batch_size: int = PAPER_MMIMDB["batch_size"], workers: int = 0,
        save: str | Path = "best_deq_mmimdb.pt", seed: int = 0, **train_overrides) -> dict:
    """Train with ``train_paper_mmimdb``, reload the validation-selected checkpoint, evaluate valid and test."""
    torch.manual_seed(seed)
    train_dl, valid_dl, test_dl = dataloaders(data, root, batch_size, limit, workers)
    encoders, fuse, head = build_model(fusion, dim, root=root, **dict(fusion_kwargs or {}))
    train_paper_mmimdb(encoders, fuse, head, train_dl, valid_dl, epochs, save=str(save), root=root, **train_overrides)

    single_test = import_multibench("training_structures.Supervised_Learning", root).single_test
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # where MultiBench's test runs
    model = load_model(save, map_location=device)
    result = {"fusion": fusion, "device": str(device), "limit": limit, "checkpoint": str(save)}
    for split, loader in (("valid", valid_dl), ("test", test_dl)):
        scores = single_test(model, loader, criterion=nn.BCEWithLogitsLoss(), task="multilabel")
        result[split] = {k: float(v) for k, v in scores.items()}
    stats = getattr(model.fuse, "last_stats", None)
    if stats is not None:
        result["solver"] = {k: v for k, v in stats.as_dict().items() if isinstance(v, (int, float, bool))}
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqfusion run multibench --", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="multimodal_imdb.hdf5 (features, vgg_features, genres)")
    p.add_argument("--root", help="MultiBench checkout (else --upstream / $DEQFUSION_MULTIBENCH_ROOT)")
    p.add_argument("--fusion", default="deq", help="registry name (deq, concat, low_rank_tensor, ...)")
    p.add_argument("--fusion-arg", action="append", type=parse_fusion_option, default=[], metavar="KEY=VALUE",
                   help="fusion keyword, e.g. output_dim=512 (repeatable)")
    p.add_argument("--dim", type=int, default=PAPER_MMIMDB["dim"], help="encoder output and DEQ width")
    p.add_argument("--epochs", type=int, default=1000, help="cap; train stops early on validation macro-F1")
    p.add_argument("--limit", type=int, help="use only the first N rows of each split (quick smoke run)")
    p.add_argument("--batch-size", type=int, default=PAPER_MMIMDB["batch_size"])
    p.add_argument("--lr", type=float, default=PAPER_MMIMDB["lr"])
    p.add_argument("--weight-decay", type=float, default=PAPER_MMIMDB["weight_decay"])
    p.add_argument("--fusion-lr-scale", type=float, default=PAPER_MMIMDB["fusion_lr_scale"])
    p.add_argument("--jac-weight", type=float, default=None, help=f"default {PAPER_MMIMDB['jac_weight']}")
    p.add_argument("--clip", type=float, default=PAPER_MMIMDB["clip_val"], help="gradient-norm clip")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--save", default="best_deq_mmimdb.pt", help="checkpoint train() writes (best validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv: Sequence[str] | None = None, root=None, fusion_options=None) -> int:
    args = parser().parse_args(argv)
    options = FusionOptions.coerce(fusion_options)  # `deqfusion run multibench --solver ... --jac-weight ...`
    jac_weight = args.jac_weight if args.jac_weight is not None else options.get("jac_weight", PAPER_MMIMDB["jac_weight"])
    fusion_kwargs = {**(options.fusion_kwargs() if args.fusion == "deq" else {}), **dict(args.fusion_arg)}
    try:
        check_file(args.data)
    except (OSError, KeyError, ValueError) as exc:
        print(f"deqfusion run multibench: {exc}", file=sys.stderr)
        return 2
    result = run(args.data, args.root or root, fusion=args.fusion, fusion_kwargs=fusion_kwargs, dim=args.dim,
                 epochs=args.epochs,
                 limit=args.limit, batch_size=args.batch_size, workers=args.workers, save=args.save, seed=args.seed,
                 lr=args.lr, weight_decay=args.weight_decay, fusion_lr_scale=args.fusion_lr_scale,
                 jac_weight=jac_weight, clip_val=args.clip)
    v, t = result["valid"], result["test"]
    print(f"MM-IMDB {args.fusion} (checkpoint selected on validation macro-F1, {result['device']}): "
          f"valid micro-F1 {v['micro']:.4f} macro-F1 {v['macro']:.4f} | test micro-F1 {t['micro']:.4f} "
          f"macro-F1 {t['macro']:.4f}")
    solver = result.get("solver")
    if solver is not None:
        state = "converged" if solver.get("converged") else "DID NOT CONVERGE"
        print(f"DEQ solver on the last test batch: {state}, {solver}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
