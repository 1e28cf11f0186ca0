"""block.bootstrap.pytorch: ``deq`` as a fusion type of block's networks, the Jacobian term in the loss.

Patch points (in memory, idempotent):

- block's fusion factory (``block.models.networks.fusions.factory.factory``, also imported by name into
  ``vqa_net``, ``vrd_net`` and ``block``) learns ``type: deq`` -> :class:`DEQBlockFusion`; every other
  type goes to block's own factory unchanged.
- ``VQANet.forward`` puts the weighted Jacobian term of its DEQ fusions (and their solver statistics)
  into its output dict: ``jac_loss``, ``deq_nstep``, ``deq_rel_residual``, ``deq_converged``.
- block's criterion factory wraps each criterion so that ``loss += net_out['jac_loss']``.

Options: ``fusion: {type: deq, input_dims: [...], output_dim: N, mm_dim: 512, jac_weight: 0.1, f_max_iter: 30,
...}`` (any DEQFusion keyword); the fusion options of ``deqfusion run block`` are the defaults under them.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import traceback
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deqfusion_core import Integration, hookimpl
from deqfusion_core.module import DEQFusion
from deqfusion_patches import vqa_compat

FUSION_TYPE = "deq"
# Defaults for `type: deq` fusions, set by apply() from `deqfusion run block --f-max-iter ... -o key=value`.
DEFAULTS: dict[str, Any] = {}


class DEQBlockFusion(nn.Module):
    """block's fusion interface (``forward([x0, x1, ...]) -> [B, output_dim]``) around :class:`DEQFusion`.

    The inputs are fused at equilibrium into ``mm_dim`` features, then ``linear_out`` maps them to
    ``output_dim``, as block's own fusions do. The last forward's Jacobian term and statistics are kept
    on ``self.last`` until the enclosing network's forward (same replica, same call) collects them.
    """

    def __init__(self, input_dims: Sequence[int], output_dim: int, mm_dim: int = 1600, dropout_input: float = 0.0,
                 dropout_output: float = 0.0, jac_weight: float = 0.0, **deq_options: Any):
        super().__init__()
        if not isinstance(output_dim, int) or output_dim <= 0:
            raise ValueError(f"fusion.output_dim: expected a positive int, got {output_dim!r}")
        if jac_weight < 0:
            raise ValueError(f"fusion.jac_weight: must be >= 0, got {jac_weight!r}")
        deq_options.pop("jac_weight", None)
        self.input_dims, self.output_dim, self.mm_dim = list(input_dims), output_dim, mm_dim
        self.dropout_input, self.dropout_output, self.jac_weight = dropout_input, dropout_output, jac_weight
        # the weight is applied by the criterion (from the network's output), never attached inside DEQFusion
        self.deq = DEQFusion(self.input_dims, mm_dim, **deq_options)
        self.linear_out = nn.Linear(mm_dim, output_dim)
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self.last = None

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        x = list(x)
        if self.dropout_input > 0:
            x = [F.dropout(xi, p=self.dropout_input, training=self.training) for xi in x]
        out = self.deq(x)
        self.last = out
        z = self.linear_out(out.fused)
        if self.dropout_output > 0:
            z = F.dropout(z, p=self.dropout_output, training=self.training)
        return z


# Keys of block's own fusions that DEQ fusion has no use for: dropped (and logged), so that an options file
# switches from `type: mutan` (or block, mlb, ...) to `type: deq` with that one key changed.
BLOCK_ONLY_KEYS = ("rank", "chunks", "shared", "normalize", "dropout_pre_lin", "pos_norm", "mm_dim_out",
                   "activ_input", "activ_output", "dimensions")


def deq_fusion_from_options(opt: dict) -> DEQBlockFusion:
    opt = dict(copy.copy(opt))
    opt.pop("type", None)
    dropped = {k: opt.pop(k) for k in BLOCK_ONLY_KEYS if k in opt}
    if dropped:
        from bootstrap.lib.logger import Logger
        Logger()(f"fusion type deq: ignoring options of block's fusions {sorted(dropped)}")
    return DEQBlockFusion(**{**DEFAULTS, **opt})


def collect_deq_outputs(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weighted Jacobian term and solver statistics of ``net``'s DEQ fusions since their last collection."""
    outs = []
    for m in net.modules():
        if isinstance(m, DEQBlockFusion) and m.last is not None:
            outs.append((m.jac_weight, m.last))
            m.last = None
    if not outs:
        return {}
    jac = sum(w * o.jac_loss for w, o in outs)
    return {
        "jac_loss": jac if torch.is_tensor(jac) else torch.zeros(()),
        "deq_nstep": torch.tensor(float(max(o.stats.nstep for _, o in outs))),
        "deq_rel_residual": torch.stack([o.stats.rel_residuals.max() for _, o in outs]).max().detach().float(),
        "deq_converged": torch.tensor(float(all(o.stats.converged for _, o in outs))),
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
    distribution = "block.bootstrap.pytorch"
    module = "block"
    repository = "Cadene/block.bootstrap.pytorch"

    def __init__(self):
        super().__init__()
        self.originals: dict[tuple[Any, str], Any] = {}

    def _set(self, owner: Any, attr: str, value: Any) -> None:
        self.originals.setdefault((owner, attr), getattr(owner, attr))
        setattr(owner, attr, value)

    def apply(self, upstream=None, options: dict[str, Any] | None = None) -> None:
        DEFAULTS.clear()
        DEFAULTS.update(options or {})
        if self.applied:
            return
        vqa_compat.shim_yaml_load()          # bootstrap 0.0.13's Options: yaml.load(f)
        vqa_compat.shim_collections_abcs()   # bootstrap 0.0.13's Options: collections.Mapping
        import block
        from block.models.criterions import factory as criterions_factory
        from block.models.networks import vqa_net, vrd_net
        from block.models.networks.fusions import factory as fusions_factory

        block_factory = fusions_factory.factory

        def factory(opt):
            if opt.get("type", None) == FUSION_TYPE:   # bootstrap's OptionsDict.get needs a default
                fusion = deq_fusion_from_options(opt)
                from bootstrap.lib.logger import Logger
                Logger().log_value("nb_params_fusion", fusion.n_params, should_print=True)
                return fusion
            return block_factory(opt)

        for module in (fusions_factory, vqa_net, vrd_net, block):
            attr = "factory" if module is fusions_factory else "factory_fusion"
            self._set(module, attr, factory)

        net_forward = vqa_net.VQANet.forward

        def forward(net, batch):
            out = net_forward(net, batch)
            if isinstance(out, dict):
                out.update(collect_deq_outputs(net))
            return out

        self._set(vqa_net.VQANet, "forward", forward)

        criterion_factory = criterions_factory.factory

        def make_criterion(engine, mode):
            criterion = criterion_factory(engine, mode)
            return None if criterion is None else JacobianCriterion(criterion)

        self._set(criterions_factory, "factory", make_criterion)
        self.applied = True

    def remove(self) -> None:
        for (owner, attr), value in self.originals.items():
            setattr(owner, attr, value)
        self.originals.clear()
        self.applied = False

    def launch(self, upstream, argv: Sequence[str]) -> int:
        """bootstrap's runner (``python -m bootstrap.run -o options/...``) with errors propagating:
        its ``main()`` logs any exception and exits 0, which would hide a failed run."""
        from bootstrap import run as bootstrap_run
        from bootstrap.lib.logger import Logger

        old_argv = sys.argv[:]
        sys.argv = ["bootstrap.run", *argv]
        try:
            bootstrap_run.run()
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:
            with contextlib.suppress(Exception):   # as bootstrap's main(): the trace goes to exp_dir/logs.txt
                Logger()(traceback.format_exc(), Logger.ERROR)
            raise
        finally:
            sys.argv = old_argv
        return 0


INTEGRATION = BlockIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
