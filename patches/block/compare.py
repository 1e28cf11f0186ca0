"""``deqfusion compare block``: bootstrap's runner (``bootstrap.run -o OPTIONS``) once per arm, with the options file's
own classifier fusion (arm ``baseline``) and with ``--model.network.classif.fusion.type deq``.

The effective configuration is bootstrap's merged ``Options`` (the options file and the command line), so the
arms may differ only under ``model.network.classif.fusion``. Each run writes into its own ``exp.dir``; the
reported figures are the last epoch's evaluation (``eval_epoch.*`` of bootstrap's ``logs.json``): the paper's VQA
protocol trains on train and reports val.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, deq_option_args, deq_settings,
                                    split_deq_options)

__all__ = ["BlockComparison"]

FUSION = "model.network.classif.fusion"
EPOCH = re.compile(r"Training model on \w+ for epoch (\d+)")


class BlockComparison(Comparison):
    integration = "block"
    study = "vqa2_block"
    baseline = "own"          # the options file's own classifier fusion
    metric = "accuracy_top1"
    selections = ("final",)
    fusion_keys = {"options." + FUSION: "the classifier's fusion (its type and params)",
                   "options." + FUSION + ".jac_weight": "DEQ recipe: Jacobian weight",
                   "deq": "the DEQ fusion's settings (solver, gradient)",
                   "deq.jac_weight": "DEQ recipe: Jacobian weight", "deq.dropout": "DEQ recipe: dropout in the fusion"}
    not_compared = {"options.exp.dir": "where the run writes"}

    def smoke_args(self, upstream_args):
        return ["--engine.nb_epochs", "1"]

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        if "-o" not in upstream_args and not any(a.startswith("--path_opts") for a in upstream_args):
            raise ValueError("-- -o OPTIONS.yaml: required (a block.bootstrap options file)")
        fusion = [] if arm.fusion == self.baseline else [f"--{FUSION}.type", arm.fusion]
        return [*deq_option_args(fusion_options), *upstream_args, *fusion, "--misc.seed", str(seed),
                "--exp.dir", str(Path(run_dir) / "exp")]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, argv):
        from deqfusion_core import plugins

        options, rest = split_deq_options(argv)
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), rest

    def effective_config(self, upstream, argv):
        integ, options, rest = self._parse(argv)
        integ.apply(upstream, options)
        from bootstrap.lib.options import Options

        saved = sys.argv
        Options._Options__instance = None
        sys.argv = ["bootstrap.run", *rest]
        try:
            merged = Options().options
        finally:
            sys.argv = saved
            Options._Options__instance = None
        config = {"options": merged}
        if merged["model"]["network"]["classif"]["fusion"]["type"] == "deq":
            config["deq"] = deq_settings(dict(options))
        return config

    def train(self, upstream, argv, run_dir, progress):
        from deqfusion_core.compare.tap import tap_stdout

        integ, options, rest = self._parse(argv)
        integ.apply(upstream, options)
        total = int(rest[rest.index("--engine.nb_epochs") + 1]) if "--engine.nb_epochs" in rest else None

        def on_line(line):
            m = EPOCH.search(line)
            if m:
                progress(done=int(m.group(1)), total=total, unit="epoch")

        with tap_stdout(on_line):
            code = integ.launch(upstream, rest)
        logs = Path(rest[rest.index("--exp.dir") + 1]) / "logs.json"
        if code or not logs.is_file():
            raise RuntimeError(f"bootstrap's runner exited with {code}; {logs} {'is' if logs.is_file() else 'is not'} "
                               f"there")
        values = json.loads(logs.read_text())
        final = {k.split(".", 1)[1]: float(v[-1]) for k, v in values.items()
                 if k.startswith("eval_epoch.") and v and isinstance(v[-1], (int, float))}
        epochs = len(values.get("eval_epoch.epoch", [])) or len(values.get("train_epoch.epoch", []))
        return RunOutcome({"final": Selection(final or None, None, at=f"epoch {epochs}",
                                              criterion="the paper's VQA protocol: val after the last epoch")},
                          [], {"epochs": epochs})
