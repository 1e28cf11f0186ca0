"""``x_fuse``: how the injected fused feature is computed (Eq. 12's weighted sum, or ``"linear"``: a matrix per
modality; fusion_map.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import central_difference, inputs, make_contractive
from deqfusion_core import DEQFusion

DIMS = [6, 8, 5]
TIGHT = dict(f_max_iter=300, f_tol=1e-13, b_max_iter=300, b_tol=1e-13)
MASK = torch.tensor([[True, True, True], [True, True, False], [False, True, False]])


def model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(dim=8, num_groups=2, jac_samples=0, x_fuse="linear", **TIGHT)
    opts.update(kw)
    return make_contractive(DEQFusion(DIMS, **opts)).to(dtype)


def test_linear_x_fuse_is_a_matrix_per_modality_plus_bias():
    m = model(torch.float32, equilibrium=False, num_layers=0)
    xs = inputs(DIMS)
    x_proj = [p(x) for p, x in zip(m.proj, xs)]
    expected = sum(x @ lin.weight.T for lin, x in zip(m.fuse_in, x_proj)) + m.bias
    torch.testing.assert_close(m(xs).fused, expected)
    assert not hasattr(m, "weights") and m.bias.shape == (8,)


def test_linear_x_fuse_enters_the_fuse_block_and_is_not_a_weighted_sum():
    m = model(torch.float32, equilibrium=False, num_layers=1, modality_blocks=False)
    xs = [x.abs() for x in inputs(DIMS)]     # non-negative features, as after an encoder's ReLU
    x_proj = [p(x) for p, x in zip(m.proj, xs)]
    x_fuse = sum(lin(x) for lin, x in zip(m.fuse_in, x_proj)) + m.bias
    torch.testing.assert_close(m(xs).fused, m.fusion.gn(F.relu(m.fusion.fuse.bias + x_fuse)))
    assert (x_fuse < 0).any()                # signed: the ReLU after it is not the identity


def test_implicit_gradient_with_linear_x_fuse_and_a_mask_matches_finite_differences_float64():
    m = model().train()
    xs = inputs(DIMS, batch=3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: m([a, b, c], present=MASK).fused, tuple(xs),
                                    eps=1e-6, atol=1e-6, fast_mode=True)
    out = m(xs, present=MASK)
    assert out.stats.converged
    # the gradient of the new parameters: a central difference along a random direction
    loss = lambda: (m(xs, present=MASK).fused.sin()).sum()
    m.zero_grad()
    loss().backward()
    params = [*m.fuse_in.parameters(), m.bias]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction))
    numeric = central_difference(loss, params, direction)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_nan_in_absent_entries_changes_nothing_with_linear_x_fuse():
    m = model(torch.float32, f_tol=1e-4, f_max_iter=60, b_tol=1e-4, b_max_iter=60).train()
    xs = inputs(DIMS, batch=3)
    outs, grads = [], []
    for fill in (0.0, float("nan")):
        x = [torch.where(MASK[:, i, None], v, fill).requires_grad_() for i, v in enumerate(xs)]
        out = m(x, present=MASK)
        out.fused.sum().backward()
        outs.append(out.fused)
        grads.append([v.grad for v in x])
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])
    for i, (a, b) in enumerate(zip(*grads)):
        assert torch.equal(a, b) and not b[~MASK[:, i]].any()


def test_x_fuse_is_validated():
    with pytest.raises(ValueError, match="x_fuse"):
        DEQFusion(DIMS, dim=8, num_groups=2, x_fuse="concat")
