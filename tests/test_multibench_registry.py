"""Unit tests of the MultiBench integration's own logic; they need no MultiBench checkout."""
import sys

import pytest
import torch
from torch import nn

from deqfusion_adapters.multibench import (DEQObjective, FusionLR, MultiBenchNotFound, create, deq_train_kwargs,
                                           get, list_fusions, registry, use_checkout)
from deqfusion_adapters.multibench.checkout import MARKER, find_checkout
from deqfusion_adapters.multibench.plugin import INTEGRATION
from deqfusion_compat import common
from deqfusion_compat import multibench as shims
from deqfusion_core import compat
from deqfusion_core.integration import Upstream

MULTIBENCH_NAMES = ["concat", "concat_early", "concat_linear", "low_rank_tensor", "mult", "multiplicative_interactions",
                    "multiplicative_interactions_3modal", "nl_gate", "stack", "tensor"]


@pytest.fixture(autouse=True)
def no_checkout(monkeypatch):
    monkeypatch.delenv("DEQFUSION_MULTIBENCH_ROOT", raising=False)
    use_checkout(None)
    yield
    INTEGRATION.remove()


def test_every_name_is_listed_without_multibench():
    assert list_fusions() == sorted(["deq", *MULTIBENCH_NAMES])
    assert list_fusions("concat*") == ["concat", "concat_early", "concat_linear"]
    assert callable(get("low_rank_tensor"))


def test_deq_works_without_multibench_and_returns_a_plain_tuple():
    fusion = create("deq", [6, 10], dim=8, f_max_iter=5, b_max_iter=5)
    assert fusion.output_dim == 8
    fusion.train()
    out = fusion([torch.randn(3, 6), torch.randn(3, 10)])
    assert type(out) is tuple  # MultiBench's MMDL passes out[0] to the head only for exact tuples
    fused, jac_loss, stats = out
    assert fused.shape == (3, 8) and jac_loss.dim() == 0 and fusion.last_stats is stats


@pytest.mark.parametrize("name", MULTIBENCH_NAMES)
def test_multibench_names_say_the_checkout_was_not_found(name):
    dims, kwargs = {"multiplicative_interactions_3modal": ([4, 4, 4], {"output_dim": 4}),
                    "nl_gate": ([6, 6], {"thw_dim": 3, "c_dim": 2, "tf_dim": 3}),
                    "concat_linear": ([4, 4], {"output_dim": 4}), "low_rank_tensor": ([4, 4], {"output_dim": 4}),
                    "multiplicative_interactions": ([4, 4], {"output_dim": 4})}.get(name, ([4, 4], {}))
    with pytest.raises(MultiBenchNotFound, match=f"needs a MultiBench checkout.*DEQFUSION_MULTIBENCH_ROOT"):
        create(name, dims, **kwargs)


def test_a_folder_that_is_not_multibench_is_named(tmp_path):
    with pytest.raises(MultiBenchNotFound, match="not a pliang279/MultiBench checkout"):
        create("concat", [4, 4], root=tmp_path)


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match="unknown fusion 'nope'.*deq"):
        create("nope", [4])
    with pytest.raises(TypeError, match="input_dims"):
        create("deq", 4)
    with pytest.raises(ValueError, match="input_dims: multiplicative_interactions fuses exactly 2"):
        create("multiplicative_interactions", [4, 4, 4], output_dim=4)
    with pytest.raises(TypeError, match="output_dim: required"):
        create("concat_linear", [4, 4])


def fake_checkout(tmp_path):
    (tmp_path / MARKER).parent.mkdir(parents=True)
    (tmp_path / MARKER).write_text("")
    return Upstream("multibench", True, tmp_path)


def test_plugin_options_become_deq_defaults(tmp_path):
    deq = registry.entry("deq")
    INTEGRATION.apply(fake_checkout(tmp_path), {"f_max_iter": 7, "jac_weight": 0.5})
    fusion = create("deq", [4, 4])
    assert fusion.deq.f_max_iter == 7 and fusion.deq.jac_weight == 0.0  # jac_weight goes to the objective
    assert create("deq", [4, 4], f_max_iter=3).deq.f_max_iter == 3
    assert find_checkout() == tmp_path.resolve()
    INTEGRATION.remove()                                # the registry's entry and the checkout are the originals
    assert registry.entry("deq") is deq and create("deq", [4, 4]).deq.f_max_iter != 7
    with pytest.raises(MultiBenchNotFound):
        find_checkout()


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="multibench option 'f_max_ter': unknown"):
        INTEGRATION.apply(fake_checkout(tmp_path), {"f_max_ter": 7})
    with pytest.raises(ValueError, match="deq 'solvr': unknown"):
        create("deq", [4, 4], solvr="anderson")
    with pytest.raises(ValueError, match="'jac_weight': must be a number >= 0"):
        DEQObjective(jac_weight=-1.0)


def test_objective_adds_the_jacobian_term_in_training_only():
    pred, truth = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.int8)
    jac = torch.tensor(2.0)
    base = nn.BCEWithLogitsLoss()(pred, truth.float())
    objective = DEQObjective(jac_weight=0.1)
    assert torch.allclose(objective(pred, truth, {"fused": (pred, jac, None), "training": True}), base + 0.2)
    assert torch.allclose(objective(pred, truth, {"fused": (pred, jac, None), "training": False}), base)
    assert torch.allclose(objective(pred, truth, {"fused": pred, "training": True}), base)  # not a DEQ
    with pytest.raises(ValueError, match="objective_args_dict"):
        objective(pred, truth, None)
    ce = DEQObjective(nn.CrossEntropyLoss(), jac_weight=0.0)
    assert ce(torch.zeros(2, 3), torch.tensor([[1], [2]]), {}).item() == pytest.approx(torch.log(torch.tensor(3.0)).item())


def test_fusion_gets_its_own_learning_rate():
    encoder, fusion = nn.Linear(4, 4), create("deq", [4, 4], f_max_iter=3)
    optimtype = FusionLR(fusion, 1e-4)
    params = list(encoder.parameters()) + list(fusion.parameters())
    op = optimtype(params, lr=1e-3, weight_decay=0.01)  # how MultiBench's train calls it
    assert isinstance(op, torch.optim.AdamW) and optimtype.optimizer is op
    rest, own = op.param_groups
    assert rest["lr"] == pytest.approx(1e-3) and own["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in own["params"]} == {id(p) for p in fusion.parameters()}
    assert own["weight_decay"] == 0.01
    kwargs = deq_train_kwargs(fusion, clip_val=2.0)
    assert kwargs["objective_args_dict"] == {} and kwargs["clip_val"] == 2.0
    assert kwargs["optimtype"] is torch.optim.AdamW                     # no own rate asked: one group
    assert deq_train_kwargs(fusion, fusion_lr=1e-4)["optimtype"].fusion_lr == 1e-4
    with pytest.raises(ValueError, match="fusion_lr: must be > 0"):
        FusionLR(fusion, 0.0)


def test_recipes_are_attributed():
    """MultiBench's own MM-IMDB recipe is every arm's; the paper's DEQ recipe (appendix C: Jacobian weight 0.1, the
    DEQ fusion's learning rate 1e-4) is the DEQ arm's; the authors' script's solver settings are not the paper's."""
    from deqfusion_adapters.multibench import runner, training

    assert training.MULTIBENCH_MMIMDB == dict(batch_size=128, lr=8e-3, weight_decay=1e-2, clip_val=8.0, epochs=1000)
    assert training.PAPER_MMIMDB == dict(jac_weight=0.1, fusion_lr=1e-4)
    assert {"f_max_iter", "b_max_iter", "batch_size"} <= set(training.AUTHORS_MMIMDB)
    args = runner.parser().parse_args(["--data", "x.hdf5", "--fusion", "concat"])
    used = runner.settings(args)
    assert used["train"]["lr"] == 8e-3 and used["train"]["batch_size"] == 128 and "jac_weight" not in used["fusion"]
    deq = runner.settings(runner.parser().parse_args(["--data", "x.hdf5", "--lr", "1e-3"]))
    assert deq["train"]["lr"] == 1e-3 and deq["fusion"]["fusion_lr"] == 1e-4 and deq["fusion"]["jac_weight"] == 0.1
    with pytest.raises(ValueError, match="--jac-weight/--fusion-lr: the DEQ recipe"):
        runner.settings(runner.parser().parse_args(["--data", "x.hdf5", "--fusion", "concat", "--fusion-lr", "1e-4"]))


def test_mmimdb_deq_takes_the_contractive_norm_which_options_override(tmp_path):
    """MM-IMDB's DEQ arm builds its fusion with norm=contractive (ours: training.CONVERGENCE_MMIMDB); a fusion
    option from the command line (-o / --fusion-arg) wins; ROSMAP/BRCA and the other fusions take none; and the
    whole normed model pickles, as MultiBench's train() saves it."""
    from deqfusion_adapters.multibench import registry, runner, training

    assert training.CONVERGENCE_MMIMDB == dict(norm="contractive")
    opts = lambda argv, o=None: runner.settings(runner.parser().parse_args(argv), o)["fusion"].get("options")
    assert opts(["--data", "x.hdf5"]) == {"norm": "contractive"}
    assert opts(["--data", "x.hdf5"], {"norm": "none"}) == {"norm": "none"}
    assert opts(["--data", "x.hdf5", "--fusion-arg", "norm=spectral"]) == {"norm": "spectral"}
    assert opts(["--data", str(tmp_path)]) == {} and opts(["--data", "x.hdf5", "--fusion", "concat"]) is None
    fusion = registry.create("deq", [6, 6], dim=8, num_groups=2, **opts(["--data", "x.hdf5"]))
    assert fusion.deq.norm == "contractive"
    torch.save(nn.Sequential(fusion), tmp_path / "best.pt")
    assert torch.load(tmp_path / "best.pt", weights_only=False)[0].deq.norm == "contractive"


def test_shim_stands_in_only_for_what_is_missing(monkeypatch):
    monkeypatch.setitem(shims.STAND_INS, "deqfusion_no_such_pkg", (("json", "deqfusion_no_such_pkg"), "a test", ("sub",)))
    monkeypatch.setitem(shims.STAND_INS, "json", (("json",), "a test", ()))
    missing, present = (shims._stand_in_shim(name, "a test shim") for name in ("deqfusion_no_such_pkg", "json"))
    try:
        with compat.applying("multibench", [missing.name, present.name]) as names:
            from deqfusion_no_such_pkg import sub  # noqa: F401  (what MultiBench's top-level imports do)
            from deqfusion_no_such_pkg.sub import Thing
            with pytest.raises(ImportError, match="deqfusion_no_such_pkg.sub.Thing is not available.*only for a test"):
                Thing()
            assert names == ["deqfusion_no_such_pkg"] and not isinstance(sys.modules["json"], common.Unavailable)
        assert "deqfusion_no_such_pkg" not in sys.modules            # undone when the import is over
        assert missing in compat.applied("multibench") and present not in compat.applied("multibench")
    finally:
        compat.unregister(missing)
        compat.unregister(present)


class Saved(nn.Module):  # a pickled module, as MultiBench's train saves its best model
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)


def test_saved_model_loads(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(Saved(), path)
    assert isinstance(shims.load_model(path), Saved)
    with compat.applying("multibench", shims.SCRIPT):
        assert isinstance(torch.load(path), Saved)  # MultiBench's bare torch.load(filename)
    if shims.load_defaults_to_weights_only():
        with pytest.raises(Exception, match="weights_only"):
            torch.load(path)  # the shim is scoped: outside it, torch's default is back


def test_mmimdb_file_is_checked(tmp_path):
    h5py = pytest.importorskip("h5py")
    from deqfusion_adapters.multibench import mmimdb

    with h5py.File(tmp_path / "short.hdf5", "w") as f:
        f.create_dataset("features", (10, 300), dtype="f4")
    with pytest.raises(ValueError, match=r"'features' has shape \(10, 300\), expected \(25959, 300\)"):
        mmimdb.check_file(tmp_path / "short.hdf5")
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_dataset("features", (25959, 300), dtype="f4", chunks=(64, 300))
    with pytest.raises(KeyError, match="no dataset 'vgg_features'"):
        mmimdb.check_file(tmp_path / "bad.hdf5")
    with pytest.raises(FileNotFoundError, match="--data"):
        mmimdb.check_file(tmp_path / "missing.hdf5")
    good = mmimdb.write_synthetic(tmp_path / "mmimdb.hdf5", rows_per_split=4)
    mmimdb.check_file(good)
    with h5py.File(good, "r") as f:
        assert {k: f[k].shape for k in mmimdb.LAYOUT} == {k: (25959, w) for k, w in mmimdb.LAYOUT.items()}
        assert f["genres"][18160:18164].any() and not f["genres"][18164:18170].any()
    assert good.stat().st_size < 20_000_000  # unwritten rows take no space


def test_runner_names_a_bad_data_file(tmp_path, capsys):
    pytest.importorskip("h5py")
    from deqfusion_adapters.multibench import runner

    assert runner.main(["--data", str(tmp_path / "missing.hdf5")]) == 2
    assert "--data:" in capsys.readouterr().err
