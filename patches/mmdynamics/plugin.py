"""MM-Dynamics (TencentAILabHealthcare/mmdynamics): DEQ fusion instead of the concatenation in ``model.py``.

Patch point, in memory (the checkout's files are never edited):

- ``MMDynamic.MMClasifier`` (upstream: ``Linear(views * hidden, classes)`` over the concatenation of the
  confidence-weighted view features) becomes :class:`DEQHead`: the concatenation is split back into the
  views, fused by ``DEQFusion`` (x_fuse = their weighted sum, initialised to the plain sum; no dropout
  inside), and only the fused state goes to ``Linear(hidden, classes)``. ``MMDynamic.forward`` is the
  upstream one; a thin wrapper only tells the head which data split it sees, so that the solver
  warm-starts from the previous full-batch epoch's state of the same split (kept on the model, outside
  its ``state_dict``).
- The paper's training settings: Jacobian weight 20 (attached to the fused feature's backward, so the
  upstream ``loss.backward()`` includes it), gradient-norm clip 30 (a step pre-hook on the optimizer of
  the upstream ``train_epoch``), hidden width 500.

The upstream training script (``train_test.train``) is run as it is, with: ``num_epoch`` and
``test_inverval`` read from the launcher's options (the only two literals replaced in its source, in
memory); ``prepare_trte_data`` reading the data folder the user names, keeping the selected views and,
under the fair protocol, carving a stratified seeded validation split off the training files; its prints
labelled with the protocol that produced them. See :mod:`deqfusion_patches.mmdynamics.protocol`.

Conditional shims: ``.cuda()`` without a GPU is a no-op (``vqa_compat.shim_cuda_on_cpu``);
``load_checkpoint`` maps the released (CUDA-saved) checkpoints to the CPU when there is no GPU.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from deqfusion_core import Integration, hookimpl
from deqfusion_patches import vqa_compat
from deqfusion_patches.nonconvergence import NonConvergence
from deqfusion_patches.isolated_import import import_isolated

PAPER = {"jac_weight": 20.0, "grad_clip": 30.0, "hidden": 500}
# fusion: "deq" or "concat" (the upstream model); fusion_options: DEQFusion keyword arguments
SETTINGS: dict[str, Any] = {"fusion": "deq", "fusion_options": {}, "jac_weight": PAPER["jac_weight"],
                            "grad_clip": PAPER["grad_clip"], "hidden": None}
NONCONVERGED = NonConvergence("MM-Dynamics")


class DEQHead(nn.Module):
    """Replaces ``MMClasifier``: split the concatenated view features, DEQ-fuse them, classify the fused state."""

    def __init__(self, views: int, hidden: int, num_class: int, linear_layer, **fusion_options):
        super().__init__()
        from deqfusion_core import DEQFusion

        self.views, self.hidden = views, hidden
        self.deq_fusion = DEQFusion([hidden] * views, hidden, **fusion_options)
        self.classifier = linear_layer(hidden, num_class)     # the upstream LinearLayer (xavier init)
        self.split_key = None     # set by the patched MMDynamic.forward: which data split is passing
        self.states: dict = {}    # split -> last solved state (warm start of the next epoch); not in state_dict
        self.stats: dict = {}     # split -> last SolverStats

    def forward(self, concatenated: torch.Tensor) -> torch.Tensor:
        xs = list(torch.split(concatenated, self.hidden, dim=1))
        if len(xs) != self.views:
            raise ValueError(f"DEQHead: expected {self.views} views of width {self.hidden}, got {concatenated.shape}")
        z0 = self.states.get(self.split_key)
        if z0 is not None and z0.shape[0] != concatenated.shape[0]:
            z0 = None
        fused, _, stats = self.deq_fusion(xs, z0=z0)
        self.states[self.split_key], self.stats[self.split_key] = stats.state, stats
        NONCONVERGED.check(stats)
        return self.classifier(fused)


def split_key(data_list) -> tuple:
    """A data split's identity: the full-batch script passes the same tensors every epoch."""
    x = data_list[0]
    return (x.data_ptr(), tuple(x.shape))


def patch_model(model_module) -> None:
    cls = model_module.MMDynamic
    upstream_init, upstream_forward = cls.__init__, cls.forward

    def __init__(self, in_dim, hidden_dim, num_class, dropout):
        if SETTINGS["hidden"]:
            hidden_dim = [SETTINGS["hidden"]]
        upstream_init(self, in_dim, hidden_dim, num_class, dropout)
        if SETTINGS["fusion"] == "deq":
            if len(hidden_dim) != 1:
                raise ValueError(f"hidden_dim: the DEQ head replaces the single classifier layer; got {hidden_dim}")
            options = {**SETTINGS["fusion_options"], "jac_weight": SETTINGS["jac_weight"]}
            self.MMClasifier = DEQHead(self.views, hidden_dim[0], num_class, model_module.LinearLayer, **options)

    def forward(self, data_list, label=None, infer=False):
        if isinstance(self.MMClasifier, DEQHead):
            self.MMClasifier.split_key = split_key(data_list)
        return upstream_forward(self, data_list, label, infer)

    __init__.__doc__ = "Upstream MMDynamic.__init__; MMClasifier -> DEQHead when the fusion is 'deq'."
    cls.__init__, cls.forward = __init__, forward
    cls._deqfusion_upstream = (upstream_init, upstream_forward)


def clip_on_step(model, optimizer) -> None:
    """Clip the gradient norm of ``model`` before each ``optimizer.step()`` (once per optimizer)."""
    if SETTINGS["fusion"] != "deq" or not SETTINGS["grad_clip"] or getattr(optimizer, "_deqfusion_clip", False):
        return
    params = [p for p in model.parameters()]

    def clip(*_):
        torch.nn.utils.clip_grad_norm_(params, SETTINGS["grad_clip"])

    optimizer.register_step_pre_hook(clip)
    optimizer._deqfusion_clip = True


def shim_load_checkpoint(train_test) -> bool:
    """The released checkpoints were saved from CUDA tensors: without a GPU, map them to the CPU."""
    if torch.cuda.is_available():
        return False

    def load_checkpoint(model, path):
        model.load_state_dict(torch.load(path, map_location="cpu"))

    train_test.load_checkpoint = load_checkpoint
    vqa_compat.APPLIED.add("mmdynamics.load_checkpoint->cpu")
    return True


def apply_settings(options: dict[str, Any] | None) -> None:
    options = dict(options or {})
    for key in ("jac_weight", "grad_clip"):
        value = float(options.pop(key, PAPER[key]))
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")
        SETTINGS[key] = value
    SETTINGS["fusion_options"] = options


class MmdynamicsIntegration(Integration):
    name = "mmdynamics"
    summary = "MM-Dynamics (BRCA/ROSMAP): DEQ fusion of the confidence-weighted views instead of concatenation"
    env_var = "DEQFUSION_MMDYNAMICS_ROOT"
    marker = "train_test.py"
    repository = "TencentAILabHealthcare/mmdynamics"

    def apply(self, upstream, options: dict[str, Any] | None = None) -> None:
        """Options: DEQFusion keyword arguments, plus ``jac_weight`` (20) and ``grad_clip`` (30).
        The fusion (``deq`` or the upstream ``concat``) and the hidden width are launcher arguments."""
        apply_settings(options)
        if self.applied:
            return
        root = upstream.require().root
        vqa_compat.shim_cuda_on_cpu()    # train_test.train: model.cuda(), labels.cuda()
        mods = import_isolated(root, ["model", "train_test"])
        model_module, train_test = mods["model"], mods["train_test"]
        from . import protocol

        patch_model(model_module)
        protocol.patch_script(train_test)
        shim_load_checkpoint(train_test)
        self.train_test = train_test
        self.applied = True

    def launch(self, upstream, argv: Sequence[str]) -> int:
        from . import protocol

        protocol.run(self.train_test, protocol.parse_args(argv), upstream.root)
        return 0


INTEGRATION = MmdynamicsIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
