"""MM-Dynamics' training script with the data folder, view selection and two evaluation protocols.

- **paper**: what the upstream (and the paper authors' BRCA code) does: train on all training files, score the
  test split every ``--eval-every`` epochs; the evaluation the authors' script keeps is reported (its criterion:
  the largest accuracy + weighted F1 + macro F1, the first on ties; optimistic: the test split selects the
  epoch), next to the final epoch's test score.
- **fair**: a stratified, seeded validation split (``--val-fraction`` of the training files) is carved off
  before training; the epoch is selected on it by the same criterion and the test score of that epoch is
  reported, next to the test-selected epoch (the authors' selection, on the same run) and the final epoch.

Every number printed carries the protocol that produced it. The upstream ``train_test.train`` runs
unchanged except for ``num_epoch`` and ``test_inverval``, which come from ``--epochs``/``--eval-every``.
The model and the script are patched for the duration of a run (its fusion and width are its arguments).
The fusion is the only thing that differs between ``--fusion deq`` and ``--fusion concat``: the width
(``--hidden``, default the upstream's) and gradient clipping (``--grad-clip``, default off as in the upstream)
apply to both; the DEQ's own solver warm-starts from its previous epoch's state (part of the DEQ).
"""
from __future__ import annotations

import argparse
import builtins
import inspect
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from deqfusion_core.integration import Patches

from .head import DEQHead, clip_on_step, patched_model, split_key
from .missing import nan_aware_numpy, view_mask

VIEWS = {"mR": 1, "D": 2, "miR": 3}      # MOGONET's files: 1 mRNA expression, 2 DNA methylation, 3 miRNA
DATASETS = ("ROSMAP", "BRCA")             # the names the upstream's train() recognises (its hyper-parameters)


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
    p.add_argument("--hidden", type=int, help="hidden width, both fusions (default: the upstream's, 1000; the "
                   "paper authors' code: 500 BRCA, 300 ROSMAP)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm at this value, both fusions (default: "
                   "off, as the upstream; the paper authors' code: 30)")
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
    if args.grad_clip is not None and not args.grad_clip > 0:
        p.error(f"--grad-clip: must be > 0, got {args.grad_clip}")
    return args


# -- metrics ---------------------------------------------------------------------------------------------
def scores(labels: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """The upstream's metrics: acc, F1, AUC (binary); acc, weighted F1, macro F1 (multi-class). Binary runs also
    get the weighted and macro F1, which the paper authors' selection criterion adds up."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    pred = prob.argmax(1)
    averaged = {"f1_weighted": f1_score(labels, pred, average="weighted"),
                "f1_macro": f1_score(labels, pred, average="macro")}
    if prob.shape[1] == 2:
        return {"acc": accuracy_score(labels, pred), "f1": f1_score(labels, pred),
                "auc": roc_auc_score(labels, prob[:, 1]), **averaged}
    return {"acc": accuracy_score(labels, pred), **averaged}


CRITERION = "the largest accuracy + weighted F1 + macro F1 (the first on ties), the paper authors' selection"


def select(history: list[dict], split: str) -> dict:
    """The evaluation the paper authors' script keeps (experiments/BRCA/train_test_deq.py): the first with the
    largest ``acc + f1_weighted + f1_macro`` on ``split`` (it compares with a strict >)."""
    return max(history, key=lambda r: r[split]["acc"] + r[split]["f1_weighted"] + r[split]["f1_macro"])


def fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# -- a run -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run of the upstream script: its arguments, what it produced, and the summary."""

    args: argparse.Namespace
    protocol: str
    label: str = "mmdynamics"
    history: list = field(default_factory=list)
    epoch_times: list = field(default_factory=list)
    model: Any = None
    test: list | None = None
    labels_te: np.ndarray | None = None
    val: list | None = None
    labels_val: np.ndarray | None = None
    split_keys: dict = field(default_factory=dict)
    train: list | None = None
    present_tr: Any = None       # [samples, views] bool of each split (None: every view of every sample present)
    present_te: Any = None
    masks: dict = field(default_factory=dict)   # split_key -> its present mask, read by the patched forward
    best_state: dict | None = None    # fair protocol: the model's state at the validation-selected evaluation
    best_epoch: int | None = None
    checkpoint: dict | None = None
    summary: dict = field(default_factory=dict)

    def print(self, *args, **kwargs) -> None:
        """The upstream script's prints, tagged with what produced them (or silenced with --quiet)."""
        if self.args.quiet:
            return
        text = " ".join(str(a) for a in args)
        stripped = text.lstrip("\n")
        builtins.print("\n" * (len(text) - len(stripped)) + f"[{self.label}] {stripped}", **kwargs)


def transformed_train(train_test):
    """``train`` recompiled with ``num_epoch``/``test_inverval`` read from ``_deqfusion_option`` (in memory)."""
    lines, start = inspect.getsourcelines(train_test.train)
    src = "\n" * (start - 1) + "".join(lines)      # keep the upstream line numbers in tracebacks
    src, n_epochs = re.subn(r"^(\s*)num_epoch = (\d+)\s*$", r"\1num_epoch = _deqfusion_option('epochs', \2)", src,
                            flags=re.M)
    src, n_interval = re.subn(r"^(\s*)test_inverval = (\d+)\s*$",
                              r"\1test_inverval = _deqfusion_option('eval_every', \2)", src, flags=re.M)
    if not n_epochs or n_interval != 1:
        raise RuntimeError("MM-Dynamics train_test.train changed: 'num_epoch = N' / 'test_inverval = N' not found; "
                           "this patch targets TencentAILabHealthcare/mmdynamics 06a2bb8")
    namespace: dict = {}
    exec(compile(src, inspect.getsourcefile(train_test.train), "exec"), train_test.__dict__, namespace)
    return namespace[train_test.train.__name__]     # its globals: the module's, with the patched functions


def patch_script(patches: Patches, train_test, run: Run, on_evaluation=None) -> None:
    """The upstream script's data loading, epochs and prints, wired to ``run``."""
    upstream = {n: getattr(train_test, n) for n in ("prepare_trte_data", "train_epoch", "test_epoch")}
    args = run.args

    def prepare_trte_data(_dataset_name):
        """The upstream loader on the user's folder; keeps the selected views; fair: carves off validation."""
        with nan_aware_numpy(train_test):   # all-NaN rows: absent views (missing.py); identical on complete data
            tr, te, idx, labels = upstream["prepare_trte_data"](str(Path(args.data_folder).expanduser().resolve()))
        tr, te = [tr[v - 1] for v in args.views], [te[v - 1] for v in args.views]
        tr, present_tr = view_mask(tr, [f"{v}_tr.csv" for v in args.views], "training")
        te, run.present_te = view_mask(te, [f"{v}_te.csv" for v in args.views], "test")
        labels_tr, labels_te = labels[idx["tr"]], labels[idx["te"]]
        if run.protocol == "fair":
            from sklearn.model_selection import train_test_split

            keep, val = train_test_split(np.arange(len(labels_tr)), test_size=args.val_fraction,
                                         stratify=labels_tr, random_state=args.seed)
            keep, val = np.sort(keep), np.sort(val)
            run.val = [x[torch.as_tensor(val, device=x.device)] for x in tr]
            run.labels_val = labels_tr[val]
            tr, labels_tr = [x[torch.as_tensor(keep, device=x.device)] for x in tr], labels_tr[keep]
            present_val = None if present_tr is None else present_tr[torch.as_tensor(val, device=present_tr.device)]
            present_tr = None if present_tr is None else present_tr[torch.as_tensor(keep, device=present_tr.device)]
            if present_val is not None:
                run.masks[split_key(run.val)] = present_val
        run.train, run.present_tr = tr, present_tr
        run.test, run.labels_te = te, labels_te
        for x, present in ((tr, present_tr), (te, run.present_te)):
            if present is not None:
                run.masks[split_key(x)] = present
        named = {"train": tr, "test": te, "val": run.val}
        run.split_keys = {split_key(x): name for name, x in named.items() if x is not None}
        n_tr = len(labels_tr)
        return tr, te, {"tr": list(range(n_tr)), "te": list(range(n_tr, n_tr + len(labels_te)))}, \
            np.concatenate([labels_tr, labels_te])

    def train_epoch(data_list, label, model, optimizer):
        run.model = model
        clip_on_step(model, optimizer, args.grad_clip)      # both fusions alike (None: off)
        start = time.perf_counter()
        upstream["train_epoch"](data_list, label, model, optimizer)
        run.epoch_times.append(time.perf_counter() - start)

    def test_epoch(data_list, model):
        prob = upstream["test_epoch"](data_list, model)
        if args.testonly:
            run.checkpoint = scores(run.labels_te, prob)
            return prob
        epoch = len(run.epoch_times) - 1
        record = {"epoch": epoch, "test": scores(run.labels_te, prob)}
        if run.protocol == "fair":
            record["val"] = scores(run.labels_val, upstream["test_epoch"](run.val, model))
            run.print(f"epoch {epoch} validation: {fmt(record['val'])}")
            if not run.history or select(run.history + [record], "val") is record:   # the first best, as select
                run.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                run.best_epoch = epoch
        solves = evaluation_solves(run, model)
        if solves:
            record["solver"] = solves
        run.history.append(record)
        report_solver(run, model, epoch)
        if on_evaluation is not None:
            on_evaluation(record)
        return prob

    def option(name: str, upstream_value: int) -> int:
        return getattr(args, name) or upstream_value

    for name, value in (("prepare_trte_data", prepare_trte_data), ("train_epoch", train_epoch),
                        ("test_epoch", test_epoch), ("print", run.print), ("_deqfusion_option", option),
                        ("train", transformed_train(train_test))):
        patches.set(train_test, name, value)


def evaluation_solves(run: Run, model) -> dict:
    """The DEQ head's latest solve of each evaluated split (``test``, ``val``): converged, relative residual,
    steps ({} for the concatenation)."""
    head = getattr(model, "MMClasifier", None)
    if not isinstance(head, DEQHead):
        return {}
    named = ((run.split_keys.get(key), stats) for key, stats in head.split_solves.items())
    return {name: {"converged": bool(stats.converged), "rel_residual": float(stats.rel_residual),
                   "nstep": int(stats.nstep)} for name, stats in named if name in ("test", "val")}


def report_solver(run: Run, model, epoch: int) -> None:
    head = getattr(model, "MMClasifier", None)
    if not isinstance(head, DEQHead) or not head.split_solves:
        return
    parts = []
    for key, stats in head.split_solves.items():
        name = run.split_keys.get(key, "?")
        parts.append(f"{name}: {stats.nstep} steps, rel residual {stats.rel_residual:.1e}"
                     f"{'' if stats.converged else ' NOT CONVERGED'}")
    run.print(f"epoch {epoch} DEQ solver: " + "; ".join(parts))


def run(modules: dict, options, args: argparse.Namespace, root: Path, on_evaluation=None) -> Run:
    """Run the upstream ``train(dataset, modelpath, testonly)`` of ``modules`` (its ``model`` and ``train_test``)
    under ``args``, with DEQ fusion built from ``options``; print the summary and return the run.
    ``on_evaluation(record)`` is called after each evaluation of the script."""
    train_test = modules["train_test"]
    hidden = args.hidden
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    modelpath = args.modelpath or (str(Path(root) / "model") if args.testonly else "model")
    current = Run(args, protocol="paper" if args.testonly else args.protocol)
    title = (f"MM-Dynamics {args.dataset} views {view_names(args.views)} fusion={args.fusion} "
             f"hidden={hidden or 'upstream'} seed={args.seed}")
    if args.testonly:
        current.label = f"checkpoint {Path(modelpath) / args.dataset / 'checkpoint.pt'}, test split"
    elif args.protocol == "paper":
        current.label = f"paper protocol: test split every {args.eval_every} epochs"
    else:
        current.label = f"fair protocol: test split every {args.eval_every} epochs, monitoring only"
    builtins.print(f"== {title}, protocol {current.protocol}")
    with Patches() as patches:
        init, forward = patched_model(modules["model"], options, args.fusion, hidden, current.masks)
        patches.set(modules["model"].MMDynamic, "__init__", init)
        patches.set(modules["model"].MMDynamic, "forward", forward)
        patch_script(patches, train_test, current, on_evaluation)
        train_test.train(args.dataset, os.path.join(modelpath, ""), args.testonly)
    current.summary = summarize(current, train_test, title)
    return current


def give_mask(run: Run, data_list) -> None:
    """After the script (the model's forward is the upstream's again, which does not tell the DEQ head which split
    passes): give the head the mask of ``data_list`` (None: every view of every sample present)."""
    head = getattr(run.model, "MMClasifier", None)
    if isinstance(head, DEQHead):
        head.present = run.masks.get(split_key(data_list))


def summarize(run: Run, train_test, title: str) -> dict[str, Any]:
    args = run.args
    summary: dict[str, Any] = {"title": title, "protocol": run.protocol, "dataset": args.dataset,
                               "views": view_names(args.views), "fusion": args.fusion, "seed": args.seed}
    if args.testonly:
        summary["checkpoint"] = run.checkpoint
        builtins.print(f"[{run.label}] {fmt(run.checkpoint)}")
        return summary
    give_mask(run, run.test)
    final = scores(run.labels_te, train_test.test_epoch(run.test, run.model))
    history, n_epochs = run.history, len(run.epoch_times)
    summary.update(epochs=n_epochs - 1, epoch_time_s=float(np.mean(run.epoch_times)), history=history)
    summary["final"] = dict(final, epoch=n_epochs - 1)
    if run.protocol == "fair":
        give_mask(run, run.val)
        summary["final"]["val"] = scores(run.labels_val, train_test.test_epoch(run.val, run.model))
    best = select(history, "test")
    summary["test_selected"] = dict(best["test"], epoch=best["epoch"])
    if args.protocol == "paper":
        summary["paper_best"] = summary["test_selected"]
        builtins.print(f"[paper protocol: test-selected of {len(history)} evaluations (the authors' criterion: "
                       f"acc + weighted F1 + macro F1), epoch {best['epoch']}] {fmt(best['test'])}")
        builtins.print(f"[paper split, final epoch {n_epochs - 1}] test {fmt(final)}")
    else:
        chosen = select(history, "val")
        summary["val_selected"] = dict(chosen["test"], epoch=chosen["epoch"], val=chosen["val"])
        builtins.print(f"[fair protocol: validation-selected epoch {chosen['epoch']} (val acc "
                       f"{chosen['val']['acc']:.4f})] test {fmt(chosen['test'])}")
        builtins.print(f"[fair protocol: test-selected epoch {best['epoch']} (the authors' criterion on the test "
                       f"split; optimistic)] test {fmt(best['test'])}")
        builtins.print(f"[fair protocol: final epoch {n_epochs - 1}] test {fmt(final)}")
    builtins.print(f"[{args.fusion}] wall time per training epoch: {summary['epoch_time_s'] * 1000:.1f} ms "
                   f"({n_epochs} epochs)")
    return summary
