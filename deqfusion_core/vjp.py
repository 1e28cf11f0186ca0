"""f's vector-Jacobian product in z, derived by hand, for the implicit backward's solver steps (issue 14: the
backward at its floor on the CPU).

Each backward solver step needs v -> v J_f(z*) at the same z*. Autograd replays f's recorded graph for it: some
sixty nodes, each GroupNorm's backward in four to six passes over memory. :class:`FusedVJP` applies f once at z*
keeping what the backward needs (normalised GroupNorm inputs, their 1 / std, the ReLUs' inputs, the gates) and then
computes each product with f's eight matrix products and one fused kernel per GroupNorm (``kernels.gn_backward``:
the norm's VJP with the ReLU mask and the addition next to it). The formulas (f of ``fusion_map``; u the input of a
GroupNorm, xh its normalised input, w its weight):

    GN'(t)        = rstd * (t w - mean(t w) - xh * mean(t w xh))       over each row's group (t: the cotangent)
    fuse block    d_u = GN_f'(v_fuse) [u_f > 0];  d_p = d_u W_f;  d_tot = (d_p * z_fuse) W_a
                  g_fuse = d_p * gates + N d_tot                        (the gates' sum: FuseBlock's docstring)
                  without the gate (gating=False): d_tot = d_p, g_fuse = 0
    block i       d_s = GN_3'(v_i + d_tot) [s_i > 0];  d_h = GN_2'(d_s) W_2;  g_i = d_s + GN_1'(d_h [n_i > 0]) W_1

It applies where the kernels do (float32 CPU, :func:`kernels.usable`) to FusionMap's own f with the paper's linear
gate or none, all modalities present and no dropout inside f (``FusedVJP.applies``); otherwise the backward keeps autograd.
tests/test_vjp.py checks it against autograd's VJP of the same f and against finite differences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fusion_map, kernels

__all__ = ["FusedVJP", "vjp_at"]


def _group_norm(u: torch.Tensor, groups: int, eps: float, weight, bias):
    """``fusion_map.group_norm`` with the same ops (so the same values as f's autograd path, ReLU masks included),
    also returning the normalised input and its rstd [..., G] (as the norm's own backward reads them)."""
    shape = u.shape
    xh, _, rstd = torch.native_layer_norm(u.view(*shape[:-1], groups, -1), (shape[-1] // groups,),
                                          fusion_map.ones(shape[-1] // groups, u), None, eps)
    xh = xh.view(shape)
    return torch.addcmul(bias, xh, weight), xh, rstd.view(*shape[:-1], groups)


def _block_back(v, add, out, saved, work):
    """The VJP of the modality blocks (Eq. 7-8) from the cotangent ``v`` + ``add`` of their output into ``out``,
    on [b, d] (one modality) or stacked [N, b, d] views; ``saved``: (xh, rstd, GN weight) of the three norms, the
    two ReLUs' inputs (n, s) and the Linears' weights (W_1, W_2) for these views; ``work``: two scratch buffers."""
    (xh1, r1, w1), (xh2, r2, w2), (xh3, r3, w3), (n, s), (lin1, lin2) = saved
    d_s = kernels.gn_backward(v, xh3, r3, w3, add=add, post_mask=s, out=out)
    d_h = kernels.gn_backward(d_s, xh2, r2, w2, out=work[0])
    d_h = torch.mm(d_h, lin2, out=work[1]) if v.dim() == 2 else torch.bmm(d_h, lin2, out=work[1])
    kernels.gn_backward(d_h, xh1, r1, w1, pre_mask=n)
    return out.addmm_(d_h, lin1) if v.dim() == 2 else out.baddbmm_(d_h, lin1)


class FusedVJP:
    """``vjp(v)`` = v J_f(z) at the fixed ``z`` [b, (N+1) d] with the injection ``inj`` (its rows), for a
    FusionMap ``fm`` that :meth:`applies`. Built once per backward solve (and per row selection); each call
    allocates only its result."""

    @staticmethod
    def applies(fm, z: torch.Tensor, inj) -> bool:
        return (type(fm).layer is fusion_map.FusionMap.layer and fm.blocks is not None and fm.fusion is not None
                and fm.fusion.gating in ("linear", None) and fm.fusion.gn.affine and inj.present is None
                and inj.gate_mask is None and inj.fuse_mask is None and inj.blocks is not None
                and z.dtype == inj.x_fuse.dtype and kernels.usable(z))

    @torch.no_grad()
    def __init__(self, fm, z: torch.Tensor, inj):
        b, N, d = z.shape[0], fm.num_modalities, fm.dim
        P = inj.blocks
        zz = z.view(b, N + 1, d)
        z_fuse = zz[:, N]
        self.batched = b * d <= fusion_map.BATCHED_MAX           # as f runs the blocks (FusionMap.modality_states)
        # f at z with the ops of its autograd path (fusion_map.block, FuseBlock.forward), keeping what the VJP reads
        if self.batched:
            zs, (w1, b1, w2, g1, g2, g3) = zz[:, :N].transpose(0, 1), P.stacked
            mm = torch.baddbmm
        else:
            zs, (w1, b1, w2, g1, g2, g3) = zz.unbind(1)[:N], zip(*P.each)
            mm = torch.addmm
        saved = []
        for i, z_i in enumerate([zs] if self.batched else zs):
            at = (lambda t: t) if self.batched else (lambda t, i=i: t[i])
            n, xh1, r1 = _group_norm(mm(at(b1), z_i, at(w1)), P.groups, P.eps, *at(g1))
            s, xh2, r2 = _group_norm(mm(at(inj.x2), F.relu(n), at(w2)), P.groups, P.eps, *at(g2))
            s = s.add_(z_i)
            y, xh3, r3 = _group_norm(F.relu(s), P.groups, P.eps, *at(g3))
            saved.append((y, (xh1, r1, at(g1)[0]), (xh2, r2, at(g2)[0]), (xh3, r3, at(g3)[0]), (n, s),
                          (at(w1).transpose(-1, -2), at(w2).transpose(-1, -2))))   # the Linears' own weights
        fuse = fm.fusion
        new = saved[0][0] if self.batched else [part[0] for part in saved]
        if fuse.gate is None:                                   # no gate: z_fuse' = sum_i z_i (FuseBlock)
            self.gates, purified = None, fusion_map._total(new)
        else:
            self.gates = torch.addmm(N * fuse.gate.bias, fusion_map._total(new, z_fuse, N), fuse.gate.weight.t())
            purified = z_fuse * self.gates
        x_fuse_biased = inj.x_fuse + fuse.fuse.bias if inj.x_fuse_biased is None else inj.x_fuse_biased
        self.u_fuse = torch.addmm(x_fuse_biased, purified, fuse.fuse.weight.t())
        _, self.xh_fuse, self.r_fuse = _group_norm(F.relu(self.u_fuse), fuse.gn.num_groups, fuse.gn.eps,
                                                   fuse.gn.weight, fuse.gn.bias)
        self.w_fuse, self.W_f, self.z_fuse = fuse.gn.weight, fuse.fuse.weight, z_fuse
        self.W_a = None if fuse.gate is None else fuse.gate.weight
        self.saved = [part[1:] for part in saved]    # one entry (stacked [N, ...]) or one per modality
        self.shape = (b, N, d)
        self.work = z.new_empty(3, b, d)
        self.block_work = z.new_empty(2, N, b, d) if self.batched else z.new_empty(2, b, d)

    @torch.no_grad()
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        b, N, d = self.shape
        out = torch.empty_like(v)
        vv, o = v.view(b, N + 1, d), out.view(b, N + 1, d)
        A, B, d_tot = self.work
        d_u = kernels.gn_backward(vv[:, N], self.xh_fuse, self.r_fuse, self.w_fuse, post_mask=self.u_fuse, out=A)
        if self.gates is None:        # f_fuse reads the modalities' new states only
            torch.mm(d_u, self.W_f, out=d_tot)
            o[:, N].zero_()
        else:
            d_p = torch.mm(d_u, self.W_f, out=B)
            torch.mm(torch.mul(d_p, self.z_fuse, out=A), self.W_a, out=d_tot)
            torch.mul(d_tot, N, out=o[:, N]).addcmul_(d_p, self.gates)
        if self.batched:
            _block_back(vv[:, :N].transpose(0, 1), d_tot, o[:, :N].transpose(0, 1), self.saved[0], self.block_work)
        else:
            for i, saved in enumerate(self.saved):
                _block_back(vv[:, i], d_tot, o[:, i], saved, self.block_work)
        return out


def vjp_at(fm, z: torch.Tensor, inj):
    """f's hand-derived VJP in z at ``z`` (a :class:`FusedVJP`) where it applies (call without autograd), else None
    (then the backward takes autograd's)."""
    return FusedVJP(fm, z, inj) if FusedVJP.applies(fm, z, inj) else None
