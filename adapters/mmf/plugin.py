"""The `mmf` integration: `deqfusion run mmf -- config=... model=... dataset=...`, `deqfusion mmf-user-dir`,
`deqfusion mmf-demo`. MMF is pip-installed (`mmf==1.0.0rc10 --no-deps`, see install.sh)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from deqfusion_core import hookimpl
from deqfusion_core.compat import unwatch_imports
from deqfusion_core.integration import Integration, Upstream
from deqfusion_core.options import parse_fusion_option
from deqfusion_core.process import run_main

from . import CONFIG_DIR, USER_DIR
from .flavour import ROOT_VARIABLE, detect, shims_needed, use_checkout


def resolve_config_opts(argv: Sequence[str]) -> list[str]:
    """`config=easy_vqa_deq` (a packaged experiment name) becomes the path of that packaged yaml."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "config" and eq and not Path(value).exists():
            packaged = CONFIG_DIR / "experiments" / (value if value.endswith(".yaml") else value + ".yaml")
            if packaged.is_file():
                arg = f"config={packaged}"
        out.append(arg)
    return out


class MMFIntegration(Integration):
    name = "mmf"
    summary = "fusion: deq in MMF's fusion registry, fusion_classifier model, easy_vqa dataset"
    distribution, module = "mmf", "mmf"
    compat = ("deqfusion_compat.mmf_rc10",)   # `deqfusion list -v`; MMF main's shims are listed by describe()
    env_var = ROOT_VARIABLE          # a checkout of MMF main, instead of the installed mmf
    marker = "mmf/version.py"
    repository = "facebookresearch/mmf"

    def locate(self, path=None):
        """The installed mmf, or the checkout given by ``path`` / ``$DEQFUSION_MMF_ROOT`` (then first on sys.path);
        the version says which flavour: ``rc10 1.0.0rc10`` or ``main 1.0.0rc12 (git ...)``. ``path`` may also be
        the ``mmf`` package folder an earlier locate reported (``deqfusion compare`` passes it to its workers)."""
        if path is not None and Path(path).name == "mmf" and (Path(path) / "version.py").is_file():
            info = detect()
            path = None if info is not None and info.path == Path(path).resolve() else Path(path).resolve().parent
        upstream = super().locate(path)
        if not upstream.found:
            return upstream
        if upstream.root is not None:
            use_checkout(upstream.root)
        info = detect()
        if info is None:
            return Upstream(self.name, False, upstream.root, reason="no importable `mmf` package")
        commit = f" (git {info.commit})" if info.commit else ""
        return Upstream(self.name, True, info.path, f"{info.flavour} {info.version}{commit}")

    def describe(self, upstream) -> str:
        """``deqfusion list``: the shims this MMF needs on this stack."""
        names = shims_needed()
        return f"{self.summary}; shims: {', '.join(names) or 'none'}"

    def install(self, upstream, options):
        from .registration import register, unregister

        self.patches.call(lambda: unwatch_imports(self.name))
        self.patches.call(lambda: unwatch_imports("mmf-main"))
        self.patches.call(unregister)
        register(options)

    def launch(self, upstream, argv):
        from mmf_cli.run import run

        return run_main(lambda: run(opts=resolve_config_opts(argv)))


INTEGRATION = MMFIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION


@hookimpl
def deqfusion_comparison():
    from .compare import MMFComparison

    return MMFComparison()


def cmd_user_dir(args) -> int:
    print(USER_DIR)
    return 0


def cmd_demo(args) -> int:
    upstream = INTEGRATION.locate(args.upstream)
    if not upstream.found:
        print(f"deqfusion mmf-demo: MMF not found: {upstream.reason}", file=sys.stderr)
        return 2
    from .demo import main

    return main(args)


@hookimpl
def deqfusion_add_commands(subparsers):
    p = subparsers.add_parser("mmf-user-dir", help="print the MMF user dir: mmf_run ... env.user_dir=$(deqfusion mmf-user-dir)")
    p.set_defaults(func=cmd_user_dir)
    p = subparsers.add_parser("mmf-demo", help="train fusion_classifier on easy-VQA in MMF on the CPU; print "
                                               "validation accuracy and solver stats, save convergence/gate plots")
    p.add_argument("--fusion", default="deq", help="deq (default) or linear_sum (the baseline config)")
    p.add_argument("--out", default="runs/mmf_easy_vqa", help="folder for MMF's save dir and the plots")
    p.add_argument("--max-updates", type=int, default=None, help="override training.max_updates")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the demo's ops are "
                                                          "tiny; extra threads only wait on a busy machine)")
    p.add_argument("--upstream", metavar="PATH", help=f"an MMF checkout (git main) to use instead of the installed "
                                                      f"mmf (else ${ROOT_VARIABLE})")
    p.add_argument("-o", "--fusion-option", action="append", type=parse_fusion_option, metavar="KEY=VALUE",
                   help="a DEQFusion keyword over the packaged config's, e.g. -o f_max_iter=60 (repeatable)")
    p.add_argument("mmf_opts", nargs="*", help="more MMF options, e.g. training.batch_size=32")
    p.set_defaults(func=cmd_demo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cmd_user_dir(None))
