"""The MultiBench integration as a deqfusion plugin (entry point ``multibench``).

``deqfusion run multibench [--upstream PATH] [fusion options] -- <args>``:
* ``<args>`` starting with a ``.py`` script (relative to the checkout): run that MultiBench script
  unchanged, with the compatibility shims; it can build fusions with ``deqfusion_adapters.multibench.create``;
* otherwise: the runner, MM-IMDB or ROSMAP/BRCA (``python -m deqfusion_adapters.multibench.runner --help``).

Applying it uses the checkout for the registry's MultiBench fusions, and registers ``deq`` with the fusion
options as its defaults.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from deqfusion_compat import multibench as shims
from deqfusion_core import hookimpl
from deqfusion_core.compat import applying
from deqfusion_core.integration import Integration
from deqfusion_core.process import prepend_sys_path, run_path_as_main

from . import checkout, registry


class MultiBenchIntegration(Integration):
    name = checkout.NAME
    summary = "fusion registry with `deq` for MultiBench; MM-IMDB trained by MultiBench's own train()"
    env_var, marker, repository = checkout.ENV_VAR, checkout.MARKER, checkout.REPOSITORY
    compat = ("deqfusion_compat.multibench",)

    def install(self, upstream, options):
        self.patches.call(lambda: checkout.use_checkout(None))
        checkout.use_checkout(upstream.require().root)
        deq = registry.entry("deq")
        self.patches.item(registry.FUSIONS, "deq",
                          dataclasses.replace(deq, factory=functools.partial(deq.factory, defaults=options)))

    def launch(self, upstream, argv):
        argv = list(argv)
        if argv and argv[0].endswith(".py"):
            script = Path(argv[0])
            script = script if script.is_absolute() else upstream.root / script
            with prepend_sys_path(upstream.root), applying(self.name, shims.IMPORT + shims.SCRIPT):
                return run_path_as_main(script, argv[1:], cwd=upstream.root)
        from .runner import main

        return main(argv, root=upstream.root, fusion_options=self.options)


INTEGRATION = MultiBenchIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION


@hookimpl
def deqfusion_comparison():
    from .compare import MultiBenchComparison

    return MultiBenchComparison()
