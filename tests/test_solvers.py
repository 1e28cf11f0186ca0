"""Solvers: tolerance reached on a contractive map, per-sample stopping, best iterate, errors."""
import pytest
import torch

from deqfusion_core import DEQConvergenceError, SOLVERS, get_solver, solve


def linear_map(B=6, L=20, rho=0.7, seed=0, dtype=torch.float64, symmetric=False):
    """f(z) = A_b z + c_b per sample, with spectral norm rho < 1: a contraction with a known fixed point."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, L, L, generator=g, dtype=dtype)
    if symmetric:
        A = A @ A.transpose(1, 2)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    c = torch.randn(B, L, generator=g, dtype=dtype)
    calls = []

    def f(z, rows):
        calls.append(None if rows is None else rows.tolist())
        Ar, cr = (A, c) if rows is None else (A[rows], c[rows])
        return torch.bmm(Ar, z[:, :, None])[:, :, 0] + cr

    z_star = torch.linalg.solve(torch.eye(L, dtype=dtype) - A, c)
    return f, z_star, calls


def rel_residual(f, z):
    fz = f(z, None)
    return ((fz - z).norm(dim=1) / fz.norm(dim=1)).max().item()


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("stop", ["rel", "abs"])
def test_solver_reaches_tolerance(name, stop):
    f, z_star, _ = linear_map()
    res = solve(f, torch.zeros_like(z_star), name, max_iter=200, tol=1e-8, stop=stop)
    assert res.converged
    assert res.nstep < 200
    resid = res.rel_residuals if stop == "rel" else res.abs_residuals
    assert resid.max() <= 1e-8
    # the returned iterate really is a fixed point: recompute its residual independently
    if stop == "rel":
        assert rel_residual(f, res.z) <= 1e-8
    torch.testing.assert_close(res.z, z_star, atol=1e-6, rtol=1e-6)
    assert len(res.trace) == res.nstep


def test_anderson_beats_plain_iteration():
    f, z_star, _ = linear_map(rho=0.95, symmetric=True)  # spectral radius 0.95: plain iteration is slow
    steps = {n: solve(f, torch.zeros_like(z_star), n, max_iter=500, tol=1e-8).nstep
             for n in ("anderson", "fixed_point")}
    assert steps["anderson"] < steps["fixed_point"] / 2


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_converged_samples_stop_changing_and_costing(name):
    f, z_star, calls = linear_map(B=5)
    z0 = torch.zeros_like(z_star)
    z0[0] = z_star[0]                       # sample 0 starts at its fixed point
    res = solve(f, z0, name, max_iter=200, tol=1e-10)
    assert res.converged
    # after the first step, sample 0 is never evaluated again ...
    assert calls[0] is None
    assert all(rows is not None and 0 not in rows for rows in calls[1:])
    # ... and is returned exactly as it was when it converged
    torch.testing.assert_close(res.z[0], z_star[0], rtol=0, atol=0)


def test_nonconvergence_is_reported_not_raised():
    f, z_star, _ = linear_map(rho=0.99)
    res = solve(f, torch.zeros_like(z_star), "fixed_point", max_iter=3, tol=1e-10)
    assert not res.converged and res.nstep == 3
    # best iterate is returned: its residual is the lowest seen
    assert res.rel_residuals.max() <= min(t.item() for t in res.trace) + 1e-12


def test_best_iterate_is_returned_when_iteration_diverges():
    calls = {"n": 0}

    def f(z, rows):  # converges for 3 steps, then blows up (but stays finite)
        calls["n"] += 1
        return 0.5 * z + 1 if calls["n"] <= 3 else 10 * z + 1

    res = solve(f, torch.zeros(2, 3), "fixed_point", max_iter=6, tol=1e-12)
    assert not res.converged
    assert res.rel_residuals.max() < 0.5    # from the early, good iterates


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_non_finite_residual_raises(name):
    def f(z, rows):
        out = z * 0.5 + 1
        out[0, 0] = float("nan")
        return out

    with pytest.raises(DEQConvergenceError, match="NaN/Inf"):
        solve(f, torch.zeros(3, 4), name, max_iter=10, tol=1e-6)


def test_unknown_solver_and_bad_options():
    with pytest.raises(ValueError, match="solver"):
        get_solver("newton")
    f, z_star, _ = linear_map()
    with pytest.raises(ValueError, match="stop"):
        solve(f, torch.zeros_like(z_star), "anderson", stop="median")
    with pytest.raises(ValueError, match="m:"):
        solve(f, torch.zeros_like(z_star), "anderson", m=0)
    with pytest.raises(ValueError, match="max_iter"):
        solve(f, torch.zeros_like(z_star), "fixed_point", max_iter=0)


@pytest.mark.parametrize("seed", range(6))
def test_compaction_keeps_exactly_the_running_rows_with_their_data(seed):
    from deqfusion_core.solvers import _compaction

    g = torch.Generator().manual_seed(seed)
    W = 17
    keep = torch.rand(W, generator=g) < (0.2, 0.5, 0.9, 1 / W, 0.0, 0.97)[seed]
    keep[torch.randint(W, (1,), generator=g)] = True           # at least one runs (else the solver is done)
    n_keep = int(keep.sum())
    data = torch.randn(W, 3, 2, generator=g)
    compact = _compaction(keep, n_keep)
    rows = compact(torch.arange(W))
    out = compact(data.clone())
    assert sorted(rows.tolist()) == torch.arange(W)[keep].tolist()
    torch.testing.assert_close(out, data[rows], rtol=0, atol=0)
    moved = (rows != torch.arange(n_keep)).sum().item()          # only rows below n_keep that stopped move
    assert moved == (~keep[:n_keep]).sum().item()


def test_tracker_for_autograd_runs_every_row_and_reports_the_last_step():
    from deqfusion_core.solvers import Tracker

    f, z_star, _ = linear_map(rho=0.5)
    z0 = torch.zeros_like(z_star)
    z0[0] = z_star[0]                      # sample 0 starts converged: a compacting solve drops it at once
    t = Tracker(z0, 1e-8, "abs", 100, autograd=True)
    z, steps = z0, []
    while not t.done:
        fz = f(z, None)
        assert t.update(z, fz) is None     # never compacts
        steps.append((fz - z).norm(dim=1))
        z = fz
    res = t.result(z)
    assert res.z is z and res.nstep == len(steps) == solve(f, z0, "fixed_point", max_iter=100, tol=1e-8,
                                                            stop="abs").nstep
    torch.testing.assert_close(res.abs_residuals, steps[-1], rtol=0, atol=0)
    assert res.converged and t.rows is None


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("max_iter", [12, 200])   # 12: some samples end unconverged at the cap
def test_batched_solve_with_compaction_equals_each_sample_solved_alone(name, max_iter):
    """The working set shrinks as samples stop, and the tracker keeps each sample's best iterate in the working
    set's order: every sample's result, residuals and the per-step trace (the batch's max of the best relative
    residual so far, samples that stopped included) are those of the sample solved alone."""
    B, L = 7, 16
    g = torch.Generator().manual_seed(3)
    A = torch.randn(B, L, L, generator=g, dtype=torch.float64)
    rho = torch.linspace(0.2, 0.9, B, dtype=torch.float64)     # samples stop at different steps
    A = rho[:, None, None] * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    c = torch.randn(B, L, generator=g, dtype=torch.float64)

    def restricted(idx):
        def f(z, rows):
            r = idx if rows is None else idx[rows]
            return torch.bmm(A[r], z[:, :, None])[:, :, 0] + c[r]
        return f

    batch = solve(restricted(torch.arange(B)), torch.zeros(B, L, dtype=torch.float64), name, max_iter=max_iter,
                  tol=1e-9)
    alone = [solve(restricted(torch.tensor([i])), torch.zeros(1, L, dtype=torch.float64), name, max_iter=max_iter,
                   tol=1e-9) for i in range(B)]
    torch.testing.assert_close(batch.z, torch.cat([a.z for a in alone]), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch.rel_residuals, torch.cat([a.rel_residuals for a in alone]), rtol=0, atol=1e-12)
    torch.testing.assert_close(batch.abs_residuals, torch.cat([a.abs_residuals for a in alone]), rtol=0, atol=1e-12)
    assert batch.nstep == max(a.nstep for a in alone) and batch.converged == all(a.converged for a in alone)
    expected = [max(float(a.trace[min(k, a.nstep - 1)]) for a in alone) for k in range(batch.nstep)]
    assert [float(t) for t in batch.trace] == pytest.approx(expected, rel=0, abs=1e-12)
    assert (max_iter == 200) == batch.converged
