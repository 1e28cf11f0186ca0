"""The fused CPU kernels of f's solver steps (deqfusion_core/kernels.py): equal to f's torch ops and to f written
plainly, used exactly where they apply, and a missing compiler falls back to torch ops with the reason."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion, fusion_map, kernels
from test_fusion import reference_f

HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None


@pytest.fixture
def calls(monkeypatch):
    """Counts the kernel calls (so that a test knows which path f took)."""
    count = [0]
    real = kernels.gn_fused

    def spy(*a, **k):
        count[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(kernels, "gn_fused", spy)
    return count


def perturbed(dims, dim, groups, seed=0, **kw):
    torch.manual_seed(seed)
    m = DEQFusion(dims, dim, num_groups=groups, **kw)
    with torch.no_grad():
        for p in m.parameters():     # not the initial GroupNorm affine (ones, zeros)
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: f runs torch ops (tested below)")
def test_kernels_build_where_there_is_a_compiler():
    assert kernels.status().startswith("fused C kernels"), kernels.status()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("dim,groups", [(16, 4), (40, 4), (30, 1)])
@pytest.mark.parametrize("batched", [True, False])
def test_kernel_f_equals_f_written_plainly(dim, groups, batched, monkeypatch, calls):
    monkeypatch.setattr(fusion_map, "BATCHED_MAX", 1 << 30 if batched else 0)
    m = perturbed([dim] * 3, dim, groups)
    xs = inputs([dim] * 3, batch=9)
    z = torch.randn(9, m.state_width)
    with torch.no_grad():
        got = m.layer(z, m.inject(xs))
    assert calls[0] == (2 if batched else 6) + 1     # two per block (or per stacked blocks) and the fuse norm
    torch.testing.assert_close(got, reference_f(m, z, xs), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("kw", [dict(), dict(pre=True), dict(post=True, res=True), dict(add="vector", post=True),
                                dict(add="matrix", res=True, post=True, tail=True), dict(pre=True, add="matrix")])
@pytest.mark.parametrize("R", [11, 12, 1])     # rows go four at a time: blocks of 4 and the 3, 0 or 1 left over
@pytest.mark.parametrize("inplace", [False, True])
def test_gn_fused_is_its_formula_on_strided_views(kw, R, inplace):
    torch.manual_seed(1)
    C, G = 24, 3
    base = torch.randn(R, 3, C)                     # rows with a stride of 3C, as a state's parts
    x, res, out = base[:, 0], torch.randn(R, 2, C)[:, 1], torch.randn(R, 4, C)[:, 2]
    w, b, w3, b3 = (torch.randn(C) for _ in range(4))
    add = {"vector": torch.randn(C), "matrix": torch.randn(R, C)}.get(kw.get("add"))

    def gn(v, weight, bias):
        return F.group_norm(v, G, weight, bias, 1e-5)
    v = x + add if add is not None else x.clone()
    v = F.relu(v) if kw.get("pre") else v
    h = gn(v, w, b) + (res if kw.get("res") else 0)
    h = F.relu(h) if kw.get("post") else h
    expected = gn(h, w3, b3) if kw.get("tail") else h
    with torch.no_grad():
        got = kernels.gn_fused(x, G, 1e-5, w, b, add=add, pre=kw.get("pre", False), res=res if kw.get("res") else None,
                               post=kw.get("post", False), weight3=w3 if kw.get("tail") else None,
                               bias3=b3 if kw.get("tail") else None, out=None if inplace else out)
    assert got.data_ptr() == (x if inplace else out).data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if not inplace:
        torch.testing.assert_close(base[:, 0], x)      # the input is left as it was (out elsewhere)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_solve_with_kernels_is_the_fixed_point_of_the_torch_f(monkeypatch, calls):
    torch.manual_seed(0)
    m = make_contractive(DEQFusion([12, 12, 12], 12, num_groups=4, f_tol=1e-5, f_max_iter=200)).eval()
    xs = inputs([12, 12, 12], batch=16)
    with torch.no_grad():
        fast = m(xs)
        assert calls[0] > 0 and fast.stats.converged, fast.stats
        monkeypatch.setattr(kernels, "_STATE", {"lib": None, "why": "off for this test"})
        calls[0] = 0
        slow = m(xs)
        assert calls[0] == 0 and slow.stats.converged, slow.stats
        # the kernel solve's state is a fixed point of f computed with torch ops, to the solve's tolerance
        z = fast.stats.state
        residual = (m.layer(z, m.inject(xs)) - z).norm(dim=1) / z.norm(dim=1)
    assert residual.max().item() < 2e-5
    torch.testing.assert_close(fast.fused, slow.fused, rtol=1e-4, atol=1e-4)


def test_float64_and_autograd_take_torch_ops(calls):
    m = perturbed([8, 8], 8, 2)
    xs = inputs([8, 8], batch=4)
    z = torch.randn(4, m.state_width)
    with torch.no_grad():
        m.double().layer(z.double(), m.inject([x.double() for x in xs]))
    m.float().layer(z.requires_grad_(), m.inject(xs))
    assert calls[0] == 0


def test_missing_compiler_falls_back_to_torch_ops_and_says_why(monkeypatch, tmp_path, calls):
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DEQFUSION_CACHE", str(tmp_path))
    assert "no-such-cc" in kernels.status() and kernels.status().startswith("torch ops")
    m = perturbed([8, 8, 8], 8, 2)
    xs = inputs([8, 8, 8], batch=5)
    z = torch.randn(5, m.state_width)
    with torch.no_grad():
        got = m.layer(z, m.inject(xs))
    assert calls[0] == 0
    torch.testing.assert_close(got, reference_f(m, z, xs), rtol=1e-5, atol=1e-5)


def test_disabled_by_environment(monkeypatch, calls):
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("DEQFUSION_KERNELS", "0")
    assert kernels.status() == "torch ops: DEQFUSION_KERNELS=0"
    m = perturbed([8, 8], 8, 2)
    with torch.no_grad():
        m.layer(torch.randn(3, m.state_width), m.inject(inputs([8, 8], batch=3)))
    assert calls[0] == 0


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_nan_propagates_as_through_torch_ops(monkeypatch, calls):
    m = perturbed([8, 8, 8], 8, 2)
    xs = inputs([8, 8, 8], batch=5)
    xs[1][2, 3] = float("nan")
    z = torch.randn(5, m.state_width)
    with torch.no_grad():
        fast = m.layer(z, m.inject(xs))
        monkeypatch.setattr(kernels, "_STATE", {"lib": None, "why": "off for this test"})
        slow = m.layer(z, m.inject(xs))
    assert calls[0] > 0 and fast[2].isnan().any()
    torch.testing.assert_close(fast.isnan(), slow.isnan())


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the solvers' bookkeeping runs torch ops")
def test_residual_and_copy_rows_are_their_formulas_on_strided_views():
    torch.manual_seed(0)
    F_hist, G_hist = torch.randn(9, 5, 37), torch.randn(9, 5, 37)
    fx, x = torch.randn(9, 37), torch.randn(9, 2, 37)[:, 1]      # x: row stride 74
    gn, fn = kernels.residual(fx, x, G_hist[:, 3], F_hist[:, 3])
    assert torch.equal(G_hist[:, 3], fx - x) and torch.equal(F_hist[:, 3], fx)
    torch.testing.assert_close(gn, (fx - x).norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(fn, fx.norm(dim=1), rtol=1e-6, atol=0)
    before = G_hist.clone()
    kernels.residual(fx, x, G_hist[:, 0])                          # without the f history
    assert torch.equal(G_hist[:, 0], fx - x) and torch.equal(G_hist[:, 1:], before[:, 1:])
    take = torch.tensor([True, False, True, True, False, False, True, False, True])
    rows = torch.tensor([11, 3, 0, 7, 5, 2, 9, 1, 4])
    best = torch.randn(12, 37)
    expected = best.clone()
    expected[rows[take]] = x[take]
    kernels.copy_rows(x, take, rows, best)
    assert torch.equal(best, expected)
    best, expected = torch.randn(9, 37), None
    expected = torch.where(take[:, None], x, best)
    kernels.copy_rows(x, take, None, best)
    assert torch.equal(best, expected)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the solvers' bookkeeping runs torch ops")
@pytest.mark.parametrize("name", ["anderson", "fixed_point", "broyden"])
def test_solver_bookkeeping_kernels_equal_torch_ops(name, monkeypatch):
    """float32 on the CPU without autograd, the solvers' residual and best-iterate updates run the kernels
    (spied: they are used); the solve equals the torch ops' one, working-set compaction included."""
    from deqfusion_core import solve

    B, L = 12, 24
    g = torch.Generator().manual_seed(1)
    A = torch.randn(B, L, L, generator=g)
    A = torch.linspace(0.2, 0.9, B)[:, None, None] * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    c = torch.randn(B, L, generator=g)

    def f(z, rows):
        Ar, cr = (A, c) if rows is None else (A[rows], c[rows])
        return torch.bmm(Ar, z[:, :, None])[:, :, 0] + cr

    used = {"residual": 0, "copy_rows": 0}
    for k in used:
        real = getattr(kernels, k)
        monkeypatch.setattr(kernels, k, lambda *a, _real=real, _k=k: (used.__setitem__(_k, used[_k] + 1), _real(*a))[1])
    with torch.no_grad():
        fast = solve(f, torch.zeros(B, L), name, max_iter=60, tol=1e-5)
        monkeypatch.setattr(kernels, "_STATE", {"lib": None, "why": "off for this test"})
        slow = solve(f, torch.zeros(B, L), name, max_iter=60, tol=1e-5)
    assert used["copy_rows"] == fast.nstep and used["residual"] == (fast.nstep if name == "anderson" else 0)
    assert fast.nstep == slow.nstep and fast.converged and slow.converged
    torch.testing.assert_close(fast.z, slow.z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.rel_residuals, slow.rel_residuals, rtol=1e-4, atol=1e-9)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("add,pre,post", [(False, False, False), (True, False, True), (False, True, False),
                                          (True, True, True)])
@pytest.mark.parametrize("R", [11, 12, 1])
@pytest.mark.parametrize("M", [1, 3])
def test_gn_backward_is_autograds_vjp_of_the_norm(add, pre, post, R, M):
    """out = post(VJP of GN(u) * w + b at u, applied to pre(v + a)), on strided views; masks from ReLU inputs."""
    torch.manual_seed(2)
    C, G = 24, 3
    lead = (M,) if M > 1 else ()
    u = torch.randn(*lead, R, C, requires_grad=True)
    w = torch.randn(*lead, 1, C) if M > 1 else torch.randn(C)
    y = F.group_norm(u.reshape(-1, C), G, None, None, 1e-5).view_as(u) * w
    v = torch.randn(R, *lead, 2, C).movedim(0, -3)[..., 0, :] if M > 1 else torch.randn(R, 2, C)[:, 0]   # strided
    a = torch.randn(R, C) if add else None
    pm, qm = (torch.randn(*lead, R, C) if flag else None for flag in (pre, post))
    t = v + a if add else v
    t = torch.where(pm > 0, t, 0.0) if pre else t
    expected = torch.autograd.grad(y, u, t)[0]
    expected = torch.where(qm > 0, expected, 0.0) if post else expected
    with torch.no_grad():
        g = u.unflatten(-1, (G, -1))
        mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + 1e-5)
        xh = ((g - mean) * rstd).flatten(-2)
        out = torch.empty(*lead, R, 3, C)[..., 1, :]
        got = kernels.gn_backward(v, xh, rstd.squeeze(-1), w, add=a, pre_mask=pm, post_mask=qm, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("gating", [True, "sigmoid", False])
def test_kernel_f_with_a_modality_mask_equals_torch_ops(batched, gating, monkeypatch, calls):
    """A modality mask (issue 13): the kernels compute every block, then the absent modalities' parts of the new
    state are zeroed in place (exact zeros, as torch.where), and the gate counts each row's present modalities."""
    monkeypatch.setattr(fusion_map, "BATCHED_MAX", 1 << 30 if batched else 0)
    m = perturbed([16] * 3, 16, 4, gating=gating)
    xs = inputs([16] * 3, batch=9)
    present = torch.tensor([[True, False, False], [False, True, True], [True, True, True]]).repeat(3, 1)
    z = torch.randn(9, m.state_width)
    with torch.no_grad():
        with kernels.torch_ops():
            plain = m.layer(z, m.inject(xs, present))
        assert calls[0] == 0
        got = m.layer(z, m.inject(xs, present))
    assert calls[0] == (2 if batched else 6) + 1
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    absent = ~torch.cat([present, present.new_ones(9, 1)], 1)[:, :, None].expand(-1, -1, 16).reshape(9, -1)
    assert (got[absent] == 0).all() and (got[~absent] != 0).any()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_torch_ops_switches_the_kernels_off_within_it(calls):
    from deqfusion_core import vjp
    m = perturbed([8] * 2, 8, 2)
    xs = inputs([8] * 2, batch=5)
    z = torch.randn(5, m.state_width)
    with torch.no_grad():
        with kernels.torch_ops():
            plain = m.layer(z, m.inject(xs))
            assert calls[0] == 0 and vjp.tape_for(m, z, m.inject(xs)) is None
        fused = m.layer(z, m.inject(xs))
        assert calls[0] > 0 and vjp.tape_for(m, z, m.inject(xs)) is not None
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
