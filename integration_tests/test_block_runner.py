"""block.bootstrap.pytorch's own runner (bootstrap.run, through `deqfusion run block`) trains and evaluates block's
VQA2 model with `fusion: {type: deq}` for an epoch, on VQA-v2 data generated in block's own layout: the raw
question/annotation JSONs it processes itself, and one bottom-up feature file per image."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("block", reason="block.bootstrap.pytorch is not installed (./install.sh vqa)")
yaml = pytest.importorskip("yaml")

import vqa_data  # noqa: E402

DV = 16   # visual feature width (bottom-up features are 2048; tiny here)


def options(tmp_path: Path, fusion: str = "deq", epochs: int = 1, per_image: int = 3) -> dict:
    """Generated data and block's options (small widths); ``per_image`` questions an image
    (benchmarks/recipe_convergence.py asks for more)."""
    data = tmp_path / "data"
    ids = vqa_data.write_vqa2_raw(data / "vqa2" / "raw" / "annotations", per_image)
    vqa_data.write_rcnn_features(data / "coco" / "extract_rcnn", ids, DV)
    st = vqa_data.write_skipthoughts(data / "skip-thoughts")
    classif = {"type": fusion, "input_dims": [4800, 2 * DV], "output_dim": 20, "mm_dim": 32, "rank": 3}
    if fusion == "deq":
        classif.update(num_groups=4, f_max_iter=10, b_max_iter=10, jac_weight=0.5)
    return {
        "exp": {"dir": str(tmp_path / "exp"), "resume": None},
        "misc": {"cuda": False, "seed": 1337, "logs_name": None},
        "dataset": {"import": "block.datasets.factory", "name": "vqa2", "dir": str(data / "vqa2"),
                    "train_split": "train", "eval_split": "val", "proc_split": "train", "nb_threads": 0,
                    "batch_size": 8, "nans": 20, "minwcount": 0, "nlp": "mcb", "samplingans": True,
                    "dir_rcnn": str(data / "coco" / "extract_rcnn"), "vg": False},
        "model": {"name": "default",
                  "network": {"import": "block.models.networks.factory", "name": "vqa_net",
                              "txt_enc": {"name": "skipthoughts", "type": "BayesianUniSkip", "dropout": 0.25,
                                          "fixed_emb": False, "dir_st": str(st)},
                              "self_q_att": True,
                              "attention": {"mlp_glimpses": 2,
                                            "fusion": {"type": "mutan", "input_dims": [4800, DV], "output_dim": 32,
                                                       "mm_dim": 32, "rank": 3}},
                              "classif": {"fusion": classif}},
                  "criterion": {"import": "block.models.criterions.factory", "name": "vqa_cross_entropy"},
                  "metric": {"import": "block.models.metrics.factory", "name": "vqa_accuracies"}},
        "optimizer": {"import": "block.optimizers.factory", "name": "Adamax", "lr": 3e-4,
                      "gradual_warmup_steps": [0.5, 2.0, 4], "lr_decay_epochs": [10, 20, 2], "lr_decay_rate": 0.25},
        "engine": {"name": "logger", "debug": False, "print_freq": 1, "nb_epochs": epochs,
                   "saving_criteria": ["eval_epoch.accuracy_top1:max"]},
    }


def run_block(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "run", "block", "--", "-o", str(path),
                           *extra], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def test_bootstrap_runner_trains_and_evaluates_block_vqa2_with_deq(tmp_path):
    opts = options(tmp_path)
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(opts))
    proc = run_block(path)
    exp = Path(opts["exp"]["dir"])
    logs = (exp / "logs.txt").read_text() if (exp / "logs.txt").is_file() else ""
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + logs[-4000:]
    # block processed the raw JSONs itself, bootstrap's engine trained and evaluated, and wrote its checkpoint
    assert list((Path(opts["dataset"]["dir"]) / "processed").glob("*/trainset.pth"))
    assert (exp / "ckpt_last_model.pth.tar").is_file()
    state = __import__("torch").load(exp / "ckpt_last_model.pth.tar", map_location="cpu", weights_only=False)
    assert any(".deq." in k for k in state["network"]), sorted(state["network"])[:10]
    stats = json.loads((exp / "logs.json").read_text())
    assert "train_epoch.loss" in stats and "eval_epoch.accuracy_top1" in stats
    assert "train_epoch.deq_nstep" in stats and "train_batch.jac_loss" in stats


def test_compare_block_smoke(tmp_path):
    """`deqfusion compare block --smoke`: bootstrap's runner with the options file's own classifier fusion (mutan)
    and with deq; bootstrap's merged options differ only in that fusion."""
    opts = options(tmp_path, fusion="mutan")
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(opts))
    out = tmp_path / "study"
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "compare", "block", "--seeds", "1",
                           "--smoke", "--f-max-iter", "8", "--out", str(out), "--", "-o", str(path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"baseline", "deq"} and runs["baseline"]["solver"] is None
    diff = runs["deq"]["differs_from_baseline"]
    assert "options.model.network.classif.fusion.type" in diff
    assert all(k.startswith(("options.model.network.classif.fusion", "deq.")) for k in diff), diff
    for r in runs.values():
        assert r["selected_by"] == "final" and 0 <= r["val"]["accuracy_top1"] <= 100
    assert runs["deq"]["solver"]["max_iter"] == 8           # --f-max-iter reached the DEQ arm only
