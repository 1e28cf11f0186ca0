"""deqfusion_core: Deep Equilibrium multimodal fusion (torch only).

    from deqfusion_core import DEQFusion
    fusion = DEQFusion(input_dims=[1000, 1000, 503], dim=500)
    fused, jac_loss, stats = fusion([x1, x2, x3])

The integration kit: ``deqfusion_core.integration`` (``Integration``, ``FusionAdapter``), ``.options``
(``FusionOptions``), ``.compat`` (conditional shims), ``.process`` (running an upstream's script).
"""
from . import _lazy
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", *_lazy.EXPORTS]


def __getattr__(name):  # the torch-heavy parts load on first use, so the CLI and plugin discovery stay light
    return _lazy.get(name)
