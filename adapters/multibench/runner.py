"""Train and test one fusion with MultiBench's own code (``train``, ``single_test``) on MM-IMDB
(``multimodal_imdb.hdf5``) or on ROSMAP/BRCA (a folder in MOGONET's layout).

    deqfusion run multibench --upstream ~/MultiBench -- --data multimodal_imdb.hdf5 [--fusion concat]
    deqfusion run multibench --upstream ~/MultiBench -- --data ../shared/data/rosmap --fusion deq
    python -m deqfusion_adapters.multibench.runner --root ~/MultiBench --data multimodal_imdb.hdf5 --limit 256

Every fusion trains with the same recipe, MultiBench's own for the data set (:data:`RECIPES`; each setting a
command-line option, the same for every fusion); a DEQ fusion adds the paper's DEQ recipe (Jacobian weight, its own
learning rate), which belongs to the fusion, and, for MM-IMDB, our fusion options for convergence
(``training.CONVERGENCE_MMIMDB``: ``norm=contractive``; ``-o norm=none`` restores DEQFusion's default). Reports valid and test scores of the checkpoint ``train`` selected on
validation (its own rule: best accuracy, or best macro-F1 for MM-IMDB). Uses the GPU when there is one
(MultiBench's ``train`` picks ``cuda:0``; ``CUDA_VISIBLE_DEVICES=`` forces the CPU).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deqfusion_compat.multibench import load_model
from deqfusion_core.compare.tap import tap_stdout
from deqfusion_core.options import FusionOptions, parse_fusion_option

from . import mmimdb, mogonet
from .checkout import import_multibench
from .training import CONVERGENCE_MMIMDB, MULTIBENCH_MMIMDB, PAPER_MMIMDB, deq_train_kwargs

# The shared recipe of each data set (every fusion alike) and where it comes from; then the DEQ recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "mmimdb": {"task": "multilabel", "optimizer": "AdamW", "dim": 512, "early_stop": True, **MULTIBENCH_MMIMDB,
               "source": "MultiBench's examples/multimedia/mmimdb_simple_late_fusion.py (the clip at 8: its train()'s "
                         "default)"},
    "mogonet": {"task": "classification", "optimizer": "RMSprop", "lr": 1e-3, "weight_decay": 0.0, "clip_val": 8.0,
                "batch_size": 32, "epochs": 100, "dim": 100, "early_stop": True, "val_fraction": 0.2,
                "source": "MultiBench's train() defaults (optimizer, learning rate, weight decay, clip); batch, epochs, "
                          "width and validation share are ours (MultiBench has no ROSMAP/BRCA recipe)"},
}
DEQ_RECIPES = {
    "mmimdb": {**PAPER_MMIMDB, "options": CONVERGENCE_MMIMDB,
               "source": "the paper's appendix C (MM-IMDB: Jacobian weight, the fusion's learning rate); the fusion "
                         "options (norm=contractive) are ours (training.CONVERGENCE_MMIMDB)"},
    "mogonet": {"jac_weight": 20.0, "fusion_lr": None, "source": "the paper's appendix C (BRCA: Jacobian weight 20)"},
}
SHARED = ("optimizer", "lr", "weight_decay", "clip_val", "batch_size", "epochs", "dim", "early_stop", "val_fraction")


def dataset_kind(data: str | Path) -> str:
    return "mogonet" if Path(data).is_dir() else "mmimdb"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqfusion run multibench --", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="multimodal_imdb.hdf5, or a MOGONET-layout folder (ROSMAP, BRCA)")
    p.add_argument("--root", help="MultiBench checkout (else --upstream / $DEQFUSION_MULTIBENCH_ROOT)")
    p.add_argument("--fusion", default="deq", help="registry name (deq, concat, low_rank_tensor, ...)")
    p.add_argument("--fusion-arg", action="append", type=parse_fusion_option, default=[], metavar="KEY=VALUE",
                   help="fusion keyword, e.g. output_dim=512 (repeatable)")
    g = p.add_argument_group("the shared recipe (every fusion; default: MultiBench's own for the data set)")
    g.add_argument("--dim", type=int, help="encoders' output width (and the DEQ's)")
    g.add_argument("--epochs", type=int, help="cap; train() stops early on validation (--no-early-stop: never)")
    g.add_argument("--no-early-stop", dest="early_stop", action="store_false", default=None)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=["AdamW", "Adam", "RMSprop", "SGD"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--clip", dest="clip_val", type=float, help="gradient-norm clip (train() always clips; inf: off)")
    g.add_argument("--val-fraction", type=float, help="ROSMAP/BRCA: validation share of the training files")
    g = p.add_argument_group("the DEQ recipe (--fusion deq only; default: the paper's for the data set)")
    g.add_argument("--jac-weight", type=float)
    g.add_argument("--fusion-lr", type=float, help="the DEQ fusion's own learning rate")
    p.add_argument("--limit", type=int, help="use only the first N rows of each split (quick smoke run)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--save", default="best_multibench.pt", help="checkpoint train() writes (best validation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    return p


def settings(args: argparse.Namespace, fusion_options=None) -> dict[str, Any]:
    """Every setting of the run, resolved: the shared recipe, the fusion and (for a DEQ) its recipe."""
    kind = dataset_kind(args.data)
    recipe = RECIPES[kind]
    train = {k: (getattr(args, k) if getattr(args, k, None) is not None else recipe.get(k)) for k in SHARED}
    if kind != "mogonet":
        train.pop("val_fraction")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {args.limit}")
    fusion: dict[str, Any] = {"type": args.fusion, "args": dict(args.fusion_arg)}
    options = FusionOptions.coerce(fusion_options)
    if args.fusion == "deq":
        deq = DEQ_RECIPES[kind]
        fusion["jac_weight"] = next(v for v in (args.jac_weight, options.get("jac_weight"), deq["jac_weight"])
                                    if v is not None)
        fusion["fusion_lr"] = args.fusion_lr if args.fusion_lr is not None else deq["fusion_lr"]
        fusion["options"] = {**deq.get("options", {}), **options.fusion_kwargs(), **dict(args.fusion_arg)}
    elif args.jac_weight is not None or args.fusion_lr is not None:
        raise ValueError(f"--jac-weight/--fusion-lr: the DEQ recipe; --fusion {args.fusion} has none")
    return {"data": {"path": str(Path(args.data).resolve()), "kind": kind, "task": recipe["task"],
                     "limit": args.limit, "seed": args.seed},
            "train": train, "fusion": fusion, "selection": "train()'s own: the best validation "
            + ("macro-F1" if recipe["task"] == "multilabel" else "accuracy")}


EPOCH = re.compile(r"Epoch (\d+) valid loss: \S+ (?:acc: (\S+)|f1_micro: (\S+) f1_macro: (\S+))")


class _Epochs:
    """Reads MultiBench's per-epoch validation lines (and which epoch it saved as the best)."""

    def __init__(self, on_epoch):
        self.on_epoch, self.epochs, self.best = on_epoch, 0, None

    def __call__(self, line):
        m = EPOCH.search(line)
        if m:
            self.epochs = int(m.group(1)) + 1
            metric = {"valid accuracy": float(m.group(2))} if m.group(2) else \
                {"valid f1_micro": float(m.group(3)), "valid f1_macro": float(m.group(4))}
            if self.on_epoch:
                self.on_epoch(self.epochs, metric)
        elif line.strip() == "Saving Best":
            self.best = self.epochs - 1


def run(args: argparse.Namespace, root=None, fusion_options=None,
        on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train with MultiBench's ``train``, reload the validation-selected checkpoint, score valid and test with
    its ``single_test``. ``on_epoch(epochs_done, valid_metrics)`` after each epoch."""
    used = settings(args, fusion_options)
    kind, train, fusion = used["data"]["kind"], used["train"], used["fusion"]
    torch.manual_seed(args.seed)
    if kind == "mmimdb":
        loaders = mmimdb.dataloaders(args.data, root, train["batch_size"], args.limit, args.workers)
        encoders, fuse, head = mmimdb.build_model(args.fusion, train["dim"], root=root, **fusion.get(
            "options", fusion["args"]))
        criterion = nn.BCEWithLogitsLoss()
    else:
        loaders = mogonet.dataloaders(args.data, train["batch_size"], args.limit, args.workers,
                                      val_fraction=train["val_fraction"], seed=args.seed)
        dims = [t.shape[1] for t in loaders[0].dataset.tensors[:-1]]
        classes = int(max(int(t.max()) for t in (l.dataset.tensors[-1] for l in loaders)) + 1)
        encoders, fuse, head = mogonet.build_model(args.fusion, dims, classes, train["dim"], root=root,
                                                   **fusion.get("options", fusion["args"]))
        criterion = nn.CrossEntropyLoss()
    supervised = import_multibench("training_structures.Supervised_Learning", root)
    optimizer = getattr(torch.optim, train["optimizer"])
    kwargs = dict(early_stop=train["early_stop"], task=used["data"]["task"], lr=train["lr"],
                  weight_decay=train["weight_decay"], clip_val=train["clip_val"], optimtype=optimizer,
                  objective=criterion, save=str(args.save))
    if args.fusion == "deq":
        kwargs.update(deq_train_kwargs(fuse, criterion, jac_weight=fusion["jac_weight"], fusion_lr=fusion["fusion_lr"],
                                       optimizer=optimizer, clip_val=train["clip_val"]))
    epochs = _Epochs(on_epoch)
    with tap_stdout(epochs):
        supervised.train(list(encoders), fuse, head, loaders[0], loaders[1], train["epochs"], **kwargs)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # where MultiBench's test runs
    model = load_model(args.save, map_location=device)
    names = {"micro": "f1_micro", "macro": "f1_macro", "Accuracy": "accuracy"}
    result = {"fusion": args.fusion, "device": str(device), "settings": used, "checkpoint": str(args.save),
              "epochs": epochs.epochs, "best_epoch": epochs.best}
    for split, loader in (("valid", loaders[1]), ("test", loaders[2])):
        scores = supervised.single_test(model, loader, criterion=criterion, task=used["data"]["task"])
        result[split] = {names.get(k, k): float(v) for k, v in scores.items()}
    stats = getattr(model.fuse, "last_stats", None)
    if stats is not None:
        result["solver"] = {k: v for k, v in stats.as_dict().items() if isinstance(v, (int, float, bool))}
    return result


def main(argv: Sequence[str] | None = None, root=None, fusion_options=None) -> int:
    args = parser().parse_args(argv)
    try:
        if dataset_kind(args.data) == "mmimdb":
            mmimdb.check_file(args.data)
        else:
            mogonet.check_folder(args.data)
        settings(args, fusion_options)
    except (OSError, KeyError, ValueError) as exc:
        print(f"deqfusion run multibench: {exc}", file=sys.stderr)
        return 2
    result = run(args, args.root or root, fusion_options)
    v, t = result["valid"], result["test"]
    show = (lambda d: " ".join(f"{k} {x:.4f}" for k, x in d.items()))
    print(f"{result['settings']['data']['kind']} {args.fusion} (checkpoint selected by {result['settings']['selection']}"
          f", epoch {result['best_epoch']} of {result['epochs']}, {result['device']}): valid {show(v)} | test {show(t)}")
    solver = result.get("solver")
    if solver is not None:
        state = "converged" if solver.get("converged") else "DID NOT CONVERGE"
        print(f"DEQ solver on the last test batch: {state}, {solver}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
