"""``deqfusion compare mcan``: MCAN's own ``run.py`` (train on ``--SPLIT train``, evaluated on VQA-v2 val after each
epoch) once per arm: the upstream's sum of the two features (``-o baseline=True``: the shims only) and DEQ fusion.

The effective configuration is MCAN's own ``Cfgs`` as ``run.py`` builds it (its arguments, then the model's yml,
then ``proc()``), plus the fusion. The paper's MCAN protocol reports the val split after the last epoch
(selection ``final``). ``-- --glove PATH`` (ours, every arm): the GloVe text file (else ``$DEQFUSION_GLOVE``).
"""
from __future__ import annotations

import hashlib
import os
import re
import runpy
from pathlib import Path
from typing import Any

from deqfusion_core.compare import (Comparison, RunOutcome, Selection, arg_value, deq_option_args, deq_recipe_keys, deq_settings,
                                    split_deq_options)

__all__ = ["McanComparison"]

OVERALL = re.compile(r"Overall Accuracy is: ([\d.]+)")
PER_TYPE = re.compile(r"^(yes/no|number|other) : ([\d.]+)$")


class McanComparison(Comparison):
    integration, study, baseline, metric, selections = "mcan", "vqa2_mcan", "sum", "accuracy", ("final",)
    fusion_keys = {"fusion": "the fusion (the upstream's sum, or DEQ with its solver and gradient settings)",
                   **deq_recipe_keys("fusion.deq.")}
    not_compared = {"cfgs.VERSION": "the run's name (its log and checkpoint folder)",
                    "cfgs.CKPT_VERSION": "the run's name (its log and checkpoint folder)"}

    def fusions(self):
        return ["sum", "deq"]

    def smoke_args(self, upstream_args):
        return ["--MAX_EPOCH=1", "--BS=8", "--NW=0"]

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        options = {**fusion_options, "baseline": arm.fusion != "deq"}
        return [*deq_option_args(options), "--RUN=train", "--SPLIT=train", f"--SEED={seed}",
                f"--VERSION=deqfusion-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]}", *upstream_args]

    # -- in the worker ------------------------------------------------------------------------------------------
    def _parse(self, argv):
        from deqfusion_core import plugins

        options, rest = split_deq_options(argv)
        glove = arg_value(rest, "--glove")
        if glove is not None:
            i = rest.index("--glove")
            rest = rest[:i] + rest[i + 2:]
        options["glove"] = str(Path(glove).resolve()) if glove else os.environ.get("DEQFUSION_GLOVE")
        integ = plugins.get_integration(self.integration)
        return integ, integ.fusion_options(options), rest

    def effective_config(self, upstream, argv):
        import yaml

        from deqfusion_core.process import prepend_sys_path, run_main

        integ, options, rest = self._parse(argv)
        integ.apply(upstream, options)
        root = Path(upstream.root)
        built: dict[str, Any] = {}

        def build():      # run.py's main up to print(__C): its arguments, the model's yml, proc()
            from cfgs.base_cfgs import Cfgs

            script = runpy.run_path(str(root / "run.py"), run_name="deqfusion_mcan_config")
            args = script["parse_args"]()
            cfg = Cfgs()
            args_dict = cfg.parse_to_dict(args)
            with open(root / "cfgs" / f"{args.MODEL}_model.yml") as f:
                cfg.add_args({**yaml.safe_load(f), **args_dict})
            cfg.proc()
            built.update(vars(cfg))      # flattened to plain values by the worker

        with prepend_sys_path(root):
            run_main(build, rest, prog=str(root / "run.py"), cwd=root)
        fusion: dict[str, Any] = {"type": "sum" if options["baseline"] else "deq"}
        if not options["baseline"]:
            fusion["deq"] = deq_settings({k: v for k, v in options.items() if k not in ("baseline", "glove")})
        return {"cfgs": built, "fusion": fusion, "glove": options["glove"]}

    def train(self, upstream, argv, run_dir, progress):
        from deqfusion_core.compare.tap import tap_stdout

        integ, options, rest = self._parse(argv)
        integ.apply(upstream, options)
        epochs: list[dict[str, float]] = []
        total = int(arg_value(rest, "--MAX_EPOCH") or 13)

        def on_line(line):
            m = OVERALL.search(line)
            if m:
                epochs.append({"accuracy": float(m.group(1)) / 100})
                progress(done=len(epochs), total=total, unit="epoch", metric={"val accuracy": epochs[-1]["accuracy"]})
                return
            m = PER_TYPE.match(line.strip())
            if m and epochs:
                epochs[-1][m.group(1)] = float(m.group(2)) / 100

        with tap_stdout(on_line):
            code = integ.launch(upstream, rest)
        if code or not epochs:
            raise RuntimeError(f"MCAN's run.py exited with {code} after {len(epochs)} evaluations")
        return RunOutcome({"final": Selection(epochs[-1], None, at=f"epoch {len(epochs)}",
                                              criterion="the paper's MCAN protocol: VQA-v2 val after the last epoch")},
                          [], {"val_by_epoch": epochs})
