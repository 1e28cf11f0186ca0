"""Lazy exports of deqfusion_core, so that `import deqfusion_core` (the CLI, plugin discovery) stays light."""
import importlib

EXPORTS = {
    "DEQFusion": "module", "DEQFusionOutput": "module",
    "FusionMap": "fusion_map", "Injection": "fusion_map",
    "SolverStats": "stats", "SolveResult": "stats", "DEQConvergenceError": "stats",
    "SolveConfig": "solvers", "SOLVERS": "solvers", "register_solver": "solvers", "get_solver": "solvers",
    "solve": "solvers", "Tracker": "solvers",
    "GRADIENTS": "gradients", "register_gradient": "gradients", "get_gradient": "gradients",
    "attach_aux_loss": "jacobian", "jacobian_loss": "jacobian",
    "spectral_radius": "contraction", "NotContractiveWarning": "contraction",
    "NORMS": "norms", "register_norm": "norms", "correction_loss": "correction",
    "plot_convergence": "plot", "plot_gates": "plot",
    "Integration": "integration", "Upstream": "integration", "UpstreamNotFound": "integration",
    "FusionAdapter": "integration", "FusionOptions": "options",
    "prepend_sys_path": "process", "run_path_as_main": "process",
}


def get(name):
    if name not in EXPORTS:
        raise AttributeError(f"module 'deqfusion_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deqfusion_core.{EXPORTS[name]}"), name)
