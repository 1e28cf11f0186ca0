"""Bad input gets a clear error naming the argument; non-finite residuals raise DEQConvergenceError."""
import pytest
import torch

from conftest import inputs
from deqfusion_core import DEQConvergenceError, DEQFusion

DIMS = [6, 8, 5]


def fusion(**kw):
    return DEQFusion(DIMS, dim=8, num_groups=2, **kw)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(input_dims=[]), ValueError, "input_dims"),
    (dict(input_dims=8), TypeError, "input_dims"),
    (dict(input_dims=[4, -1]), TypeError, "input_dims"),
    (dict(input_dims=[4, 6]), ValueError, "dim: required"),
    (dict(input_dims=[4, 4], dim=0), ValueError, "dim"),
    (dict(input_dims=[8, 8], num_groups=3), ValueError, "num_groups"),
    (dict(input_dims=[8, 8], num_groups=0), ValueError, "num_groups"),
    (dict(input_dims=[8, 8], num_groups=2, dropout=1.0), ValueError, "dropout"),
    (dict(input_dims=[8, 8], num_groups=2, solver="newton"), ValueError, "solver"),
    (dict(input_dims=[8, 8], num_groups=2, b_solver="newton"), ValueError, "b_solver"),
    (dict(input_dims=[8, 8], num_groups=2, backward="magic"), ValueError, "backward"),
    (dict(input_dims=[8, 8], num_groups=2, f_stop="median"), ValueError, "f_stop"),
    (dict(input_dims=[8, 8], num_groups=2, f_max_iter=0), ValueError, "f_max_iter"),
    (dict(input_dims=[8, 8], num_groups=2, b_tol=0), ValueError, "b_tol"),
    (dict(input_dims=[8, 8], num_groups=2, jac_samples=-1), ValueError, "jac_samples"),
    (dict(input_dims=[8, 8], num_groups=2, jac_weight=-1.0), ValueError, "jac_weight"),
    (dict(input_dims=[8, 8], num_groups=2, num_layers=-1), ValueError, "num_layers"),
    (dict(input_dims=[8, 8], num_groups=2, phantom_damping=0), ValueError, "phantom_damping"),
    (dict(input_dims=[8, 8], num_groups=2, solver_options={"memory": 4}), ValueError, "solver_options: anderson"),
    (dict(input_dims=[8, 8], num_groups=2, b_solver="broyden", b_solver_options={"m": 4}), ValueError,
     "b_solver_options: broyden takes no option 'm'"),
])
def test_construction_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DEQFusion(**kwargs)


@pytest.mark.parametrize("name, value", [("f_max_iter", 0), ("b_tol", 0.0), ("solver", "newton"), ("f_stop", "x"),
                                         ("b_solver_options", {"beta": 1.0, "m": 2, "x": 1})])
def test_solver_settings_set_later_are_validated_and_name_the_attribute(name, value):
    m = fusion()
    before = (m.forward_solve, m.backward_solve)
    with pytest.raises(ValueError, match=name):
        setattr(m, name, value)
    assert (m.forward_solve, m.backward_solve) == before


def test_wrong_number_of_modalities():
    with pytest.raises(ValueError, match=r"xs: expected 3 modality tensors .* got 2"):
        fusion()(inputs(DIMS[:2]))


def test_not_a_list():
    with pytest.raises(TypeError, match="xs: expected a list"):
        fusion()(torch.randn(4, 6))


def test_width_mismatch_names_the_modality():
    xs = inputs(DIMS)
    xs[1] = torch.randn(4, 9)
    with pytest.raises(ValueError, match=r"xs\[1\]: expected shape \[B, 8\]"):
        fusion()(xs)


def test_batch_mismatch():
    xs = inputs(DIMS)
    xs[2] = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"xs\[2\]: batch size 3 differs"):
        fusion()(xs)


def test_empty_batch_names_the_input():
    """A batch of no samples is refused naming the input (it was a reshape RuntimeError from inside the solver)."""
    xs = [x[:0] for x in inputs(DIMS)]
    with pytest.raises(ValueError, match=r"xs\[0\]: empty batch \(shape \[0, \d+\]\): DEQFusion needs at least one"):
        fusion()(xs)


def test_dtype_mix_and_integer_inputs():
    xs = inputs(DIMS)
    xs[1] = xs[1].double()
    with pytest.raises(TypeError, match=r"xs\[1\]: dtype torch.float64 differs"):
        fusion()(xs)
    xs = inputs(DIMS)
    xs[0] = torch.ones(4, 6, dtype=torch.long)
    with pytest.raises(TypeError, match=r"xs\[0\]: expected a floating-point"):
        fusion()(xs)


def test_device_mix():
    xs = inputs(DIMS)
    xs[0] = xs[0].to("meta")
    with pytest.raises(TypeError, match=r"xs\[0\]: on meta"):
        fusion()(xs)


def test_bad_initial_state():
    with pytest.raises(ValueError, match=r"z0: expected a state of shape \[4, 32\]"):
        fusion()(inputs(DIMS), z0=torch.zeros(4, 31))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_nan_input_is_a_clear_error(solver):
    xs = inputs(DIMS)
    xs[1][2, 3] = float("nan")
    with pytest.raises(DEQConvergenceError, match="inputs or parameters contain NaN/Inf"):
        fusion(solver=solver)(xs)


def test_inf_parameter_is_a_clear_error():
    m = fusion()
    with torch.no_grad():
        m.blocks[0].lin1.weight[0, 0] = float("inf")
    with pytest.raises(DEQConvergenceError, match="non-finite residual"):
        m(inputs(DIMS))


def test_plot_without_recorded_gates_names_the_problem(tmp_path):
    pytest.importorskip("matplotlib")
    from deqfusion_core import plot_gates

    out = fusion()(inputs(DIMS))
    with pytest.raises(ValueError, match="track_gates=True"):
        plot_gates(out.stats, tmp_path / "g.png")


def test_attach_aux_loss_needs_a_scalar():
    from deqfusion_core import attach_aux_loss

    with pytest.raises(ValueError, match="aux: expected a scalar"):
        attach_aux_loss(torch.randn(3), torch.randn(2, requires_grad=True), 1.0)
