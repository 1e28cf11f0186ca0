"""The convergence options of DEQFusion (issue 10): evaluation cap, spectral radius estimate, stagnation
detection, Jacobian-weight schedule, normalisation of f, fixed-point correction."""
import copy
import warnings

import pytest
import torch

from conftest import inputs, make_contractive
from deqfusion_core import DEQFusion
from deqfusion_core.contraction import NotContractiveWarning, spectral_radius

DIMS = [6, 8, 5]


def model(dtype=torch.float64, seed=0, contractive=True, **kw):
    torch.manual_seed(seed)
    opts = dict(dim=8, num_groups=2, f_max_iter=100, f_tol=1e-10, jac_samples=0)
    opts.update(kw)
    m = DEQFusion(DIMS, **opts)
    return (make_contractive(m) if contractive else m).to(dtype)


def exact_radius(m, z_star, inj):
    """max |eigenvalue| of the exact Jacobian df/dz at z_star, per sample (f acts per sample)."""
    out = []
    for i in range(z_star.shape[0]):
        one = inj.select(torch.tensor([i]))
        J = torch.autograd.functional.jacobian(lambda z: m.layer(z[None], one)[0], z_star[i])
        out.append(torch.linalg.eigvals(J).abs().max())
    return torch.stack(out)


# -- 1. evaluation cap ------------------------------------------------------------------------------------
def test_eval_cap_is_used_in_eval_mode_only_and_reported():
    m = model(f_max_iter=3, f_max_iter_eval=40, f_tol=1e-12)
    xs = inputs(DIMS, dtype=torch.float64)
    train = m.train()(xs)
    assert train.stats.max_iter == 3 and train.stats.nstep == 3
    ev = m.eval()(xs)
    assert ev.stats.max_iter == 40 and 3 < ev.stats.nstep <= 40
    assert ev.stats.rel_residual < train.stats.rel_residual
    m.f_max_iter = 5                       # the training cap can change; the eval cap stays
    assert m.eval()(xs).stats.max_iter == 40 and m.train()(xs).stats.max_iter == 5


def test_eval_cap_default_is_the_larger_of_the_training_cap_and_100():
    m = model(f_max_iter=4, f_tol=1e-12).eval()
    assert m(inputs(DIMS, dtype=torch.float64)).stats.max_iter == 100
    m = model(f_max_iter=150, f_tol=1e-12).eval()
    assert m(inputs(DIMS, dtype=torch.float64)).stats.max_iter == 150
    m = model(f_max_iter=4, f_tol=1e-12).train()
    assert m(inputs(DIMS, dtype=torch.float64)).stats.max_iter == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_eval_cap_is_validated(bad):
    with pytest.raises(ValueError, match="f_max_iter_eval"):
        DEQFusion(DIMS, dim=8, num_groups=2, f_max_iter_eval=bad)


# -- 2. spectral radius -----------------------------------------------------------------------------------
def test_spectral_radius_of_a_linear_map_with_known_eigenvalues():
    g = torch.Generator().manual_seed(0)
    B, L = 3, 12
    radii = torch.tensor([0.5, 0.9, 1.3], dtype=torch.float64)
    # A_b = Q diag(eigs) Q^-1 with a non-orthogonal Q: non-normal, so the norm of A differs from rho
    Q = torch.randn(B, L, L, generator=g, dtype=torch.float64) + 3 * torch.eye(L, dtype=torch.float64)
    eigs = torch.rand(B, L, generator=g, dtype=torch.float64) * 0.4 * radii[:, None]
    eigs[:, 0] = radii
    A = Q @ torch.diag_embed(eigs) @ torch.linalg.inv(Q)
    c = torch.randn(B, L, generator=g, dtype=torch.float64)
    layer = lambda z, inj: torch.bmm(A, z[:, :, None])[:, :, 0] + c
    assert (torch.linalg.matrix_norm(A, ord=2) > radii * 1.2).all()
    est = spectral_radius(layer, torch.zeros(B, L, dtype=torch.float64), None, iters=200,
                          generator=torch.Generator().manual_seed(1))
    assert est.shape == (B,)
    torch.testing.assert_close(est, radii, rtol=0.02, atol=0)


def test_spectral_radius_of_the_fusion_map_matches_its_exact_jacobian():
    m = model(contractive=False, f_max_iter=300, f_tol=1e-12).eval()
    with torch.no_grad():   # larger output gains: rho > 1 on most samples
        for gn in [b.gn3 for b in m.blocks] + [m.fusion.gn]:
            gn.weight.mul_(2.0)
    xs = inputs([6, 8, 5], batch=5, dtype=torch.float64)
    inj = m.inject(xs)
    z = m.solve(torch.zeros(5, m.state_width, dtype=torch.float64), inj).z
    exact = exact_radius(m, z, inj)
    est = spectral_radius(m.layer, z, inj, iters=60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)


def test_spectral_radius_option_reports_and_warns():
    m = model(spectral_radius_iters=30, contractive=True)
    xs = inputs(DIMS, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotContractiveWarning)
        out = m(xs)
    rho = out.stats.spectral_radius
    assert rho.shape == (4,) and (rho > 0).all() and (rho < 1).all()
    d = out.stats.as_dict()
    assert d["spectral_radius_max"] == pytest.approx(float(rho.max()))
    assert d["spectral_radius_median"] == pytest.approx(float(rho.median()))
    assert "spectral radius max" in str(out.stats)
    assert model()(xs).stats.spectral_radius is None and "spectral_radius_max" not in model()(xs).stats.as_dict()
    # scaled-up output gains: not contractive, warned with the value
    hot = model(spectral_radius_iters=30, contractive=False)
    with torch.no_grad():
        for gn in [b.gn3 for b in hot.blocks] + [hot.fusion.gn]:
            gn.weight.mul_(4.0)
    with pytest.warns(NotContractiveWarning, match=r"spectral radius of df/dz estimated at \d"):
        out = hot(xs)
    assert out.stats.spectral_radius_max >= 1


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_spectral_radius_iters_is_validated(bad):
    with pytest.raises(ValueError, match="spectral_radius_iters"):
        DEQFusion(DIMS, dim=8, num_groups=2, spectral_radius_iters=bad)
    with pytest.raises(ValueError, match="iters"):
        spectral_radius(lambda z, inj: z, torch.zeros(2, 3), None, iters=0)


# -- 4. stagnation detection (Anderson) -------------------------------------------------------------------
from deqfusion_core.solvers import anderson  # noqa: E402

A_STAR = torch.tensor([[1.0], [-2.0], [0.5], [3.0]], dtype=torch.float64)


def atan_map(z, rows):
    """f(z) = z - atan(z - a): a contraction (0 <= f' < 1) with fixed point a, on which plain iteration
    converges but Anderson (a secant method in 1-D) cycles from far starts, as Newton does on atan."""
    return z - torch.atan(z - (A_STAR if rows is None else A_STAR[rows]))


def run_atan(x0, **kw):
    with torch.no_grad():
        return anderson(atan_map, torch.full((4, 1), x0, dtype=torch.float64), max_iter=60, tol=1e-10,
                        stop="abs", m=5, **kw)


def test_stagnation_is_detected_and_restart_then_fallback_recovers():
    plain = run_atan(10.0)
    assert not plain.converged and (plain.abs_residuals > 0.5).sum() >= 3   # Anderson cycles
    fixed = run_atan(10.0, stall=5)
    assert fixed.converged and (fixed.abs_residuals <= 1e-10).all()
    torch.testing.assert_close(fixed.z, A_STAR, rtol=0, atol=1e-9)
    assert fixed.restarted == 4 and fixed.fell_back == 4
    assert plain.restarted is None and plain.fell_back is None


def test_restart_alone_recovers_a_stalled_sample():
    plain, fixed = run_atan(20.0), run_atan(20.0, stall=5)
    assert plain.abs_residuals[1] > 1.0 and not plain.converged
    assert fixed.converged and fixed.restarted == 1 and fixed.fell_back == 0
    for i in (0, 2, 3):   # the samples that never stalled: bit-identical
        assert torch.equal(plain.z[i], fixed.z[i]) and torch.equal(plain.abs_residuals[i], fixed.abs_residuals[i])


def test_stagnation_detection_changes_nothing_when_nothing_stalls():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 20, 20, generator=g, dtype=torch.float64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    c = torch.randn(6, 20, generator=g, dtype=torch.float64)
    f = lambda z, rows: torch.bmm(A if rows is None else A[rows], z[:, :, None])[:, :, 0] + (c if rows is None else c[rows])
    z0 = torch.zeros(6, 20, dtype=torch.float64)
    with torch.no_grad():
        plain = anderson(f, z0, max_iter=100, tol=1e-10, m=5)
        watched = anderson(f, z0, max_iter=100, tol=1e-10, m=5, stall=10)
    assert watched.restarted == 0 and watched.fell_back == 0
    assert plain.nstep == watched.nstep and torch.equal(plain.z, watched.z)
    assert torch.equal(plain.rel_residuals, watched.rel_residuals)


@pytest.mark.parametrize("opt", [dict(stall=-1), dict(stall=2.5), dict(stall=5, stall_factor=0.0),
                                 dict(stall=5, stall_factor=1.5), dict(stall=5, stall_damping=0.0)])
def test_stagnation_options_are_validated(opt):
    with pytest.raises(ValueError, match=sorted(opt)[-1] if len(opt) > 1 else "stall"):
        run_atan(1.0, **opt)


def test_stagnation_counts_reach_deqfusion_stats():
    m = model(solver_options={"stall": 5})
    out = m(inputs(DIMS, dtype=torch.float64))
    assert out.stats.converged and out.stats.restarted == 0 and out.stats.fell_back == 0
    assert out.stats.as_dict()["restarted"] == 0
    assert "restarted" not in model()(inputs(DIMS, dtype=torch.float64)).stats.as_dict()


# -- 5. Jacobian-weight schedule --------------------------------------------------------------------------
from deqfusion_core.jacobian import JAC_SCHEDULES, get_jac_schedule  # noqa: E402


def test_jac_schedules():
    assert set(JAC_SCHEDULES) >= {"constant", "linear", "cosine"}
    lin, cos = get_jac_schedule("linear"), get_jac_schedule("cosine")
    assert [lin(1.0, 5.0, s, 4) for s in (0, 1, 2, 4, 9)] == [1.0, 2.0, 3.0, 5.0, 5.0]
    assert cos(1.0, 5.0, 0, 4) == 1.0 and cos(1.0, 5.0, 2, 4) == pytest.approx(3.0) and cos(1.0, 5.0, 7, 4) == 5.0
    assert get_jac_schedule("constant")(2.0, 9.0, 3, 4) == 2.0
    with pytest.raises(ValueError, match="jac_schedule: unknown schedule 'step'"):
        get_jac_schedule("step")


def test_deqfusion_counts_training_forwards_and_attaches_the_scheduled_weight():
    m = model(jac_samples=1, jac_weight=1.0, jac_schedule="linear", jac_weight_final=3.0, jac_schedule_steps=2,
              f_tol=1e-8)
    xs = inputs(DIMS, dtype=torch.float64)
    assert m.current_jac_weight == 1.0
    weights = []
    for _ in range(4):
        m.train()
        torch.manual_seed(5)            # the same Hutchinson probe in both backwards
        out = m(xs)
        weights.append(m.current_jac_weight)
        m.zero_grad()
        out.fused.sum().backward()       # the scheduled term rides along
        attached = [p.grad.clone() for p in m.parameters()]
        torch.manual_seed(5)
        m.jac_schedule, m.jac_weight = "constant", 0.0   # the same forward, uncounted, nothing attached:
        ref = m(xs)                                      # the term added by hand
        m.jac_schedule, m.jac_weight = "linear", 1.0
        m.zero_grad()
        (ref.fused.sum() + weights[-1] * ref.jac_loss).backward()
        for a, b in zip(attached, [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b)
        m.eval()(xs)                      # eval forwards are not counted
    assert weights == [1.0, 2.0, 3.0, 3.0] and int(m.jac_forwards) == 4
    state = m.state_dict()
    assert int(state["jac_forwards"]) == 4
    fresh = model(jac_samples=1, jac_weight=1.0, jac_schedule="linear", jac_weight_final=3.0, jac_schedule_steps=2)
    fresh.load_state_dict(state)
    assert fresh.current_jac_weight == 3.0
    assert "jac_forwards" not in model().state_dict()       # the default keeps checkpoints as they were


@pytest.mark.parametrize("kw,name", [(dict(jac_schedule="nope"), "jac_schedule"),
                                     (dict(jac_schedule="linear", jac_schedule_steps=3), "jac_weight_final"),
                                     (dict(jac_schedule="linear", jac_weight_final=1.0), "jac_schedule_steps")])
def test_jac_schedule_is_validated(kw, name):
    with pytest.raises(ValueError, match=name):
        DEQFusion(DIMS, dim=8, num_groups=2, **kw)


def test_fusion_adapter_reports_the_scheduled_weight():
    from deqfusion_core.integration import FusionAdapter

    adapter = FusionAdapter(DIMS, 8, {"jac_weight": 2.0, "jac_schedule": "linear", "jac_weight_final": 0.0,
                                      "jac_schedule_steps": 4, "num_groups": 2, "jac_samples": 1})
    assert adapter.jac_weight == 2.0 and adapter.deq.jac_weight == 0.0     # the adapter owns the weight
    make_contractive(adapter.deq)
    xs = inputs(DIMS)
    seen = []
    for _ in range(3):
        adapter.train().fuse(xs)
        seen.append(adapter.current_jac_weight)
    assert seen == [2.0, 1.5, 1.0]


# -- jac_term="diagonal": the Jacobian term's diagonal blocks ------------------------------------------------------
def _exact_blocks(fusion, z, inj):
    """Per sample, the exact Jacobian of f at z [L, L], and its (N+1) x (N+1) blocks' squared Frobenius norms."""
    n, d = fusion.num_modalities + 1, fusion.dim
    out = []
    for b in range(z.shape[0]):
        sel = inj.select(torch.tensor([b]))
        jac = torch.autograd.functional.jacobian(lambda v: fusion.layer(v.unsqueeze(0), sel)[0], z[b])
        out.append(jac.view(n, d, n, d).permute(0, 2, 1, 3).pow(2).sum((-1, -2)))
    return torch.stack(out)          # [B, N+1 (rows), N+1 (columns)]


def test_diagonal_jacobian_term_estimates_the_diagonal_blocks_only():
    from deqfusion_core import DEQFusion
    from deqfusion_core.jacobian import jacobian_loss

    torch.manual_seed(0)
    fusion = DEQFusion([6, 6, 6], 8, num_groups=2).double()
    xs = [torch.randn(3, 6, dtype=torch.float64) for _ in range(3)]
    inj = fusion.inject(xs)
    z = torch.randn(3, fusion.state_width, dtype=torch.float64)
    blocks = _exact_blocks(fusion, z, inj)
    # f_i reads z_i only: the blocks above the diagonal and between modalities are zero
    assert torch.all(blocks[:, :3, :].sum(-1) - torch.diagonal(blocks[:, :3, :3], dim1=1, dim2=2) < 1e-20)
    diagonal = torch.diagonal(blocks, dim1=1, dim2=2).sum() / z.numel()
    full = blocks.sum() / z.numel()
    assert blocks[:, 3, :3].sum() > 1e-3 * blocks.sum()         # the cross-modal blocks are not zero
    zz = z.clone().requires_grad_()
    fz = fusion.layer(zz, inj)
    torch.manual_seed(1)
    est_diag = jacobian_loss(fz, zz, samples=4000, create_graph=False, blocks=4)
    est_full = jacobian_loss(fz, zz, samples=4000, create_graph=False)
    assert abs(est_diag / diagonal - 1) < 0.05, (float(est_diag), float(diagonal))
    assert abs(est_full / full - 1) < 0.05, (float(est_full), float(full))


def test_diagonal_jacobian_term_option_is_validated_and_used():
    from deqfusion_core import DEQFusion
    from deqfusion_core.jacobian import jacobian_loss

    with pytest.raises(ValueError, match="jac_term"):
        DEQFusion([4, 4], 4, num_groups=2, jac_term="offdiagonal")
    torch.manual_seed(0)
    fusion = DEQFusion([8, 8], 8, num_groups=2, jac_term="diagonal").train()
    xs = [torch.randn(5, 8) for _ in range(2)]
    torch.manual_seed(3)
    out = fusion(xs)
    z = out.stats.state.clone().requires_grad_()
    torch.manual_seed(3)
    expected = jacobian_loss(fusion.layer(z, fusion.inject(xs)), z, 1, blocks=3)
    torch.manual_seed(3)
    full = jacobian_loss(fusion.layer(z, fusion.inject(xs)), z, 1)
    assert torch.allclose(out.jac_loss, expected) and not torch.allclose(out.jac_loss, full)

# -- 6. normalisation of f --------------------------------------------------------------------------------
import io  # noqa: E402

from torch.func import functional_call  # noqa: E402
from torch.nn.utils import parametrizations, parametrize  # noqa: E402

from deqfusion_core.norms import (NORMS, GainBound, apply_norm, is_normalised, loop_group_norms,  # noqa: E402
                                  loop_linears, normalised_once)
from deqfusion_core.solvers import fixed_point  # noqa: E402
from deqfusion_core.fusion_map import RowMap  # noqa: E402

WIDE = [12, 16, 10]


def settle(m, xs):
    """Anderson's z* (rel residuals), the exact spectral radius there, and plain iteration's residuals."""
    m.eval()
    with normalised_once(m):
        with torch.no_grad():
            inj = m.inject(xs)
            z0 = torch.zeros(xs[0].shape[0], m.state_width, dtype=torch.float64)
            star = m.solve(z0, inj)
            plain = fixed_point(RowMap(m.layer, inj), z0, max_iter=300, tol=1e-12)
        return star.rel_residuals, exact_radius(m, star.z, inj), plain.rel_residuals


def test_contractive_norm_makes_f_contractive_where_the_plain_one_is_not():
    torch.manual_seed(2)
    plain = DEQFusion(WIDE, 16, num_groups=2, f_max_iter=300, f_tol=1e-12, jac_samples=0).double()
    with torch.no_grad():                       # larger GroupNorm gains: not contractive at its fixed point
        for gn in loop_group_norms(plain):
            gn.weight.mul_(2.0)
    normed = apply_norm(copy.deepcopy(plain), "contractive")          # the same weights, normalised
    xs = inputs(WIDE, batch=6, dtype=torch.float64)
    star, rho, iterated = settle(plain, xs)
    assert (star < 1e-8).all()                  # Anderson reaches a fixed point ...
    assert rho.max() > 1.05                     # ... where df/dz has an eigenvalue outside the unit circle
    assert iterated.max() > 1e-2                # and plain iteration does not get there
    star, rho, iterated = settle(normed, xs)
    assert (star < 1e-8).all() and rho.max() < 0.95    # measured 0.88
    assert (iterated < 1e-6).all()


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_norms_normalise_f_and_keep_it_trainable(norm):
    m = model(norm=norm, contractive=False, f_max_iter=30, f_tol=1e-6)
    fuse = m.fusion
    linears = [fuse.gate, fuse.fuse] + [b.lin2 for b in m.blocks]
    assert all(is_normalised(layer) for layer in linears)
    assert is_normalised(m.blocks[0].lin1) == (norm != "contractive")
    assert all(is_normalised(gn) for gn in loop_group_norms(m)) == (norm == "contractive")
    assert not any(is_normalised(p) for p in m.proj)     # the injection is left alone
    xs = inputs(DIMS, dtype=torch.float64)
    out = m.train()(xs)
    (out.fused ** 2).sum().backward()
    assert torch.isfinite(out.fused).all()
    grads = [p.grad for n, p in m.named_parameters() if "original" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(m.eval()(xs).fused).all()


def test_a_state_dict_round_trip_with_a_norm():
    xs = inputs(DIMS, dtype=torch.float64)
    for norm in ("spectral", "contractive"):
        m = model(norm=norm, seed=0, contractive=False, f_max_iter=30)
        m.train()(xs)                           # spectral: the power iteration's vectors move in training
        state = m.state_dict()
        assert any("parametrizations" in k for k in state)
        fresh = model(norm=norm, seed=1, contractive=False, f_max_iter=30)
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh.eval()(xs).fused, m.eval()(xs).fused, rtol=0, atol=0)
    keys = set(model(contractive=False).state_dict())   # the default keeps checkpoints as they were
    assert not any("parametrizations" in k for k in keys)
    assert keys == set(DEQFusion(DIMS, dim=8, num_groups=2, norm=None).state_dict())


def torch_parametrized(norm, seed=0):
    """The reference: the same model with the norm as torch's parametrizations (what ``norms`` replaced)."""
    m = model(norm=None, seed=seed, contractive=False, dtype=torch.float32)
    if norm == "weight":
        for layer in loop_linears(m):
            parametrizations.weight_norm(layer)
    elif norm == "spectral":
        for layer in loop_linears(m):
            parametrizations.spectral_norm(layer)
    else:
        for gn in loop_group_norms(m):
            parametrize.register_parametrization(gn, "weight", GainBound(0.25))
        for layer in loop_linears(m, ("lin2", "gate", "fuse")):
            parametrizations.spectral_norm(layer)
    return m.double()


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_norms_compute_what_torchs_parametrizations_computed(norm):
    ours = model(norm=norm, seed=0, contractive=False, dtype=torch.float32).double()
    ref = torch_parametrized(norm, seed=0)
    state, expected = ours.state_dict(), ref.state_dict()
    assert set(state) == set(expected)            # the same names: their checkpoints load
    for k in state:
        torch.testing.assert_close(state[k], expected[k], rtol=0, atol=0)
    xs = inputs(DIMS, dtype=torch.float64)
    for mode in ("train", "train", "train", "eval"):   # spectral: one power iteration per training forward
        getattr(ours, mode)(), getattr(ref, mode)()
        with parametrize.cached():
            ref_out = ref(xs).fused
        torch.testing.assert_close(ours(xs).fused, ref_out, rtol=0, atol=1e-14)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=1e-14)


def test_normalised_weights_keep_their_bounds():
    m = model(norm="contractive", contractive=False, f_max_iter=30)
    with torch.no_grad():                   # raw gains and weights far outside the bounds
        for gn in loop_group_norms(m):
            gn.parametrizations.weight.original.normal_(0, 10)
        for layer in loop_linears(m, ("lin2", "gate", "fuse")):
            layer.parametrizations.weight.original.mul_(50)
        m.blocks[0].lin1.weight.mul_(50)
    xs = inputs(DIMS, dtype=torch.float64)
    for _ in range(3):
        m.train()(xs)
    for gn in loop_group_norms(m):
        assert 0.2 < gn.weight.abs().max() <= 0.25        # tanh saturates to the bound in floating point
    for layer in loop_linears(m, ("lin2", "gate", "fuse")):
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert 1 - 1e-6 < sigma < 1 + 1e-3            # the power iteration's sigma is at most the true one
    assert torch.linalg.matrix_norm(m.blocks[0].lin1.weight.detach(), ord=2) > 10   # lin1 is left alone
    w = model(norm="weight", contractive=False)
    layer = w.fusion.fuse
    g = layer.parametrizations.weight.original0
    torch.testing.assert_close(layer.weight.norm(dim=1, keepdim=True), g.abs())


@pytest.mark.parametrize("norm", [None, *sorted(NORMS)])
def test_a_normed_model_pickles_deep_copies_and_round_trips(norm):
    m = model(norm=norm, seed=0, contractive=False, f_max_iter=30)
    xs = inputs(DIMS, dtype=torch.float64)
    (m.train()(xs).fused ** 2).sum().backward()        # after a training step: buffers moved, grads held
    buf = io.BytesIO()
    torch.save(m, buf)                                  # what MultiBench's train() does with the whole model
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(m)
    fresh = model(norm=norm, seed=1, contractive=False, f_max_iter=30)
    fresh.load_state_dict(m.state_dict())
    expected = m.eval()(xs).fused
    for other in (loaded, copied, fresh):
        assert [type(x) for x in other.modules()] == [type(x) for x in m.modules()]
        torch.testing.assert_close(other.eval()(xs).fused, expected, rtol=0, atol=0)
        (other.train()(xs).fused ** 2).sum().backward()        # and it trains
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in other.parameters()
                   if p.requires_grad and p is not other.bias)
    with torch.no_grad():                               # the copies hold their own parameters
        for p in copied.parameters():
            p.add_(1.0)
    torch.testing.assert_close(m.eval()(xs).fused, expected, rtol=0, atol=0)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_gradient_through_a_normed_fusion_matches_finite_differences(norm):
    m = model(norm=norm, contractive=False, f_max_iter=300, f_tol=1e-13, b_max_iter=300, b_tol=1e-13).eval()
    with torch.no_grad():                   # halved free gains: f contracts, so both solves reach 1e-13
        for gn in loop_group_norms(m):
            if not is_normalised(gn):
                gn.weight.mul_(0.5)
    names = [n for n, _ in m.named_parameters() if "parametrizations" in n]
    raw = [p.detach().clone().requires_grad_() for n, p in m.named_parameters() if n in names]
    xs = inputs(DIMS, batch=2, dtype=torch.float64, requires_grad=True)

    def fused(*args):
        out = functional_call(m, dict(zip(names, args[:len(names)])), (list(args[len(names):]),))
        assert out.stats.rel_residual < 1e-10
        return out.fused
    assert torch.autograd.gradcheck(fused, (*raw, *xs), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("kw,name", [(dict(norm="batch"), "norm: unknown norm 'batch'"),
                                     (dict(norm="contractive", norm_options={"max_gain": 0}), "norm_options"),
                                     (dict(norm="weight", norm_options={"max_gain": 1.0}), "norm_options"),
                                     (dict(norm_options={"max_gain": 1.0}), "norm_options"),
                                     (dict(norm="spectral", norm_options=[1]), "norm_options")])
def test_norm_is_validated(kw, name):
    with pytest.raises(ValueError, match=name):
        DEQFusion(DIMS, dim=8, num_groups=2, **kw)


def test_fusion_options_take_the_norm():
    from deqfusion_core.options import FusionOptions

    m = FusionOptions({"norm": "contractive", "norm_options": {"max_gain": 0.5}}).build(DIMS, 8, num_groups=2)
    assert m.norm == "contractive" and m.blocks[0].gn1.parametrizations.weight[0].max_gain == 0.5


# -- 7. fixed-point correction ----------------------------------------------------------------------------
from deqfusion_core.correction import correction_loss, correction_weights  # noqa: E402
from deqfusion_core.solvers import snapshot_steps  # noqa: E402


def test_correction_gradient_matches_autograd_on_the_trajectory_and_finite_differences():
    m = model(solver="fixed_point", f_max_iter=12, f_tol=1e-300, correction_steps=3).train()
    xs = inputs(DIMS, dtype=torch.float64)
    out = m(xs)
    assert len(out.stats.iterates) == 3 and out.stats.iterates[0].shape == (4, 8)
    target = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss_fn = lambda fused: ((fused - target) ** 2).sum() ** 1.5
    params = [p for p in m.parameters()]
    got = torch.autograd.grad(correction_loss(loss_fn, out.stats.iterates, gamma=0.5), params, allow_unused=True)

    # the same trajectory by hand: plain iteration from zero, kept after the steps [3, 6, 9]
    assert snapshot_steps(12, 3) == [3, 6, 9]
    kept, z = [], torch.zeros(4, m.state_width, dtype=torch.float64)
    with torch.no_grad():
        inj = m.inject(xs)
        for step in range(1, 10):
            if step in (3, 6, 9):
                kept.append(z)
            z = m.layer(z, inj)

    def reference():
        inj = m.inject(xs)
        return sum(w * loss_fn(m.fused(m.layer(zk, inj))) for w, zk in zip([0.25, 0.5, 1.0], kept))
    want = torch.autograd.grad(reference(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    weight = m.blocks[1].lin2.weight
    index = next(i for i, p in enumerate(params) if p is weight)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():                     # central difference along a direction of lin2's weight
        eps, old = 1e-5, weight.clone()
        weight.copy_(old + eps * direction)
        up = reference()
        weight.copy_(old - eps * direction)
        down = reference()
        weight.copy_(old)
    slope = float((got[index] * direction).sum())
    assert abs(slope) > 1e-3 and slope == pytest.approx(float((up - down) / (2 * eps)), rel=1e-6)


def test_correction_keeps_the_result_when_the_solve_stops_early():
    m = model(f_max_iter=60, f_tol=1e-6, correction_steps=3).train()    # kept after steps 15, 30, 45
    out = m(inputs(DIMS, dtype=torch.float64))
    assert 15 <= out.stats.nstep < 30 and out.stats.converged             # measured: 17
    torch.testing.assert_close(out.stats.iterates[-1], out.stats.iterates[-2], rtol=0, atol=0)
    assert not torch.equal(out.stats.iterates[0], out.stats.iterates[1])
    torch.testing.assert_close(out.stats.iterates[-1], m.fused(m.layer(out.stats.state, m.inject(
        inputs(DIMS, dtype=torch.float64)))), rtol=1e-12, atol=1e-12)


def test_correction_steps_zero_changes_nothing():
    xs = inputs(DIMS, dtype=torch.float64)
    results = []
    for steps in (0, 3):
        m = model(f_max_iter=20, f_tol=1e-8, correction_steps=steps).train()
        out = m(xs)
        (out.fused ** 2).sum().backward()
        results.append((out, [p.grad for p in m.parameters()]))
        assert m.eval()(xs).stats.iterates is None             # eval forwards keep none
    (off, g_off), (on, g_on) = results
    assert off.stats.iterates is None and len(on.stats.iterates) == 3
    assert torch.equal(off.fused, on.fused) and off.stats.nstep == on.stats.nstep
    assert torch.equal(off.stats.rel_residuals, on.stats.rel_residuals)
    assert all(torch.equal(a, b) for a, b in zip(g_off, g_on))


def test_correction_with_the_unrolled_backward():
    m = model(backward="unrolled", f_max_iter=10, f_tol=1e-300, correction_steps=2).train()
    out = m(inputs(DIMS, dtype=torch.float64))
    assert len(out.stats.iterates) == 2 and all(t.requires_grad for t in out.stats.iterates)


def test_correction_weights_and_validation():
    assert correction_weights(3, 0.5) == [0.25, 0.5, 1.0]
    x = torch.ones(2, requires_grad=True)
    assert correction_loss(lambda t: t.sum(), [x, 2 * x], gamma=0.5).item() == pytest.approx(0.5 * 2 + 4)
    with pytest.raises(ValueError, match="iterates"):
        correction_loss(lambda t: t.sum(), None)
    with pytest.raises(ValueError, match="gamma"):
        correction_loss(lambda t: t.sum(), [x], gamma=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="correction_steps"):
            DEQFusion(DIMS, dim=8, num_groups=2, correction_steps=bad)
    with pytest.raises(ValueError, match="correction_steps: needs equilibrium"):
        DEQFusion(DIMS, dim=8, num_groups=2, correction_steps=2, equilibrium=False)


def test_norm_none_string_turns_an_integration_default_off():
    from deqfusion_core import DEQFusion
    from deqfusion_core.options import FusionOptions

    fusion = FusionOptions({"norm": "none"}, defaults={"norm": "contractive"}).build([4, 4], 4, num_groups=2)
    plain = DEQFusion([4, 4], 4, num_groups=2)
    assert fusion.norm is None and set(fusion.state_dict()) == set(plain.state_dict())


def test_norm_options_belong_to_the_norm_of_their_layer():
    """A layer that picks another norm without options does not inherit the lower layer's norm_options; the same
    norm keeps them; options given with the new norm are its own."""
    from deqfusion_core.options import FusionOptions

    defaults = {"norm": "contractive", "norm_options": {"max_gain": 0.15}}
    off = FusionOptions({"norm": "none"}, defaults=defaults)
    assert "norm_options" not in off and off.build([4, 4], 4, num_groups=2).norm is None
    same = FusionOptions({"norm": "contractive"}, defaults=defaults)
    assert same["norm_options"] == {"max_gain": 0.15}
    assert FusionOptions(defaults).updated({"norm": "weight"})["norm"] == "weight"
    assert "norm_options" not in FusionOptions(defaults).updated({"norm": "weight"})
    assert FusionOptions(defaults).updated({"f_max_iter": 3})["norm_options"] == {"max_gain": 0.15}
    with pytest.raises(ValueError, match="norm_options"):
        FusionOptions({"norm": "none", "norm_options": {"max_gain": 0.2}}, defaults=defaults).build([4, 4], 4,
                                                                                                   num_groups=2)


def test_bench_problem_warms_up_until_its_forward_solve_converges():
    """contractive_problem (bench and benchmarks/bench_core.py): ten Jacobian-regularised steps leave f
    non-contractive at some rows of the 3 x 64, batch 64 problem (seed 0); the warm-up goes on until the
    fusion's forward solve reaches 1e-6 within 105 steps and plain fixed-point iteration within 200 (bench_core's
    fixed-point configurations and ground truth iterate f itself: where only Anderson converged, they diverged),
    checked here through the module's own forward with each solver."""
    from deqfusion_core.bench import contractive_problem, forward_converges, problem_converges

    fixed = contractive_problem(64, (64, 64, 64), 64, seed=0, max_warmup_steps=10)
    assert fixed.warmup_steps == 10 and fixed.converged is None
    assert not forward_converges(fixed.fusion, fixed.xs) and not problem_converges(fixed.fusion, fixed.xs)
    p = contractive_problem(64, (64, 64, 64), 64, seed=0)
    assert p.converged and 10 < p.warmup_steps < 100
    for solver, cap in (("anderson", 105), ("fixed_point", 200)):
        p.fusion.solver, p.fusion.f_tol, p.fusion.f_max_iter = solver, 1e-6, cap
        with torch.no_grad():
            stats = p.fusion(p.xs).stats
        assert stats.converged and stats.rel_residuals.max() <= 1e-6 and stats.nstep < cap, solver


def test_bench_problem_check_asks_plain_iteration_too():
    """Anderson converges at rows where f does not contract and iterating f diverges: the warm-up's check asks
    both. A planted f (one row scaled by 3 about its fixed point) passes the Anderson check and fails the other."""
    from deqfusion_core import bench

    p = bench.contractive_problem(16, (8, 8), 8, seed=0, warmup_steps=0, max_warmup_steps=0, num_groups=2)
    layer = p.fusion.layer

    def expanding(z, inj, *a, **k):   # f(z) = z* + 3 (z - z*) on row 0 (z* = 1): a fixed point Anderson finds
        out = layer(z, inj, *a, **k).clone()
        out[0] = 1 + 3 * (z[0] - 1)
        return out

    p.fusion.layer = expanding
    assert bench.forward_converges(p.fusion, p.xs, max_iter=200)
    assert not bench.forward_converges(p.fusion, p.xs, max_iter=200, solver="fixed_point")
    assert not bench.problem_converges(p.fusion, p.xs)


def test_bench_core_records_a_diverging_configuration_and_goes_on():
    """benchmarks/bench_core.py: a configuration whose solve diverges (DEQConvergenceError) becomes a row saying so;
    the summary names it and picks the fastest among the others (before, the first divergence ended the run)."""
    import importlib.util
    import types
    from pathlib import Path

    from deqfusion_core.bench import contractive_problem

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"
    spec = importlib.util.spec_from_file_location("bench_core", path)
    bench_core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_core)
    p = contractive_problem(16, (8, 8), 8, seed=0, warmup_steps=0, max_warmup_steps=0, num_groups=2)
    layer = p.fusion.layer
    p.fusion.layer = lambda z, inj, *a, **k: 1 + 3 * (layer(z, inj, *a, **k) * 0 + z - 1)   # iterating it diverges
    p.fusion.solver, p.fusion.f_max_iter, p.fusion.f_tol = "fixed_point", 200, 1e-6
    row = bench_core.ours_steps(types.SimpleNamespace(repeats=2), p.fusion, p.xs, p.head, p.labels)
    assert set(row) == {"failed"} and "non-finite residual" in row["failed"]
    ok = {"step_s": 1.0, "grad_rel_err": 1e-4}
    out = bench_core.summary({"train_step": {"deqfusion fixed_point f 1e-06 b 1e-05": row,
                                             "deqfusion anderson f 1e-06 b 1e-05": ok,
                                             "reference f 1e-06 b 1e-05": {**ok, "step_s": 5.0}}})
    assert out["failed: deqfusion fixed_point f 1e-06 b 1e-05"] == row["failed"]
    assert "5.0x faster" in out["train step at grad error <= 0.001"]
