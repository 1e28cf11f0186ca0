"""Training DEQ fusion with MultiBench's unmodified ``training_structures/Supervised_Learning.train``.

``train`` has three extension points, and the DEQ needs nothing else:

* ``objective(pred, truth, args)`` with ``objective_args_dict`` (a dict): ``args['fused']`` is the fusion's
  raw output, ``(fused, jac_loss, stats)`` for ``deq``, so :class:`DEQObjective` adds the Jacobian term;
* ``optimtype(params, lr=, weight_decay=)``: :class:`FusionLR` gives the fusion its own learning rate;
* ``clip_val``: gradient-norm clipping.

``deq_train_kwargs(fusion)`` returns the three; ``train_paper_mmimdb`` trains with the paper's MM-IMDB setting.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from deqfusion_core.options import FusionOptions

from .checkout import import_multibench

# The paper authors' MM-IMDB DEQ setting (paper appendix C; see docs/multibench.md).
PAPER_MMIMDB = dict(dim=512, solver="anderson", f_max_iter=105, b_max_iter=106, lr=1e-3, weight_decay=1e-2,
                    fusion_lr_scale=0.1, jac_weight=0.1, batch_size=256, clip_val=8.0)


class DEQObjective:
    """``objective(pred, truth, args)`` for ``train``: ``criterion(pred, truth) + jac_weight * jac_loss``.

    ``jac_loss`` is element 1 of the fusion's raw output (``args['fused']``), added in training steps only;
    a fusion that returns a single tensor (any MultiBench fusion) gets the criterion alone.
    """

    def __init__(self, criterion: nn.Module | None = None, jac_weight: float = 0.1):
        self.criterion = criterion if criterion is not None else nn.BCEWithLogitsLoss()
        self.jac_weight = FusionOptions({"jac_weight": jac_weight}, where="DEQObjective").jac_weight
        self.last_jac_loss: torch.Tensor | None = None  # the term of the latest training step

    def target(self, truth: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        truth = truth.to(pred.device)
        if isinstance(self.criterion, nn.CrossEntropyLoss):  # as MultiBench's deal_with_objective does
            return (truth.squeeze(-1) if truth.dim() == pred.dim() else truth).long()
        return truth.float()

    def __call__(self, pred, truth, args):
        if args is None:
            raise ValueError("objective_args_dict: pass a dict (e.g. {}) to train(), or MultiBench does not hand "
                             "the fusion's output to the objective and the Jacobian term is lost")
        loss = self.criterion(pred, self.target(truth, pred))
        fused = args.get("fused")
        if args.get("training") and self.jac_weight and isinstance(fused, tuple) and len(fused) > 1:
            self.last_jac_loss = fused[1].detach()
            loss = loss + self.jac_weight * fused[1]
        return loss

    def __repr__(self):
        return f"DEQObjective({self.criterion!r}, jac_weight={self.jac_weight})"


class FusionLR:
    """``optimtype`` for ``train``: optimizer ``base`` with the fusion's parameters at ``lr * scale``.

    ``train`` never returns its optimizer; the one it built is kept as ``self.optimizer``.
    """

    def __init__(self, fusion: nn.Module, scale: float = 0.1, base=torch.optim.AdamW, **base_kwargs):
        if not scale > 0:
            raise ValueError(f"fusion_lr_scale: must be > 0, got {scale!r}")
        self.fusion, self.scale, self.base, self.base_kwargs = fusion, scale, base, base_kwargs
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, params, lr, weight_decay=0.0):
        own = {id(p) for p in self.fusion.parameters()}
        params = list(params)
        groups = [{"params": [p for p in params if id(p) not in own]},
                  {"params": [p for p in params if id(p) in own], "lr": lr * self.scale}]
        self.optimizer = self.base([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay,
                                   **self.base_kwargs)
        return self.optimizer

    def __repr__(self):
        return f"FusionLR({self.base.__name__}, fusion lr x{self.scale})"


def deq_train_kwargs(fusion: nn.Module, criterion: nn.Module | None = None, *, jac_weight: float = 0.1,
                     fusion_lr_scale: float = 0.1, optimizer=torch.optim.AdamW, clip_val: float = 8.0) -> dict:
    """Keyword arguments of MultiBench's ``train`` that add the Jacobian term, the fusion's learning rate
    and clipping: ``train(encoders, fusion, head, ..., **deq_train_kwargs(fusion))``."""
    return dict(objective=DEQObjective(criterion, jac_weight), objective_args_dict={},
                optimtype=FusionLR(fusion, fusion_lr_scale, optimizer), clip_val=clip_val)


def train_paper_mmimdb(encoders: Sequence[nn.Module], fusion: nn.Module, head: nn.Module, train_dataloader,
                       valid_dataloader, total_epochs: int = 1000, *, save: str = "best_deq.pt", root=None,
                       **overrides) -> dict:
    """MultiBench's ``train`` with the paper's MM-IMDB setting: multilabel BCE, AdamW lr 1e-3 wd 1e-2,
    fusion lr x0.1, Jacobian weight 0.1, early stop on validation macro-F1 (``train``'s own rule).

    ``overrides`` are ``train`` keywords (``lr``, ``early_stop``, ``track_complexity``, ...) or
    ``jac_weight``, ``fusion_lr_scale``, ``clip_val``. Returns the keywords used (``optimtype.optimizer``
    is the optimizer ``train`` built).
    """
    supervised = import_multibench("training_structures.Supervised_Learning", root)
    extra = {k: overrides.pop(k, PAPER_MMIMDB[k]) for k in ("jac_weight", "fusion_lr_scale", "clip_val")}
    kwargs = dict(early_stop=True, task="multilabel", lr=PAPER_MMIMDB["lr"], weight_decay=PAPER_MMIMDB["weight_decay"],
                  save=save, **deq_train_kwargs(fusion, nn.BCEWithLogitsLoss(), **extra))
    kwargs.update(overrides)
    supervised.train(list(encoders), fusion, head, train_dataloader, valid_dataloader, total_epochs, **kwargs)
    return kwargs
