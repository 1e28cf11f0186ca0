"""``deqfusion compare mutan``: vqa.pytorch's own ``train.py`` (``--vqa_trainsplit train``: train, then validate
after each epoch) once per arm: Mutan's own fusion (``-o baseline=True``: the shims only) and DEQ fusion.

The effective configuration is what ``train.py`` itself prints with ``--help_opt`` (its arguments and its options,
the options file merged over them) before it builds anything, plus the fusion. Reported: the val split after the
last epoch (``final``; vqa.pytorch's top-1 and top-5 accuracy over its answer vocabulary, from its logger.json; the
official VQA accuracy needs its Python 2 evaluation script).
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, arg_value, deq_option_args, deq_recipe_keys, deq_settings,
                                    split_deq_options)

__all__ = ["MutanComparison"]

EPOCH = re.compile(r"^\s*\* Acc@1 ([\d.]+)")
SEED = "--compare-seed"     # the study's seed (train.py has no seed argument); stripped before train.py parses
SEEDED = ("vqa.pytorch's train.py seeds nothing; each run seeds random, numpy and torch with the study's seed before "
          "train.py starts, so both arms of a seed start from the same random state")


class MutanComparison(Comparison):
    integration, study, baseline, metric, selections = "mutan", "vqa2_mutan", "mutan", "acc1", ("final",)
    fusion_keys = {"fusion": "the classifier's fusion (Mutan's own, or DEQ with its solver and gradient settings)",
                   **deq_recipe_keys("fusion.deq.")}
    not_compared = {"args.dir_logs": "where the run writes", "options.logs.dir_logs": "where the run writes"}

    def fusions(self):
        return ["mutan", "deq"]

    def smoke_args(self, upstream_args):
        return ["--epochs", "2", "-j", "0"]       # train.py trains epochs 1 .. epochs-1

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        if arg_value(upstream_args, "--path_opt") is None:
            raise ValueError("-- --path_opt OPTIONS.yaml: required (a vqa.pytorch options file)")
        options = {**fusion_options, "baseline": arm.fusion != "deq"}
        return [*deq_option_args(options), SEED, str(seed), *upstream_args, "--dir_logs", str(Path(run_dir) / "logs")]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, argv):
        from deqfusion_core import plugins

        options, rest = split_deq_options(argv)
        i = rest.index(SEED)
        seed, rest = int(rest[i + 1]), rest[:i] + rest[i + 2:]
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), rest, seed

    def effective_config(self, upstream, argv):
        from deqfusion_core.compare.tap import tap_stdout

        integ, options, rest, seed = self._parse(argv)
        integ.apply(upstream, options)
        lines: list[str] = []
        with tap_stdout(lines.append):
            code = integ.launch(upstream, [*rest, "--help_opt"])
        text = "\n".join(lines)
        if code or "## options" not in text:
            raise RuntimeError(f"train.py --help_opt exited with {code} without printing its options")
        args_text, options_text = text.split("## args", 1)[1].split("## options", 1)
        config: dict[str, Any] = {"args": ast.literal_eval(args_text.strip()),
                                  "options": ast.literal_eval(options_text.strip()), "seed": seed}
        config["fusion"] = {"type": "mutan" if options["baseline"] else "deq"}
        if not options["baseline"]:
            config["fusion"]["deq"] = deq_settings({k: v for k, v in options.items() if k != "baseline"})
        return config

    def train(self, upstream, argv, run_dir, progress):
        from deqfusion_core.compare.tap import tap_stdout

        import random

        import numpy as np
        import torch

        integ, options, rest, seed = self._parse(argv)
        integ.apply(upstream, options)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        epochs = int(arg_value(rest, "--epochs") or 0) - 1
        done = []

        def on_line(line):
            m = EPOCH.match(line)
            if m:
                done.append(float(m.group(1)))
                progress(done=len(done), total=epochs if epochs > 0 else None, unit="epoch",
                         metric={"val acc1": done[-1] / 100})

        with tap_stdout(on_line):
            code = integ.launch(upstream, rest)
        logger = Path(arg_value(rest, "--dir_logs")) / "logger.json"
        if code or not logger.is_file():
            raise RuntimeError(f"vqa.pytorch's train.py exited with {code}; {logger} was not written")
        val = json.loads(logger.read_text()).get("logged", {}).get("val", {})
        scale = {"acc1": 100.0, "acc5": 100.0, "loss": 1.0}      # vqa.pytorch logs accuracies in percent
        final = {name: float(by_epoch[max(by_epoch, key=int)]) / scale[name] for name, by_epoch in val.items()
                 if name in scale and by_epoch}
        last = max((int(e) for e in val.get("acc1", {})), default=0)
        return RunOutcome({"final": Selection(final or None, None, at=f"epoch {last}",
                                              criterion="the paper's VQA protocol: val after the last epoch")},
                          [SEEDED], {"epochs": last})
