"""The arguments of ``deqfusion compare NAME --seeds LIST --out DIR [...] -- <upstream arguments>``
(the command itself is in :mod:`deqfusion_core.cli`)."""
from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from typing import Sequence

from .robustness import NOISE_LEVELS
from .study import StudyOptions

__all__ = ["DESCRIPTION", "HELP", "USAGE", "add_arguments", "misplaced_flag", "parse_seeds", "study_options"]


def parse_seeds(text: str) -> list[int]:
    """``1,2`` / ``1-5`` / ``1-3,7`` -> a list of distinct non-negative seeds in the given order."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise argparse.ArgumentTypeError(f"expected seeds like 1,2 or 1-5, got {text!r}")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return list(dict.fromkeys(seeds))


def parse_levels(text: str) -> list[float]:
    """``0,0.5,1`` -> noise levels (distinct, increasing, >= 0; 0 is the clean evaluation, added if missing)."""
    try:
        levels = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected noise levels like 0,0.5,1, got {text!r}") from None
    levels = sorted(set([0.0, *levels]))
    if len(levels) < 2 or levels[0] < 0 or not all(math.isfinite(x) for x in levels):
        raise argparse.ArgumentTypeError(f"expected noise levels >= 0 (at least one > 0), got {text!r}")
    return levels


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def misplaced_flag(upstream_args: Sequence[str]) -> str | None:
    """The first of ``deqfusion compare``'s own flags (``--dry-run``, ``--smoke``, ``--seeds``, ...) given after
    ``--``, where it would reach the upstream (MMF dies of it with an unpacking error); None when there is none.
    The fusion flags (``-o``, ``--f-tol``, ...) are left to the upstream: some take them (block's ``-o FILE``)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    own = {flag for action in parser._actions for flag in action.option_strings}
    return next((arg.split("=", 1)[0] for arg in upstream_args if arg.split("=", 1)[0] in own), None)


def study_options(args: argparse.Namespace, upstream_root: str | None, fusion_options: dict) -> StudyOptions:
    """The study the parsed ``deqfusion compare`` command line asks for."""
    arm_args: dict[str, list[str]] = {}
    for arm, text in args.arm_args or []:
        arm_args.setdefault(arm, []).extend(shlex.split(text))
    return StudyOptions(seeds=args.seeds, out=args.out, smoke=args.smoke, fusion=args.fusion,
                        baselines=[b for text in args.baseline or [] for b in _names(text)],
                        upstream=upstream_root, allow_diff=args.allow_diff or [], fusion_options=fusion_options,
                        upstream_args=list(args.upstream_args), arm_args=arm_args, threads=args.threads,
                        study=args.study, command=shlex.join(["deqfusion", *getattr(args, "argv", sys.argv[1:])]),
                        dry_run=args.dry_run, robustness=args.robustness)


HELP = ("the paper's A/B: the upstream's own training once per arm and seed, only the fusion swapped; result "
        "files per ../shared/RESULTS.md")
USAGE = ("deqfusion compare NAME --seeds LIST --out DIR [--smoke] [--fusion deq] [--baseline FUSION] "
         "[--upstream PATH] [--allow-diff KEY ...] [--robustness [LEVELS]] [fusion options] -- <upstream arguments>")
DESCRIPTION = ("Per seed, run the upstream's own training entry once per arm (baseline: the upstream's own fusion; "
               "deq), with identical data, split, seed, optimizer, schedule, clipping, widths and selection. The arms' "
               "effective configurations are compared first: a difference beyond the fusion stops the study (exit 2) "
               "unless named with --allow-diff. Writes DIR/runs.jsonl, DIR/summary.md, DIR/summary.json and "
               "DIR/paired.png; rerunning the same command resumes.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``deqfusion compare`` (the fusion flags are the CLI's, shared with ``run``)."""
    p.add_argument("name", help="integration name (see `deqfusion list`)")
    p.add_argument("--seeds", type=parse_seeds, required=True, help="e.g. 1,2 or 1-5")
    p.add_argument("--out", required=True, help="the study's folder (benchmarks/results/<study>/ for the README)")
    p.add_argument("--smoke", action="store_true", help="a few updates or epochs on a few samples (tests)")
    p.add_argument("--fusion", default=None, help="the fusion under test (default deq)")
    p.add_argument("--baseline", action="append", metavar="FUSION",
                   help="the baseline fusion(s), comma-separated or repeated (default: the upstream's own)")
    p.add_argument("--upstream", metavar="PATH", help="the upstream checkout (else DEQFUSION_<NAME>_ROOT)")
    p.add_argument("--allow-diff", action="extend", nargs="+", metavar="KEY",
                   help="a configuration key (or dotted prefix) the arms may differ in beyond the fusion; the "
                        "summary states it")
    p.add_argument("--arm-args", nargs=2, action="append", metavar=("ARM", "ARGS"),
                   help="extra upstream arguments for one arm only (a shell-quoted string); the check applies")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run, both arms (default 1)")
    p.add_argument("--study", help="the study's name in the result files (default: the comparison's)")
    p.add_argument("--robustness", nargs="?", type=parse_levels, const=list(NOISE_LEVELS), default=None,
                   metavar="LEVELS",
                   help="after training, evaluate each run's selected checkpoint on the test split with each modality "
                        "removed and under Gaussian noise of each level on each modality (default levels "
                        f"{','.join(f'{x:g}' for x in NOISE_LEVELS)}: sigma in units of each feature's std); the "
                        "summary's robustness section and robustness.png (docs/robustness.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="compute and check the arms' configurations, show each arm's upstream arguments; train nothing")
