"""Missing modalities (issue 13): ``fusion(xs, present=mask)``, ``xs[i] = None`` and ``modality_dropout``.

The reference for "an absent modality takes no part" is a DEQFusion built without it: the same parameters for the
present modalities and the fuse block, with w_i scaled by N / N_p (our x_fuse renormalisation, fusion_map.py).
"""
import pytest
import torch

from conftest import central_difference, inputs, make_contractive
from deqfusion_core import DEQFusion

DIMS = [6, 8, 5]
TIGHT = dict(f_max_iter=300, f_tol=1e-13, b_max_iter=300, b_tol=1e-13)
MODES = ["implicit", "phantom", "onestep", "unrolled", "weight_tied"]
# per sample: all present; modality 2 absent; only modality 1; only modality 0
MASK = torch.tensor([[True, True, True], [True, True, False], [False, True, False], [True, False, False]])


def model(dtype=torch.float64, seed=0, dims=DIMS, **kw):
    torch.manual_seed(seed)
    opts = dict(dim=8, num_groups=2, jac_samples=0, **TIGHT)
    opts.update(kw)
    return make_contractive(DEQFusion(dims, **opts)).to(dtype)


def mode_kw(mode):
    return dict(equilibrium=False, num_layers=4) if mode == "weight_tied" else dict(backward=mode)


def reduced(m, keep, **kw):
    """The DEQFusion over the modalities ``keep`` alone, with m's parameters (w_i scaled by N / N_p)."""
    r = model(m.weights.dtype, dims=[m.input_dims[i] for i in keep], **kw)
    state = {}
    for k, v in m.state_dict().items():
        head, _, rest = k.partition(".")
        if head in ("proj", "blocks"):
            i, _, tail = rest.partition(".")
            if int(i) in keep:
                state[f"{head}.{keep.index(int(i))}.{tail}"] = v
        elif k == "weights":
            state[k] = v[keep] * (m.num_modalities / len(keep))
        else:
            state[k] = v
    r.load_state_dict(state)
    return r


def poisoned(xs, present, value=float("nan")):
    """xs with ``value`` in every absent entry."""
    return [torch.where(present[:, i, None], x.detach(), value).requires_grad_(x.requires_grad)
            for i, x in enumerate(xs)]


def loss_of(fused):
    return (fused.sin() * torch.arange(1, fused.shape[1] + 1, dtype=fused.dtype)).sum()


def run(m, xs, **kw):
    """Output, parameter gradients (None where none reached) and input gradients of one forward + backward."""
    m.zero_grad(set_to_none=True)
    for x in xs:
        if x is not None:
            x.grad = None
    out = m(xs, **kw)
    loss_of(out.fused).backward()
    return (out, {k: (None if p.grad is None else p.grad.clone()) for k, p in m.named_parameters()},
            [None if x is None else x.grad.clone() for x in xs])


@pytest.mark.parametrize("mode", MODES)
def test_each_sample_equals_the_model_without_its_absent_modalities(mode):
    m = model(**mode_kw(mode)).train()
    xs = inputs(DIMS, batch=4, dtype=torch.float64)
    out = m(xs, present=MASK)
    assert out.stats.converged or mode == "weight_tied"
    for row, keep in [(0, [0, 1, 2]), (1, [0, 1]), (2, [1]), (3, [0])]:
        r = reduced(m, keep, **mode_kw(mode)).train()
        ref = r([xs[i][row:row + 1] for i in keep]).fused
        torch.testing.assert_close(out.fused[row:row + 1], ref, rtol=1e-9, atol=1e-10)


def test_sigmoid_gate_sample_equals_the_model_without_its_absent_modalities():
    m = model(gating="sigmoid").train()
    xs = inputs(DIMS, batch=4, dtype=torch.float64)
    out = m(xs, present=MASK)
    assert out.stats.converged
    for row, keep in [(0, [0, 1, 2]), (1, [0, 1]), (2, [1]), (3, [0])]:
        ref = reduced(m, keep, gating="sigmoid").train()([xs[i][row:row + 1] for i in keep]).fused
        torch.testing.assert_close(out.fused[row:row + 1], ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_equal_the_model_without_the_absent_modality_and_are_zero_there(mode):
    m = model(**mode_kw(mode)).train()
    xs = inputs(DIMS, batch=3, dtype=torch.float64, requires_grad=True)
    out, g, gx = run(m, poisoned(xs, MASK[[1, 1, 1]]), present=MASK[[1, 1, 1]])
    assert torch.isfinite(out.fused).all()
    r = reduced(m, [0, 1], **mode_kw(mode)).train()
    _, gr, gxr = run(r, [x.detach().requires_grad_() for x in xs[:2]])
    assert gx[2].abs().max() == 0 and gx[0].abs().max() > 0
    for a, b in zip(gx[:2], gxr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    for k, v in gr.items():
        expected = v * 1.5 if k == "weights" else v
        torch.testing.assert_close(g[k][:2] if k == "weights" else g[k], expected, rtol=1e-8, atol=1e-10)
    assert g["weights"][2] == 0
    for k in g:
        if k.startswith(("proj.2.", "blocks.2.")):
            assert g[k] is None or g[k].abs().max() == 0, k


@pytest.mark.parametrize("mode", MODES)
def test_nan_in_every_absent_entry_changes_nothing(mode):
    m = model(torch.float32, f_tol=1e-4, f_max_iter=60, b_tol=1e-4, b_max_iter=60, jac_samples=1, jac_weight=0.5,
              **mode_kw(mode)).train()
    xs = inputs(DIMS, batch=4, requires_grad=True)
    torch.manual_seed(5)
    a, ga, gxa = run(m, poisoned(xs, MASK, 0.0), present=MASK)
    torch.manual_seed(5)
    b, gb, gxb = run(m, poisoned(xs, MASK), present=MASK)
    assert torch.isfinite(b.fused).all()
    assert torch.equal(a.fused, b.fused)
    assert torch.equal(a.jac_loss, b.jac_loss)
    for k in ga:
        assert (ga[k] is None and gb[k] is None) or torch.equal(ga[k], gb[k]), k
    for i, (u, v) in enumerate(zip(gxa, gxb)):
        assert torch.equal(u, v)
        assert u[~MASK[:, i]].abs().max() == 0          # absent entries: zero gradient
        assert u[MASK[:, i]].abs().max() > 0


@pytest.mark.parametrize("train", [True, False])
def test_all_present_mask_is_bit_identical_to_no_mask(train):
    m = model(torch.float32, f_tol=1e-4, f_max_iter=40, b_tol=1e-4, b_max_iter=20, jac_samples=1, jac_weight=0.3,
              dropout=0.2).train(train)
    xs = inputs(DIMS, batch=4, requires_grad=True)
    torch.manual_seed(7)
    a, ga, gxa = run(m, xs)
    torch.manual_seed(7)
    b, gb, gxb = run(m, xs, present=torch.ones(4, 3, dtype=torch.bool))
    assert torch.equal(a.fused, b.fused) and torch.equal(a.stats.state, b.stats.state)
    assert torch.equal(a.jac_loss, b.jac_loss)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    for u, v in zip(gxa, gxb):
        assert torch.equal(u, v)


def test_samples_with_one_modality_converge_at_the_default_tolerance():
    m = make_contractive(DEQFusion(DIMS, dim=8, num_groups=2)).eval()
    xs = inputs(DIMS, batch=6)
    present = torch.eye(3, dtype=torch.bool)[[0, 1, 2, 0, 1, 2]]
    with torch.no_grad():
        out = m(xs, present=present)
    assert out.stats.converged and out.stats.tol == 1e-2
    assert (out.stats.rel_residuals <= 1e-2).all()
    state = out.stats.state.view(6, 4, 8)[:, :3]
    assert state[~present].abs().max() == 0 and state[present].abs().min(1).values.max() > 0


def test_implicit_gradient_with_a_mask_matches_finite_differences_float64():
    m = model().train()
    xs = inputs(DIMS, batch=3, dtype=torch.float64, requires_grad=True)
    present = MASK[1:]
    assert torch.autograd.gradcheck(lambda a, b, c: m([a, b, c], present=present).fused, tuple(xs),
                                    eps=1e-6, atol=1e-6, fast_mode=True)
    out, g, _ = run(m, xs, present=present)
    assert out.stats.converged and out.stats.backward.converged
    # parameter gradient: a central difference along a random direction
    params = [p for p in m.parameters()]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g[k] * d).sum() for (k, _), d in zip(m.named_parameters(), direction))
    numeric = central_difference(lambda: loss_of(m(xs, present=present).fused), params, direction)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_a_none_modality_equals_an_all_false_column_with_zeros():
    m = model(torch.float64, f_tol=1e-10, f_max_iter=100, b_tol=1e-10, b_max_iter=100).train()
    xs = inputs(DIMS, batch=3, dtype=torch.float64, requires_grad=True)
    present = torch.tensor([[True, True, False], [False, True, False], [True, True, False]])
    a, ga, gxa = run(m, [xs[0], xs[1], None], present=present)
    zeros = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    b, gb, gxb = run(m, [xs[0], xs[1], zeros], present=present)
    assert torch.equal(a.fused, b.fused)
    for k in ga:
        assert (ga[k] is None and gb[k] is None) or torch.equal(ga[k], gb[k]), k
    assert gxa[2] is None and torch.equal(gxa[0], gxb[0])
    # without a mask, None marks the column absent for every sample
    c, _, _ = run(m, [xs[0], xs[1], None])
    d, _, _ = run(m, [xs[0], xs[1], zeros], present=torch.tensor([[True, True, False]] * 3))
    assert torch.equal(c.fused, d.fused)


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_every_solver_reaches_the_masked_fixed_point_with_absent_states_at_zero(solver):
    m = model(solver=solver, f_tol=1e-9, f_max_iter=400).eval()
    xs = inputs(DIMS, batch=4, dtype=torch.float64)
    with torch.no_grad():
        out = m(xs, present=MASK)
        z = out.stats.state
        inj = m.inject(xs, MASK)
        fz = m.layer(z, inj)
    assert out.stats.converged
    assert ((fz - z).norm(dim=1) / fz.norm(dim=1)).max() <= 1e-8
    assert z.view(4, 4, 8)[:, :3][~MASK].abs().max() == 0


def test_jacobian_rows_and_columns_of_absent_states_are_zero():
    m = model().train()
    xs = inputs(DIMS, batch=4, dtype=torch.float64)
    z = m(xs, present=MASK).stats.state
    inj = m.inject(xs, MASK)
    J = torch.autograd.functional.jacobian(lambda s: m.layer(s, inj), z, vectorize=True)   # [B, L, B, L]
    absent = ~inj.state_mask(m.dim)
    for b in range(4):
        Jb = J[b, :, b]
        assert Jb[absent[b]].abs().max() == 0 if absent[b].any() else True
        assert Jb[:, absent[b]].abs().max() == 0 if absent[b].any() else True
    assert J[2, ~absent[2]][:, 2, ~absent[2]].abs().max() > 0
    # so the Jacobian term is that of the present parts: positive and finite with NaN in the absent inputs
    m.jac_samples = 2
    out = m(poisoned(xs, MASK), present=MASK)
    assert torch.isfinite(out.jac_loss) and out.jac_loss > 0


def test_warm_start_with_a_mask_gives_the_cold_answer_and_holds_absent_states_at_zero():
    m = model(torch.float64, f_tol=1e-10, f_max_iter=200, b_tol=1e-10, b_max_iter=200).train()
    xs = inputs(DIMS, batch=4, dtype=torch.float64, requires_grad=True)
    full, _, _ = run(m, xs)                                   # every modality present: nonzero states
    cold, gc, _ = run(m, poisoned(xs, MASK), present=MASK)
    warm, gw, _ = run(m, poisoned(xs, MASK), present=MASK, warm_start=full.stats)
    torch.testing.assert_close(warm.fused, cold.fused, rtol=1e-8, atol=1e-9)
    for k in gc:
        torch.testing.assert_close(gw[k], gc[k], rtol=1e-6, atol=1e-8)
    assert warm.stats.state.view(4, 4, 8)[:, :3][~MASK].abs().max() == 0
    z0 = full.stats.state.clone()
    z0.view(4, 4, 8)[:, :3][~MASK] = float("nan")             # an explicit z0's absent parts are not read
    again = m(xs, present=MASK, z0=z0)
    torch.testing.assert_close(again.fused, cold.fused, rtol=1e-8, atol=1e-9)


def test_modality_dropout_never_drops_everything_and_is_off_in_eval():
    m = model(torch.float32, modality_dropout=0.5, f_tol=1e-4, f_max_iter=30, f_max_iter_eval=30)
    torch.manual_seed(0)
    drawn = m.train()._drop_modalities(None, 20000)
    assert drawn.any(1).all()
    rate = drawn.float().mean().item()          # kept: (1 - p) + p^N / N (the rescued one)
    assert abs(rate - (0.5 + 0.125 / 3)) < 0.01
    given = MASK.repeat(2000, 1)
    drawn = m._drop_modalities(given, given.shape[0])
    assert drawn.any(1).all() and not (drawn & ~given).any()
    assert torch.equal(drawn[2::4], given[2::4])           # a single present modality is always kept
    assert (drawn != given).any()
    assert m.eval()._drop_modalities(given, given.shape[0]) is given
    # behaviour: eval output equals the model without modality dropout; training output differs from it
    xs = inputs(DIMS, batch=8)
    plain = model(torch.float32, f_tol=1e-4, f_max_iter=30, f_max_iter_eval=30)
    with torch.no_grad():
        assert torch.equal(m.eval()(xs).fused, plain.eval()(xs).fused)
        torch.manual_seed(1)
        assert not torch.equal(m.train()(xs).fused, plain.train()(xs).fused)


def test_modality_dropout_is_validated():
    for p in (-0.1, 1.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="modality_dropout"):
            DEQFusion(DIMS, dim=8, modality_dropout=p)


def test_bad_masks_are_clear_errors_naming_present():
    m = model(torch.float32)
    xs = inputs(DIMS, batch=4)
    with pytest.raises(ValueError, match=r"present: sample\(s\) \[1\] have no modality present"):
        m(xs, present=torch.tensor([[True, False, False], [False] * 3, [True] * 3, [True] * 3]))
    with pytest.raises(TypeError, match="present: expected dtype torch.bool"):
        m(xs, present=torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"present: expected shape \[4, 3\]"):
        m(xs, present=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="present: expected a bool tensor"):
        m(xs, present=[[True] * 3] * 4)
    with pytest.raises(ValueError, match=r"present: marks modality 2 present for some sample, but xs\[2\] is None"):
        m([xs[0], xs[1], None], present=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="present: sample"):
        m([None, xs[1], None], present=torch.tensor([[False, True, False], [False] * 3] * 2))
    with pytest.raises(ValueError, match="xs: every modality is None"):
        m([None, None, None])
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="present: on cuda"):
            m(xs, present=torch.ones(4, 3, dtype=torch.bool, device="cuda"))


def test_gate_trace_averages_over_the_samples_where_a_modality_is_present():
    m = model(torch.float32, track_gates=True, f_tol=1e-6, f_max_iter=100).eval()
    xs = inputs(DIMS, batch=4)
    present = MASK.clone()
    present[:, 2] = False
    with torch.no_grad():
        out = m(xs, present=present)
    gates, z = out.stats.gates, out.stats.state.view(4, 4, 8)
    assert torch.isfinite(gates[:, :2]).all() and torch.isnan(gates[:, 2]).all()
    w, b = m.fusion.gate.weight.mean(0), m.fusion.gate.bias.mean()
    per_sample = (z[:, 3] + z[:, 0]) @ w + b                       # modality 0's mean gate, at the fixed point
    torch.testing.assert_close(gates[-1, 0], per_sample[present[:, 0]].mean(), rtol=0, atol=1e-5)
    assert (per_sample[present[:, 0]].mean() - per_sample.mean()).abs() > 1e-3   # the absent rows would change it


def test_bfloat16_autocast_with_a_mask():
    m = model(torch.float32, f_tol=1e-2, f_max_iter=30, b_tol=1e-2, b_max_iter=30, jac_samples=1, jac_weight=0.1)
    xs = inputs(DIMS, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(poisoned(xs, MASK), present=MASK)
        loss = out.fused.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(out.fused.float()).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_fixed_point_correction_and_dropout_with_a_mask():
    m = model(torch.float32, f_tol=1e-4, f_max_iter=30, b_tol=1e-4, b_max_iter=20, dropout=0.1,
              correction_steps=2).train()
    xs = inputs(DIMS, batch=4, requires_grad=True)
    torch.manual_seed(2)
    a = m(poisoned(xs, MASK, 0.0), present=MASK)
    torch.manual_seed(2)
    b = m(poisoned(xs, MASK), present=MASK)
    assert len(b.stats.iterates) == 2
    for u, v in zip([*a.stats.iterates, a.fused], [*b.stats.iterates, b.fused]):
        assert torch.isfinite(v).all() and torch.equal(u, v)
