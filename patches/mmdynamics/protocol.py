"""MM-Dynamics' training script with the data folder, view selection and two evaluation protocols.

- **paper**: what the upstream (and the paper's BRCA code) does: train on all training files, score the
  test split every ``--eval-every`` epochs; the best of those scores is reported (optimistic: the test
  split selects the epoch), next to the final epoch's test score.
- **fair**: a stratified, seeded validation split (``--val-fraction`` of the training files) is carved off
  before training; the epoch is selected on it (best validation accuracy, ties to the earlier epoch) and
  the test score of that epoch is reported, next to the final epoch's test score.

Every number printed carries the protocol that produced it. The upstream ``train_test.train`` runs
unchanged except for ``num_epoch`` and ``test_inverval``, which come from ``--epochs``/``--eval-every``.
"""
from __future__ import annotations

import argparse
import builtins
import inspect
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

VIEWS = {"mR": 1, "D": 2, "miR": 3}      # MOGONET's files: 1 mRNA expression, 2 DNA methylation, 3 miRNA
DATASETS = ("ROSMAP", "BRCA")             # the names the upstream's train() recognises (its hyper-parameters)
RUN: dict[str, Any] = {}                  # the state of the run in progress


# -- arguments -------------------------------------------------------------------------------------------
def parse_views(text: str) -> list[int]:
    """``mR,D,miR`` (or ``mR+D``, or file numbers ``1,3``) -> sorted 1-based view numbers."""
    views = []
    for part in re.split(r"[,+]", text):
        part = part.strip()
        if part in VIEWS:
            views.append(VIEWS[part])
        elif part in ("1", "2", "3"):
            views.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"--views: unknown view {part!r}; use mR, D, miR (or 1, 2, 3)")
    if len(set(views)) != len(views) or not views:
        raise argparse.ArgumentTypeError(f"--views: each view once, at least one: {text!r}")
    return sorted(views)


def view_names(views: Sequence[int]) -> str:
    names = {v: k for k, v in VIEWS.items()}
    return "+".join(names[v] for v in views)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqfusion run mmdynamics --",
                                description="MM-Dynamics' train_test.train with DEQ fusion (or its concatenation)")
    p.add_argument("--data-folder", required=True, help="MOGONET-layout folder: {1,2,3}_{tr,te}.csv, labels_{tr,te}.csv")
    p.add_argument("--dataset", choices=DATASETS, help="upstream hyper-parameter set (default: from the folder "
                   "name, else from the number of classes: 2 ROSMAP, 5 BRCA)")
    p.add_argument("--views", type=parse_views, default=[1, 2, 3], help="subset of mR,D,miR (default: all three)")
    p.add_argument("--fusion", choices=("deq", "concat"), default="deq", help="deq (patched) or concat (upstream)")
    p.add_argument("--hidden", type=int, help="hidden width (default: 500 with deq as in the paper; the "
                   "upstream's 1000 with concat)")
    p.add_argument("--protocol", choices=("paper", "fair"), default="paper")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fair protocol: validation share of the training files")
    p.add_argument("--epochs", type=int, help="training epochs (full batch; default: the upstream's, "
                   "1000 ROSMAP / 2500 BRCA); the script runs epochs 0..E, i.e. E+1 steps")
    p.add_argument("--eval-every", type=int, default=50, help="evaluation interval in epochs (upstream: 50)")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and the validation split")
    p.add_argument("--modelpath", help="checkpoint folder (checkpoint at MODELPATH/DATASET/checkpoint.pt; default: "
                   "./model, or the checkout's model/ with --testonly)")
    p.add_argument("--testonly", action="store_true", help="score MODELPATH/DATASET/checkpoint.pt on the test split")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(list(argv))
    folder = Path(args.data_folder).expanduser()
    missing = [f for f in ("labels_tr.csv", "labels_te.csv", "1_tr.csv", "1_te.csv") if not (folder / f).is_file()]
    if missing:
        p.error(f"--data-folder {folder}: missing {', '.join(missing)} (expected the MOGONET layout)")
    if args.dataset is None:
        upper = folder.resolve().name.upper()
        named = [d for d in DATASETS if d in upper]
        if named:
            args.dataset = named[0]
        else:
            classes = len(np.unique(np.loadtxt(folder / "labels_tr.csv", delimiter=",")))
            args.dataset = {2: "ROSMAP", 5: "BRCA"}.get(classes)
            if args.dataset is None:
                p.error(f"--dataset: cannot tell from {folder} ({classes} classes); pass ROSMAP or BRCA")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction: must be in (0, 1), got {args.val_fraction}")
    for name in ("epochs", "eval_every", "hidden"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    return args


# -- metrics ---------------------------------------------------------------------------------------------
def scores(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """The upstream's metrics: acc, F1, AUC (binary); acc, weighted F1, macro F1 (multi-class)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(1)
    if prob.shape[1] == 2:
        return {"acc": accuracy_score(labels, pred), "f1": f1_score(labels, pred),
                "auc": roc_auc_score(labels, prob[:, 1])}
    return {"acc": accuracy_score(labels, pred), "f1_weighted": f1_score(labels, pred, average="weighted"),
            "f1_macro": f1_score(labels, pred, average="macro")}


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# -- the upstream script, wired --------------------------------------------------------------------------
def labelled_print(*args, **kwargs) -> None:
    """The upstream script's prints, tagged with what produced them (or silenced with --quiet)."""
    if RUN.get("quiet"):
        return
    text = " ".join(str(a) for a in args)
    stripped = text.lstrip("\n")
    builtins.print("\n" * (len(text) - len(stripped)) + f"[{RUN.get('label', 'mmdynamics')}] {stripped}", **kwargs)


def option(name: str, upstream_value: int) -> int:
    return RUN.get(name) or upstream_value


def transform_train(train_test) -> None:
    """Recompile ``train`` with ``num_epoch``/``test_inverval`` read from the run's options (in memory)."""
    lines, start = inspect.getsourcelines(train_test.train)
    src = "\n" * (start - 1) + "".join(lines)      # keep the upstream line numbers in tracebacks
    src, n_epochs = re.subn(r"^(\s*)num_epoch = (\d+)\s*$", r"\1num_epoch = _deqfusion_option('epochs', \2)", src,
                            flags=re.M)
    src, n_interval = re.subn(r"^(\s*)test_inverval = (\d+)\s*$",
                              r"\1test_inverval = _deqfusion_option('eval_every', \2)", src, flags=re.M)
    if not n_epochs or n_interval != 1:
        raise RuntimeError("MM-Dynamics train_test.train changed: 'num_epoch = N' / 'test_inverval = N' not found; "
                           "this patch targets TencentAILabHealthcare/mmdynamics 06a2bb8")
    train_test._deqfusion_option = option
    code = compile(src, inspect.getsourcefile(train_test.train), "exec")
    exec(code, train_test.__dict__)


def patch_script(train_test) -> None:
    from .plugin import clip_on_step, split_key

    upstream = {n: getattr(train_test, n) for n in ("prepare_trte_data", "train_epoch", "test_epoch", "train")}
    transform_train(train_test)

    def prepare_trte_data(_dataset_name):
        """The upstream loader on the user's folder; keeps the selected views; fair: carves off validation."""
        tr, te, idx, labels = upstream["prepare_trte_data"](RUN["data_folder"])
        tr, te = [tr[v - 1] for v in RUN["views"]], [te[v - 1] for v in RUN["views"]]
        labels_tr, labels_te = labels[idx["tr"]], labels[idx["te"]]
        if RUN["protocol"] == "fair":
            from sklearn.model_selection import train_test_split

            keep, val = train_test_split(np.arange(len(labels_tr)), test_size=RUN["val_fraction"],
                                         stratify=labels_tr, random_state=RUN["seed"])
            keep, val = np.sort(keep), np.sort(val)
            RUN["val"] = [x[torch.as_tensor(val, device=x.device)] for x in tr]
            RUN["labels_val"] = labels_tr[val]
            tr, labels_tr = [x[torch.as_tensor(keep, device=x.device)] for x in tr], labels_tr[keep]
        RUN["test"], RUN["labels_te"] = te, labels_te
        named = {"train": tr, "test": te, "val": RUN.get("val")}
        RUN["split_keys"] = {split_key(x): name for name, x in named.items() if x is not None}
        n_tr = len(labels_tr)
        return tr, te, {"tr": list(range(n_tr)), "te": list(range(n_tr, n_tr + len(labels_te)))}, \
            np.concatenate([labels_tr, labels_te])

    def train_epoch(data_list, label, model, optimizer):
        RUN["model"] = model
        clip_on_step(model, optimizer)
        start = time.perf_counter()
        upstream["train_epoch"](data_list, label, model, optimizer)
        RUN["epoch_times"].append(time.perf_counter() - start)

    def test_epoch(data_list, model):
        prob = upstream["test_epoch"](data_list, model)
        if RUN.get("testonly"):
            RUN["checkpoint"] = scores(RUN["labels_te"], prob)
            return prob
        epoch = len(RUN["epoch_times"]) - 1
        record = {"epoch": epoch, "test": scores(RUN["labels_te"], prob)}
        if RUN["protocol"] == "fair":
            record["val"] = scores(RUN["labels_val"], upstream["test_epoch"](RUN["val"], model))
            labelled_print(f"epoch {epoch} validation: {fmt(record['val'])}")
        RUN["history"].append(record)
        report_solver(model, epoch)
        return prob

    train_test.prepare_trte_data, train_test.train_epoch, train_test.test_epoch = \
        prepare_trte_data, train_epoch, test_epoch
    train_test.print = labelled_print
    train_test._deqfusion_upstream = upstream


def report_solver(model, epoch: int) -> None:
    from .plugin import DEQHead

    head = getattr(model, "MMClasifier", None)
    if not isinstance(head, DEQHead) or not head.stats:
        return
    parts = []
    for key, stats in head.stats.items():
        name = RUN["split_keys"].get(key, "?")
        parts.append(f"{name}: {stats.nstep} steps, rel residual {stats.rel_residual:.1e}"
                     f"{'' if stats.converged else ' NOT CONVERGED'}")
    labelled_print(f"epoch {epoch} DEQ solver: " + "; ".join(parts))


# -- a run -----------------------------------------------------------------------------------------------
def run(train_test, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Run the upstream ``train(dataset, modelpath, testonly)`` under ``args``; print and return the summary."""
    from .plugin import PAPER, SETTINGS

    SETTINGS["fusion"] = args.fusion
    SETTINGS["hidden"] = args.hidden or (PAPER["hidden"] if args.fusion == "deq" else None)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    modelpath = args.modelpath or (str(Path(root) / "model") if args.testonly else "model")
    RUN.clear()
    RUN.update(data_folder=str(Path(args.data_folder).expanduser().resolve()), views=args.views, seed=args.seed,
               protocol="paper" if args.testonly else args.protocol, val_fraction=args.val_fraction,
               epochs=args.epochs, eval_every=args.eval_every, quiet=args.quiet, testonly=args.testonly,
               history=[], epoch_times=[])
    title = (f"MM-Dynamics {args.dataset} views {view_names(args.views)} fusion={args.fusion} "
             f"hidden={SETTINGS['hidden'] or 'upstream'} seed={args.seed}")
    if args.testonly:
        RUN["label"] = f"checkpoint {Path(modelpath) / args.dataset / 'checkpoint.pt'}, test split"
    elif args.protocol == "paper":
        RUN["label"] = f"paper protocol: test split every {args.eval_every} epochs"
    else:
        RUN["label"] = f"fair protocol: test split every {args.eval_every} epochs, monitoring only"
    builtins.print(f"== {title}, protocol {RUN['protocol']}")
    train_test.train(args.dataset, os.path.join(modelpath, ""), args.testonly)

    summary: dict[str, Any] = {"title": title, "protocol": RUN["protocol"], "dataset": args.dataset,
                               "views": view_names(args.views), "fusion": args.fusion, "seed": args.seed}
    if args.testonly:
        summary["checkpoint"] = RUN["checkpoint"]
        builtins.print(f"[{RUN['label']}] {fmt(RUN['checkpoint'])}")
        return summary
    model = RUN["model"]
    final = scores(RUN["labels_te"], train_test._deqfusion_upstream["test_epoch"](RUN["test"], model))
    history = RUN["history"]
    n_epochs = len(RUN["epoch_times"])
    summary.update(epochs=n_epochs - 1, epoch_time_s=float(np.mean(RUN["epoch_times"])), history=history)
    summary["final"] = dict(final, epoch=n_epochs - 1)
    if args.protocol == "paper":
        best = max(history, key=lambda r: r["test"]["acc"])    # first maximum: the earliest epoch
        summary["paper_best"] = dict(best["test"], epoch=best["epoch"])
        builtins.print(f"[paper protocol: best test of {len(history)} evaluations, epoch {best['epoch']}] "
                       f"{fmt(best['test'])}")
        builtins.print(f"[paper split, final epoch {n_epochs - 1}] test {fmt(final)}")
    else:
        best = max(history, key=lambda r: r["val"]["acc"])
        summary["val_selected"] = dict(best["test"], epoch=best["epoch"], val_acc=best["val"]["acc"])
        builtins.print(f"[fair protocol: validation-selected epoch {best['epoch']} (val acc {best['val']['acc']:.4f})]"
                       f" test {fmt(best['test'])}")
        builtins.print(f"[fair protocol: final epoch {n_epochs - 1}] test {fmt(final)}")
    builtins.print(f"[{args.fusion}] wall time per training epoch: {summary['epoch_time_s'] * 1000:.1f} ms "
                   f"({n_epochs} epochs)")
    return summary
