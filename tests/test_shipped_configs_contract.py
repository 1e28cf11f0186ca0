"""Every shipped MMF DEQ config builds an f that contracts at initialisation at the config's own shapes (rho of
df/dz < 1 on every sample, the evaluation solve reaches its tolerance, and in training mode the implicit backward
reaches its b_tol within its b_max_iter), measured the way benchmarks/init_contraction.py measures it; and without
the config's norm the same f does not (rho >= 1 on some sample, the backward misses; the norm is what makes it
hold, not the shapes)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("init_contraction", ROOT / "benchmarks" / "init_contraction.py")
ic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ic)


def test_every_shipped_mmf_deq_config_is_measured():
    """models/fusion_classifier.yaml is the model's template (no encoders, empty params), not a recipe."""
    shipped = {str(p.relative_to(ic.CONFIGS)) for p in ic.CONFIGS.rglob("*.yaml")
               if "type: deq" in p.read_text() and p.parent.name != "models"}
    assert shipped == set(ic.SHAPES)


@pytest.mark.parametrize("name", sorted(ic.SHAPES))
def test_shipped_config_contracts_at_initialisation(name):
    dims, kinds, dim, _ = ic.SHAPES[name]
    params = ic.fusion_params(ic.CONFIGS / name)
    shipped = ic.measure(params, dims, kinds, dim, seed=0, batch=16)
    assert shipped["rho_max"] < 1 and shipped["converged"], shipped
    assert shipped["max_rel_residual"] <= params.get("f_tol", 1e-2)
    assert shipped["backward_converged"] and shipped["backward_max_iter"] == params["b_max_iter"], shipped
    assert shipped["backward_max_rel_residual"] <= params.get("b_tol", 1e-3)
    bare = ic.measure({**params, "norm": None, "f_max_iter_eval": 40}, dims, kinds, dim, seed=0, batch=16)
    assert bare["rho_max"] >= 1 and not bare["backward_converged"], bare
    if params.get("gating", True):   # without its gate (easy_vqa_deq.yaml) the bare f is non-contractive on some
        assert not bare["converged"], bare   # samples (rho_max 1.11) yet its solve still reaches 1e-2 in 40 steps
