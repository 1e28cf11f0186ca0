"""block.bootstrap.pytorch: ``deq`` as a fusion type of block's networks, the Jacobian term in the loss.

Patch points (in memory):

- block's fusion factory (``block.models.networks.fusions.factory.factory``, also imported by name into
  ``vqa_net``, ``vrd_net`` and ``block``) learns ``type: deq`` -> :class:`DEQBlockFusion`; every other
  type goes to block's own factory unchanged.
- ``VQANet.forward`` puts the weighted Jacobian term of its DEQ fusions (and their solver statistics)
  into its output dict: ``jac_loss``, ``deq_nstep``, ``deq_rel_residual``, ``deq_converged``.
- block's criterion factory wraps each criterion so that ``loss += net_out['jac_loss']``.

Options: ``fusion: {type: deq, input_dims: [...], output_dim: N, mm_dim: 512, jac_weight: 0.1, ...}`` (any
DEQFusion keyword); the fusion options of ``deqfusion run block`` are the defaults under them, and under those the
contractive norm with gain bound 0.15 (ours, :data:`CONVERGENCE`).
Shims: ``deqfusion_compat.vqa``.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deqfusion_compat import vqa  # noqa: F401 - registers block's shims
from deqfusion_core import hookimpl
from deqfusion_core.compat import apply_shims
from deqfusion_core.integration import FusionAdapter, Integration
from deqfusion_core.process import run_main

FUSION_TYPE = "deq"
# Keys of block's own fusions that DEQ fusion has no use for: dropped (and logged), so that an options file
# switches from `type: mutan` (or block, mlb, ...) to `type: deq` with that one key changed.
BLOCK_ONLY_KEYS = ("rank", "chunks", "shared", "normalize", "dropout_pre_lin", "pos_norm", "mm_dim_out",
                   "activ_input", "activ_output", "dimensions")
SHAPE_KEYS = ("input_dims", "output_dim", "mm_dim", "dropout_input", "dropout_output")
# ours, not the paper's: the contractive norm with GroupNorm gains bounded by 0.15. Without it 0-7% of the training
# solves converged (last quarter) on seeds 1-3; with the norm's default bound 0.25, 0-100%; 0.2, 13-100%; 0.15, 100%
# on all three (benchmarks/results/recipe_convergence). Undone by `-o norm=none` (another norm drops the default's
# norm_options, deqfusion_core.options).
CONVERGENCE = {"norm": "contractive", "norm_options": {"max_gain": 0.15}}


class DEQBlockFusion(FusionAdapter):
    """block's fusion interface (``forward([x0, x1, ...]) -> [B, output_dim]``) around DEQ fusion.

    The inputs are fused at equilibrium into ``mm_dim`` features, then ``linear_out`` maps them to
    ``output_dim``, as block's own fusions do. The Jacobian term and statistics of the last forward stay on
    the module until the enclosing network's forward (same replica, same call) collects them.
    """

    label, jacobian = "block", "report"

    def __init__(self, input_dims: Sequence[int], output_dim: int, mm_dim: int = 1600, dropout_input: float = 0.0,
                 dropout_output: float = 0.0, options=None):
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f"fusion.output_dim: expected a positive int, got {output_dim!r}")
        super().__init__(input_dims, mm_dim, options)
        self.input_dims, self.output_dim, self.mm_dim = list(input_dims), output_dim, mm_dim
        self.dropout_input, self.dropout_output = dropout_input, dropout_output
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        x = list(x)
        if self.dropout_input > 0:
            x = [F.dropout(xi, p=self.dropout_input, training=self.training) for xi in x]
        z = self.linear_out(self.fuse(x))
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z


def deq_fusion_from_options(opt: dict, defaults) -> DEQBlockFusion:
    """``type: deq`` of an options file; its keys win over ``defaults`` (the command line's)."""
    opt = {k: v for k, v in dict(opt).items() if k != "type"}
    dropped = {k: opt.pop(k) for k in BLOCK_ONLY_KEYS if k in opt}
    if dropped:
        from bootstrap.lib.logger import Logger
        Logger()(f"fusion type deq: ignoring options of block's fusions {sorted(dropped)}")
    shape = {k: opt.pop(k) for k in SHAPE_KEYS if k in opt}
    return DEQBlockFusion(**shape, options=defaults.updated(opt, where="fusion"))


def collect_deq_outputs(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weighted Jacobian term and solver statistics of ``net``'s DEQ fusions since their last collection."""
    outs = []
    for m in net.modules():
        if isinstance(m, DEQBlockFusion) and m.last_stats is not None:
            outs.append((m.current_jac_weight, m.last_jac_loss, m.last_stats))
            m.last_stats = m.last_jac_loss = None
    if not outs:
        return {}
    jac = sum(w * j for w, j, _ in outs)
    return {
        "jac_loss": jac if torch.is_tensor(jac) else torch.zeros(()),
        "deq_nstep": torch.tensor(float(max(s.nstep for _, _, s in outs))),
        "deq_rel_residual": torch.stack([s.rel_residuals.max() for _, _, s in outs]).max().detach().float(),
        "deq_converged": torch.tensor(float(all(s.converged for _, _, s in outs))),
    }


class JacobianCriterion(nn.Module):
    """Wraps a block criterion: ``loss += net_out['jac_loss']`` (already weighted) when the network has one."""

    def __init__(self, criterion: nn.Module):
        super().__init__()
        self.criterion = criterion

    def forward(self, net_out, batch):
        out = self.criterion(net_out, batch)
        if isinstance(net_out, dict) and "jac_loss" in net_out and out is not None and "loss" in out:
            jac = net_out["jac_loss"]
            jac = jac.mean() if jac.dim() else jac    # torch DataParallel gathers one value per replica
            out["loss"] = out["loss"] + jac
            out["jac_loss"] = jac
        return out


class BlockIntegration(Integration):
    name = "block"
    summary = "block.bootstrap.pytorch: `fusion: {type: deq}` in its VQA network, Jacobian term in the loss"
    distribution, module, repository = "block.bootstrap.pytorch", "block", "Cadene/block.bootstrap.pytorch"
    option_defaults = CONVERGENCE
    compat = ("deqfusion_compat.vqa",)

    def install(self, upstream, options):
        apply_shims("block")      # bootstrap 0.0.13's Options: yaml.load(f), collections.Mapping
        import block
        from block.models.criterions import factory as criterions_factory
        from block.models.networks import vqa_net, vrd_net
        from block.models.networks.fusions import factory as fusions_factory

        block_factory, net_forward = fusions_factory.factory, vqa_net.VQANet.forward
        criterion_factory = criterions_factory.factory

        def factory(opt):
            if opt.get("type", None) == FUSION_TYPE:   # bootstrap's OptionsDict.get needs a default
                fusion = deq_fusion_from_options(opt, options)
                from bootstrap.lib.logger import Logger
                Logger().log_value("nb_params_fusion", fusion.n_params, should_print=True)
                return fusion
            return block_factory(opt)

        def forward(net, batch):
            out = net_forward(net, batch)
            if isinstance(out, dict):
                out.update(collect_deq_outputs(net))
            return out

        def make_criterion(engine, mode):
            criterion = criterion_factory(engine, mode)
            return None if criterion is None else JacobianCriterion(criterion)

        for module in (fusions_factory, vqa_net, vrd_net, block):
            self.patches.set(module, "factory" if module is fusions_factory else "factory_fusion", factory)
        self.patches.set(vqa_net.VQANet, "forward", forward)
        self.patches.set(criterions_factory, "factory", make_criterion)

    def launch(self, upstream, argv: Sequence[str]) -> int:
        """bootstrap's runner (``python -m bootstrap.run -o options/...``) with errors propagating:
        its ``main()`` logs any exception and exits 0, which would hide a failed run."""
        from bootstrap import run as bootstrap_run
        from bootstrap.lib.logger import Logger

        def run():
            try:
                bootstrap_run.run()
            except Exception:
                with contextlib.suppress(Exception):   # as bootstrap's main(): the trace goes to exp_dir/logs.txt
                    Logger()(traceback.format_exc(), Logger.ERROR)
                raise

        return run_main(run, argv, prog="bootstrap.run")


INTEGRATION = BlockIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION


@hookimpl
def deqfusion_comparison():
    from .compare import BlockComparison

    return BlockComparison()
