"""MM-Dynamics with DEQ fusion: the upstream training script on ROSMAP, on CPU, and a checkpoint round trip.

Needs a checkout of TencentAILabHealthcare/mmdynamics in DEQFUSION_MMDYNAMICS_ROOT and ../shared/data/rosmap.
Tiny widths and a few full-batch epochs keep it to seconds.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

ROOT = os.environ.get("DEQFUSION_MMDYNAMICS_ROOT")
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "rosmap"
pytestmark = [
    pytest.mark.skipif(not ROOT, reason="DEQFUSION_MMDYNAMICS_ROOT is unset (git clone TencentAILabHealthcare/mmdynamics)"),
    pytest.mark.skipif(not (DATA / "labels_tr.csv").is_file(), reason=f"ROSMAP data not found at {DATA}"),
]

FAST = {"f_max_iter": 8, "b_max_iter": 8, "num_groups": 2}


@pytest.fixture(scope="module")
def mmd():
    from deqfusion_patches.mmdynamics import head, plugin, protocol

    integ = plugin.INTEGRATION
    upstream = integ.locate(ROOT)
    integ.apply(upstream, dict(FAST))
    return integ, upstream, protocol, head


def argv(tmp_path, *extra):
    return ["--data-folder", str(DATA), "--hidden", "16", "--epochs", "3", "--eval-every", "2",
            "--modelpath", str(tmp_path), *extra]


def test_training_loop_fair_protocol_with_deq(mmd, tmp_path, capsys):
    integ, upstream, protocol, head_module = mmd
    run = integ.run(argv(tmp_path, "--protocol", "fair", "--seed", "3"))
    summary, out = run.summary, capsys.readouterr().out
    model = run.model
    head = model.MMClasifier
    assert isinstance(head, head_module.DEQHead) and head.classifier.clf[0].in_features == 16
    # the upstream loop ran epochs 0..3; evaluations at 0 and 2 (its test_inverval), validation at both
    assert len(run.epoch_times) == 4 and [r["epoch"] for r in summary["history"]] == [0, 2]
    assert all("val" in r for r in summary["history"])
    # stratified split: 20% of ROSMAP's 245 training files, both classes present in the same proportion
    n_val, n_tr = len(run.labels_val), len(run.labels_te)
    assert n_val == 49 and n_tr == 106 and set(run.labels_val) == {0, 1}
    # warm starts: one solved state per split (train, val, test), kept out of the checkpoint
    assert sorted(run.split_keys.get(k) for k in head.split_solves) == ["test", "train", "val"]
    # the DEQ parameters and the new classifier trained (Jacobian term in the upstream step); no clipping asked
    assert not torch.equal(head.deq.weights.detach(), torch.ones(3))
    assert 0 <= summary["final"]["acc"] <= 1 and 0 <= summary["val_selected"]["auc"] <= 1
    # the authors' selection (acc + weighted F1 + macro F1), on validation and, beside it, on test
    chosen = protocol.select(summary["history"], "val")
    assert summary["val_selected"]["epoch"] == chosen["epoch"] and "test_selected" in summary
    assert set(summary["final"]["val"]) == {"acc", "f1", "auc", "f1_weighted", "f1_macro"}
    # every metric line names its protocol
    metric_lines = [line for line in out.splitlines() if "acc" in line.lower() or "AUC" in line]
    assert metric_lines and all("protocol" in line for line in metric_lines), out
    assert "[fair protocol: validation-selected epoch" in out and "DEQ solver: train:" in out
    # the model and the script were patched for the run only
    train_test, mmdynamic = integ.modules["train_test"], integ.modules["model"].MMDynamic
    assert mmdynamic.__init__.__module__ == "model" and train_test.test_epoch.__module__ == "train_test"
    assert "print" not in vars(train_test)

    # checkpoint written by the upstream save_checkpoint, loaded by its test-only path
    ckpt = tmp_path / "ROSMAP" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu")
    assert any(k.startswith("MMClasifier.deq.") for k in state) and not any("solve" in k for k in state)
    head.split_solves.clear()       # the reloaded model starts its solver cold: compare like with like
    expected = protocol.scores(run.labels_te, train_test.test_epoch(run.test, model))
    reloaded = integ.run(argv(tmp_path, "--testonly")).summary
    assert reloaded["checkpoint"] == pytest.approx(expected)
    assert "[checkpoint " in capsys.readouterr().out


def test_paper_protocol_and_concat_baseline(mmd, tmp_path, capsys):
    integ, upstream, protocol, head_module = mmd
    run = integ.run(argv(tmp_path, "--fusion", "concat", "--views", "mR,miR", "--grad-clip", "30"))
    model, summary = run.model, run.summary
    assert not isinstance(model.MMClasifier, head_module.DEQHead) and model.views == 2
    assert model.MMClasifier[0].clf[0].in_features == 2 * 16      # --hidden applies to the baseline too
    assert [x.shape[1] for x in run.test] == [200, 200] and len(run.labels_te) == 106
    assert summary["paper_best"]["epoch"] in (0, 2) and "val_selected" not in summary
    out = capsys.readouterr().out
    assert "[paper protocol: test-selected of 2 evaluations (the authors' criterion" in out and "Test ACC" in out


def test_remove_restores_the_upstream_objects(mmd):
    integ, upstream, _, _ = mmd
    train_test = integ.modules["train_test"]
    shimmed = train_test.load_checkpoint
    assert shimmed.__module__ == "deqfusion_compat.mmdynamics"        # no GPU here: the CPU-mapping shim
    integ.remove()
    try:
        assert train_test.load_checkpoint.__module__ == "train_test" and not integ.applied
    finally:
        integ.apply(upstream, dict(FAST))


def test_bad_arguments_name_the_argument(mmd, tmp_path, capsys):
    _, _, protocol, _ = mmd
    with pytest.raises(argparse.ArgumentTypeError, match="--views: unknown view 'RNA'"):
        protocol.parse_views("mR,RNA")
    with pytest.raises(SystemExit):
        protocol.parse_args(["--data-folder", str(tmp_path)])
    assert "--data-folder" in capsys.readouterr().err


def test_released_checkpoint_scores_on_cpu(mmd, capsys):
    """The upstream's released ROSMAP checkpoint (saved from CUDA tensors) loads on CPU through the
    load_checkpoint shim and scores what its authors' model scores (test split)."""
    integ, upstream, protocol, _ = mmd
    if not (upstream.root / "model" / "ROSMAP" / "checkpoint.pt").is_file():
        pytest.skip("the checkout has no model/ROSMAP/checkpoint.pt (Git LFS not fetched)")
    summary = integ.run(["--data-folder", str(DATA), "--fusion", "concat", "--testonly"]).summary
    upstream_metrics = {k: summary["checkpoint"][k] for k in ("acc", "f1", "auc")}   # what its script prints
    assert upstream_metrics == pytest.approx({"acc": 0.840, "f1": 0.844, "auc": 0.900}, abs=1e-3)
    assert "[checkpoint " in capsys.readouterr().out


def test_selection_is_the_authors_criterion():
    """experiments/BRCA/train_test_deq.py keeps the evaluation with the largest acc + weighted F1 + macro F1 (strict >:
    the first of equals), not the largest accuracy."""
    from deqfusion_patches.mmdynamics import protocol

    def rec(epoch, acc, wf1, mf1):
        return {"epoch": epoch, "test": {"acc": acc, "f1_weighted": wf1, "f1_macro": mf1}}

    history = [rec(0, 0.70, 0.60, 0.50), rec(50, 0.72, 0.55, 0.40), rec(100, 0.69, 0.62, 0.55), rec(150, 0.69, 0.62, 0.55)]
    assert protocol.select(history, "test")["epoch"] == 100


def test_gradient_clipping_applies_to_both_fusions(mmd, tmp_path):
    integ, _, _, _ = mmd
    for fusion in ("concat", "deq"):
        run = integ.run(argv(tmp_path, "--fusion", fusion, "--epochs", "1", "--grad-clip", "0.5"))
        model = run.model
        grads = [p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None]
        assert grads and float(sum(grads)) ** 0.5 <= 0.5 + 1e-4, fusion   # clipped before the last step
