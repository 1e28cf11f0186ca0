"""``deqfusion compare cmbert``: CM-BERT's own ``run_classifier.main`` (train, model selection on dev loss, test)
once per arm: the upstream's addition of the text and audio attention maps (``-o deq=False``) and DEQ fusion.

The effective configuration is ``run_classifier``'s own arguments (its parser, read from its source, applied to
the run's argv) plus the integration's options. ``run_classifier`` ignores ``--seed`` and draws its seed from
numpy's global generator; a run seeds that generator with the study's seed first, so both arms of a seed draw the
same one. ``-- --audio PATH`` (ours, every arm): the CMU-MOSI audio features pickle.
"""
from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, arg_value, deq_option_args, deq_recipe_keys, deq_settings,
                                    split_deq_options)

__all__ = ["CmbertComparison", "run_classifier_args"]

SEED = ("run_classifier draws its seed with np.random.randint from numpy's global generator (it ignores --seed); "
        "each run seeds that generator with the study's seed, so both arms of a seed draw the same seed")


def run_classifier_args(root: Path, argv: Sequence[str]) -> dict[str, Any]:
    """``run_classifier``'s own parser (its ``parser = ...`` and ``parser.add_argument`` lines, from its source)
    applied to ``argv``."""
    tree = ast.parse((Path(root) / "run_classifier.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    body = [s for s in main.body if (isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "parser") or
            (isinstance(s, ast.Expr) and ast.unparse(s.value).startswith("parser.add_argument"))]
    if len(body) < 2:
        raise RuntimeError("CM-BERT run_classifier.main changed: its argument parser was not found")
    fn = ast.parse("def _parser():\n    import argparse\n    return parser").body[0]
    fn.body[1:1] = body
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module([fn], [])), "run_classifier.py", "exec"), namespace)
    return vars(namespace["_parser"]().parse_args(list(argv)))


class _EvalLog(logging.Handler):
    """The dev-set results run_classifier logs after each epoch (``eval_loss = ...``, ``eval_accuracy = ...``)."""

    def __init__(self, on_epoch):
        super().__init__()
        self.epochs: list[dict] = []
        self.on_epoch = on_epoch

    def emit(self, record):
        m = re.fullmatch(r"\s*(eval_loss|eval_accuracy|global_step|loss) = (\S+)", record.getMessage())
        if not m:
            return
        key, value = m.group(1), float(m.group(2))
        if key == "eval_accuracy":          # the first of the sorted keys of an epoch's results
            self.epochs.append({})
        if self.epochs and key not in self.epochs[-1]:
            self.epochs[-1][key] = value
            if len(self.epochs[-1]) == 4:
                self.on_epoch(len(self.epochs), self.epochs[-1])


class CmbertComparison(Comparison):
    integration, study, baseline, metric, selections = "cmbert", "cmu_mosi", "add", "acc", ("val",)
    fusion_keys = {"fusion": "the fusion (the upstream's addition, or DEQ with its solver and gradient settings)",
                   **deq_recipe_keys("fusion.deq.")}
    not_compared = {"args.output_dir": "where the run writes", "args.cache_dir": "BERT's download cache",
                    "workdir": "the run's work folder"}

    def fusions(self):
        return ["add", "deq"]

    def smoke_args(self, upstream_args):
        return ["--num_train_epochs", "1"]

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        args = list(upstream_args)
        if arg_value(args, "--bert_model") is None or arg_value(args, "--data_dir") is None:
            raise ValueError("-- --data_dir DIR --bert_model DIR: required (CMU-MOSI transcripts, a BERT folder)")
        options = {**fusion_options, "deq": arm.fusion == "deq", "workdir": str(Path(run_dir) / "work")}
        return [*deq_option_args(options), "--seed", str(seed), *args]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, upstream, argv):
        from deqfusion_core import plugins

        options, rest = split_deq_options(argv)
        audio = arg_value(rest, "--audio")
        if audio is not None:
            i = rest.index("--audio") if "--audio" in rest else None
            rest = rest[:i] + rest[i + 2:] if i is not None else [a for a in rest if not a.startswith("--audio=")]
            options["audio"] = str(Path(audio).expanduser().resolve())
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), rest

    def effective_config(self, upstream, argv):
        _, options, rest = self._parse(upstream, argv)
        args = run_classifier_args(upstream.root, rest)
        for key in ("data_dir", "bert_model"):
            args[key] = str(Path(args[key]).expanduser().resolve())
        fusion: dict[str, Any] = {"type": "deq" if options["deq"] else "add"}
        if options["deq"]:
            fusion["deq"] = deq_settings({k: v for k, v in options.items() if k not in ("deq", "audio", "workdir")})
        return {"args": args, "fusion": fusion, "audio": options["audio"], "workdir": options["workdir"],
                "seed_drawn_from": "numpy's global generator, seeded with --seed"}

    def train(self, upstream, argv, run_dir, progress):
        import numpy as np

        integ, options, rest = self._parse(upstream, argv)
        integ.apply(upstream, options)
        args = run_classifier_args(upstream.root, rest)
        np.random.seed(int(args["seed"]))
        log = _EvalLog(lambda epoch, r: progress(done=epoch, total=int(args["num_train_epochs"]), unit="epoch",
                                                 metric={"dev loss": r["eval_loss"]}))
        logging.getLogger().addHandler(log)
        try:
            results = integ.run_once(upstream, rest)
        finally:
            logging.getLogger().removeHandler(log)
        if not log.epochs:
            raise RuntimeError("run_classifier logged no dev evaluation: nothing was selected")
        best = min(range(len(log.epochs)), key=lambda i: log.epochs[i]["eval_loss"])    # its strict <: the first
        dev = {"loss": log.epochs[best]["eval_loss"], "eval_accuracy": log.epochs[best]["eval_accuracy"]}
        test = {k: float(results[k]) for k in ("acc", "F1", "mae", "corr", "acc7", "test_loss") if k in results}
        return RunOutcome({"val": Selection(dev, test, at=f"epoch {best + 1} of {len(log.epochs)}",
                                            criterion="run_classifier's own: the lowest dev loss")},
                          [SEED], {"epochs": len(log.epochs)})
