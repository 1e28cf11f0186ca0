"""MCAN (MILVLG/mcan-vqa) with DEQ fusion: the real run.py trains MCAN-small for one epoch on a tiny generated
dataset in MCAN's own file layout, validates, and the saved checkpoint reloads for --RUN=val.

Runs against DEQFUSION_MCAN_ROOT (a checkout of MILVLG/mcan-vqa), else the snapshot in ../shared/upstreams/mcan-vqa
(see upstreams.py). The checkout is copied to a temporary folder first, because run.py writes results/ and ckpts/
beside itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import upstreams
from deqfusion_compat.vqa import read_glove
from deqfusion_patches.mcan import plugin

ROOT = upstreams.checkout("DEQFUSION_MCAN_ROOT", "mcan-vqa")

QUESTIONS = [("what color is the cat", "red"), ("is there a dog", "yes"), ("how many people are there", "2"),
             ("is it raining", "no"), ("what color is the sky", "blue"), ("how many cats are there", "3")]
SPLITS = {  # split -> (feature folder, number of images, questions per image)
    "train": ("train2014", 8, 3), "val": ("val2014", 4, 2), "test": ("test2015", 2, 1)}


def make_dataset(root: Path, seed: int = 0, splits: dict = SPLITS) -> tuple[Path, Path, Path]:
    """VQA-v2 question/annotation JSON, per-image bottom-up .npz features and a GloVe text file; ``splits`` as
    :data:`SPLITS` (benchmarks/recipe_convergence.py asks for more images)."""
    rng = np.random.default_rng(seed)
    data, feats = root / "vqa", root / "coco_extract"
    data.mkdir(parents=True)
    qid = 0
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}}
    files = {"train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json"),
             "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
             "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None)}
    for split, (folder, n_images, per_image) in splits.items():
        (feats / folder).mkdir(parents=True)
        questions, annotations = [], []
        for i in range(n_images):
            image_id = 1000 * (list(splits).index(split) + 1) + i
            boxes = int(rng.integers(10, 20))
            np.savez(feats / folder / f"COCO_{folder}_{image_id:012d}.jpg.npz",
                     x=rng.random((2048, boxes), dtype=np.float32))
            for j in range(per_image):
                text, answer = QUESTIONS[(i + j) % len(QUESTIONS)]
                qid += 1
                questions.append({"image_id": image_id, "question": text + "?", "question_id": qid})
                annotations.append({"question_id": qid, "image_id": image_id, "question_type": text.split()[0],
                                    "answer_type": "yes/no" if answer in ("yes", "no") else "other",
                                    "multiple_choice_answer": answer,
                                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                                for k in range(10)]})
        qfile, afile = files[split]
        (data / qfile).write_text(json.dumps({**meta, "data_subtype": folder, "questions": questions}))
        if afile:
            (data / afile).write_text(json.dumps({**meta, "data_subtype": folder, "annotations": annotations}))
    (data / "VG_questions.json").write_text(json.dumps({"questions": []}))
    (data / "VG_annotations.json").write_text(json.dumps({"annotations": []}))
    words = sorted({w for q, _ in QUESTIONS for w in q.split()} - {"raining"})    # one word without a vector
    glove = root / "glove.tiny.300d.txt"
    glove.write_text("".join(w + " " + " ".join(f"{v:.4f}" for v in rng.standard_normal(300)) + "\n" for w in words))
    return data, feats, glove


def deqfusion(checkout: Path, args: list[str], glove: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEQFUSION_GLOVE": str(glove), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "deqfusion_core", "run", "mcan", "--upstream", str(checkout),
           "--f-max-iter", "12", "--jac-weight", "0.1", "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def checkout(tmp_path):
    if not ROOT:
        pytest.skip(upstreams.missing("DEQFUSION_MCAN_ROOT", "mcan-vqa"))
    return upstreams.writable_copy(ROOT, tmp_path / "mcan-vqa")


def test_mcan_small_trains_one_epoch_validates_and_reloads(tmp_path, checkout):
    data, feats, glove = make_dataset(tmp_path / "data")
    common = ["--MODEL=small", f"--DATA_PATH={data}", f"--FEAT_PATH={feats}", "--NW=0", "--GPU=0", "--SEED=1"]

    train = deqfusion(checkout, ["--RUN=train", "--SPLIT=train", "--BS=8", "--MAX_EPOCH=1", "--VERSION=deq",
                                 *common], glove)
    log = train.stdout + train.stderr
    assert train.returncode == 0, log[-4000:]
    assert "GloVe vectors from" in log and "found" in log             # the spaCy shim read the named file
    assert "Overall Accuracy is" in log                               # validated after the epoch
    ckpt = checkout / "ckpts" / "ckpt_deq" / "epoch1.pkl"
    assert ckpt.is_file(), log[-4000:]
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("deq_fusion.") for k in state), "the checkpoint has no DEQ fusion parameters"
    assert "Overall Accuracy" in (checkout / "results" / "log" / "log_run_deq.txt").read_text()

    val = deqfusion(checkout, ["--RUN=val", "--CKPT_V=deq", "--CKPT_E=1", *common], glove)
    assert val.returncode == 0, (val.stdout + val.stderr)[-4000:]
    assert "Overall Accuracy is" in val.stdout


JAC_CHECK = r"""
import sys, torch
from deqfusion_core import Upstream
from deqfusion_patches.mcan import plugin
from pathlib import Path
plugin.INTEGRATION.apply(Upstream("mcan", True, Path(sys.argv[1])),
                         {"jac_weight": float(sys.argv[2]), "f_max_iter": 8, "baseline": sys.argv[3] == "1"})
from cfgs.base_cfgs import Cfgs
from core.model.net import Net
cfg = Cfgs()
cfg.add_args({"LAYER": 1, "HIDDEN_SIZE": 64, "MULTI_HEAD": 4, "FLAT_MLP_SIZE": 64, "FLAT_OUT_SIZE": 128,
              "USE_GLOVE": False, "IMG_FEAT_SIZE": 32})
cfg.FF_SIZE, cfg.HIDDEN_SIZE_HEAD = 256, 16
torch.manual_seed(0)
net = Net(cfg, None, 20, 7)
img, ques = torch.rand(5, 6, 32), torch.randint(1, 20, (5, 4))
target = torch.rand(5, 7).round()
pred = net(img, ques)
loss = torch.nn.BCELoss(reduction="sum")(pred, target)
loss.backward()
print("KEYS", any(k.startswith("deq_fusion.") for k in net.state_dict()))
print("GRAD", net.deq_fusion.deq.weights.grad.tolist() if hasattr(net, "deq_fusion") else None)
if hasattr(net, "deq_fusion"):
    b = net.deq_fusion.last_stats.backward
    print("BACKWARD", net.deq_fusion.deq.b_max_iter, b.nstep, b.converged)
"""


def test_jacobian_term_reaches_the_summed_loss(tmp_path, checkout):
    """Same seed, same batch: the fusion's gradient changes when --jac-weight is set, with the loss untouched."""
    script = tmp_path / "jac_check.py"
    script.write_text(JAC_CHECK)
    grads = []
    for weight in ("0", "1.0"):
        out = subprocess.run([sys.executable, str(script), str(checkout), weight, "0"], capture_output=True, text=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=checkout, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "KEYS True" in out.stdout
        cap, steps = out.stdout.split("BACKWARD", 1)[1].split()[:2]
        assert cap == "40" and 1 <= int(steps) <= 40      # MCAN's recipe: backward cap 40 (DEQFusion's default: 10)
        grads.append(eval(out.stdout.split("GRAD", 1)[1].splitlines()[0]))
    assert grads[0] != pytest.approx(grads[1], rel=1e-4)

    baseline = subprocess.run([sys.executable, str(script), str(checkout), "0", "1"], capture_output=True, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=checkout, timeout=300)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    assert "KEYS False" in baseline.stdout        # -o baseline=True: shims only, the upstream's sum fusion


REMOVE_CHECK = r"""
import sys
from pathlib import Path
from deqfusion_core import Upstream, compat
from deqfusion_patches.mcan import plugin
root = Path(sys.argv[1])
sys.path.insert(0, str(root))
from cfgs.base_cfgs import Cfgs
from core.model.net import Net
originals = (vars(Net)["__init__"], vars(Net)["forward"], vars(Cfgs)["add_args"])
plugin.INTEGRATION.apply(Upstream("mcan", True, root), {"f_max_iter": 8})
from core.data import data_utils, load_data
patched = (vars(Net)["__init__"], vars(Net)["forward"], vars(Cfgs)["add_args"])
assert all(p is not o for p, o in zip(patched, originals)) and data_utils.tokenize.__module__ == "deqfusion_compat.vqa"
print("APPLIED", sorted(s.name for s in compat.applied("mcan")))
plugin.INTEGRATION.remove()
assert (vars(Net)["__init__"], vars(Net)["forward"], vars(Cfgs)["add_args"]) == originals
assert data_utils.tokenize.__module__ == "core.data.data_utils" and load_data.tokenize is data_utils.tokenize
assert "en_vectors_web_lg" not in sys.modules
print("REMOVED")
"""


def test_remove_restores_the_upstream_objects(tmp_path, checkout):
    script = tmp_path / "remove_check.py"
    script.write_text(REMOVE_CHECK)
    out = subprocess.run([sys.executable, str(script), str(checkout)], capture_output=True, text=True, cwd=checkout,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert out.returncode == 0 and "REMOVED" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "'Cfgs.add_args'" in out.stdout and "'en_vectors_web_lg'" in out.stdout     # the shims it needed


def test_read_glove_keeps_named_words_and_reports_a_missing_file(tmp_path):
    glove = tmp_path / "g.txt"
    glove.write_text("the 0.1 0.2 0.3\ncat 1 2 3\nnew york 1 2 3\ndog 4 5 6\n")   # "new york": a spaced token
    vectors, width = read_glove(glove, {"cat", "dog", "bird"})
    assert width == 3 and sorted(vectors) == ["cat", "dog"]
    np.testing.assert_allclose(vectors["dog"], [4, 5, 6])
    with pytest.raises(FileNotFoundError, match="DEQFUSION_GLOVE"):
        read_glove(tmp_path / "missing.txt", {"cat"})


def test_missing_checkout_is_reported():
    up = plugin.INTEGRATION.locate("/nonexistent/mcan")
    assert not up.found and "not a directory" in up.reason


def test_compare_mcan_smoke(tmp_path, checkout):
    """`deqfusion compare mcan --smoke`: run.py once per arm (the upstream's sum via baseline=True, and DEQ), its
    Cfgs compared key by key, VQA val accuracy after the epoch."""
    data, feats, glove = make_dataset(tmp_path / "data")
    out = tmp_path / "study"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "compare", "mcan", "--seeds", "1", "--smoke",
                           "--upstream", str(checkout), "--f-max-iter", "8", "--out", str(out), "--",
                           "--MODEL=small", f"--DATA_PATH={data}/", f"--FEAT_PATH={feats}/", "--GPU=0",
                           "--glove", str(glove)], capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert runs["baseline"]["fusion"] == "sum" and runs["baseline"]["solver"] is None
    diff = runs["deq"]["differs_from_baseline"]
    assert "fusion.type" in diff and all(k.startswith("fusion.") for k in diff), diff
    for r in runs.values():
        assert r["selected_by"] == "final" and 0 <= r["val"]["accuracy"] <= 1 and r["test"] is None
    # --f-max-iter caps the training solves; max_iter is the last solve's cap, an evaluation: max(8, 100)
    assert runs["deq"]["solver"]["mean_steps"] <= 8 and runs["deq"]["solver"]["max_iter"] == 8
