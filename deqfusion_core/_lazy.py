"""Lazy exports of deqfusion_core, so that `import deqfusion_core` (the CLI, plugin discovery) stays light."""
import importlib

_EXPORTS = {
    "DEQFusion": "module", "DEQFusionOutput": "module",
    "SolverStats": "stats", "DEQConvergenceError": "stats",
    "attach_aux_loss": "jacobian", "jacobian_loss": "jacobian",
    "SOLVERS": "solvers", "register_solver": "solvers", "get_solver": "solvers", "solve": "solvers",
    "plot_convergence": "plot", "plot_gates": "plot",
    "Integration": "integration", "Upstream": "integration", "UpstreamNotFound": "integration",
    "FusionAdapter": "integration", "FusionOptions": "options",
    "prepend_sys_path": "process", "run_path_as_main": "process",
}


def get(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deqfusion_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deqfusion_core.{_EXPORTS[name]}"), name)
