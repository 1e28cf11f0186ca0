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
    from deqfusion_patches.mmdynamics import plugin, protocol

    integ = plugin.INTEGRATION
    upstream = integ.locate(ROOT)
    integ.apply(upstream, dict(FAST))
    return integ, upstream, protocol, plugin


def args_for(protocol, tmp_path, *extra):
    return protocol.parse_args(["--data-folder", str(DATA), "--hidden", "16", "--epochs", "3", "--eval-every", "2",
                                "--modelpath", str(tmp_path), *extra])


def test_training_loop_fair_protocol_with_deq(mmd, tmp_path, capsys):
    integ, upstream, protocol, plugin = mmd
    summary = protocol.run(integ.train_test, args_for(protocol, tmp_path, "--protocol", "fair", "--seed", "3"),
                           upstream.root)
    out = capsys.readouterr().out
    model = protocol.RUN["model"]
    head = model.MMClasifier
    assert isinstance(head, plugin.DEQHead) and head.classifier.clf[0].in_features == 16
    # the upstream loop ran epochs 0..3; evaluations at 0 and 2 (its test_inverval), validation at both
    assert len(protocol.RUN["epoch_times"]) == 4 and [r["epoch"] for r in summary["history"]] == [0, 2]
    assert all("val" in r for r in summary["history"])
    # stratified split: 20% of ROSMAP's 245 training files, both classes present in the same proportion
    n_val, n_tr = len(protocol.RUN["labels_val"]), len(protocol.RUN["labels_te"])
    assert n_val == 49 and n_tr == 106 and set(protocol.RUN["labels_val"]) == {0, 1}
    # warm starts: one solved state per split (train, val, test), kept out of the checkpoint
    assert sorted(protocol.RUN["split_keys"].get(k) for k in head.states) == ["test", "train", "val"]
    # the DEQ parameters and the new classifier trained (Jacobian term and clip hook in the upstream step)
    assert not torch.equal(head.deq_fusion.weights.detach(), torch.ones(3))
    assert 0 <= summary["final"]["acc"] <= 1 and 0 <= summary["val_selected"]["auc"] <= 1
    # every metric line names its protocol
    metric_lines = [line for line in out.splitlines() if "acc" in line.lower() or "AUC" in line]
    assert metric_lines and all("protocol" in line for line in metric_lines), out
    assert "[fair protocol: validation-selected epoch" in out and "DEQ solver: train:" in out

    # checkpoint written by the upstream save_checkpoint, loaded by its test-only path
    ckpt = tmp_path / "ROSMAP" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu")
    assert any(k.startswith("MMClasifier.deq_fusion.") for k in state) and not any("states" in k for k in state)
    head.states.clear()             # the reloaded model starts its solver cold: compare like with like
    test, labels = protocol.RUN["test"], protocol.RUN["labels_te"]
    expected = protocol.scores(labels, integ.train_test._deqfusion_upstream["test_epoch"](test, model))
    reloaded = protocol.run(integ.train_test, args_for(protocol, tmp_path, "--testonly"), upstream.root)
    assert reloaded["checkpoint"] == pytest.approx(expected)
    assert "[checkpoint " in capsys.readouterr().out


def test_paper_protocol_and_concat_baseline(mmd, tmp_path, capsys):
    integ, upstream, protocol, plugin = mmd
    summary = protocol.run(integ.train_test, args_for(protocol, tmp_path, "--fusion", "concat", "--views", "mR,miR"),
                           upstream.root)
    model = protocol.RUN["model"]
    assert not isinstance(model.MMClasifier, plugin.DEQHead) and model.views == 2
    assert [x.shape[1] for x in protocol.RUN["test"]] == [200, 200] and len(protocol.RUN["labels_te"]) == 106
    assert summary["paper_best"]["epoch"] in (0, 2) and "val_selected" not in summary
    out = capsys.readouterr().out
    assert "[paper protocol: best test of 2 evaluations" in out and "Test ACC" in out


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
    args = protocol.parse_args(["--data-folder", str(DATA), "--fusion", "concat", "--testonly"])
    summary = protocol.run(integ.train_test, args, upstream.root)
    assert summary["checkpoint"] == pytest.approx({"acc": 0.840, "f1": 0.844, "auc": 0.900}, abs=1e-3)
    assert "[checkpoint " in capsys.readouterr().out
