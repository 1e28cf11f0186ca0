"""``deqfusion compare multibench``: MultiBench's own ``train``/``single_test`` (through
:mod:`deqfusion_adapters.multibench.runner`) once per arm, ``concat`` (MultiBench's late fusion) and ``deq``,
on MM-IMDB (``-- --data multimodal_imdb.hdf5``) or ROSMAP/BRCA (``-- --data <MOGONET folder>``).

The effective configuration is the runner's resolved settings: the shared recipe (MultiBench's own for the data
set), the fusion and, for the DEQ, the paper's DEQ recipe. Selection: ``train``'s own, on validation.
"""
from __future__ import annotations

from pathlib import Path

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, arg_value, deq_option_args, deq_recipe_keys,
                                    deq_settings, split_deq_options)

__all__ = ["MultiBenchComparison"]

SMOKE = {"mmimdb": ["--limit", "32", "--epochs", "2", "--batch-size", "16", "--dim", "32"],
         "mogonet": ["--limit", "64", "--epochs", "2", "--dim", "16"]}


def _data(upstream_args) -> str | None:
    return arg_value(list(upstream_args), "--data")


def _kind(upstream_args) -> str:
    from .runner import dataset_kind

    data = _data(upstream_args)
    if data is None:
        raise ValueError("-- --data: required (multimodal_imdb.hdf5, or a MOGONET folder such as ../shared/data/rosmap)")
    return dataset_kind(data)


class MultiBenchComparison(Comparison):
    integration, study, baseline, metric, selections = "multibench", "multibench", "concat", "accuracy", ("val",)
    fusion_keys = {"fusion": "the fusion (its type, its arguments; for DEQ, its solver and gradient settings)",
                   **deq_recipe_keys("fusion.", "jac_weight", "fusion_lr"), **deq_recipe_keys("fusion.options.", "dropout")}

    def study_name(self, upstream_args):
        data = _data(upstream_args)
        if data is None:
            return self.study
        return ("mmimdb" if _kind(upstream_args) == "mmimdb" else Path(data).resolve().name.lower()) + "_multibench"

    def headline(self, upstream_args):
        return "f1_macro" if _data(upstream_args) and _kind(upstream_args) == "mmimdb" else "accuracy"

    def smoke_args(self, upstream_args):
        return list(SMOKE[_kind(upstream_args)])

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        _kind(upstream_args)
        return [*deq_option_args(fusion_options), "--fusion", arm.fusion, "--seed", str(seed),
                "--save", str(Path(run_dir) / "best.pt"), *upstream_args]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, argv):
        from deqfusion_core import plugins

        from .runner import parser

        options, rest = split_deq_options(argv)
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), parser().parse_args(rest)

    def effective_config(self, upstream, argv):
        from .runner import settings

        _, options, args = self._parse(argv)
        used = settings(args, options)
        if args.fusion == "deq":
            used["fusion"]["options"] = deq_settings(used["fusion"]["options"])
        return used

    def train(self, upstream, argv, run_dir, progress):
        from .runner import run

        integ, options, args = self._parse(argv)
        integ.apply(upstream, options)

        def on_epoch(done, metric):
            progress(done=done, total=args.epochs, unit="epoch", metric=metric)

        result = run(args, upstream.root, options, on_epoch)
        at = f"epoch {result['best_epoch']} of {result['epochs']}"
        return RunOutcome({"val": Selection(result["valid"], result["test"], at=at,
                                            criterion=result["settings"]["selection"])},
                          [], {"epochs": result["epochs"], "device": result["device"]})
