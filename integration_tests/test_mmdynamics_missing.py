"""Missing views in MM-Dynamics (issue 13): ROSMAP with some rows of a view all NaN, through the upstream's own
loader, model and training script. Those rows are absent views: the DEQ gets them as its mask, the upstream's
encoders see zeros (nothing non-finite reaches a weight), and what stands in an absent row changes no prediction.

Needs a checkout of TencentAILabHealthcare/mmdynamics in DEQFUSION_MMDYNAMICS_ROOT and ../shared/data/rosmap.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_mmdynamics import DATA, FAST, ROOT, pytestmark  # noqa: F401 - the same upstream, data and skips
ABSENT_TR = {2: [0, 5, 17, 40, 100]}           # view file -> rows made all NaN (training files)
ABSENT_TE = {3: [1, 2, 50], 1: [3]}            # (test files)


@pytest.fixture(scope="module")
def mmd():
    from deqfusion_patches.mmdynamics import compare, head, plugin

    integ = plugin.INTEGRATION
    integ.apply(integ.locate(ROOT), dict(FAST))
    return integ, head, compare


@pytest.fixture(scope="module")
def holes(tmp_path_factory):
    """ROSMAP with the ABSENT_* rows of their views all NaN (the folder keeps the name: --dataset ROSMAP)."""
    folder = tmp_path_factory.mktemp("data") / "rosmap"
    shutil.copytree(DATA, folder)
    for split, absent in (("tr", ABSENT_TR), ("te", ABSENT_TE)):
        for view, rows in absent.items():
            x = np.loadtxt(folder / f"{view}_{split}.csv", delimiter=",")
            x[rows] = np.nan
            np.savetxt(folder / f"{view}_{split}.csv", x, delimiter=",")
    return folder


def expected_test_mask(n):
    present = torch.ones(n, 3, dtype=torch.bool)
    for view, rows in ABSENT_TE.items():
        present[rows, view - 1] = False
    return present


@pytest.fixture(scope="module")
def trained(mmd, holes, tmp_path_factory):
    from deqfusion_core import DEQFusion

    integ = mmd[0]
    seen, forward = [], DEQFusion.forward

    def recording(self, xs, *args, **kwargs):
        seen.append(kwargs.get("present"))
        return forward(self, xs, *args, **kwargs)

    DEQFusion.forward = recording
    try:
        run = integ.run(["--data-folder", str(holes), "--hidden", "16", "--epochs", "3", "--eval-every", "2",
                         "--protocol", "fair", "--seed", "3", "--modelpath", str(tmp_path_factory.mktemp("model")),
                         "--quiet"])
    finally:
        DEQFusion.forward = forward
    return run, seen


def test_nan_rows_are_the_deqs_mask_and_never_reach_the_encoders(trained):
    run, seen = trained
    n_te = len(run.labels_te)
    assert torch.equal(run.present_te, expected_test_mask(n_te))
    # every DEQ solve of the run got its split's mask: the test split's as built from the files
    test_masks = [p for p in seen if p is not None and p.shape[0] == n_te]
    assert test_masks and all(torch.equal(p, expected_test_mask(n_te)) for p in test_masks)
    # the training and validation splits: the five absent rows of view 2 between them (the validation split may
    # hold none: then it has no mask)
    train_val = [p for p in seen if p is not None and p.shape[0] != n_te]
    assert 245 - len(run.labels_val) in {p.shape[0] for p in train_val}
    absent = {(p.shape[0], tuple((~p).sum(0).tolist())) for p in train_val}
    assert sum(c[1] for _, c in absent) == len(ABSENT_TR[2]) and all(c[0] == c[2] == 0 for _, c in absent)
    # the upstream's encoders saw zeros where the files had NaN: every weight and every metric is finite
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert all(np.isfinite(v) for v in run.summary["final"].values() if isinstance(v, float))
    assert all(torch.isfinite(x).all() for x in run.test + run.train)


def predict(run, train_test, split_key, xs, mask):
    """The upstream's test_epoch on ``xs``, the DEQ head given ``mask`` (None: no mask), solving from zero."""
    head = run.model.MMClasifier
    head.split_key, head.present = split_key(xs), mask
    try:
        return train_test.test_epoch(xs, run.model)
    finally:
        head.split_solves.pop(head.split_key, None)


def test_what_stands_in_an_absent_view_changes_no_prediction(mmd, trained):
    integ, head, _ = mmd
    run, _ = trained
    train_test = integ.modules["train_test"]
    g = torch.Generator().manual_seed(0)
    zero = [x.clone() for x in run.test]
    garbage = [torch.where(run.present_te[:, i, None], x, 100 * torch.randn(x.shape, generator=g))
               for i, x in enumerate(run.test)]
    a = predict(run, train_test, head.split_key, zero, run.present_te)
    b = predict(run, train_test, head.split_key, garbage, run.present_te)
    assert np.allclose(a, b, atol=1e-6, rtol=0)
    # the same garbage without the mask (what the concatenation gets) does change the predictions of its rows
    c = predict(run, train_test, head.split_key, garbage, None)
    assert (np.abs(c - a).max(1) > 1e-3)[~run.present_te.all(1).numpy()].any()


def test_robustness_evaluator_masks_a_removed_view(mmd, trained, monkeypatch):
    _, _, compare = mmd
    from deqfusion_core import DEQFusion
    from deqfusion_core.compare.robustness import Perturbation, Transform

    run, _ = trained
    ev = compare._Evaluator(run, mmd[0])
    assert ev.modalities == ["mR", "D", "miR"] and ev.takes_mask
    received, forward = [], DEQFusion.forward
    monkeypatch.setattr(DEQFusion, "forward", lambda self, xs, *a, **kw: received.append(kw.get("present")) or
                        forward(self, xs, *a, **kw))
    seen = []
    for p in (Perturbation("clean"), Perturbation("remove", 1, missing="mask")):
        t = Transform(p)
        ev.evaluate(lambda xs, present, t=t: seen.append(t(xs, present)) or seen[-1])
    clean, removed = seen
    assert torch.equal(clean[1], run.present_te)
    assert not removed[1][:, 1].any() and torch.equal(removed[1][:, [0, 2]], run.present_te[:, [0, 2]])
    # the DEQ itself got those masks (after the run, the model's forward is the upstream's again)
    assert len(received) == 2 and torch.equal(received[0], clean[1]) and torch.equal(received[1], removed[1])
    assert run.model.MMClasifier.present is None                  # the evaluation's mask is not left behind


def test_concatenation_trains_on_the_zero_filled_views(mmd, holes, tmp_path):
    run = mmd[0].run(["--data-folder", str(holes), "--hidden", "16", "--epochs", "2", "--eval-every", "2",
                      "--fusion", "concat", "--protocol", "fair", "--seed", "1", "--modelpath", str(tmp_path),
                      "--quiet"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert 0 <= run.summary["final"]["acc"] <= 1


def test_a_partly_nan_row_is_an_error_naming_the_file(mmd, holes, tmp_path):
    folder = tmp_path / "rosmap"
    shutil.copytree(holes, folder)
    x = np.loadtxt(folder / "1_tr.csv", delimiter=",")
    x[7, :3] = np.nan
    np.savetxt(folder / "1_tr.csv", x, delimiter=",")
    with pytest.raises(ValueError, match=r"1_tr.csv \(training\) rows \[7\] have some features NaN"):
        mmd[0].run(["--data-folder", str(folder), "--hidden", "16", "--epochs", "1", "--modelpath", str(tmp_path),
                    "--quiet"])
