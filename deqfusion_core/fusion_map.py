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

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

__all__ = ["GroupNorm", "group_norm", "block", "ModalityBlock", "FuseBlock", "Injection", "BlockParams", "FusionMap",
           "RowMap", "GateTrace", "Tape", "BATCHED_MAX", "X_FUSE", "GATINGS"]

X_FUSE = ("weighted_sum", "linear")   # the ways to compute x_fuse (FusionMap's ``x_fuse``)
# FusionMap's ``gating``: True / "linear" is Eq. 9 (alpha_i = W_a (z_fuse + z_i) + b_a, unbounded); "sigmoid" (ours)
# is sigma(Eq. 9), a gate in (0, 1); False: no gate (Table 6 ablation, z'_i = z_i).
GATINGS = {True: "linear", "linear": "linear", "sigmoid": "sigmoid", False: False}


# At most this many [rows x dim] entries per modality, f runs the N modality blocks as batched [N, b, dim] ops
# (one kernel launch each instead of N: per-op overhead dominates small f); above it, one matrix product per
# modality (torch 2.13's CPU bmm took 1.7x the time of N mm at 612 x 500 x 500 on this project's 2-core machine).
BATCHED_MAX = 1 << 16


_ONES: dict = {}


def ones(n: int, like: torch.Tensor) -> torch.Tensor:
    """A cached [n] tensor of ones of ``like``'s dtype and device (never written to)."""
    key = (n, like.dtype, like.device)
    t = _ONES.get(key)
    if t is None:
        t = _ONES[key] = torch.ones(n, dtype=like.dtype, device=like.device)
    return t


class Tape:
    """What f's hand-derived VJP (:mod:`~deqfusion_core.vjp`) reads, recorded while f runs under autograd (``layer(z,
    inj, tape=...)``): per GroupNorm with an affine, in f's order, its normalised input and 1 / std [..., G]
    (``norms``); the ReLUs' outputs, whose signs are their masks (``relus``); the gates (``gates``). Detached views
    of tensors autograd keeps for f's own backward anyway."""

    def __init__(self):
        self.norms: list = []
        self.relus: list = []
        self.gates: torch.Tensor | None = None


def group_norm(x: torch.Tensor, groups: int, weight, bias, eps: float, out: torch.Tensor | None = None,
               tape: Tape | None = None):
    """GroupNorm of [..., C] over the last dim as a layer norm over [..., G, C/G] with a weight of ones (torch's
    CPU layer norm without one is 2.2x slower, same result) and a per-channel affine (``weight``, ``bias``
    broadcast against x; None: no affine). ``out``: write the result there (no autograd). ``tape``: record the
    normalised input and 1 / std there (``F.layer_norm`` is ``native_layer_norm``'s first output: same values)."""
    shape = x.shape
    grouped, size = x.view(*shape[:-1], groups, -1), (shape[-1] // groups,)
    if tape is None or weight is None:
        y = F.layer_norm(grouped, size, ones(size[0], x), eps=eps).view(shape)
    else:
        y, _, rstd = torch.native_layer_norm(grouped, size, ones(size[0], x), None, eps)
        y = y.view(shape)
        tape.norms.append((y.detach(), rstd.detach().view(*shape[:-1], groups)))
    if weight is None:
        return y if out is None else out.copy_(y)
    return torch.addcmul(bias, y, weight) if out is None else torch.addcmul(bias, y, weight, out=out)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state_dict) that computes [B, C] inputs with :func:`group_norm`:
    torch's group_norm kernel has no spatial extent to vectorise over here and is 1.7x slower forward, 3x
    slower backward on CPU (measured at 612 x 500, 4 groups)."""

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, tape: Tape | None = None) -> torch.Tensor:
        if x.dim() != 2:
            return super().forward(x) if out is None else out.copy_(super().forward(x))
        return group_norm(x, self.num_groups, self.weight if self.affine else None, self.bias, self.eps, out, tape)


def block(z, x2, w1, b1, w2, g1, g2, g3, groups, eps, out=None, work=None, tape=None):
    """f_theta_i (Eq. 7-8) on z [..., b, d]: GN(ReLU(GN(ReLU(GN(z W1 + b1)) W2 + b2 + x) + z)) with ``x2`` = x + b2,
    weights given transposed ([d, d] or stacked [N, d, d]: then every op runs on all N modalities at once) and
    each GN's (weight, bias). In place where the producer's backward does not need its output; ``out``: write
    the result there (no autograd; then on float32 CPU tensors each GN with its neighbours is one fused kernel,
    and the two products go to ``work`` [2, *z.shape] if given: no allocation, so no fresh pages to fault in).
    ``tape``: record the norms and the two ReLUs' outputs there (:class:`Tape`)."""
    if out is not None and g1[0] is not None and kernels.usable(z):
        mm = torch.mm if z.dim() == 2 else torch.bmm
        h, a = (None, None) if work is None else work
        h = kernels.gn_fused(mm(z, w1, out=h), groups, eps, *g1, add=b1, post=True)
        return kernels.gn_fused(mm(h, w2, out=a), groups, eps, *g2, add=x2, res=z, post=True, weight3=g3[0],
                                bias3=g3[1], out=out)
    mm = torch.addmm if z.dim() == 2 else torch.baddbmm
    n = F.relu(group_norm(mm(b1, z, w1), groups, *g1, eps, tape=tape), inplace=True)
    s = F.relu(group_norm(mm(x2, n, w2), groups, *g2, eps, tape=tape).add_(z), inplace=True)
    if tape is not None:
        tape.relus += [n.detach(), s.detach()]
    return group_norm(s, groups, *g3, eps, out, tape)


class ModalityBlock(nn.Module):
    """f_theta_i (Eq. 7-8): Linear, GroupNorm, ReLU, Linear, + x_i, GroupNorm, + z (residual), ReLU, GroupNorm."""

    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gn1, self.gn2, self.gn3 = (GroupNorm(num_groups, dim) for _ in range(3))

    def params(self) -> tuple:
        """This block's parameters as :func:`block` takes them (w1, b1, w2, g1, g2, g3), read once."""
        gns = tuple((gn.weight, gn.bias) for gn in (self.gn1, self.gn2, self.gn3))
        return (self.lin1.weight.t(), self.lin1.bias, self.lin2.weight.t(), *gns)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, *gns = self.params()
        return block(z, x + self.lin2.bias, w1, b1, w2, *gns, self.gn1.num_groups, self.gn1.eps)


def _total(zs, z=None, alpha=1, out=None):
    """sum_i z_i over the modalities (a list of [b, d], or stacked [N, b, d]), plus ``alpha`` z if given; ``out``:
    write it there (no autograd)."""
    if isinstance(zs, torch.Tensor):
        total = torch.sum(zs, 0, out=out) if out is not None else zs.sum(0)
        return total if z is None else total.add_(z, alpha=alpha)
    if len(zs) > 1:
        total = torch.add(zs[0], zs[1], out=out)
    else:
        total = zs[0].clone() if out is None else out.copy_(zs[0])
    for t in zs[2:]:
        total += t
    return total if z is None else total.add_(z, alpha=alpha)


class FuseBlock(nn.Module):
    """f_fuse (Eq. 9-11): purify z_fuse with a soft gate per modality, combine, inject x_fuse.

    The gate is one Linear shared by the modalities, so with the paper's linear gate (``gating="linear"``)
    sum_i alpha_i * z_fuse equals z_fuse * (W_a (N z_fuse + sum_i z_i) + N b_a): one matrix product instead of N.
    ``gating="sigmoid"`` (ours): alpha_i = sigmoid(W_a (z_fuse + z_i) + b_a), bounded in (0, 1), computed per
    modality. ``gating=None``: no gate.
    """

    def __init__(self, dim: int, num_groups: int, gating: str | None = "linear"):
        super().__init__()
        self.gating = gating
        self.gate = nn.Linear(dim, dim) if gating else None
        self.fuse = nn.Linear(dim, dim)
        self.gn = GroupNorm(num_groups, dim)

    def _sigmoid_gates(self, z_fuse, zs, present):
        """sum_i sigmoid(W_a (z_fuse + z_i) + b_a) over the (present) modalities [b, d], and the gates [N, b, d]."""
        stacked = zs if isinstance(zs, torch.Tensor) else torch.stack(list(zs))
        each = torch.sigmoid(torch.matmul(stacked, self.gate.weight.t())
                             .add_(F.linear(z_fuse, self.gate.weight, self.gate.bias)))
        if present is not None:
            each = each * present.t()[:, :, None].to(each.dtype)
        return each.sum(0), each

    def forward(self, z_fuse, zs, x_fuse, gate_mask=None, fuse_mask=None, gate_means=None, present=None,
                x_fuse_biased=None, out=None, work=None, tape=None):
        """``zs``: the modality states, a list of [b, d] or stacked [N, b, d]. ``present`` [b, N] bool or None:
        the sum runs over the present modalities, whose states are the only nonzero ones (absent ones are
        zero), and N is their count per sample. ``x_fuse_biased``: x_fuse + the fuse Linear's bias, if the
        caller has it (saves one addition). ``out``: write the result there (no autograd), ``work``: scratch
        [2, b, d] then (no allocation in a solver step). ``tape``: record the gates, the ReLU's output and the
        norm there (:class:`Tape`)."""
        each = None
        if self.gate is None:                       # Table 6 ablation: z'_i = z_i
            purified = _total(zs)
        elif self.gating == "sigmoid":
            gates, each = self._sigmoid_gates(z_fuse, zs, present)
        elif present is None and work is not None:     # a solver step: sum and gates in scratch, in place
            n = len(zs)
            gates = torch.mm(_total(zs, z_fuse, n, out=work[0]), self.gate.weight.t(), out=work[1])
            gates.add_(self.gate.bias, alpha=n)
        elif present is None:
            n = len(zs)
            gates = torch.addmm(n * self.gate.bias, _total(zs, z_fuse, n), self.gate.weight.t())
        else:
            n = present.sum(1, keepdim=True).to(z_fuse.dtype)
            gates = torch.addcmul(F.linear(n * z_fuse + _total(zs), self.gate.weight), n, self.gate.bias)
        if self.gate is not None:
            if tape is not None:
                tape.gates = gates.detach()
            if gate_mask is not None:
                gates = gates * gate_mask
            purified = gates.mul_(z_fuse) if work is not None else z_fuse * gates
            if gate_means is not None:              # per-sample mean alpha_i per modality [b, N], for Fig. 3
                if each is not None:
                    means = each.mean(-1).t().detach().float()
                else:
                    w, b = self.gate.weight.mean(0), self.gate.bias.mean()
                    stacked = zs if isinstance(zs, torch.Tensor) else torch.stack(list(zs))
                    means = ((z_fuse + stacked) @ w + b).t().detach().float()
                gate_means.append(means if present is None else means.masked_fill(~present, float("nan")))
        if fuse_mask is None:
            if x_fuse_biased is None:
                x_fuse_biased = x_fuse + self.fuse.bias
            if out is not None and self.gn.affine and kernels.usable(purified):   # GN(ReLU(h)) fused (no autograd)
                h = torch.mm(purified, self.fuse.weight.t(), out=None if work is None else work[0])
                return kernels.gn_fused(h, self.gn.num_groups, self.gn.eps, self.gn.weight, self.gn.bias,
                                        add=x_fuse_biased, pre=True, out=out)
            h = torch.addmm(x_fuse_biased, purified, self.fuse.weight.t())
        else:
            h = self.fuse(purified).mul_(fuse_mask).add_(x_fuse)
        h = F.relu(h, inplace=True)
        if tape is not None:
            tape.relus.append(h.detach())
        return self.gn(h, out, tape)


class Injection:
    """The per-forward constants of f: projected inputs, x_fuse (Eq. 12), the dropout masks and the modality
    mask ``present`` [B, N] bool (None: all present); ``blocks``: f's modality-block parameters, read once per
    forward (:meth:`FusionMap.inject`), and the per-row constants derived from them: ``x2`` (x_i + the second
    Linear's bias, [N, B, d]) and ``x_fuse_biased`` (x_fuse + the fuse Linear's bias).

    Row-selectable (``select(rows)``), so that f can run on the samples a solver still iterates.
    """

    def __init__(self, xs: list[torch.Tensor], x_fuse: torch.Tensor, gate_mask: torch.Tensor | None = None,
                 fuse_mask: torch.Tensor | None = None, present: torch.Tensor | None = None, *,
                 blocks=None, x2: torch.Tensor | None = None, x_fuse_biased: torch.Tensor | None = None):
        self.xs, self.x_fuse, self.gate_mask, self.fuse_mask = xs, x_fuse, gate_mask, fuse_mask
        self.present = present
        self.blocks, self.x2, self.x_fuse_biased = blocks, x2, x_fuse_biased
        self._work: dict = {}

    def work(self, *shape: int) -> torch.Tensor:
        """A scratch buffer of ``shape`` (x_fuse's dtype and device), the same one at every solver step of this
        forward and rows selection (f's steps run one after the other), so that they allocate nothing."""
        buf = self._work.get(shape)
        if buf is None:
            buf = self._work[shape] = self.x_fuse.new_empty(shape)
        return buf

    def select(self, rows: torch.Tensor) -> "Injection":
        pick = lambda t: None if t is None else t[rows]
        return Injection([x[rows] for x in self.xs], self.x_fuse[rows], pick(self.gate_mask), pick(self.fuse_mask),
                         pick(self.present), blocks=self.blocks, x2=None if self.x2 is None else self.x2[:, rows],
                         x_fuse_biased=pick(self.x_fuse_biased))

    def state_mask(self, dim: int) -> torch.Tensor | None:
        """Which entries of the flat state [B, (N+1)*dim] take part (absent modalities' parts: False)."""
        if self.present is None:
            return None
        keep = torch.cat([self.present, self.present.new_ones(self.present.shape[0], 1)], 1)
        return keep[:, :, None].expand(-1, -1, dim).reshape(keep.shape[0], -1)


class BlockParams(NamedTuple):
    """The N modality blocks' parameters, read once per forward: per modality (``each``, as
    :func:`block` takes them) and stacked over modalities (``stacked``, [N, ...]), with the GroupNorm
    constants."""
    each: list
    stacked: tuple
    groups: int
    eps: float


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
            ``gating``: True or "linear" (Eq. 9, the paper's), "sigmoid" (ours: the gate of Eq. 9 through a
            sigmoid, bounded in (0, 1)), or False.
        x_fuse: how the injected fused feature is computed. ``"weighted_sum"`` (Eq. 12, the paper's): a learned
            scalar w_i per modality. ``"linear"`` (ours): sum_i W_i x_i + b with a [dim, dim] matrix per modality,
            so that x_fuse alone is a learned linear fusion (the paper leaves this open: "our approach is
            flexible on the ways to compute the injected fused feature", section 2.2). With a weighted sum of
            non-negative features (encoders ending in ReLU), ReLU(x_fuse) is linear in them; see
            docs/convergence.md.
    """

    def __init__(self, input_dims: Sequence[int], dim: int | None = None, *, num_groups: int = 4,
                 dropout: float = 0.0, modality_blocks: bool = True, fuse_block: bool = True, gating: bool | str = True,
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
        if not isinstance(gating, (bool, str)) or gating not in GATINGS:
            raise ValueError(f"gating: True, False, 'linear' or 'sigmoid', got {gating!r}")
        gating = GATINGS[gating]
        self.input_dims, self.dim, self.num_modalities = input_dims, dim, len(input_dims)
        self.num_groups, self.dropout = num_groups, dropout
        self.modality_blocks, self.fuse_block, self.gating = modality_blocks, fuse_block, gating

        self.proj = nn.ModuleList(nn.Identity() if d == dim else nn.Linear(d, dim) for d in input_dims)
        self.blocks = nn.ModuleList(ModalityBlock(dim, num_groups) for _ in input_dims) if modality_blocks else None
        self.fusion = FuseBlock(dim, num_groups, gating or None) if fuse_block else None
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
        """The constants of f for one forward: projected inputs, x_fuse (Eq. 12), the dropout masks, and f's
        block parameters read once (so that every application of f in this forward reads no parameter again).

        ``present`` [B, N] bool (checked by the caller; None: all present): absent inputs are replaced by zero
        before the projection and after it (see the module docstring for x_fuse)."""
        if present is None:
            xs = [p(x) for p, x in zip(self.proj, xs)]
            x_fuse = self._weighted(xs) + self.bias
        else:
            cols = present[:, :, None].unbind(1)
            xs = [torch.where(c, p(torch.where(c, x, 0.0)), 0.0) for p, x, c in zip(self.proj, xs, cols)]
            count = present.sum(1, keepdim=True).to(xs[0].dtype)
            x_fuse = self._weighted(xs) * (self.num_modalities / count) + self.bias
        gate_mask, fuse_mask = self._dropout_masks(x_fuse)
        blocks = x2 = x_fuse_biased = None
        if self.blocks is not None:
            blocks = self._block_params()
            x2 = torch.stack(xs) + torch.stack([blk.lin2.bias for blk in self.blocks])[:, None]
        if self.fusion is not None and fuse_mask is None:
            x_fuse_biased = x_fuse + self.fusion.fuse.bias
        return Injection(xs, x_fuse, gate_mask, fuse_mask, present, blocks=blocks, x2=x2,
                         x_fuse_biased=x_fuse_biased)

    def _block_params(self) -> BlockParams:
        each = [blk.params() for blk in self.blocks]
        cat = lambda ts: None if ts[0] is None else torch.stack(ts)
        w1, b1, w2 = (torch.stack([e[k] for e in each]) for k in range(3))
        gns = tuple((cat([e[k][0] for e in each]), cat([e[k][1] for e in each])) for k in range(3, 6))
        gns = tuple((None, None) if w is None else (w[:, None], b[:, None]) for w, b in gns)
        gn = self.blocks[0].gn1
        return BlockParams(each, (w1, b1[:, None], w2, *gns), gn.num_groups, gn.eps)

    def modality_states(self, zz: torch.Tensor, parts: Sequence[torch.Tensor], inj: Injection,
                        out: torch.Tensor | None = None, tape: Tape | None = None):
        """f_i(z_i; x_i) for every modality (Eq. 7-8) from the state ``zz`` [b, N+1, d] (``parts``: its unbind):
        stacked [N, b, d] (every op on all modalities at once) when there are at most ``BATCHED_MAX`` entries per
        modality, else a list of N [b, d] (one matrix product per modality, on ``parts``: a slice or select per use
        would fill a zero gradient of the whole state in the backward each time). ``out`` [b, N, d]: written there
        (no autograd). ``tape``: passed to :func:`block`."""
        P, n = inj.blocks, self.num_modalities
        b, d = zz.shape[0], zz.shape[2]
        if b * d <= BATCHED_MAX:
            return block(zz[:, :n].transpose(0, 1), inj.x2, *P.stacked, P.groups, P.eps,
                         None if out is None else out.transpose(0, 1), None if out is None else inj.work(2, n, b, d),
                         tape)
        return [block(parts[i], inj.x2[i], *P.each[i], P.groups, P.eps, None if out is None else out[:, i],
                      None if out is None else inj.work(2, b, d), tape) for i in range(n)]

    def _weighted(self, xs):
        """sum_i w_i x_i (Eq. 12) or sum_i W_i x_i (``x_fuse="linear"``), without the bias."""
        if self.x_fuse == "weighted_sum":
            return sum(w * x for w, x in zip(self.weights, xs))
        return sum(lin(x) for lin, x in zip(self.fuse_in, xs))

    def layer(self, z: torch.Tensor, inj: Injection, gate_means: list | None = None,
              tape: Tape | None = None) -> torch.Tensor:
        """One application of f to the flat state z [b, (N+1)*dim]; ``gate_means`` collects the
        per-sample mean gate per modality [b, N] (paper Fig. 3). Without autograd (a solver's steps), the
        parts of f(z) are written into one new state instead of being concatenated. ``tape`` (under autograd):
        record what f's hand-derived VJP reads there (:class:`Tape`)."""
        b, n, d = z.shape[0], self.num_modalities, self.dim
        zz = z.view(b, n + 1, d)
        parts = zz.unbind(1)
        direct = self.blocks is not None and self.fusion is not None and tape is None \
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled(z.device.type) \
            and z.dtype == inj.x_fuse.dtype and not torch.compiler.is_compiling()   # out= breaks a compiled graph
        out = torch.empty_like(zz) if direct else None
        if self.blocks is None:
            new = list(inj.xs)
        else:
            new = self.modality_states(zz, parts, inj, None if out is None else out[:, :n], tape)
            if inj.present is not None:   # an absent modality's f_i is the constant 0
                if out is not None:       # in the new state, in place (``new`` views it)
                    out[:, :n].masked_fill_(~inj.present[:, :, None], 0.0)
                elif isinstance(new, torch.Tensor):
                    new = torch.where(inj.present.t()[:, :, None], new, 0.0)
                else:
                    new = [torch.where(c, v, 0.0) for v, c in zip(new, inj.present[:, :, None].unbind(1))]
        if self.fusion is None:
            z_fuse = _total(new)
        else:
            z_fuse = self.fusion(parts[n], new, inj.x_fuse, inj.gate_mask, inj.fuse_mask, gate_means, inj.present,
                                 inj.x_fuse_biased, None if out is None else out[:, n],
                                 None if out is None else inj.work(2, b, d), tape)
        if out is not None:
            return out.view(b, -1)
        if isinstance(new, torch.Tensor):
            return torch.cat([new.transpose(0, 1), z_fuse[:, None]], 1).view(b, -1).to(z.dtype)
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
