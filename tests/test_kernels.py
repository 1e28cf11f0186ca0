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
def test_gn_fused_is_its_formula_on_strided_views(kw):
    torch.manual_seed(1)
    R, C, G = 11, 24, 3
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
                               bias3=b3 if kw.get("tail") else None, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
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
