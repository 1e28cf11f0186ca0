"""MM-Dynamics (TencentAILabHealthcare/mmdynamics): DEQ fusion instead of the concatenation in ``model.py``.

The head and the model patch are in :mod:`deqfusion_patches.mmdynamics.head`; the training script with the
data folder, view selection and evaluation protocols in :mod:`deqfusion_patches.mmdynamics.protocol`. The
paper's training settings: Jacobian weight 20 (attached to the fused feature's backward, so the upstream
``loss.backward()`` includes it), gradient-norm clip 30 (a step pre-hook on the optimizer of the upstream
``train_epoch``), hidden width 500.

Options: DEQFusion's, ``jac_weight`` (20) and ``grad_clip`` (30). The fusion (``deq`` or the upstream
``concat``) and the hidden width are launcher arguments. Shims: ``deqfusion_compat.mmdynamics``.
"""
from __future__ import annotations

from typing import Sequence

from deqfusion_compat import mmdynamics  # noqa: F401 - registers mmdynamics' shims
from deqfusion_core import hookimpl
from deqfusion_core.compat import apply_shims
from deqfusion_core.integration import Integration
from deqfusion_core.options import OptionError
from deqfusion_core.process import import_isolated

from . import protocol
from .head import PAPER


class MmdynamicsIntegration(Integration):
    name = "mmdynamics"
    summary = "MM-Dynamics (BRCA/ROSMAP): DEQ fusion of the confidence-weighted views instead of concatenation"
    env_var, marker, repository = "DEQFUSION_MMDYNAMICS_ROOT", "train_test.py", "TencentAILabHealthcare/mmdynamics"
    option_defaults = {"jac_weight": PAPER["jac_weight"], "grad_clip": PAPER["grad_clip"]}
    compat = ("deqfusion_compat.mmdynamics",)

    def install(self, upstream, options):
        if options["grad_clip"] < 0:
            raise OptionError(f"mmdynamics option 'grad_clip': must be >= 0, got {options['grad_clip']}")
        self.root = upstream.require().root
        self.modules = import_isolated(self.root, ["model", "train_test"])
        apply_shims("mmdynamics", train_test=self.modules["train_test"])

    def run(self, argv: Sequence[str]) -> protocol.Run:
        """One run of the upstream script (``argv``: the launcher's arguments); its summary is ``.summary``."""
        return protocol.run(self.modules, self.options, protocol.parse_args(argv), self.root)

    def launch(self, upstream, argv: Sequence[str]) -> int:
        self.run(argv)
        return 0


INTEGRATION = MmdynamicsIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
