"""vqa.pytorch's own train.py (through `deqfusion run mutan`) trains MutanAtt with DEQ fusion for an epoch and
validates, on VQA-v2 generated in vqa.pytorch's own layout: the raw question/annotation JSONs it turns into its
interim and processed files itself, and grid features as its extract.py writes them (HDF5 [N, 2048, 14, 14] there;
tiny here). MutanAtt attends over a grid: it takes 4-D features only, not bottom-up region features.

Checkout-gated: DEQFUSION_VQA_PYTORCH_ROOT (a Cadene/vqa.pytorch checkout; copied, since train.py runs in it).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("h5py")
yaml = pytest.importorskip("yaml")

import vqa_data  # noqa: E402

ROOT = os.environ.get("DEQFUSION_VQA_PYTORCH_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="DEQFUSION_VQA_PYTORCH_ROOT is not set (a Cadene/vqa.pytorch checkout)")
DV, GRID = 32, 3


@pytest.fixture
def checkout(tmp_path):
    return Path(shutil.copytree(ROOT, tmp_path / "vqa.pytorch", ignore=shutil.ignore_patterns(".git", "doc", "demo_web")))


def options(tmp_path: Path, epochs: int = 1, per_image: int = 3) -> Path:
    """Generated data and MutanAtt's options file (small widths) for ``epochs`` epochs of training, ``per_image``
    questions an image (benchmarks/recipe_convergence.py asks for more)."""
    data = tmp_path / "data"
    ids = vqa_data.write_vqa2_raw(data / "vqa2" / "raw" / "annotations", per_image)
    vqa_data.write_grid_features(data / "coco" / "extract" / "arch,fbresnet152_size,448", ids, DV, GRID)
    st = vqa_data.write_skipthoughts(data / "skip-thoughts")
    opts = {
        "logs": {"dir_logs": str(tmp_path / "logs")},
        "vqa": {"dataset": "VQA2", "dir": str(data / "vqa2"), "trainsplit": "train", "nans": 24, "maxlength": 26,
                "minwcount": 0, "nlp": "mcb", "pad": "right", "samplingans": True},
        "coco": {"dir": str(data / "coco"), "arch": "fbresnet152", "mode": "att", "size": 448},
        "model": {"arch": "MutanAtt", "dim_v": DV, "dim_q": 2400,
                  "seq2vec": {"arch": "skipthoughts", "dir_st": str(st), "type": "BayesianUniSkip", "dropout": 0.25,
                              "fixed_emb": False},
                  "attention": {"nb_glimpses": 2, "dim_hv": 20, "dim_hq": 20, "dim_mm": 20, "R": 2, "dropout_v": 0.5,
                                "dropout_q": 0.5, "dropout_mm": 0.5, "activation_v": "tanh", "activation_q": "tanh",
                                "dropout_hv": 0, "dropout_hq": 0},
                  "fusion": {"dim_hv": 40, "dim_hq": 20, "dim_mm": 30, "R": 2, "dropout_v": 0.5, "dropout_q": 0.5,
                             "activation_v": "tanh", "activation_q": "tanh", "dropout_hv": 0, "dropout_hq": 0},
                  "classif": {"dropout": 0.5}},
        "optim": {"lr": 1e-3, "batch_size": 8, "epochs": epochs + 1},     # train.py trains epochs 1 .. epochs-1
    }
    path = tmp_path / "mutan_att_train.yaml"
    path.write_text(yaml.safe_dump(opts))
    return path


def test_train_py_trains_and_validates_mutan_att_with_deq(tmp_path, checkout):
    path = options(tmp_path)
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "run", "mutan", "--upstream", str(checkout),
                           "--f-max-iter", "8", "--jac-weight", "0.1", "--", "--path_opt", str(path), "-j", "0",
                           "--print_freq", "1"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    logs = tmp_path / "logs"
    # vqa.pytorch processed the raw JSONs itself, trained an epoch, validated, and saved its checkpoint
    assert list((tmp_path / "data" / "vqa2" / "processed").glob("*/trainset.pickle"))
    assert "Epoch: [1]" in log and (logs / "ckpt_model.pth.tar").is_file()
    import torch

    state = torch.load(logs / "ckpt_model.pth.tar", map_location="cpu", weights_only=False)
    assert any(k.startswith("fusion_classif.deq.") for k in state), sorted(state)[:10]
    logger = json.loads((logs / "logger.json").read_text())
    assert "val" in json.dumps(logger) and "acc1" in json.dumps(logger)
    assert (logs / "epoch_1" / "OpenEnded_mscoco_val2014_model_results.json").is_file()


def test_compare_mutan_smoke(tmp_path, checkout):
    """`deqfusion compare mutan --smoke`: train.py once with Mutan's own fusion (baseline=True: the shims only) and
    once with DEQ; what train.py prints with --help_opt (its args and options) differs only in the fusion."""
    path = options(tmp_path)
    out = tmp_path / "study"
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "compare", "mutan", "--seeds", "1",
                           "--smoke", "--upstream", str(checkout), "--f-max-iter", "8", "--out", str(out), "--",
                           "--path_opt", str(path), "--print_freq", "1"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert runs["baseline"]["fusion"] == "mutan" and runs["baseline"]["solver"] is None
    diff = runs["deq"]["differs_from_baseline"]
    assert "fusion.type" in diff and all(k.startswith("fusion.") for k in diff), diff
    for r in runs.values():
        assert r["selected_by"] == "final" and 0 <= r["val"]["acc1"] <= 1 and r["info"]["epochs"] == 1
        assert any("seeds nothing" in c for c in r["behaviour_changes"])
