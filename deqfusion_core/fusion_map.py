"""The fixed-point map f of DEQ fusion (paper section 2.2, Eq. 7-12), apart from how it is solved.

For modality features x_1..x_N (projected to a common width d), the state z = (z_1, ..., z_N, z_fuse)
is the fixed point of f = (f_1, ..., f_N, f_fuse):

    f_i(z_i; x_i)     = GN(ReLU(GN(W2 ReLU(GN(W1 z_i)) + x_i) + z_i))              Eq. 7-8 (+ residual)
    alpha_i           = W_a (z_fuse + f_i) + b_a                                     Eq. 9
    f_fuse(z; x)      = GN(ReLU(W_f sum_i alpha_i * z_fuse + x_fuse))                Eq. 10-11
    x_fuse            = sum_i w_i x_i + b                                            Eq. 12
                        (x_fuse="linear", ours: sum_i W_i x_i + b, a matrix per modality)

Missing modalities (ours; issue 13): ``inject(xs, present)`` takes a boolean mask [B, N]. For a sample, an
absent modality i takes no part: its input is replaced by zero before anything reads it (``torch.where``, so
NaN there never enters arithmetic and its gradient is zero), f_i is the constant 0 (its state is held at
zero; the Jacobian's rows and columns of z_i are zero), the gate's sum of Eq. 9-11 runs over the present
modalities (N_p z_fuse + sum_present z_i, N_p b_a), and x_fuse = (N / N_p) sum_present w_i x_i + b (the sum
over the present modalities rescaled by their count, so x_fuse keeps its scale; with equal w_i, as
initialised, this is exactly the weights renormalised over the present ones; we do not divide by
sum_present w_i, which learned weights may bring near zero). ``present=None`` is the all-present map.

:class:`FusionMap` holds f's parameters and is used in two calls: ``inj = inject(xs)`` computes the
constants of one forward (projected inputs, x_fuse, dropout masks) and ``layer(z, inj)`` applies f to the
flat state z [B, (N+1)*d]. :class:`~deqfusion_core.module.DEQFusion` adds the solve and the gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

X_FUSE = ("weighted_sum", "linear")   # the ways to compute x_fuse (FusionMap's ``x_fuse``)

__all__ = ["GroupNorm", "ModalityBlock", "FuseBlock", "Injection", "FusionMap", "RowMap", "GateTrace"]


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict) that computes [B, C] inputs as a layer norm over
    [B, G, C/G] and a per-channel affine: torch's group_norm kernel has no spatial extent to vectorise
    over here and is 1.7x slower forward, 3x slower backward on CPU (measured at 612 x 500, 4 groups).
    The layer norm gets a weight of ones: torch's CPU kernel without one is 2.2x slower (same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x)
        b, c = x.shape
        y = F.layer_norm(x.view(b, self.num_groups, c // self.num_groups), (c // self.num_groups,),
                         x.new_ones(c // self.num_groups), eps=self.eps).view(b, c)
        return torch.addcmul(self.bias, y, self.weight) if self.affine else y


class ModalityBlock(nn.Module):
    """f_theta_i (Eq. 7-8): Linear, GroupNorm, ReLU, Linear, + x_i, GroupNorm, + z (residual), ReLU, GroupNorm."""

    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gn1, self.gn2, self.gn3 = (GroupNorm(num_groups, dim) for _ in range(3))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # in place where the producer's backward does not need its output: fewer [B, dim] buffers per f
        out = F.relu(self.gn1(self.lin1(z)), inplace=True)
        out = self.gn2(self.lin2(out).add_(x))
        return self.gn3(F.relu(out.add_(z), inplace=True))


class FuseBlock(nn.Module):
    """f_fuse (Eq. 9-11): purify z_fuse with a soft gate per modality, combine, inject x_fuse.

    The gate is one Linear shared by the modalities, so sum_i alpha_i * z_fuse equals
    z_fuse * (W_a (N z_fuse + sum_i z_i) + N b_a): one matrix product instead of N.
    """

    def __init__(self, dim: int, num_groups: int, gating: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, dim) if gating else None
        self.fuse = nn.Linear(dim, dim)
        self.gn = GroupNorm(num_groups, dim)

    def forward(self, z_fuse, zs, x_fuse, gate_mask=None, fuse_mask=None, gate_means=None, present=None):
        """``present`` [b, N] bool or None: the sum runs over the present modalities, whose states ``zs`` are
        the only nonzero ones (absent ones are zero), and N is their count per sample."""
        if self.gate is None:                       # Table 6 ablation: z'_i = z_i
            purified = sum(zs)
        elif present is None:
            n = len(zs)
            gates = F.linear(n * z_fuse + sum(zs), self.gate.weight, n * self.gate.bias)
        else:
            n = present.sum(1, keepdim=True).to(z_fuse.dtype)
            gates = torch.addcmul(F.linear(n * z_fuse + sum(zs), self.gate.weight), n, self.gate.bias)
        if self.gate is not None:
            if gate_mask is not None:
                gates = gates * gate_mask
            purified = z_fuse * gates
            if gate_means is not None:              # per-sample mean alpha_i per modality [b, N], for Fig. 3
                w, b = self.gate.weight.mean(0), self.gate.bias.mean()
                means = torch.stack([(z_fuse + z) @ w + b for z in zs], 1).detach().float()
                gate_means.append(means if present is None else means.masked_fill(~present, float("nan")))
        out = self.fuse(purified)
        if fuse_mask is not None:
            out = out * fuse_mask
        return self.gn(F.relu(out + x_fuse, inplace=True))


class Injection:
    """The per-forward constants of f: projected inputs, x_fuse (Eq. 12), the dropout masks and the modality
    mask ``present`` [B, N] bool (None: all present).

    Row-selectable (``select(rows)``), so that f can run on the samples a solver still iterates.
    """

    def __init__(self, xs: list[torch.Tensor], x_fuse: torch.Tensor, gate_mask: torch.Tensor | None = None,
                 fuse_mask: torch.Tensor | None = None, present: torch.Tensor | None = None):
        self.xs, self.x_fuse, self.gate_mask, self.fuse_mask = xs, x_fuse, gate_mask, fuse_mask
        self.present = present

    def select(self, rows: torch.Tensor) -> "Injection":
        pick = lambda t: None if t is None else t[rows]
        return Injection([x[rows] for x in self.xs], self.x_fuse[rows], pick(self.gate_mask), pick(self.fuse_mask),
                         pick(self.present))

    def state_mask(self, dim: int) -> torch.Tensor | None:
        """Which entries of the flat state [B, (N+1)*dim] take part (absent modalities' parts: False)."""
        if self.present is None:
            return None
        keep = torch.cat([self.present, self.present.new_ones(self.present.shape[0], 1)], 1)
        return keep[:, :, None].expand(-1, -1, dim).reshape(keep.shape[0], -1)


class FusionMap(nn.Module):
    """The fixed-point map f (Eq. 7-12) and its parameters: ``inject(xs)`` and ``layer(z, inj)``.

    Args (checked here; see :class:`~deqfusion_core.module.DEQFusion` for the rest):
        input_dims: width of each modality's feature; widths other than ``dim`` get a Linear projection.
        dim: common width (default: the input width, when all are equal).
        num_groups: GroupNorm groups; must divide ``dim``.
        dropout: variational dropout on the gate and fuse outputs inside f (one mask per ``inject``,
            fixed over solver steps so that the fixed point is well defined).
        modality_blocks, fuse_block, gating: the paper's ablations (Tables 5-7): ``modality_blocks=False``:
            z_i = x_i; ``fuse_block=False``: z_fuse = sum_i z_i; ``gating=False``: z'_i = z_i.
        x_fuse: how the injected fused feature is computed. ``"weighted_sum"`` (Eq. 12, the paper's): a learned
            scalar w_i per modality. ``"linear"`` (ours): sum_i W_i x_i + b with a [dim, dim] matrix per modality,
            so that x_fuse alone is a learned linear fusion (the paper leaves this open: "our approach is
            flexible on the ways to compute the injected fused feature", section 2.2). With a weighted sum of
            non-negative features (encoders ending in ReLU), ReLU(x_fuse) is linear in them; see
            docs/convergence.md.
    """

    def __init__(self, input_dims: Sequence[int], dim: int | None = None, *, num_groups: int = 4,
                 dropout: float = 0.0, modality_blocks: bool = True, fuse_block: bool = True, gating: bool = True,
                 x_fuse: str = "weighted_sum"):
        super().__init__()
        if isinstance(input_dims, int) or not all(isinstance(d, int) and d > 0 for d in input_dims):
            raise TypeError(f"input_dims: expected a sequence of positive ints, got {input_dims!r}")
        input_dims = list(input_dims)
        if not input_dims:
            raise ValueError("input_dims: at least one modality is needed")
        if dim is None:
            if len(set(input_dims)) != 1:
                raise ValueError(f"dim: required when input_dims differ ({input_dims})")
            dim = input_dims[0]
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(num_groups, int) or num_groups <= 0 or dim % num_groups:
            raise ValueError(f"num_groups: must be a positive divisor of dim={dim}, got {num_groups!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout!r}")
        if x_fuse not in X_FUSE:
            raise ValueError(f"x_fuse: one of {', '.join(map(repr, X_FUSE))}, got {x_fuse!r}")
        self.input_dims, self.dim, self.num_modalities = input_dims, dim, len(input_dims)
        self.num_groups, self.dropout = num_groups, dropout
        self.modality_blocks, self.fuse_block, self.gating = modality_blocks, fuse_block, gating

        self.proj = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(d, dim) for d in input_dims)
        self.blocks = nn.ModuleList(ModalityBlock(dim, num_groups) for _ in input_dims) if modality_blocks else None
        self.fusion = FuseBlock(dim, num_groups, gating) if fuse_block else None
        self.x_fuse = x_fuse
        if x_fuse == "weighted_sum":
            self.weights = nn.Parameter(torch.ones(len(input_dims)))   # w_i of x_fuse (Eq. 12)
            self.bias = nn.Parameter(torch.zeros(1))
        else:                                                          # W_i of x_fuse = sum_i W_i x_i + b
            self.fuse_in = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in input_dims)
            self.bias = nn.Parameter(torch.zeros(dim))

    @property
    def state_width(self) -> int:
        """Width of the flat state z = (z_1, ..., z_N, z_fuse)."""
        return (self.num_modalities + 1) * self.dim

    def inject(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> Injection:
        """The constants of f for one forward: projected inputs, x_fuse (Eq. 12) and the dropout masks.

        ``present`` [B, N] bool (checked by the caller; None: all present): absent inputs are replaced by zero
        before the projection and after it (see the module docstring for x_fuse)."""
        if present is None:
            xs = [p(x) for p, x in zip(self.proj, xs)]
            x_fuse = self._weighted(xs) + self.bias
            return Injection(xs, x_fuse, *self._dropout_masks(x_fuse))
        cols = present[:, :, None].unbind(1)
        xs = [torch.where(c, p(torch.where(c, x, 0.0)), 0.0) for p, x, c in zip(self.proj, xs, cols)]
        count = present.sum(1, keepdim=True).to(xs[0].dtype)
        x_fuse = self._weighted(xs) * (self.num_modalities / count) + self.bias
        return Injection(xs, x_fuse, *self._dropout_masks(x_fuse), present)

    def _weighted(self, xs):
        """sum_i w_i x_i (Eq. 12) or sum_i W_i x_i (``x_fuse="linear"``), without the bias."""
        if self.x_fuse == "weighted_sum":
            return sum(w * x for w, x in zip(self.weights, xs))
        return sum(lin(x) for lin, x in zip(self.fuse_in, xs))

    def layer(self, z: torch.Tensor, inj: Injection, gate_means: list | None = None) -> torch.Tensor:
        """One application of f to the flat state z [b, (N+1)*dim]; ``gate_means`` collects the
        per-sample mean gate per modality [b, N] (paper Fig. 3)."""
        b, n, d = z.shape[0], self.num_modalities, self.dim
        zs = z.view(b, n + 1, d).unbind(1)
        if self.blocks is None:
            new = list(inj.xs)
        else:
            new = [blk(zi, xi) for blk, zi, xi in zip(self.blocks, zs[:n], inj.xs)]
            if inj.present is not None:   # an absent modality's f_i is the constant 0
                new = [torch.where(c, v, 0.0) for v, c in zip(new, inj.present[:, :, None].unbind(1))]
        if self.fusion is None:
            z_fuse = sum(new)
        else:
            z_fuse = self.fusion(zs[n], new, inj.x_fuse, inj.gate_mask, inj.fuse_mask, gate_means, inj.present)
        return torch.stack([*new, z_fuse], 1).view(b, -1).to(z.dtype)

    def fused(self, z: torch.Tensor) -> torch.Tensor:
        """The output of the fusion: z_fuse, the last of the state's parts [b, dim]."""
        return z.view(z.shape[0], self.num_modalities + 1, self.dim)[:, -1]

    def _dropout_masks(self, x_fuse):
        if not (self.training and self.dropout > 0 and self.fusion is not None):
            return None, None
        keep = 1.0 - self.dropout
        masks = [torch.bernoulli(torch.full_like(x_fuse, keep)) / keep for _ in range(2)]
        return (masks[0] if self.gating else None), masks[1]


class GateTrace:
    """Per solver step, the mean gate value per modality over the batch (paper Fig. 3); samples the solver
    stopped keep their last gates. ``masked`` (a modality mask in use): the mean over the samples where the
    modality is present (absent ones record NaN; NaN for a modality absent from the whole batch)."""

    def __init__(self, batch: int, num_modalities: int, device: torch.device, masked: bool = False):
        self.last = torch.zeros(batch, num_modalities, dtype=torch.float32, device=device)
        self.means: list[torch.Tensor] = []
        self.mean = torch.nanmean if masked else torch.mean

    def record(self, step: list[torch.Tensor], rows: torch.Tensor | None = None):
        if step:   # nothing when f has no gates (gating=False, fuse_block=False)
            self.last[slice(None) if rows is None else rows] = step[0]
            self.means.append(self.mean(self.last, 0))


class RowMap:
    """f as the solvers call it, ``f(z, rows)``: on the rows ``rows`` of the batch (``None``: all) that the
    solver still runs. The injection is re-selected only when the solver's working set changed."""

    def __init__(self, layer, inj: Injection, gates: GateTrace | None = None):
        self.layer, self.inj, self.gates = layer, inj, gates
        self.rows, self.inj_rows = None, inj

    def __call__(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is not self.rows:
            self.rows, self.inj_rows = rows, (self.inj if rows is None else self.inj.select(rows))
        if self.gates is None:
            return self.layer(z, self.inj_rows)
        step: list = []
        out = self.layer(z, self.inj_rows, step)
        self.gates.record(step, rows)
        return out
