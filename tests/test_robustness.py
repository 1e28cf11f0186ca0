"""The robustness evaluation's own logic (deqfusion_core.compare.robustness, robustness_report): the conditions,
the perturbations, the noise scale and seeds, the area under the curve, the summary. The integrations' evaluators
run against their real upstreams in integration_tests/ (test_compare_mmf.py, test_mmdynamics_missing.py)."""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from deqfusion_core.compare.command import parse_levels
from deqfusion_core.compare.robustness import (InputStats, Perturbation, Transform, area_under_curve, evaluate,
                                               plan)
from deqfusion_core.compare.robustness_report import render_robustness, summarize_robustness

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))


def names(conditions, modalities=("a", "b")):
    return [p.name(list(modalities)) for p in conditions]


def test_plan_lists_clean_removals_and_noise_levels():
    assert names(plan(2, True, (0, 0.5, 1))) == [
        "clean", "remove:a:mask", "remove:a:zero_fill", "remove:b:mask", "remove:b:zero_fill",
        "noise:a:0.5", "noise:a:1", "noise:b:0.5", "noise:b:1"]
    # a fusion without a mask: zero-fill only
    assert names(plan(2, False, (0, 2))) == ["clean", "remove:a:zero_fill", "remove:b:zero_fill", "noise:a:2",
                                             "noise:b:2"]
    for bad in ([1, 0.5], [0, -1], [0, float("nan")], [0, 1, 1]):
        with pytest.raises(ValueError, match="levels"):
            plan(2, True, bad)
    with pytest.raises(ValueError, match="num_modalities"):
        plan(0, True)


def test_parse_levels_adds_clean_and_rejects_bad_text():
    assert parse_levels("1,0.5") == [0.0, 0.5, 1.0]
    for bad in ("x", "-1,1", "0", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_levels(bad)


def batch(n=6):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(n, 3, 2, 2, generator=g), torch.rand(n, 5, generator=g)]


def test_remove_with_mask_marks_the_modality_absent_and_zero_fills_it():
    xs = batch()
    given = torch.ones(6, 2, dtype=torch.bool)
    given[0, 1] = False
    out, present = Transform(Perturbation("remove", 0, missing="mask"))(xs, given)
    assert torch.equal(out[0], torch.zeros_like(xs[0])) and out[1] is xs[1]
    assert present[:, 0].eq(False).all() and torch.equal(present[:, 1], given[:, 1])
    assert given.all(1)[1:].all() and given[0, 0]                   # the caller's mask is not changed
    _, present = Transform(Perturbation("remove", 1, missing="mask"))(xs, None)
    assert torch.equal(present, torch.tensor([[True, False]] * 6))


def test_remove_by_zero_fill_passes_no_mask():
    xs = batch()
    out, present = Transform(Perturbation("remove", 1, missing="zero_fill"))(xs, None)
    assert present is None and torch.equal(out[1], torch.zeros(6, 5)) and out[0] is xs[0]
    out, present = Transform(Perturbation("clean"))(xs, None)
    assert present is None and all(a is b for a, b in zip(out, xs))


def test_noise_is_scaled_per_feature_seeded_and_the_same_for_every_arm():
    std = [torch.full((3, 2, 2), 0.5), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])]
    x = [torch.zeros(20000, 3, 2, 2), torch.zeros(20000, 5)]
    p = Perturbation("noise", 1, 1.5)
    out, present = Transform(p, std, run_seed=3)(x, None)
    assert present is None and out[0] is x[0]
    added = out[1]
    assert added[:, 0].eq(0).all()                                       # a constant feature gets no noise
    assert torch.allclose(added[:, 1:].std(0), 1.5 * std[1][1:], rtol=0.03)
    assert added.mean(0).abs().max() < 0.1
    # another arm at the same seed: the same draws batch by batch; another seed, modality or level: others
    t1, t2 = Transform(p, std, run_seed=3), Transform(p, std, run_seed=3)
    small = [torch.zeros(4, 3, 2, 2), torch.zeros(4, 5)]
    for _ in range(3):
        assert torch.equal(t1(small, None)[0][1], t2(small, None)[0][1])
    first = Transform(p, std, run_seed=3)(small, None)[0][1]
    for other in (Transform(p, std, run_seed=4), Transform(Perturbation("noise", 1, 2.0), std, run_seed=3)):
        assert not torch.allclose(other(small, None)[0][1] / other.p.level, first / 1.5)
    with pytest.raises(ValueError, match="std"):
        Transform(p)
    with pytest.raises(ValueError, match="feature shape"):
        Transform(p, [std[0], torch.ones(4)])(small, None)


def test_input_stats_is_the_population_std_over_present_rows():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g) * 3 + 1, torch.randn(5, 4, generator=g) * 3 + 1
    stats = InputStats()
    stats.add([a[:, :2], a[:, 2:]])
    mask = torch.tensor([[True, True]] * 3 + [[True, False]] * 2)
    stats.add([b[:, :2], b[:, 2:]], mask)
    std = stats.std()
    assert torch.allclose(std[0], torch.cat([a, b])[:, :2].std(0, unbiased=False), atol=1e-5)
    assert torch.allclose(std[1], torch.cat([a, b[:3]])[:, 2:].std(0, unbiased=False), atol=1e-5)
    with pytest.raises(ValueError, match="no batch"):
        InputStats().std()


def test_area_under_curve_is_multibench_relative_robustness_over_the_range():
    assert area_under_curve([0, 1, 2], [0.8, 0.8, 0.8]) == pytest.approx(0.8)
    assert area_under_curve([0, 0.5, 2], [1.0, 0.5, 0.0]) == pytest.approx((0.5 * 0.75 + 1.5 * 0.25) / 2)
    # MultiBench's relative_robustness_helper: levels 0, 0.1, ..., 0.9, trapezoids of width 0.1
    ys = [0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.4]
    multibench = sum((ys[i] + ys[i + 1]) * 0.1 / 2 for i in range(len(ys) - 1))
    assert area_under_curve([i / 10 for i in range(10)], ys) == pytest.approx(multibench / 0.9)
    with pytest.raises(ValueError, match="levels, values"):
        area_under_curve([0], [1])


class _Evaluator:
    """A linear 'model' on two modalities whose accuracy is the fraction of samples whose input sum is positive."""

    modalities = ["a", "b"]
    noise_on = "the inputs"

    def __init__(self, takes_mask):
        self.takes_mask = takes_mask
        g = torch.Generator().manual_seed(5)
        self.test = [torch.randn(50, 3, generator=g).abs(), torch.randn(50, 2, generator=g).abs()]
        self.seen = []

    def train_inputs(self):
        yield list(self.test), None

    def evaluate(self, transform):
        xs, present = transform(self.test, None)
        self.seen.append(present)
        return {"accuracy": float((xs[0].sum(1) + xs[1].sum(1) > 1.0).float().mean())}


def test_evaluate_runs_every_condition_and_records_the_protocol():
    ev = _Evaluator(True)
    rob = evaluate(ev, 2, (0, 1))
    assert list(rob["test"]) == names(plan(2, True, (0, 1)))
    assert rob["test"]["clean"]["accuracy"] == 1.0 and rob["takes_mask"] and rob["levels"] == [0.0, 1.0]
    assert rob["test"]["remove:a:zero_fill"]["accuracy"] < 1.0
    masks = [p for p in ev.seen if p is not None]
    assert len(masks) == 2 and not masks[0][:, 0].any() and masks[0][:, 1].all()


def record(arm, seed, rob):
    return {"arm": arm, "seed": seed, "selected_by": "val", "robustness": rob}


def fake(takes_mask, clean, removed, curve):
    test = {"clean": {"acc": clean}}
    for m, v in removed.items():
        test[f"remove:{m}:zero_fill"] = {"acc": v}
        if takes_mask:
            test[f"remove:{m}:mask"] = {"acc": v + 0.1}
    for i, level in enumerate((0.5, 1.0)):
        test[f"noise:x:{level:g}"] = {"acc": curve[i]}
    return {"modalities": ["x"], "takes_mask": takes_mask, "levels": [0.0, 0.5, 1.0], "noise_on": "inputs",
            "test": test}


def test_summary_pairs_each_condition_and_the_area_over_seeds():
    records = [record("baseline", s, fake(False, 0.8, {"x": 0.5}, [0.7, 0.6])) for s in (1, 2)]
    records += [record("deq", s, fake(True, 0.8 + 0.01 * s, {"x": 0.4}, [0.8, 0.7])) for s in (1, 2)]
    arms = [{"name": "baseline", "fusion": "sum", "is_fusion": False}, {"name": "deq", "fusion": "deq", "is_fusion": True}]
    rob = summarize_robustness(records, arms, "acc")
    deq, base = rob["arms"]["deq"], rob["arms"]["baseline"]
    assert deq["conditions"]["remove:x:own"]["mean"] == pytest.approx(0.5)          # deq: its mask
    assert base["conditions"]["remove:x:own"]["mean"] == pytest.approx(0.5)         # baseline: zero-fill
    assert "remove:x:mask" not in base["conditions"]
    # the area: trapezoids over sigma 0, 0.5, 1 divided by the range 1
    assert base["conditions"]["auc:x"]["mean"] == pytest.approx((0.8 + 0.7) / 4 + (0.7 + 0.6) / 4)
    assert deq["drop"]["remove:x:zero_fill"]["mean"] == pytest.approx(0.4 - 0.815)
    assert deq["mask_minus_zero_fill"]["x"]["mean"] == pytest.approx(0.1) and base["mask_minus_zero_fill"] == {}
    pair = rob["paired"][0]
    assert pair["seeds"] == [1, 2] and "remove:x:mask" not in pair["conditions"]
    assert pair["conditions"]["remove:x:own"]["mean"] == pytest.approx(0.0)
    assert pair["conditions"]["noise:x:1"]["mean"] == pytest.approx(0.1)
    md = "\n".join(render_robustness(rob))
    assert "| x removed (mask) | n/a | 0.5000 ± 0.0000 (-0.3150) | n/a |" in md
    assert "the only option for `baseline`" in md
    assert summarize_robustness([{"arm": "deq", "seed": 1, "selected_by": "val"}], arms, "acc") is None


# -- a whole study on the test double of tests/test_compare.py --------------------------------------------------
@pytest.fixture
def toy_env(monkeypatch):
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    return monkeypatch


def test_study_with_robustness_writes_it_and_refuses_to_mix(tmp_path, toy_env):
    from compare_toy import ToyComparison

    from deqfusion_core.compare.study import StudyError, StudyOptions, run_study

    def study(out, robustness):
        lines = []
        opts = StudyOptions(seeds=[1], out=out, smoke=True, command="deqfusion compare toy --robustness",
                            robustness=robustness)
        return run_study(ToyComparison(), opts, say=lines.append), lines

    status, lines = study(tmp_path / "r", [0.0, 1.0])
    assert status == 0 and any("robustness condition" in line for line in lines)
    runs = [json.loads(x) for x in (tmp_path / "r" / "runs.jsonl").read_text().splitlines()]
    for r in runs:
        rob = r["robustness"]
        assert r["study"] == "robustness_toy" and rob["levels"] == [0.0, 1.0]
        assert rob["takes_mask"] == (r["arm"] == "deq")
        # the clean condition is the selected checkpoint's test metric
        assert rob["test"]["clean"]["accuracy"] == pytest.approx(r["test"]["accuracy"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert set(summary["robustness"]["arms"]) == {"baseline", "deq"}
    assert "## Robustness" in (tmp_path / "r" / "summary.md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "r" / "robustness.png").stat().st_size > 0
    # runs without the robustness evaluation are not mixed into a robustness study
    assert study(tmp_path / "plain", None)[0] == 0
    with pytest.raises(StudyError, match="without the robustness evaluation"):
        study(tmp_path / "plain", [0.0, 1.0])


def test_robustness_needs_an_evaluator_before_anything_trains(tmp_path):
    from compare_toy import ToyComparison

    from deqfusion_core.compare import Comparison
    from deqfusion_core.compare.study import StudyError, StudyOptions, run_study

    class NoEvaluator(ToyComparison):
        robustness_evaluator = Comparison.robustness_evaluator

    with pytest.raises(StudyError, match="--robustness: toy has no robustness evaluation"):
        run_study(NoEvaluator(), StudyOptions(seeds=[1], out=tmp_path, robustness=[0.0, 1.0]), say=lambda s: None)
    assert not (tmp_path / "runs.jsonl").exists()
