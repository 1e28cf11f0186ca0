"""The GPU path (issue 14, item 2): the stopping test every k steps (``check_every``), fixed shapes instead of
compaction (``compact=False``) and a compiled f (``compile_f``). Their logic is device-independent and tested on
the CPU; exactness against the CPU path and the absence of per-step host syncs need CUDA (skipped without it)."""
import copy
import warnings

import pytest
import torch

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion
from deqfusion_core.fusion_map import RowMap
from deqfusion_core.module import _COMPILED
from deqfusion_core.solvers import SOLVERS, solve

DIMS = [6, 8, 5]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def model(dtype=torch.float64, **kw):
    # strongly contractive (scale 0.1): tens of steps, so rounding-level differences between batch compositions
    # (another working set, other kernel blocking) cannot move a solve's stopping step much
    torch.manual_seed(0)
    opts = dict(dim=8, num_groups=2, f_max_iter=200, f_tol=1e-10, b_max_iter=200, b_tol=1e-10, jac_samples=0)
    opts.update(kw)
    return make_contractive(DEQFusion(DIMS, **opts), scale=0.1).to(dtype)


class Counted(RowMap):
    calls = 0

    def __call__(self, z, rows):
        self.calls += 1
        return super().__call__(z, rows)


def grads(m, xs):
    m.zero_grad()
    for x in xs:
        x.grad = None
    out = m(xs)
    (out.fused.sin() * torch.arange(out.fused.shape[1], device=out.fused.device)).sum().backward()
    return out, torch.cat([p.grad.flatten() for p in m.parameters()] + [x.grad.flatten() for x in xs])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("k", [3, 7])
def test_check_every_stops_at_a_multiple_of_k_with_the_same_fixed_point(solver, k):
    m = model().eval()
    xs = inputs(DIMS, batch=6, dtype=torch.float64)
    inj = m.inject(xs)
    z0 = torch.zeros(6, m.state_width, dtype=torch.float64)
    f_every, f_sparse = Counted(m.layer, inj), Counted(m.layer, inj)
    with torch.no_grad():
        every = solve(f_every, z0, solver, max_iter=200, tol=1e-8)
        sparse = solve(f_sparse, z0, solver, max_iter=200, tol=1e-8, check_every=k)
    assert every.converged and sparse.converged and every.nstep < 100
    # the step count is the number of f evaluations; the test runs only at multiples of k: the first one at or
    # after the step where every sample had stopped
    assert (every.nstep, sparse.nstep) == (f_every.calls, f_sparse.calls)
    assert sparse.nstep % k == 0 and every.nstep <= sparse.nstep < every.nstep + k
    assert sparse.rel_residuals.max() <= 1e-8
    torch.testing.assert_close(sparse.z, every.z, atol=1e-6, rtol=0)   # both within 1e-8 of the fixed point


def test_check_every_reports_the_cap_when_the_cap_is_not_a_multiple():
    m = model().eval()
    xs = inputs(DIMS, batch=4, dtype=torch.float64)
    with torch.no_grad():
        res = solve(RowMap(m.layer, m.inject(xs)), torch.zeros(4, m.state_width, dtype=torch.float64), "anderson",
                    max_iter=10, tol=1e-30, check_every=4)
    assert res.nstep == 10 and not res.converged and len(res.trace) == 10


@pytest.mark.parametrize("options", [{"check_every": 4}, {"compact": False}, {"check_every": 5, "compact": False}])
def test_gpu_path_options_give_the_same_gradient_and_count_steps(options):
    m = model()
    xs = inputs(DIMS, batch=6, dtype=torch.float64, requires_grad=True)
    out, g = grads(m, xs)
    fast = copy.deepcopy(m)
    fast.solver_options, fast.b_solver_options = options, options
    out_fast, g_fast = grads(fast, xs)
    assert out.stats.converged and out.stats.backward.converged and out.stats.nstep < 100
    assert out_fast.stats.converged and out_fast.stats.backward.converged
    assert rel(g_fast, g) <= 1e-7
    k = options.get("check_every", 1)
    for mine, theirs in ((out_fast.stats, out.stats), (out_fast.stats.backward, out.stats.backward)):
        assert mine.nstep % k == 0 and theirs.nstep <= mine.nstep < theirs.nstep + k


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_check_every_is_validated_naming_the_argument(bad):
    with pytest.raises(ValueError, match="check_every"):
        DEQFusion(DIMS, dim=8, num_groups=2, solver_options={"check_every": bad})(inputs(DIMS))


def test_compact_and_compile_f_are_validated_naming_the_argument():
    with pytest.raises(ValueError, match="compact"):   # the backward solve runs (and checks it) in backward()
        DEQFusion(DIMS, dim=8, num_groups=2, b_solver_options={"compact": 0})(
            inputs(DIMS, requires_grad=True)).fused.sum().backward()
    with pytest.raises(ValueError, match="compile_f"):
        DEQFusion(DIMS, dim=8, num_groups=2, compile_f="fast")


@pytest.mark.parametrize("norm,train", [(None, False), ("contractive", True)])
def test_compiled_f_gives_eager_gradients(norm, train):
    """compile_f compiles only the tape-free solve; every gradient applies eager f. (Before 834c498 the implicit
    gradient applied the compiled f: in eval it failed on donated buffers, in training its gradients were off by
    2-3% at float64; from then to 0cc6e0e compile_f was refused with gradients.)"""
    kw = dict(f_tol=1e-12, b_tol=1e-12, f_max_iter=300, b_max_iter=300, jac_samples=1, jac_weight=1.0)
    m = model(torch.float64, **kw | ({"norm": norm} if norm else {})).train(train)
    compiled = copy.deepcopy(m)
    compiled.compile_f = "default"
    xs = inputs(DIMS, batch=4, dtype=torch.float64)

    def grads(mod):
        torch.manual_seed(3)                        # the Jacobian term's random vectors alike
        mod.zero_grad()
        out = mod(xs)
        loss = out.fused.sin().sum() + (out.jac_loss if out.jac_loss is not None else 0)
        loss.backward()
        assert out.stats.converged and out.stats.backward.converged
        return [p.grad for p in mod.parameters() if p.requires_grad]
    expected, got = grads(m), grads(compiled)
    assert _COMPILED.get(compiled) is not None      # the compiled f ran (the solve)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# with the norm, Anderson (m=5) stagnates near 8e-3 on one sample, where plain iteration converges (86 steps)
@pytest.mark.parametrize("norm,tol", [(None, 1e-7), ("contractive", 1e-2)])
def test_compiled_f_gives_the_same_fixed_point_in_inference(norm, tol):
    kw = dict(f_tol=tol, f_max_iter=300) | ({"norm": norm} if norm else {})
    m = model(torch.float64, **kw).eval()
    xs = inputs(DIMS, batch=6, dtype=torch.float64)
    compiled = copy.deepcopy(m)
    compiled.compile_f = "default"
    with torch.no_grad():
        out, out_c = m(xs), compiled(xs)
    assert out.stats.converged and out_c.stats.converged
    torch.testing.assert_close(out_c.fused, out.fused, atol=1e-9, rtol=1e-9)


# -- CUDA -----------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("options", [{}, {"check_every": 4, "compact": False}])
def test_cuda_gradients_match_the_cpu_path(options):
    m = model()
    xs = inputs(DIMS, batch=6, dtype=torch.float64, requires_grad=True)
    _, g_cpu = grads(m, xs)
    mc = copy.deepcopy(m).cuda()
    mc.solver_options, mc.b_solver_options = options, options
    xc = [x.detach().cuda().requires_grad_() for x in xs]
    out, g_cuda = grads(mc, xc)
    assert out.stats.converged and out.stats.backward.converged
    assert rel(g_cuda.cpu(), g_cpu) <= 1e-7


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("k", [1, 5])
def test_cuda_solve_waits_for_the_device_once_every_k_steps(k):
    m = model(torch.float32).cuda().eval()
    xs = [x.cuda() for x in inputs(DIMS, batch=64)]
    inj = m.inject(xs)
    z0 = torch.zeros(64, m.state_width, device="cuda")
    f = RowMap(m.layer, inj)
    with torch.no_grad():
        solve(f, z0, "anderson", max_iter=20, tol=1e-30, check_every=k)    # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                solve(f, z0, "anderson", max_iter=20, tol=1e-30, check_every=k)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    # the stopping test's one sync per check (20 / k of them), plus the result's converged flag
    assert syncs <= 20 // k + 2, [str(w.message) for w in caught][:5]


@pytest.mark.cuda
@cuda
def test_cuda_graphs_compiled_f_matches_eager():
    m = model(torch.float32, f_tol=1e-5, f_max_iter=60).cuda().eval()
    fixed = {"compact": False, "check_every": 5}
    m.solver_options = fixed
    xs = [x.cuda() for x in inputs(DIMS, batch=8)]
    graphs = copy.deepcopy(m)
    graphs.compile_f = "reduce-overhead"
    with torch.no_grad():
        out = m(xs)
        for _ in range(2):    # the first call records the graphs
            out_c = graphs(xs)
    torch.testing.assert_close(out_c.fused, out.fused, atol=1e-4, rtol=1e-4)