"""f's hand-derived VJP (deqfusion_core/vjp.py): equal to autograd's VJP of the same f, taken by the implicit
backward exactly where it applies, and the gradient it gives equal to the float64 autograd one."""
import copy
import os
import shutil

import pytest
import torch

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion, fusion_map, gradients, vjp
from test_kernels import perturbed

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler: the backward takes autograd's VJP (test_kernels covers it)")


def _fast_vjp(m, z, inj):
    """f applied at z under autograd recording its tape, as the implicit backward does; (f(z), the hand VJP)."""
    tape = vjp.tape_for(m, z, inj)
    fz = m.layer(z, inj, tape=tape)
    return fz, vjp.FusedVJP(m, z, inj, tape)


@pytest.mark.parametrize("dim,groups", [(16, 4), (40, 4), (30, 1)])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("batch", [9, 12])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_vjp_equals_autograd_vjp(dim, groups, batched, batch, gating, masked, monkeypatch):
    """``masked``: a modality mask (issue 13) with one, two or all three modalities present per row."""
    monkeypatch.setattr(fusion_map, "BATCHED_MAX", 1 << 30 if batched else 0)
    m = perturbed([dim] * 3, dim, groups, gating=gating)
    xs = inputs([dim] * 3, batch=batch)
    present = torch.tensor([[True, False, False], [False, True, True], [True, True, True]]).repeat(batch, 1)[:batch]
    inj = m.inject(xs, present if masked else None)
    z = torch.randn(batch, m.state_width)
    if masked:     # absent modalities' states are held at zero, as the solver holds them
        z = torch.where(inj.state_mask(dim), z, 0.0)
    z.requires_grad_()
    fz, fast = _fast_vjp(m, z, inj)
    assert fast.batched == batched
    v = torch.randn_like(fz)
    expected = torch.autograd.grad(fz, z, v, retain_graph=True)[0]
    torch.testing.assert_close(fast(v), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(2 * v), 2 * expected, rtol=1e-5, atol=1e-5)   # its scratch reused
    rows = torch.tensor([batch - 1, 0, 5])         # on some rows, in any order: autograd's VJP on those rows
    masked = torch.zeros_like(v)
    masked[rows] = v[rows]
    torch.testing.assert_close(fast.select(rows)(v[rows]), torch.autograd.grad(fz, z, masked)[0][rows],
                               rtol=1e-5, atol=1e-5)


def test_the_tape_holds_f_s_own_tensors():
    """Recording changes nothing in f, and the tape's ReLU outputs and normalised inputs are f's own."""
    m = perturbed([8] * 2, 8, 2)
    xs = inputs([8] * 2, batch=5)
    z = torch.randn(5, m.state_width).requires_grad_()
    inj = m.inject(xs)
    tape = vjp.tape_for(m, z, inj)
    torch.testing.assert_close(m.layer(z, inj, tape=tape), m.layer(z, inj), rtol=0, atol=0)
    assert len(tape.norms) == 3 + 1 and len(tape.relus) == 2 + 1 and tape.gates.shape == (5, 8)
    xh, rstd = tape.norms[-1]
    torch.testing.assert_close(xh.view(5, 2, 4).mean(-1), torch.zeros(5, 2), rtol=0, atol=1e-6)
    u = tape.relus[-1]
    torch.testing.assert_close(xh.view(5, 2, 4), (u.view(5, 2, 4) - u.view(5, 2, 4).mean(-1, keepdim=True))
                               * rstd[..., None], rtol=1e-5, atol=1e-5)


def test_fused_vjp_applies_only_where_it_is_f():
    xs = inputs([8, 8], batch=3)
    z = torch.randn(3, 24)
    for gating in (True, False):       # the paper's linear gate, or none
        m = DEQFusion([8, 8], 8, gating=gating)
        assert vjp.tape_for(m, z, m.inject(xs)) is not None
    assert vjp.tape_for(m, z.double(), m.double().inject([x.double() for x in xs])) is None   # float64
    for kw in (dict(gating="sigmoid"), dict(fuse_block=False), dict(modality_blocks=False)):
        m = DEQFusion([8, 8], 8, **kw)
        assert vjp.tape_for(m, z, m.inject(xs)) is None, kw
    m = DEQFusion([8, 8], 8)
    assert vjp.tape_for(m, z, m.inject(xs, torch.tensor([[True, False]] * 3))) is not None   # a modality mask: yes
    for owners, name in ((m.blocks, "gn2"), ([m.fusion], "gn")):                        # norms without affine
        norms = [getattr(owner, name) for owner in owners]
        for owner in owners:
            setattr(owner, name, fusion_map.GroupNorm(4, 8, affine=False))
        assert vjp.tape_for(m, z, m.inject(xs)) is None, name
        for owner, norm in zip(owners, norms):
            setattr(owner, name, norm)
    assert vjp.tape_for(m, z, m.inject(xs)) is not None
    m = DEQFusion([8, 8], 8, dropout=0.2).train()
    assert vjp.tape_for(m, z, m.inject(xs)) is None                                      # dropout inside f
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vjp.tape_for(m.eval(), z, m.inject(xs)) is None                           # autocast


def _grads(m, xs):
    out = m(xs)
    loss = (out.fused * torch.linspace(-1, 1, out.fused.shape[1], dtype=out.fused.dtype)).square().sum()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*xs, *params])
    return out, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("kw", [dict(gating=True), dict(gating=False), dict(gating=False, norm="contractive"),
                                dict(gating=True, modality_dropout=0.4)])
def test_implicit_gradient_through_the_fused_vjp_is_autograds(kw, monkeypatch):
    """The same forward, the backward solve with either VJP: the same gradient (float32, solves to 1e-5), with the
    rows still running selected from the hand VJP as the backward compacts them. With the contractive norm (the
    easy-VQA recipe's f) the VJP reads the forward's normalised weights; with modality dropout (the same draws in
    both forwards) it takes each row's mask."""
    torch.manual_seed(0)
    m = DEQFusion([12, 12, 12], 12, num_groups=4, f_tol=1e-5, f_max_iter=200, b_tol=1e-5, b_max_iter=200,
                  jac_weight=0.0, **kw)
    m = (m if m.norm else make_contractive(m)).train()
    twin = copy.deepcopy(m)    # the same weights for the second forward (a norm's power iteration steps per forward)
    xs = inputs([12, 12, 12], batch=16, requires_grad=True)
    calls, selects = [0], [0]
    real_call, real_select = vjp.FusedVJP.__call__, vjp.FusedVJP.select

    def spy(self, v):
        calls[0] += 1
        return real_call(self, v)

    def spy_select(self, rows):
        selects[0] += 1
        return real_select(self, rows)
    monkeypatch.setattr(vjp.FusedVJP, "__call__", spy)
    monkeypatch.setattr(vjp.FusedVJP, "select", spy_select)
    torch.manual_seed(1)
    out, fused = _grads(m, xs)
    assert calls[0] == out.stats.backward.nstep and selects[0] > 0
    assert out.stats.converged and out.stats.backward.converged
    calls[0] = 0
    monkeypatch.setattr(gradients, "tape_for", lambda *a: None)
    torch.manual_seed(1)
    out, auto = _grads(twin, xs)
    assert calls[0] == 0 and out.stats.backward.converged
    assert ((fused - auto).norm() / auto.norm()).item() < 1e-4


def test_the_backward_takes_the_hand_vjp_from_its_first_step_without_applying_f(monkeypatch):
    """With DEQFusion's defaults (backward cap 10) every backward step is the hand VJP, read from the tape of the
    forward's f at z*: the backward applies f no more (autograd's path re-applies it to the rows still running)."""
    torch.manual_seed(0)
    m = make_contractive(DEQFusion([12, 12, 12], 12, num_groups=4, b_tol=1e-6)).train()
    xs = inputs([12, 12, 12], batch=16, requires_grad=True)
    out = m(xs)
    applied, calls = [0], [0]
    real_layer, real_call = type(m).layer, vjp.FusedVJP.__call__
    monkeypatch.setattr(type(m), "layer", lambda self, *a, **k: applied.__setitem__(0, applied[0] + 1)
                        or real_layer(self, *a, **k))
    monkeypatch.setattr(vjp.FusedVJP, "__call__", lambda self, v: calls.__setitem__(0, calls[0] + 1)
                        or real_call(self, v))
    out.fused.square().sum().backward()
    assert m.b_max_iter == 10 and calls[0] == out.stats.backward.nstep > 1 and applied[0] == 0
