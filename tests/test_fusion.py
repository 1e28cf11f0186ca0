"""DEQFusion: fixed points, implicit gradients, ablations, Jacobian term, warm starts, round trips."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion

DIMS = [6, 8, 5]


def model(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(dim=8, num_groups=2, f_max_iter=300, f_tol=1e-13, b_max_iter=300, b_tol=1e-13, jac_samples=0)
    opts.update(kw)
    return make_contractive(DEQFusion(DIMS, **opts)).to(dtype)


def grads(m, xs, loss_fn=lambda fused: (fused.sin() * torch.arange(fused.shape[1])).sum()):
    m.zero_grad()
    for x in xs:
        x.grad = None
    out = m(xs)
    loss_fn(out.fused).backward()
    return out, [p.grad.clone() for p in m.parameters()] + [x.grad.clone() for x in xs]


def rel_err(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def test_output_is_a_fixed_point():
    # history 6: with the default 5, one sample's Anderson trajectory stalls near 1e-3 or converges at step ~156
    # depending on rounding-level differences in f (fused vs unfused additions)
    m = model(torch.float64, f_tol=1e-9, f_max_iter=200, solver_options={"m": 6})
    xs = inputs(DIMS, batch=5, dtype=torch.float64)
    out = m(xs)
    assert out.fused.shape == (5, 8)
    assert out.stats.converged and out.stats.nstep < 200
    z = out.stats.state
    fz = m.layer(z, m.inject(xs))  # recompute f(z*) independently of the solver
    rel = ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()
    assert rel <= 1e-9
    torch.testing.assert_close(out.fused, z.view(5, 4, 8)[:, -1])


def test_implicit_gradient_matches_unrolled_autograd_float64():
    m = model()
    xs = inputs(DIMS, dtype=torch.float64, requires_grad=True)
    out, g_implicit = grads(m, xs)
    assert out.stats.converged and out.stats.backward.converged
    m.backward = "unrolled"
    _, g_unrolled = grads(m, xs)
    assert rel_err(g_implicit, g_unrolled) <= 1e-5


def test_implicit_gradient_matches_finite_differences():
    m = model()
    m.train()
    xs = inputs([6, 8, 5], batch=2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: m([a, b, c]).fused, tuple(xs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["phantom", "onestep"])
def test_cheap_gradients_point_the_same_way(mode):
    m = model()
    xs = inputs(DIMS, dtype=torch.float64, requires_grad=True)
    _, g_implicit = grads(m, xs)
    m.backward = mode
    m.phantom_steps = 10
    _, g_cheap = grads(m, xs)
    a, b = torch.cat([t.flatten() for t in g_cheap]), torch.cat([t.flatten() for t in g_implicit])
    assert F.cosine_similarity(a, b, dim=0) > 0.9
    assert rel_err(g_cheap, g_implicit) > 1e-8  # really a different gradient


def test_no_hooks_or_graph_left_behind():
    m = model(torch.float32, f_tol=1e-4, f_max_iter=50, b_tol=1e-4, b_max_iter=50)
    xs = inputs(DIMS, requires_grad=True)
    out = m(xs)
    out.fused.sum().backward()
    assert out.stats.backward is not None and out.stats.backward.nstep >= 1
    assert all(not mod._backward_hooks and not mod._forward_hooks for mod in m.modules())


def test_ablation_weighted_sum_baseline():
    m = model(torch.float32, equilibrium=False, num_layers=0)
    xs = inputs(DIMS)
    x_proj = [p(x) for p, x in zip(m.proj, xs)]
    torch.testing.assert_close(m(xs).fused, sum(w * x for w, x in zip(m.weights, x_proj)) + m.bias)


def test_ablation_no_equilibrium_no_blocks_is_weighted_sum_plus_one_fuse_step():
    m = model(torch.float32, equilibrium=False, num_layers=1, modality_blocks=False)
    xs = inputs(DIMS)
    x_proj = [p(x) for p, x in zip(m.proj, xs)]
    x_fuse = sum(w * x for w, x in zip(m.weights, x_proj)) + m.bias
    # from z = 0 the purified features are zero, so one step of f_fuse is GN(ReLU(b_fuse + x_fuse))
    expected = m.fusion.gn(F.relu(m.fusion.fuse.bias + x_fuse))
    torch.testing.assert_close(m(xs).fused, expected)


def test_ablation_no_blocks_no_fuse_is_the_plain_sum():
    m = model(torch.float32, modality_blocks=False, fuse_block=False, f_tol=1e-6)
    xs = inputs(DIMS)
    out = m(xs)
    torch.testing.assert_close(out.fused, sum(p(x) for p, x in zip(m.proj, xs)))
    assert out.stats.converged


def test_ablation_no_gating_sums_modality_states():
    m = model(torch.float32, gating=False, f_tol=1e-6, f_max_iter=200)
    xs = inputs(DIMS)
    out = m(xs)
    z = out.stats.state.view(4, 4, 8)
    x_proj = [p(x) for p, x in zip(m.proj, xs)]
    x_fuse = sum(w * x for w, x in zip(m.weights, x_proj)) + m.bias
    expected = m.fusion.gn(F.relu(m.fusion.fuse(z[:, :3].sum(1)) + x_fuse))
    torch.testing.assert_close(out.fused, expected, atol=1e-4, rtol=1e-4)


def test_shared_gate_shortcut_equals_per_modality_gates():
    m = model(torch.float32)
    g = torch.Generator().manual_seed(3)
    z_fuse, zs, x_fuse = torch.randn(4, 8, generator=g), [torch.randn(4, 8, generator=g) for _ in range(3)], torch.randn(4, 8, generator=g)
    fb = m.fusion
    explicit = fb.gn(F.relu(fb.fuse(sum(fb.gate(z_fuse + z) * z_fuse for z in zs)) + x_fuse))
    torch.testing.assert_close(fb(z_fuse, zs, x_fuse), explicit)


def test_sigmoid_gate_is_sigma_of_eq9_per_modality_and_bounded():
    m = model(torch.float32, gating="sigmoid", track_gates=True)
    g = torch.Generator().manual_seed(3)
    z_fuse, zs, x_fuse = torch.randn(4, 8, generator=g), [torch.randn(4, 8, generator=g) for _ in range(3)], torch.randn(4, 8, generator=g)
    fb = m.fusion
    explicit = fb.gn(F.relu(fb.fuse(sum(torch.sigmoid(fb.gate(z_fuse + z)) * z_fuse for z in zs)) + x_fuse))
    torch.testing.assert_close(fb(z_fuse, zs, x_fuse), explicit)
    torch.testing.assert_close(fb(z_fuse, torch.stack(zs), x_fuse), explicit)
    gates = m(inputs(DIMS)).stats.gates
    assert ((gates > 0) & (gates < 1)).all()


def test_sigmoid_gate_implicit_gradient_matches_finite_differences():
    m = model(gating="sigmoid").train()
    xs = inputs([6, 8, 5], batch=2, dtype=torch.float64, requires_grad=True)
    out = m(xs)
    assert out.stats.converged
    assert torch.autograd.gradcheck(lambda a, b, c: m([a, b, c]).fused, tuple(xs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", ["tanh", 1, None])
def test_bad_gating_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="gating"):
        DEQFusion(DIMS, dim=8, gating=bad)


@pytest.mark.parametrize("shape", [(7, 12), (5, 12, 3)])
def test_group_norm_equals_torch_group_norm_forward_and_backward(shape):
    from deqfusion_core.fusion_map import GroupNorm

    torch.manual_seed(0)
    ours, theirs = GroupNorm(4, 12).double(), torch.nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for m in (ours, theirs):
        y = m(x)
        grads.append((y, *torch.autograd.grad(y, [x, *m.parameters()], v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_gate_tracking_records_per_modality_means():
    m = model(torch.float32, track_gates=True, f_tol=1e-4, f_max_iter=40)
    out = m(inputs(DIMS))
    assert out.stats.gates.shape == (out.stats.nstep, 3)
    fb, z = m.fusion, out.stats.state.view(4, 4, 8)
    assert torch.isfinite(out.stats.gates).all()


def test_attached_jacobian_term_equals_adding_it_by_hand():
    a = model(torch.float64, jac_samples=2, jac_weight=0.7)
    b = copy.deepcopy(a)
    b.jac_weight = 0.0
    xs = inputs(DIMS, dtype=torch.float64)
    a.train(), b.train()
    torch.manual_seed(5)
    out_a = a(xs)
    (out_a.fused ** 2).sum().backward()
    torch.manual_seed(5)
    out_b = b(xs)
    ((out_b.fused ** 2).sum() + 0.7 * out_b.jac_loss).backward()
    assert out_a.jac_loss.item() > 0
    torch.testing.assert_close(out_a.jac_loss, out_b.jac_loss)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    # and the term really changes the gradients
    c = copy.deepcopy(b)
    c.zero_grad()
    torch.manual_seed(5)
    (c(xs).fused ** 2).sum().backward()
    assert any(not torch.allclose(pa.grad, pc.grad) for pa, pc in zip(a.parameters(), c.parameters()))


def test_jacobian_term_zero_in_eval_and_when_disabled():
    m = model(torch.float32, jac_samples=1, f_tol=1e-4, f_max_iter=50)
    xs = inputs(DIMS)
    assert m.train()(xs).jac_loss.item() > 0
    assert m.eval()(xs).jac_loss.item() == 0
    m.train().jac_samples = 0
    assert m(xs).jac_loss.item() == 0


@pytest.mark.parametrize("mode", ["implicit", "phantom", "onestep", "unrolled"])
def test_jacobian_term_is_taken_at_the_returned_state_in_every_mode(mode):
    from deqfusion_core import jacobian_loss

    m = model(torch.float64, backward=mode, jac_samples=2, f_tol=1e-8, f_max_iter=200).train()
    xs = inputs(DIMS, dtype=torch.float64)
    torch.manual_seed(3)
    out = m(xs)
    z = out.stats.state.clone().requires_grad_()
    torch.manual_seed(3)
    expected = jacobian_loss(m.layer(z, m.inject(xs)), z, 2)
    assert out.jac_loss.item() > 0 and out.jac_loss.requires_grad
    torch.testing.assert_close(out.jac_loss, expected, rtol=0, atol=0)


def test_hutchinson_estimates_frobenius_norm():
    from deqfusion_core import jacobian_loss

    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    est = jacobian_loss(z @ A.T, z, samples=4000, create_graph=False)
    exact = 3 * A.pow(2).sum() / z.numel()
    assert abs(est.item() - exact.item()) / exact.item() < 0.05


def test_warm_start_takes_fewer_steps_and_same_answer():
    m = model(torch.float32, f_tol=1e-5, f_max_iter=100, b_tol=1e-5, b_max_iter=100)
    xs = inputs(DIMS, requires_grad=True)
    w = torch.randn(m.dim, generator=torch.Generator().manual_seed(1))  # sum(GroupNorm) alone has no gradient
    cold = m(xs)
    (cold.fused @ w).sum().backward()
    warm = m(xs, warm_start=cold.stats)
    (warm.fused @ w).sum().backward()
    assert warm.stats.nstep < cold.stats.nstep
    assert warm.stats.backward.nstep < cold.stats.backward.nstep
    torch.testing.assert_close(warm.fused, cold.fused, atol=1e-4, rtol=1e-4)
    again = m(xs, z0=cold.stats.state)
    assert again.stats.nstep < cold.stats.nstep


def test_warm_start_extrapolates_along_the_last_step_when_parameters_move_smoothly():
    m = model(torch.float64, solver="fixed_point", f_tol=1e-10, f_max_iter=200, jac_samples=0)
    xs = inputs(DIMS, dtype=torch.float64)
    direction = [1e-3 * torch.randn_like(p) for p in m.parameters()]

    def step():  # the parameters move along a line, as small optimizer steps nearly do
        with torch.no_grad():
            for p, d in zip(m.parameters(), direction):
                p.add_(d)

    s0 = m(xs).stats
    step()
    s1 = m(xs, warm_start=s0).stats          # s0 was cold: a plain warm start, which s1 records
    assert s1.converged and s1.previous_state is s0.state
    step()
    extrapolated = m(xs, warm_start=s1)
    m.extrapolate_warm_start = False
    plain = m(xs, warm_start=s1)
    assert extrapolated.stats.converged and plain.stats.converged
    assert extrapolated.stats.nstep < plain.stats.nstep
    torch.testing.assert_close(extrapolated.fused, plain.fused, atol=1e-8, rtol=1e-8)
    # a warm start whose solve did not converge is neither extrapolated nor extrapolated from
    m.extrapolate_warm_start, m.f_max_iter = True, 2
    capped = m(xs, warm_start=s1).stats
    assert not capped.converged and capped.previous_state is s1.state
    assert m(xs, warm_start=capped).stats.previous_state is None
    assert m._warm_state(capped) is capped.state


def test_nonconvergence_returns_best_iterate_and_says_so():
    m = model(torch.float32, f_max_iter=2, f_tol=1e-12)
    out = m(inputs(DIMS))
    assert not out.stats.converged and out.stats.nstep == 2
    assert "NOT converged" in str(out.stats)
    assert torch.isfinite(out.fused).all()


def test_state_dict_round_trip():
    m = model(torch.float32, f_tol=1e-5, f_max_iter=60)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    n = DEQFusion(DIMS, dim=8, num_groups=2, f_tol=1e-5, f_max_iter=60, jac_samples=0)
    n.load_state_dict(torch.load(buf))
    xs = inputs(DIMS)
    torch.testing.assert_close(m.eval()(xs).fused, n.eval()(xs).fused)


def test_deterministic_under_a_seed_with_dropout_and_jacobian():
    def run():
        torch.manual_seed(0)
        m = DEQFusion(DIMS, dim=8, num_groups=2, dropout=0.3, jac_samples=2, jac_weight=0.5, f_max_iter=20)
        out = m(inputs(DIMS))
        out.fused.sum().backward()
        return out.fused.detach(), [p.grad for p in m.parameters()]

    (a, ga), (b, gb) = run(), run()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_dropout_mask_is_fixed_across_solver_steps():
    torch.manual_seed(0)
    m = make_contractive(DEQFusion(DIMS, dim=8, num_groups=2, dropout=0.5, f_tol=1e-6, f_max_iter=200))
    out = m.train()(inputs(DIMS))
    assert out.stats.converged  # a fresh mask per step would never settle


def test_bfloat16_autocast_runs():
    m = model(torch.float32, f_tol=1e-2, f_max_iter=30, b_tol=1e-2, b_max_iter=30, jac_samples=1, jac_weight=0.1)
    xs = inputs(DIMS, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(xs)
        loss = out.fused.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(out.fused.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_torch_compile_runs_forward_and_backward():
    m = model(torch.float32, f_tol=1e-4, f_max_iter=30, b_tol=1e-4, b_max_iter=30)
    xs = inputs(DIMS, requires_grad=True)
    compiled = torch.compile(m)   # the solver loops are excluded from the graph (torch.compiler.disable)
    out = compiled(xs)
    out.fused.sum().backward()
    g_compiled = [p.grad.clone() for p in m.parameters()]
    ref, g_eager = grads(m, xs, loss_fn=lambda fused: fused.sum())
    torch.testing.assert_close(out.fused, ref.fused, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_forward_backward_matches_cpu():
    m = model(torch.float32, f_tol=1e-6, f_max_iter=100, b_tol=1e-6, b_max_iter=100)
    xs = inputs(DIMS, requires_grad=True)
    _, g_cpu = grads(m, xs)
    mc = copy.deepcopy(m).cuda()
    xc = [x.detach().cuda().requires_grad_() for x in xs]
    _, g_cuda = grads(mc, xc)
    assert rel_err([g.cpu() for g in g_cuda], g_cpu) < 1e-4


def test_backward_shrinks_to_running_samples_and_stays_exact():
    m = model()
    g = torch.Generator().manual_seed(7)
    # samples of very different scales converge at different steps in both solves
    scale = torch.logspace(-1, 1, 16, dtype=torch.float64)[:, None]
    xs = [(torch.randn(16, d, generator=g, dtype=torch.float64) * scale).requires_grad_() for d in DIMS]
    calls = []
    layer = m.layer
    m.layer = lambda z, inj, gm=None: (calls.append(z.shape[0]), layer(z, inj, gm))[1]
    out = m(xs)
    n_forward = len(calls)
    loss = (out.fused.sin() * torch.arange(8)).sum()
    loss.backward()
    rebuilt = calls[n_forward:]
    assert rebuilt and all(b <= 8 for b in rebuilt)    # VJPs moved to graphs of the running samples only
    g_implicit = [p.grad.clone() for p in m.parameters()] + [x.grad.clone() for x in xs]
    del m.layer
    # exact ground truth at the same fixed point: a dense solve with the full Jacobian of f
    # (this model can have several fixed points per sample, so no iteration from zero is used)
    inj = m.inject(xs)
    z = out.stats.state.clone().requires_grad_()
    J = torch.autograd.functional.jacobian(lambda s: m.layer(s, inj), z).reshape(z.numel(), z.numel())
    fz = m.layer(z, inj)
    dl = torch.autograd.grad((fz.view(16, 4, 8)[:, -1].sin() * torch.arange(8)).sum(), fz, retain_graph=True)[0]
    g = torch.linalg.solve((torch.eye(z.numel(), dtype=J.dtype) - J).T, dl.flatten()).view_as(fz)
    g_unrolled = list(torch.autograd.grad(fz, list(m.parameters()) + xs, g))
    assert rel_err(g_implicit, g_unrolled) <= 1e-5


@pytest.mark.parametrize("kw", [dict(gating=False), dict(fuse_block=False)])
def test_gate_tracking_without_gates_records_none(kw):
    m = model(torch.float32, track_gates=True, f_tol=1e-4, f_max_iter=40, **kw)
    assert m(inputs(DIMS)).stats.gates is None


def test_solver_settings_are_one_config_each_and_reach_the_solves():
    m = model(torch.float64, f_tol=1e-6, f_max_iter=50, b_tol=1e-7, b_max_iter=40)
    assert (m.forward_solve.tol, m.forward_solve.max_iter, m.backward_solve.tol, m.backward_solve.stop) == \
        (1e-6, 50, 1e-7, "rel")
    m.solver, m.b_solver, m.f_max_iter, m.b_max_iter = "fixed_point", "broyden", 3, 2
    xs = inputs(DIMS, dtype=torch.float64, requires_grad=True)
    out = m(xs)
    assert out.stats.backward is None                  # the backward has not run yet
    (out.fused.sin() * torch.arange(8)).sum().backward()
    assert (out.stats.solver, out.stats.nstep, out.stats.backward.solver, out.stats.backward.nstep) == \
        ("fixed_point", 3, "broyden", 2)
    assert out.stats.backward_state.shape == out.stats.state.shape


def test_unrolled_mode_reports_its_last_step():
    m = model(torch.float64, backward="unrolled", f_tol=1e-6, f_max_iter=200, track_gates=True)
    xs = inputs(DIMS, dtype=torch.float64)
    out = m.train()(xs)
    st = out.stats
    inj = m.inject(xs)
    # the output is f of the last iterate: recompute the chain independently
    z = torch.zeros(4, m.state_width, dtype=torch.float64)
    residuals = []
    for _ in range(st.nstep):
        fz = m.layer(z, inj)
        residuals.append(((fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-8)))
        z = fz
    torch.testing.assert_close(out.fused, z.view(4, 4, 8)[:, -1], rtol=0, atol=0)
    assert st.converged and (residuals[-1] <= 1e-6).all() and (residuals[-2] > 1e-6).any()
    torch.testing.assert_close(st.rel_residuals, residuals[-1], rtol=0, atol=0)
    torch.testing.assert_close(st.trace_tensor, torch.stack([r.max() for r in residuals]), rtol=0, atol=0)
    assert st.gates.shape == (st.nstep, 3)


def test_a_registered_backward_mode_is_used_by_name():
    from deqfusion_core.gradients import GRADIENTS, OneStep, register_gradient

    @register_gradient("test_scaled_onestep")
    class Scaled(OneStep):   # the one-step gradient, doubled: a mode that is easy to tell apart
        def attach(self, m, res, inj, warm, jac_needed):
            eq = super().attach(m, res, inj, warm, jac_needed)
            return eq._replace(z=torch.lerp(eq.z.detach(), eq.z, 2.0))

    try:
        m = model(backward="onestep")
        xs = inputs(DIMS, dtype=torch.float64, requires_grad=True)
        _, g_one = grads(m, xs)
        m.backward = "test_scaled_onestep"
        out, g_scaled = grads(m, xs)
        for a, b in zip(g_scaled, g_one):
            torch.testing.assert_close(a, 2 * b)
    finally:
        del GRADIENTS["test_scaled_onestep"]
    with pytest.raises(ValueError, match="backward: expected one of .*'implicit'"):
        model(backward="test_scaled_onestep")


def test_gate_tracking_in_unrolled_mode():
    m = model(torch.float32, track_gates=True, equilibrium=False, num_layers=3)
    assert m(inputs(DIMS)).stats.gates.shape == (3, 3)


def reference_f(m, z, xs):
    """f (Eq. 7-12) written plainly with torch's own group norm, module by module: the reference for the fused f."""
    gn = lambda t, g: F.group_norm(t, g.num_groups, g.weight, g.bias, g.eps)
    n, d = m.num_modalities, m.dim
    zs = z.view(z.shape[0], n + 1, d).unbind(1)
    new = []
    for blk, zi, xi in zip(m.blocks, zs, xs):
        h = F.relu(gn(blk.lin1(zi), blk.gn1))
        new.append(gn(F.relu(gn(blk.lin2(h) + xi, blk.gn2) + zi), blk.gn3))
    x_fuse = sum(w * x for w, x in zip(m.weights, xs)) + m.bias
    purified = sum(zs[n] * m.fusion.gate(zs[n] + fi) for fi in new)
    fused = gn(F.relu(m.fusion.fuse(purified) + x_fuse), m.fusion.gn)
    return torch.stack([*new, fused], 1).view(z.shape[0], -1)


@pytest.mark.parametrize("batched", [True, False])
def test_fused_f_equals_f_written_plainly_forward_and_backward(batched, monkeypatch):
    from deqfusion_core import fusion_map

    # batched: the N blocks as [N, b, d] ops; else one matrix product per modality (large shapes)
    monkeypatch.setattr(fusion_map, "BATCHED_MAX", 1 << 30 if batched else 0)
    torch.manual_seed(0)
    m = DEQFusion([8, 8, 8], dim=8, num_groups=2).double()
    with torch.no_grad():
        for p in m.parameters():     # not the initial GroupNorm affine (ones, zeros) nor equal x_fuse weights
            p.add_(0.3 * torch.randn_like(p))
    xs = inputs([8, 8, 8], batch=5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, m.state_width, dtype=torch.float64, requires_grad=True)
    f = m.layer(z, m.inject(xs))
    expected = reference_f(m, z, xs)
    torch.testing.assert_close(f, expected)
    with torch.no_grad():       # the solvers' path: the parts written into one state
        torch.testing.assert_close(m.layer(z, m.inject(xs)), expected)
    v = torch.randn_like(f)
    wrt = [z, *xs, *m.parameters()]
    for a, b in zip(torch.autograd.grad(f, wrt, v), torch.autograd.grad(expected, wrt, v)):
        torch.testing.assert_close(a, b)
