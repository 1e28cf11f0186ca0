"""MultiBench's own train() and test() with the registry's fusions, on a generated file in MM-IMDB's layout.

Runs against a copy of the MultiBench checkout (pliang279/MultiBench) in DEQFUSION_MULTIBENCH_ROOT, else of the
snapshot in ../shared/upstreams/MultiBench (see upstreams.py).
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import upstreams

GIVEN = upstreams.checkout("DEQFUSION_MULTIBENCH_ROOT", "MultiBench")
pytestmark = pytest.mark.skipif(not GIVEN, reason=upstreams.missing("DEQFUSION_MULTIBENCH_ROOT", "MultiBench"))
h5py = pytest.importorskip("h5py")

from deqfusion_adapters.multibench import create, import_multibench, mmimdb, train_mmimdb  # noqa: E402
from deqfusion_compat import common  # noqa: E402
from deqfusion_compat import multibench as shims  # noqa: E402
from deqfusion_core import compat  # noqa: E402

ROWS, WIDTH, BATCH = 32, 16, 16
ROOT = None   # the copy of the checkout, set by the `root` fixture (every test here uses it)


@pytest.fixture(scope="module", autouse=True)
def root(tmp_path_factory):
    global ROOT
    ROOT = str(upstreams.writable_copy(GIVEN, tmp_path_factory.mktemp("upstream") / "MultiBench"))
    yield ROOT
    sys.path[:] = [p for p in sys.path if p != ROOT]    # import_multibench put it first


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mmimdb.write_synthetic(tmp_path_factory.mktemp("mmimdb") / "multimodal_imdb.hdf5", rows_per_split=ROWS)


def loaders(data):
    return mmimdb.dataloaders(data, ROOT, batch_size=BATCH, limit=ROWS)


def small_model(fusion_name, **kwargs):
    models = import_multibench("unimodals.common_models", ROOT)
    encoders = [models.MaxOut_MLP(WIDTH, 32, 300, WIDTH, False), models.MaxOut_MLP(WIDTH, 32, 4096, WIDTH, False)]
    fusion = create(fusion_name, [WIDTH, WIDTH], **kwargs)
    return encoders, fusion, models.Linear(fusion.output_dim, 23)


def train_one_epoch(data, tmp_path, fusion_name, seed=0, **kwargs):
    """One epoch of MultiBench's train with its MM-IMDB recipe (and the paper's DEQ recipe for a DEQ); returns
    (model pieces, train kwargs)."""
    deq_kwargs = dict(dim=WIDTH, f_max_iter=8, b_max_iter=8) if fusion_name == "deq" else dict(root=ROOT, output_dim=WIDTH)
    torch.manual_seed(seed)
    encoders, fusion, head = small_model(fusion_name, **deq_kwargs)
    train_dl, valid_dl, _ = loaders(data)
    used = train_mmimdb(encoders, fusion, head, train_dl, valid_dl, 1, save=str(tmp_path / "best.pt"),
                              root=ROOT, track_complexity=False, **kwargs)
    return (encoders, fusion, head), used


def multibench_test(data, tmp_path, capsys):
    """MultiBench's own test() on the checkpoint train() saved; returns its printed F1 line."""
    supervised = import_multibench("training_structures.Supervised_Learning", ROOT)
    model = shims.load_model(tmp_path / "best.pt")
    capsys.readouterr()
    supervised.test(model, loaders(data)[2], no_robust=True, criterion=nn.BCEWithLogitsLoss(), task="multilabel")
    return capsys.readouterr().out


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_deq_trains_with_multibench_train_and_test(data, tmp_path, capsys):
    (encoders, fusion, head), used = train_one_epoch(data, tmp_path, "deq")
    fusion_params = {id(p) for p in fusion.parameters()}
    groups = used["optimtype"].optimizer.param_groups
    own = [g for g in groups if {id(p) for p in g["params"]} == fusion_params]
    assert len(groups) == 2 and len(own) == 1
    assert own[0]["lr"] == pytest.approx(1e-4)  # the paper's DEQ fusion rate (appendix C)
    assert [g["lr"] for g in groups if g is not own[0]] == [pytest.approx(8e-3)]   # MultiBench's own, every arm
    assert used["objective"].last_jac_loss is not None and used["objective"].last_jac_loss > 0
    assert "f1_micro" in multibench_test(data, tmp_path, capsys)


def test_jacobian_term_changes_the_gradients(data, tmp_path):
    # Same seed, same data order, same Hutchinson probes: only the Jacobian term's weight differs.
    runs = {w: flat(train_one_epoch(data, tmp_path, "deq", jac_weight=w)[0][1]) for w in (0.0, 0.1)}
    again = flat(train_one_epoch(data, tmp_path, "deq", jac_weight=0.0)[0][1])
    assert torch.equal(runs[0.0], again)  # the comparison is deterministic ...
    assert not torch.allclose(runs[0.0], runs[0.1])  # ... so the difference is the Jacobian term's gradient


def test_multibench_fusion_trains_with_multibench_recipe(data, tmp_path, capsys):
    (_, fusion, _), used = train_one_epoch(data, tmp_path, "multiplicative_interactions")
    assert type(fusion).__name__ == "MultiplicativeInteractions2Modal" and fusion.output_dim == WIDTH
    # MultiBench's own late-fusion recipe, with none of the DEQ's (no own fusion rate, no Jacobian objective)
    assert used["optimtype"] is torch.optim.AdamW and used["lr"] == 8e-3 and used["weight_decay"] == 1e-2
    assert isinstance(used["objective"], nn.BCEWithLogitsLoss) and used["clip_val"] == 8.0
    assert "f1_micro" in multibench_test(data, tmp_path, capsys)


CASES = {  # name: (input dims, kwargs, fused shape per sample)
    "concat": ([4, 6], {}, 10), "concat_linear": ([4, 6], {"output_dim": 5}, 5), "tensor": ([2, 3], {}, 12),
    "low_rank_tensor": ([4, 6], {"output_dim": 5, "rank": 2}, 5), "stack": ([4, 4], {}, (4, 2)),
    "multiplicative_interactions": ([4, 6], {"output_dim": 5}, 5),
    "multiplicative_interactions_3modal": ([4, 6, 3], {"output_dim": 5}, 5),
    "nl_gate": ([6, 6], {"thw_dim": 3, "c_dim": 2, "tf_dim": 3}, 6), "deq": ([4, 4], {"f_max_iter": 4}, 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_dim_is_the_width_the_head_gets(name):
    dims, kwargs, width = CASES[name]
    fusion = create(name, dims, **({} if name == "deq" else {"root": ROOT}), **kwargs)
    out = fusion([torch.randn(3, d) for d in dims])
    out = out[0] if type(out) is tuple else out
    assert fusion.output_dim == width and tuple(out.shape[1:]) == (width if isinstance(width, tuple) else (width,))


def stand_ins() -> set[str]:
    return {name for name, m in sys.modules.items() if isinstance(m, common.Unavailable)}


def test_shims_apply_only_where_needed():
    before = stand_ins()          # another upstream's shims (MMF's) may have put a torchvision stand-in in place
    models = import_multibench("unimodals.common_models", ROOT)
    get_data = import_multibench("datasets.imdb.get_data", ROOT)
    applied = {s.name for s in compat.applied("multibench")}
    if "torchvision" in before:
        with pytest.raises(ImportError, match="torchvision"):
            models.tmodels.resnet18(pretrained=False)
    elif common.import_error("torchvision") is not None:
        assert "torchvision" in applied
        with pytest.raises(ImportError, match="torchvision.*ResNet/VGG encoders"):
            models.tmodels.resnet18(pretrained=False)
    else:
        assert not isinstance(models.torchvision, common.Unavailable)
    if common.import_error("gensim.models") is not None:
        with pytest.raises(ImportError, match="KeyedVectors.load_word2vec_format is not available"):
            get_data.KeyedVectors.load_word2vec_format("vectors.bin", binary=True)
    assert stand_ins() == before                 # MultiBench's stand-ins are gone once it has imported


def test_runner_through_the_cli(data, tmp_path):
    from deqfusion_core.cli import main

    out = tmp_path / "result.json"
    code = main(["run", "multibench", "--upstream", ROOT, "--f-max-iter", "6", "--b-max-iter", "6",
                 "-o", "f_max_iter_eval=6", "--",
                 "--data", str(data), "--limit", str(ROWS), "--epochs", "1", "--dim", str(WIDTH),
                 "--batch-size", str(BATCH), "--save", str(tmp_path / "best.pt"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["settings"]["data"]["limit"] == ROWS and result["solver"]["nstep"] <= 6   # the last (evaluation) solve
    assert all(0.0 <= result[s][k] <= 1.0 for s in ("valid", "test") for k in ("f1_micro", "f1_macro"))
    assert result["settings"]["fusion"]["jac_weight"] == 0.1 and result["settings"]["train"]["lr"] == 8e-3
    # MM-IMDB's DEQ takes the contractive norm, and MultiBench's train() pickled the whole normed model
    assert result["settings"]["fusion"]["options"]["norm"] == "contractive"
    assert torch.load(tmp_path / "best.pt", weights_only=False).fuse.deq.norm == "contractive"


def test_runner_on_rosmap_through_multibench_train(tmp_path):
    """ROSMAP (MOGONET's layout) through MultiBench's own train() and single_test(): what the MultiBench study runs."""
    from deqfusion_adapters.multibench import runner

    rosmap = Path(__file__).parents[1].parent / "shared" / "data" / "rosmap"
    if not (rosmap / "labels_tr.csv").is_file():
        pytest.skip(f"ROSMAP data not found at {rosmap}")
    out = tmp_path / "result.json"
    code = runner.main(["--data", str(rosmap), "--fusion", "concat", "--limit", "48", "--epochs", "2", "--dim", "8",
                        "--save", str(tmp_path / "best.pt"), "--json", str(out)], root=ROOT)
    result = json.loads(out.read_text())
    assert code == 0 and result["settings"]["train"]["optimizer"] == "RMSprop"        # train()'s own default
    assert 0 <= result["test"]["accuracy"] <= 1 and result["epochs"] == 2


def test_launching_a_multibench_script(tmp_path, capsys):
    from deqfusion_core.cli import main

    script = tmp_path / "script.py"  # what MultiBench's example scripts do: import its modules, torch.load bare
    script.write_text("import sys, torch\n"
                      "from unimodals.common_models import Linear\n"
                      "from datasets.imdb.get_data import get_dataloader\n"
                      "torch.save(Linear(2, 3), sys.argv[1])\n"
                      "print('loaded', type(torch.load(sys.argv[1])).__name__)\n")
    assert main(["run", "multibench", "--upstream", ROOT, "--", str(script), str(tmp_path / "m.pt")]) == 0
    assert "loaded Linear" in capsys.readouterr().out
