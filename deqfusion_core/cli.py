"""The ``deqfusion`` command line: ``list``, ``run``, ``demo``, ``bench``, plus commands from plugins."""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence

from . import plugins

# Fusion options every `deqfusion run` understands; they reach the integration as keyword
# arguments of DEQFusion (plus ``jac_weight``, the Jacobian term's weight in the loss).
FUSION_FLAGS = {
    "solver": str, "f_max_iter": int, "f_tol": float, "f_stop": str,
    "backward": str, "b_max_iter": int, "b_tol": float, "jac_weight": float, "num_groups": int,
}


def parse_fusion_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``f_tol=1e-4``, ``gating=False``); else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--fusion-option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip().replace("-", "_"), value


def fusion_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in FUSION_FLAGS if getattr(args, k, None) is not None}
    opts.update(dict(args.fusion_option or []))
    return opts


def cmd_list(args: argparse.Namespace) -> int:
    reg = plugins.integrations()
    rows = []
    for name, integ in sorted(reg.integrations.items()):
        up = integ.locate()
        status = f"found {up.version or ''}".strip() if up.found else "not found"
        where = str(up.root) if up.root else (integ.distribution or "")
        describe = getattr(integ, "describe", None)   # an integration may say more once found (MMF: its shims)
        rows.append((name, status, where, (describe(up) if describe else integ.summary) if up.found else up.reason))
    for err in reg.errors:
        rows.append((err.name, "broken", "", err.error))
    if not rows:
        print("no integrations installed")
        return 0
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        integ = plugins.get_integration(args.name)
    except KeyError as exc:
        print(f"deqfusion run: {exc.args[0]}", file=sys.stderr)
        return 2
    up = integ.locate(args.upstream)
    if not up.found:
        print(f"deqfusion run {args.name}: upstream not found: {up.reason}", file=sys.stderr)
        return 2
    integ.apply(up, fusion_options(args))
    return integ.launch(up, list(args.upstream_args))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


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
                   help="any other DEQFusion keyword, e.g. -o gating=False (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqfusion", description="Deep Equilibrium multimodal fusion, plugged into your framework.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="integrations, whether their upstream was found, and its version")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="apply an integration and run its upstream entry script",
                       usage="deqfusion run NAME [--upstream PATH] [fusion options] -- <upstream arguments>")
    p.add_argument("name", help="integration name (see `deqfusion list`)")
    p.add_argument("--upstream", metavar="PATH", help="the upstream checkout (else DEQFUSION_<NAME>_ROOT)")
    add_fusion_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="train DEQ fusion on generated multimodal data on the CPU and print solver statistics")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="folder for the convergence and gate plots")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time the solver and gradient at given shapes (see benchmarks/ for comparisons)")
    p.add_argument("--batch", type=int, default=612)
    p.add_argument("--dims", type=int, nargs="+", default=[1000, 1000, 503])
    p.add_argument("--dim", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)

    plugins.get_plugin_manager().hook.deqfusion_add_commands(subparsers=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    upstream_args: list[str] = []
    if "--" in argv:  # everything after the first `--` belongs to the upstream script, untouched
        cut = argv.index("--")
        argv, upstream_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.upstream_args = upstream_args
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
