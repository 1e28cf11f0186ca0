"""The ``deqfusion`` command line: ``list``, ``run``, ``demo``, ``bench``, plus commands from plugins."""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from typing import Any, Sequence

from . import plugins
from .options import OptionError, parse_fusion_option

__all__ = ["main", "build_parser", "parse_fusion_option", "FUSION_FLAGS"]

# Fusion options every `deqfusion run` understands; with the `-o key=value` pairs they reach the integration,
# which checks them (deqfusion_core.options.FusionOptions) against DEQFusion's keywords and its own.
FUSION_FLAGS = {
    "solver": str, "f_max_iter": int, "f_tol": float, "f_stop": str,
    "backward": str, "b_max_iter": int, "b_tol": float, "jac_weight": float, "num_groups": int,
}


def fusion_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in FUSION_FLAGS if getattr(args, k, None) is not None}
    opts.update(dict(args.fusion_option or []))
    return opts


def shim_lines(integ) -> list[str]:
    """``deqfusion list -v``: the integration's shims, each with whether it applies here."""
    from . import compat

    lines = []
    for module in integ.compat:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken compat module is reported, not fatal
            lines.append(f"    ! {module} failed to import: {type(exc).__name__}: {exc}")
    applied = set(compat.applied(integ.name))
    for s in compat.shims(integ.name):
        if s in applied:
            state = "applied"
        elif s.module is not None:
            state = f"checked when {s.module} is imported"
        elif any(p.default is p.empty for p in inspect.signature(s.needed).parameters.values()):
            state = "checked when applied"
        else:
            try:
                state = "needed here" if s.needed() else "not needed here"
            except Exception as exc:  # noqa: BLE001
                state = f"check failed: {type(exc).__name__}: {exc}"
        kind = "behaviour change, both arms; " if s.behaviour_change else ""
        lines.append(f"    {s.name}: {kind}{state} -- {s.reason}")
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    reg = plugins.integrations()
    rows, details = [], {}
    for name, integ in sorted(reg.integrations.items()):
        up = integ.locate()
        status = f"found {up.version or ''}".strip() if up.found else "not found"
        where = str(up.root) if up.root else (integ.distribution or "")
        describe = getattr(integ, "describe", None)   # an integration may say more once found (MMF: its shims)
        rows.append((name, status, where, (describe(up) if describe else integ.summary) if up.found else up.reason))
        if args.verbose:
            details[name] = shim_lines(integ)
    for err in reg.errors:
        rows.append((err.name, "broken", "", err.error))
    if not rows:
        print("no integrations installed")
        return 0
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
        for line in details.get(r[0], []):
            print(line)
    return 0


def find_upstream(command: str, name: str, path: str | None):
    """``(integration, upstream)``, or None after saying on stderr why not (the caller exits with 2)."""
    try:
        integ = plugins.get_integration(name)
    except KeyError as exc:
        print(f"deqfusion {command}: {exc.args[0]}", file=sys.stderr)
        return None
    up = integ.locate(path)
    if not up.found:
        print(f"deqfusion {command} {name}: upstream not found: {up.reason}", file=sys.stderr)
        return None
    return integ, up


def cmd_run(args: argparse.Namespace) -> int:
    found = find_upstream("run", args.name, args.upstream)
    if found is None:
        return 2
    integ, up = found
    try:
        integ.apply(up, fusion_options(args))
    except OptionError as exc:
        print(f"deqfusion run {args.name}: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        from . import compat

        shims = compat.applied(integ.name)
        print(f"deqfusion run {args.name}: shims applied: " + (", ".join(s.name for s in shims) or "none"),
              file=sys.stderr)
    return integ.launch(up, list(args.upstream_args))


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare.command import misplaced_flag, study_options
    from .compare.study import StudyError, run_study

    flag = misplaced_flag(args.upstream_args)
    if flag:
        print(f"deqfusion compare {args.name}: {flag} is a flag of deqfusion compare, given after '--' (the "
              f"upstream's own arguments): put it before '--'", file=sys.stderr)
        return 2
    found = find_upstream("compare", args.name, args.upstream)
    if found is None:
        return 2
    try:
        comparison = plugins.get_comparison(args.name)
    except KeyError as exc:
        print(f"deqfusion compare: {exc.args[0]}", file=sys.stderr)
        return 2
    integ, up = found
    try:
        options = fusion_options(args)
        integ.fusion_options(options)     # checked now: they reach the fusion arm only when it trains
        return run_study(comparison, study_options(args, str(up.root) if up.root else None, options))
    except OptionError as exc:
        print(f"deqfusion compare {args.name}: {exc}", file=sys.stderr)
        return 2
    except StudyError as exc:
        print(f"deqfusion compare {args.name}: {exc}", file=sys.stderr)
        return 2


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a batch, a width, a step count), else an error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def add_fusion_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fusion options (defaults: DEQFusion's)")
    g.add_argument("--solver", choices=None, help="forward solver: anderson, broyden, fixed_point")
    g.add_argument("--f-max-iter", dest="f_max_iter", type=int, help="forward solver iteration cap")
    g.add_argument("--f-tol", dest="f_tol", type=float, help="forward solver tolerance")
    g.add_argument("--f-stop", dest="f_stop", choices=["rel", "abs"], help="stop on relative or absolute residual")
    g.add_argument("--backward", choices=["implicit", "phantom", "onestep", "unrolled"], help="gradient mode")
    g.add_argument("--b-max-iter", dest="b_max_iter", type=int, help="backward solver iteration cap")
    g.add_argument("--b-tol", dest="b_tol", type=float, help="backward solver tolerance")
    g.add_argument("--jac-weight", dest="jac_weight", type=float, help="weight of the Jacobian term in the loss")
    g.add_argument("--num-groups", dest="num_groups", type=int, help="GroupNorm groups")
    g.add_argument("-o", "--fusion-option", action="append", type=parse_fusion_option, metavar="KEY=VALUE",
                   help="any other DEQFusion keyword or integration option, e.g. -o gating=False (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqfusion", description="Deep Equilibrium multimodal fusion, plugged into your framework.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="integrations, whether their upstream was found, and its version")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also each integration's compatibility shims and whether they apply here")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="apply an integration and run its upstream entry script",
                       usage="deqfusion run NAME [--upstream PATH] [-v] [fusion options] -- <upstream arguments>")
    p.add_argument("name", help="integration name (see `deqfusion list`)")
    p.add_argument("--upstream", metavar="PATH", help="the upstream checkout (else DEQFUSION_<NAME>_ROOT)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the shims applied (to stderr)")
    add_fusion_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="train DEQ fusion on generated multimodal data on the CPU and print solver statistics")
    p.add_argument("--steps", type=positive_int, default=160)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="folder for the convergence and gate plots")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time f, its VJP, a training step (at given and small shapes) and the solves "
                                     "(see benchmarks/ for comparisons)")
    p.add_argument("--batch", type=positive_int, default=612)
    p.add_argument("--dims", type=positive_int, nargs="+", default=[1000, 1000, 503])
    p.add_argument("--dim", type=positive_int, default=500)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile-f", metavar="MODE", help="time f torch.compile'd with this mode (DEQFusion's compile_f)")
    p.add_argument("-o", "--fusion-option", action="append", type=parse_fusion_option, metavar="KEY=VALUE",
                   help="a DEQFusion option of the f to time, e.g. -o norm=contractive -o gating=False (repeatable; "
                        "not the tolerances, caps or Jacobian term, which the bench sets)")
    p.add_argument("--json", metavar="PATH", help="also write the figures there as JSON")
    p.set_defaults(func=cmd_bench)

    from .compare import command as compare

    p = sub.add_parser("compare", help=compare.HELP, usage=compare.USAGE, description=compare.DESCRIPTION)
    compare.add_arguments(p)
    add_fusion_flags(p)
    p.set_defaults(func=cmd_compare)

    plugins.get_plugin_manager().hook.deqfusion_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    upstream_args: list[str] = []
    if "--" in argv:  # everything after the first `--` belongs to the upstream script, untouched
        cut = argv.index("--")
        argv, upstream_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.upstream_args = upstream_args
    args.argv = given   # the command as typed (result files record it)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
