"""deqfusion_core: Deep Equilibrium multimodal fusion (torch only).

    from deqfusion_core import DEQFusion
    fusion = DEQFusion(input_dims=[1000, 1000, 503], dim=500)
    fused, jac_loss, stats = fusion([x1, x2, x3])

The integration kit: ``deqfusion_core.integration`` (``Integration``, ``FusionAdapter``), ``.options``
(``FusionOptions``), ``.compat`` (conditional shims), ``.process`` (running an upstream's script).
"""
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["DEQFusion", "DEQFusionOutput", "SolverStats", "DEQConvergenceError", "attach_aux_loss", "jacobian_loss",
           "SOLVERS", "register_solver", "get_solver", "solve", "plot_convergence", "plot_gates",
           "hookimpl", "Integration", "Upstream", "UpstreamNotFound", "FusionAdapter", "FusionOptions",
           "prepend_sys_path", "run_path_as_main"]


def __getattr__(name):  # the torch-heavy parts load on first use, so the CLI and plugin discovery stay light
    import importlib

    return importlib.import_module("deqfusion_core._lazy").get(name)
