"""f's hand-derived VJP (deqfusion_core/vjp.py): equal to autograd's VJP of the same f, taken by the implicit
backward exactly where it applies, and the gradient it gives equal to the float64 autograd one."""
import os
import shutil

import pytest
import torch

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion, fusion_map, gradients, vjp
from test_kernels import perturbed

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler: the backward takes autograd's VJP (test_kernels covers it)")


@pytest.mark.parametrize("dim,groups", [(16, 4), (40, 4), (30, 1)])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("batch", [9, 12])
@pytest.mark.parametrize("gating", [True, False])
def test_fused_vjp_equals_autograd_vjp(dim, groups, batched, batch, gating, monkeypatch):
    monkeypatch.setattr(fusion_map, "BATCHED_MAX", 1 << 30 if batched else 0)
    m = perturbed([dim] * 3, dim, groups, gating=gating)
    xs = inputs([dim] * 3, batch=batch)
    z = torch.randn(batch, m.state_width).requires_grad_()
    fz = m.layer(z, m.inject(xs))
    v = torch.randn_like(fz)
    expected = torch.autograd.grad(fz, z, v)[0]
    with torch.no_grad():
        fast = vjp.vjp_at(m, z.detach(), m.inject(xs))
        assert isinstance(fast, vjp.FusedVJP) and fast.batched == batched
        got = fast(v)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_vjp_applies_only_where_it_is_f():
    xs = inputs([8, 8], batch=3)
    z = torch.randn(3, 24)
    with torch.no_grad():
        for gating in (True, False):       # the paper's linear gate, or none
            m = DEQFusion([8, 8], 8, gating=gating)
            assert vjp.vjp_at(m, z, m.inject(xs)) is not None
        assert vjp.vjp_at(m, z.double(), m.double().inject([x.double() for x in xs])) is None   # float64
        for kw in (dict(gating="sigmoid"), dict(fuse_block=False), dict(modality_blocks=False)):
            m = DEQFusion([8, 8], 8, **kw)
            assert vjp.vjp_at(m, z, m.inject(xs)) is None, kw
        m = DEQFusion([8, 8], 8)
        assert vjp.vjp_at(m, z, m.inject(xs, torch.tensor([[True, False]] * 3))) is None   # a modality mask
        m = DEQFusion([8, 8], 8, dropout=0.2).train()
        assert vjp.vjp_at(m, z, m.inject(xs)) is None                                      # dropout inside f
    assert vjp.vjp_at(m.eval(), z, m.inject(xs)) is None    # with autograd on: the kernels do not apply


def _grads(m, xs):
    out = m(xs)
    loss = (out.fused * torch.linspace(-1, 1, out.fused.shape[1], dtype=out.fused.dtype)).square().sum()
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [*xs, *params])
    return out, torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("fast_after", [0, 3])     # built at the start, or after autograd's first VJPs
def test_implicit_gradient_through_the_fused_vjp_is_autograds(gating, fast_after, monkeypatch):
    """The same forward, the backward solve with either VJP: the same gradient (float32, solves to 1e-5)."""
    monkeypatch.setattr(gradients, "FAST_AFTER", fast_after)
    torch.manual_seed(0)
    m = make_contractive(DEQFusion([12, 12, 12], 12, num_groups=4, f_tol=1e-5, f_max_iter=200, b_tol=1e-5,
                                   b_max_iter=200, jac_weight=0.0, gating=gating)).train()
    xs = inputs([12, 12, 12], batch=16, requires_grad=True)
    calls = [0]
    real = vjp.FusedVJP.__call__

    def spy(self, v):
        calls[0] += 1
        return real(self, v)
    monkeypatch.setattr(vjp.FusedVJP, "__call__", spy)
    out, fused = _grads(m, xs)
    assert calls[0] > 0 and out.stats.converged and out.stats.backward.converged
    calls[0] = 0
    monkeypatch.setattr(gradients, "vjp_at", lambda *a: None)
    out, auto = _grads(m, xs)
    assert calls[0] == 0 and out.stats.backward.converged
    assert ((fused - auto).norm() / auto.norm()).item() < 1e-4


def test_a_short_backward_solve_does_not_build_the_fused_vjp(monkeypatch):
    """Within FAST_AFTER steps the backward keeps autograd's VJPs (building the hand one costs about one f)."""
    built = []
    real = vjp.FusedVJP.__init__
    monkeypatch.setattr(vjp.FusedVJP, "__init__", lambda self, *a: built.append(1) or real(self, *a))
    torch.manual_seed(0)
    m = make_contractive(DEQFusion([12, 12, 12], 12, num_groups=4, f_tol=1e-5, f_max_iter=200, b_tol=1e-5,
                                   b_max_iter=200, jac_weight=0.0)).train()
    xs = inputs([12, 12, 12], batch=16, requires_grad=True)
    monkeypatch.setattr(gradients, "FAST_AFTER", 1000)
    out, _ = _grads(m, xs)
    assert out.stats.backward.converged and not built
    monkeypatch.setattr(gradients, "FAST_AFTER", 2)
    out, _ = _grads(m, xs)
    assert out.stats.backward.nstep > 2 and built
    built.clear()
    m.b_max_iter = 3                          # a cap below 2 x FAST_AFTER: never built
    out, _ = _grads(m, xs)
    assert out.stats.backward.nstep == 3 and not built
