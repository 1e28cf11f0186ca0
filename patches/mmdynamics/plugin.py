"""MM-Dynamics (TencentAILabHealthcare/mmdynamics): DEQ fusion instead of the concatenation in ``model.py``.

The head and the model patch are in :mod:`deqfusion_patches.mmdynamics.head`; the training script with the
data folder, view selection and evaluation protocols in :mod:`deqfusion_patches.mmdynamics.protocol`. The
paper's DEQ setting: Jacobian weight 20 (attached to the fused feature's backward, so the upstream
``loss.backward()`` includes it).

Options: DEQFusion's and ``jac_weight`` (20). The fusion (``deq`` or the upstream ``concat``), the hidden width
and gradient clipping are launcher arguments, the same for both fusions. Shims: ``deqfusion_compat.mmdynamics``.
"""
from __future__ import annotations

from typing import Sequence

from deqfusion_compat import mmdynamics  # noqa: F401 - registers mmdynamics' shims
from deqfusion_core import hookimpl
from deqfusion_core.compat import apply_shims
from deqfusion_core.integration import Integration
from deqfusion_core.process import import_isolated

from . import protocol
from .head import CONVERGENCE, PAPER


class MmdynamicsIntegration(Integration):
    name = "mmdynamics"
    summary = "MM-Dynamics (BRCA/ROSMAP): DEQ fusion of the confidence-weighted views instead of concatenation"
    env_var, marker, repository = "DEQFUSION_MMDYNAMICS_ROOT", "train_test.py", "TencentAILabHealthcare/mmdynamics"
    option_defaults = {"jac_weight": PAPER["jac_weight"], **CONVERGENCE}
    compat = ("deqfusion_compat.mmdynamics",)

    def install(self, upstream, options):
        self.root = upstream.require().root
        self.modules = import_isolated(self.root, ["model", "train_test"])
        apply_shims("mmdynamics", train_test=self.modules["train_test"])

    def run(self, argv: Sequence[str], on_evaluation=None) -> protocol.Run:
        """One run of the upstream script (``argv``: the launcher's arguments); its summary is ``.summary``.
        ``on_evaluation(record)``: called after each of the script's evaluations."""
        return protocol.run(self.modules, self.options, protocol.parse_args(argv), self.root, on_evaluation)

    def launch(self, upstream, argv: Sequence[str]) -> int:
        self.run(argv)
        return 0


INTEGRATION = MmdynamicsIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION


@hookimpl
def deqfusion_comparison():
    from .compare import MMDynamicsComparison

    return MMDynamicsComparison()
