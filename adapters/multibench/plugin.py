"""The MultiBench integration as a deqfusion plugin (entry point ``multibench``).

``deqfusion run multibench [--upstream PATH] [fusion options] -- <args>``:
* ``<args>`` starting with a ``.py`` script (relative to the checkout): run that MultiBench script
  unchanged, with the compatibility shims; it can build fusions with ``deqfusion_adapters.multibench.create``;
* otherwise: the MM-IMDB runner (``python -m deqfusion_adapters.multibench.mmimdb --help``).
"""
from __future__ import annotations

from pathlib import Path

from deqfusion_core import Integration, hookimpl, prepend_sys_path, run_path_as_main


class MultiBenchIntegration(Integration):
    name = "multibench"
    summary = "fusion registry with `deq` for MultiBench; MM-IMDB trained by MultiBench's own train()"
    env_var = "DEQFUSION_MULTIBENCH_ROOT"
    marker = "training_structures/Supervised_Learning.py"
    repository = "pliang279/MultiBench"

    def __init__(self) -> None:
        super().__init__()
        self.options: dict = {}

    def apply(self, upstream, options=None):
        """Use this checkout for the registry's MultiBench fusions; ``options`` become ``deq``'s defaults."""
        from .checkout import use_checkout

        use_checkout(upstream.require().root)
        self.options = dict(options or {})
        self.applied = True

    def remove(self):
        from .checkout import use_checkout

        use_checkout(None)
        self.options, self.applied = {}, False

    def launch(self, upstream, argv):
        argv = list(argv)
        if argv and argv[0].endswith(".py"):
            from .compat import full_torch_load, shims

            script = Path(argv[0])
            script = script if script.is_absolute() else upstream.root / script
            with prepend_sys_path(upstream.root), shims(), full_torch_load():  # the checkout's modules import
                return run_path_as_main(script, argv[1:], cwd=upstream.root)
        from .mmimdb import main

        return main(argv, root=upstream.root, fusion_options=self.options)


INTEGRATION = MultiBenchIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
