"""MM-Dynamics' DEQ recipe as its options build it (patches/mmdynamics: CONVERGENCE); no checkout needed."""
import pytest


@pytest.mark.parametrize("given, norm, norm_options", [
    ({}, "contractive", {"max_gain": 0.1}),                                  # as shipped
    ({"norm_options": {"max_gain": 0.25}}, "contractive", {"max_gain": 0.25}),   # a given gain bound wins
    ({"norm": "none"}, None, {}),                         # another norm: the gain bound is not passed to it
    ({"norm": "spectral"}, "spectral", {}),
])
def test_contractive_gain_bound_only_with_the_contractive_norm(given, norm, norm_options):
    from deqfusion_patches.mmdynamics.plugin import INTEGRATION

    options = INTEGRATION.fusion_options(given)
    deq = options.build([6, 6, 6], 8, num_groups=2)
    assert (deq.norm, deq.norm_options, deq.jac_term) == (norm, norm_options, "diagonal")
    assert options.jac_weight == 20.0
    assert INTEGRATION.fusion_options(options).given() == options.given()      # FusionOptions in: the same
