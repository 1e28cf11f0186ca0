"""f's vector-Jacobian product in z, derived by hand, for the implicit backward's solver steps (issue 14: the
backward at its floor on the CPU).

Each backward solver step needs v -> v J_f(z*) at the same z*. Autograd replays f's recorded graph for it: some
sixty nodes, each GroupNorm's backward in four to six passes over memory. :class:`FusedVJP` reads what it needs from
the :class:`~deqfusion_core.fusion_map.Tape` that f's own application at z* under autograd recorded (the implicit
backward applies f there anyway, for the parameters' gradient): normalised GroupNorm inputs, their 1 / std, the ReLUs'
outputs (their masks), the gates. So it costs nothing to build and has f's exact values and ReLU masks. Each product
is then f's eight matrix products and one fused kernel per GroupNorm (``kernels.gn_backward``: the norm's VJP with the
ReLU mask and the addition next to it). The formulas (f of ``fusion_map``; u the input of a GroupNorm, xh its
normalised input, w its weight):

    GN'(t)        = rstd * (t w - mean(t w) - xh * mean(t w xh))       over each row's group (t: the cotangent)
    fuse block    d_u = GN_f'(v_fuse) [u_f > 0];  d_p = d_u W_f;  d_tot = (d_p * z_fuse) W_a
                  g_fuse = d_p * gates + N d_tot                        (the gates' sum: FuseBlock's docstring)
                  without the gate (gating=False): d_tot = d_p, g_fuse = 0
    block i       d_s = GN_3'(v_i + d_tot) [s_i > 0];  d_h = GN_2'(d_s) W_2;  g_i = d_s + GN_1'(d_h [n_i > 0]) W_1
    modality mask (``present``, module docstring of fusion_map): N is each row's count of present modalities, and an
                  absent modality's f_i is the constant 0, so its block gets no cotangent (v_i + d_tot: 0) and g_i = 0

It applies where the kernels do (float32 CPU, :func:`kernels.usable` without autograd) to FusionMap's own f with the
paper's linear gate or none, affine GroupNorms, with or without a modality mask, and no dropout inside f
(:func:`tape_for`); otherwise the backward keeps autograd's.
tests/test_vjp.py checks it against autograd's VJP of the same f (whose gradients tests/test_fusion.py checks against
finite differences) and the implicit gradient through it against the one through autograd's VJP.
"""
from __future__ import annotations

import torch

from . import fusion_map, kernels
from .fusion_map import Tape

__all__ = ["FusedVJP", "tape_for"]


def _block_back(v, add, out, acts, params, work):
    """The VJP of the modality blocks (Eq. 7-8) from the cotangent ``v`` + ``add`` of their output into ``out``,
    on [b, d] (one modality) or stacked [N, b, d] views; ``acts``: the three norms' (xh, rstd) and the two ReLUs'
    outputs (n, s) on these rows, ``params``: the norms' weights and the Linears' weights (W_1, W_2); ``work``: two
    scratch buffers."""
    xh1, r1, xh2, r2, xh3, r3, n, s = acts
    w1, w2, w3, lin1, lin2 = params
    d_s = kernels.gn_backward(v, xh3, r3, w3, add=add, post_mask=s, out=out)
    d_h = kernels.gn_backward(d_s, xh2, r2, w2, out=work[0])
    d_h = torch.mm(d_h, lin2, out=work[1]) if v.dim() == 2 else torch.bmm(d_h, lin2, out=work[1])
    kernels.gn_backward(d_h, xh1, r1, w1, pre_mask=n)
    return out.addmm_(d_h, lin1) if v.dim() == 2 else out.baddbmm_(d_h, lin1)


def tape_for(fm, z: torch.Tensor, inj) -> Tape | None:
    """A :class:`~deqfusion_core.fusion_map.Tape` to pass to ``fm.layer(z, inj, tape=...)`` where f's hand-derived
    VJP applies to this f and state, else None (the backward takes autograd's VJP)."""
    with torch.no_grad():
        usable = kernels.usable(z)
    applies = (usable and getattr(fm.layer, "__func__", None) is fusion_map.FusionMap.layer and fm.blocks is not None
               and fm.fusion is not None and fm.fusion.gating in ("linear", None) and fm.fusion.gn.affine
               and inj.gate_mask is None and inj.fuse_mask is None and inj.blocks is not None
               and all(w is not None for w, _ in inj.blocks.stacked[3:]) and z.dtype == inj.x_fuse.dtype
               and not torch.is_autocast_enabled(z.device.type))
    return Tape() if applies else None


class FusedVJP:
    """``vjp(v)`` = v J_f(z) at ``z`` [b, (N+1) d] with the injection ``inj``, from the ``tape`` f recorded when it was
    applied there (``fm.layer(z, inj, tape=tape)``, ``tape`` from :func:`tape_for`). ``select(rows)``: the same on
    those rows. Each call allocates only its result."""

    def __init__(self, fm, z: torch.Tensor, inj, tape: Tape):
        b, N, d = z.shape[0], fm.num_modalities, fm.dim
        P = inj.blocks
        self.batched = b * d <= fusion_map.BATCHED_MAX     # as f ran the blocks (FusionMap.modality_states)
        lin = lambda w: w.transpose(-1, -2)                # the Linears' own weights (f holds them transposed)
        norms = [xh_rstd for norm in tape.norms[:-1] for xh_rstd in norm]
        self.params = [tuple(t.detach() for t in (g1[0], g2[0], g3[0], lin(w1), lin(w2)))
                       for w1, _, w2, g1, g2, g3 in ([P.stacked] if self.batched else P.each)]
        # per block: (xh, rstd) of its three norms and its two ReLUs' outputs, all [b, ...] or stacked [N, b, ...]
        self.acts = [(*norms[6 * k:6 * k + 6], *tape.relus[2 * k:2 * k + 2]) for k in range(len(self.params))]
        fuse = fm.fusion
        self.u_fuse, (self.xh_fuse, self.r_fuse) = tape.relus[-1], tape.norms[-1]
        self.gates, self.z_fuse = tape.gates, z.detach().view(b, N + 1, d)[:, N]
        # with a modality mask: [b, N, 1] absent and each row's count of present modalities [b, 1] (the state's dtype)
        self.absent = None if inj.present is None else ~inj.present[:, :, None]
        self.count = None if inj.present is None else inj.present.sum(1, keepdim=True).to(z.dtype)
        self.w_fuse, self.W_f = fuse.gn.weight.detach(), fuse.fuse.weight.detach()
        self.W_a = None if fuse.gate is None else fuse.gate.weight.detach()
        self.shape = (b, N, d)
        self.work = None     # scratch of the first call, kept for the later ones

    def select(self, rows: torch.Tensor) -> "FusedVJP":
        """This VJP on the rows ``rows`` of its batch (index copies of what it keeps)."""
        new = object.__new__(FusedVJP)
        new.__dict__.update(self.__dict__)
        bdim = 1 if self.batched else 0
        new.acts = [tuple(t.index_select(bdim, rows) for t in acts) for acts in self.acts]
        new.u_fuse, new.xh_fuse, new.r_fuse, new.z_fuse = (t[rows] for t in (self.u_fuse, self.xh_fuse, self.r_fuse,
                                                                              self.z_fuse))
        new.gates, new.absent, new.count = (None if t is None else t[rows] for t in (self.gates, self.absent,
                                                                                     self.count))
        new.shape, new.work = (rows.numel(), *self.shape[1:]), None
        return new

    @torch.no_grad()
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        b, N, d = self.shape
        out = torch.empty_like(v)
        vv, o = v.view(b, N + 1, d), out.view(b, N + 1, d)
        if self.work is None:
            self.work = v.new_empty(3, b, d), v.new_empty(2, N, b, d) if self.batched else v.new_empty(2, b, d)
        (A, B, d_tot), work = self.work
        d_u = kernels.gn_backward(vv[:, N], self.xh_fuse, self.r_fuse, self.w_fuse, post_mask=self.u_fuse, out=A)
        if self.gates is None:        # f_fuse reads the modalities' new states only
            torch.mm(d_u, self.W_f, out=d_tot)
            o[:, N].zero_()
        else:
            d_p = torch.mm(d_u, self.W_f, out=B)
            torch.mm(torch.mul(d_p, self.z_fuse, out=A), self.W_a, out=d_tot)
            torch.mul(d_tot, N if self.count is None else self.count, out=o[:, N]).addcmul_(d_p, self.gates)
        vb, add = vv[:, :N], d_tot
        if self.absent is not None:      # the cotangent of f_i's output, v_i + d_tot, zero where i is absent
            vb, add = (vb + d_tot[:, None]).masked_fill_(self.absent, 0.0), None
        if self.batched:
            _block_back(vb.transpose(0, 1), add, o[:, :N].transpose(0, 1), self.acts[0], self.params[0], work)
        else:
            for i, (acts, params) in enumerate(zip(self.acts, self.params)):
                _block_back(vb[:, i], add, o[:, i], acts, params, work)
        return out
