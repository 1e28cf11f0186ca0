"""``deqfusion compare mmdynamics``: MM-Dynamics' own training script (``train_test.train``) once per arm,
``--fusion concat`` (the upstream's) and ``--fusion deq``, everything else alike.

The effective configuration is the launcher's arguments plus the hyper-parameters the upstream script sets for
the dataset (read from its source: widths, epochs, learning rate and schedule, weight decay, dropout), with the
launcher's overrides applied. Runs use the fair protocol unless ``-- --protocol paper`` is given; selections:
``val`` (the paper authors' criterion, accuracy + weighted F1 + macro F1, on the validation split), ``final``
and ``test`` (the same criterion on the test split: the authors' own selection, reported beside the others).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Sequence

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, arg_value, deq_option_args,
                                    deq_settings, split_deq_options)

__all__ = ["MMDynamicsComparison", "upstream_settings"]

SMOKE = ["--epochs", "3", "--eval-every", "1", "--hidden", "16"]


def upstream_settings(root: Path, dataset: str) -> dict[str, Any]:
    """The literals ``train_test.train`` of the checkout at ``root`` sets for ``dataset`` (``hidden_dim``,
    ``num_epoch``, ``lr``, ``step_size``, ``num_class``), its evaluation interval, the optimizer's weight
    decay, the scheduler's gamma and the model's dropout."""
    tree = ast.parse((Path(root) / "train_test.py").read_text())
    train = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train")
    out: dict[str, Any] = {}
    for node in ast.walk(train):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                isinstance(node.test.left, ast.Constant) and node.test.left.value == dataset:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                    out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                node.targets[0].id == "test_inverval":
            out["test_inverval"] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            for call, key in (("Adam", "weight_decay"), ("StepLR", "gamma"), ("MMDynamic", "dropout")):
                if name.endswith(call) and key in keywords:
                    out[f"{call}.{key}"] = ast.literal_eval(keywords[key])
    needed = {"hidden_dim", "num_epoch", "lr", "step_size", "test_inverval", "Adam.weight_decay", "StepLR.gamma",
              "MMDynamic.dropout"}
    if not needed <= set(out):
        raise RuntimeError(f"MM-Dynamics train_test.train changed: {', '.join(sorted(needed - set(out)))} not found "
                           f"for {dataset} (this comparison reads TencentAILabHealthcare/mmdynamics 06a2bb8)")
    return out


class _Evaluator:
    """The robustness evaluation (deqfusion_core.compare.robustness) of a trained run: the model at the epoch
    selected on validation (fair protocol), scored by the upstream's ``test_epoch`` on the perturbed test split,
    the DEQ head given the perturbed split's mask (the concatenation takes none) and solving from zero."""

    noise_on = ("each view's features as the upstream's encoders read them (after its min-max scaling over the "
                "training files), before its encoders")

    def __init__(self, run, integration):
        from .protocol import view_names

        if run.best_state is None:
            raise RuntimeError("--robustness: needs the fair protocol (a validation-selected epoch)")
        self.run, self.train_test = run, integration.modules["train_test"]
        self.modalities = view_names(run.args.views).split("+")
        self.takes_mask = run.args.fusion == "deq"
        run.model.load_state_dict(run.best_state)

    def train_inputs(self):
        yield list(self.run.train), self.run.present_tr

    def evaluate(self, transform):
        from .head import DEQHead, split_key
        from .protocol import scores

        run = self.run
        xs, present = transform([x.clone() for x in run.test], run.present_te)
        head = getattr(run.model, "MMClasifier", None)
        if isinstance(head, DEQHead):   # the forward is the upstream's again: tell the head the split and mask
            head.split_key, head.present = split_key(xs), present   # a new split: a cold start, no warm start
        try:
            prob = self.train_test.test_epoch(xs, run.model)
        finally:
            if isinstance(head, DEQHead):
                head.split_solves.pop(head.split_key, None)
                head.split_key = head.present = None
        return {k: float(v) for k, v in scores(run.labels_te, prob).items()}


def _data_folder(upstream_args: Sequence[str]) -> str | None:
    return arg_value(list(upstream_args), "--data-folder")


def _metrics(scores: dict | None) -> dict[str, float] | None:
    return None if scores is None else {k: float(v) for k, v in scores.items() if k not in ("epoch", "val")}


class MMDynamicsComparison(Comparison):
    integration = "mmdynamics"
    study = "mmdynamics"
    baseline = "concat"
    metric = "acc"
    selections = ("val", "final", "test")
    fusion_keys = {
        "model.fusion": "the fusion (its type; for DEQ, its solver and gradient settings)",
        "model.fusion.deq.jac_weight": "DEQ recipe: Jacobian weight",
        "model.fusion.deq.dropout": "DEQ recipe: dropout in the fusion",
        "model.fusion.warm_start": "the DEQ solver's warm start from its previous epoch's state (part of the DEQ)",
    }
    not_compared = {"modelpath": "where the run writes its checkpoint"}

    def fusions(self):
        return ["concat", "deq"]

    def study_name(self, upstream_args):
        folder = _data_folder(upstream_args)
        return Path(folder).resolve().name.lower() if folder else self.study

    def smoke_args(self, upstream_args):
        return list(SMOKE)

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        if _data_folder(upstream_args) is None:
            raise ValueError("-- --data-folder: required (a MOGONET-layout folder, e.g. ../shared/data/rosmap)")
        return [*deq_option_args(fusion_options), "--fusion", arm.fusion, "--protocol", "fair", "--seed", str(seed),
                "--modelpath", str(Path(run_dir) / "model"), *upstream_args]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, upstream, argv):
        from deqfusion_core import plugins

        from . import protocol

        options, launcher = split_deq_options(argv)
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), protocol.parse_args(launcher), launcher

    def effective_config(self, upstream, argv):
        _, options, args, _ = self._parse(upstream, argv)
        up = upstream_settings(upstream.root, args.dataset)
        fusion: dict[str, Any] = {"type": args.fusion}
        if args.fusion == "deq":
            fusion["deq"] = deq_settings(options)
            fusion["warm_start"] = "each data split starts from its previous full-batch solve"
        return {
            "data": {"folder": str(Path(args.data_folder).expanduser().resolve()), "dataset": args.dataset,
                     "views": list(args.views), "protocol": args.protocol,
                     "val_fraction": args.val_fraction if args.protocol == "fair" else None},
            "model": {"hidden": args.hidden or up["hidden_dim"][0], "dropout": up["MMDynamic.dropout"],
                      "fusion": fusion},
            "train": {"seed": args.seed, "epochs": args.epochs or up["num_epoch"],
                      "eval_every": args.eval_every or up["test_inverval"],
                      "optimizer": {"type": "Adam", "lr": up["lr"], "weight_decay": up["Adam.weight_decay"]},
                      "scheduler": {"type": "StepLR", "step_size": up["step_size"], "gamma": up["StepLR.gamma"]},
                      "grad_clip": args.grad_clip, "full_batch": True},
            "modelpath": args.modelpath,
        }

    def robustness_evaluator(self):
        if getattr(self, "_run", None) is None:
            raise RuntimeError("robustness_evaluator: no trained run in this process (call train first)")
        return _Evaluator(self._run, self._integration)

    def train(self, upstream, argv, run_dir, progress):
        from . import protocol

        integ, options, args, launcher = self._parse(upstream, argv)
        integ.apply(upstream, options)
        epochs = args.epochs or upstream_settings(upstream.root, args.dataset)["num_epoch"]
        split = "val" if args.protocol == "fair" else "test"

        def on_evaluation(record):
            progress(done=record["epoch"], total=epochs, unit="epoch",
                     metric={f"{split} {k}": record[split][k] for k in ("acc", "f1_macro")})

        run = integ.run(launcher, on_evaluation)
        self._run, self._integration = run, integ
        history, final = run.summary["history"], run.summary["final"]
        tested = protocol.select(history, "test")
        selections = {}
        if args.protocol == "fair":
            chosen = protocol.select(history, "val")
            selections["val"] = Selection(_metrics(chosen["val"]), _metrics(chosen["test"]), at=f"epoch {chosen['epoch']}",
                                          criterion=f"validation split: {protocol.CRITERION}")
        selections["final"] = Selection(_metrics(final.get("val")), _metrics(final), at=f"epoch {final['epoch']}",
                                        criterion="the last epoch")
        selections["test"] = Selection(_metrics(tested.get("val")), _metrics(tested["test"]),
                                       at=f"epoch {tested['epoch']}",
                                       criterion=f"test split: {protocol.CRITERION} (optimistic: the test split "
                                                 f"picks the epoch)")
        info = {"epochs": final["epoch"], "evaluations": len(history), "epoch_time_s": run.summary["epoch_time_s"]}
        if any("solver" in r for r in history):
            # the DEQ's solve of each split at each evaluation, and at the evaluations the criteria selected
            info["eval_solves"] = [{"epoch": r["epoch"], **r["solver"]} for r in history]
            picked = {"val": chosen, "test": tested} if args.protocol == "fair" else {"test": tested}
            info["eval_solves_at_selected"] = {name: r.get("solver") for name, r in picked.items()}
        return RunOutcome(selections, [], info)
