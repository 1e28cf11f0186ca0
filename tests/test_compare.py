"""Unit tests of `deqfusion compare`'s own logic: the configuration check, the statistics, the summary, and whole
studies (worker processes, progress, resume, refusal) on a test double of an integration's comparison
(tests/helpers/compare_toy.py). The comparisons in real upstreams: integration_tests/test_compare_*.py."""
import json
import math
import os
import sys
from pathlib import Path

import pytest

from deqfusion_core.compare import configdiff, statistics
from deqfusion_core.compare.command import parse_seeds
from deqfusion_core.compare.study import StudyError, StudyOptions, plan_arms, read_runs, run_study
from deqfusion_core.compare.summary import render_markdown, summarize

HELPERS = Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
from compare_toy import ToyComparison  # noqa: E402


# -- configuration check ---------------------------------------------------------------------------------------
def test_flatten_and_differences_name_roles():
    base = configdiff.flatten({"model": {"fusion": {"type": "sum"}, "width": 8}, "train": {"lr": 0.1, "sched": [1, 2]},
                               "empty": {}})
    assert base == {"model.fusion.type": "sum", "model.width": 8, "train.lr": 0.1, "train.sched": [1, 2], "empty": {}}
    other = {**base, "model.fusion.type": "deq", "model.fusion.jac_weight": 0.1, "train.lr": 0.2, "train.sched": [1, 3]}
    keys = {"model.fusion": "the fusion", "model.fusion.jac_weight": "DEQ recipe: Jacobian weight"}
    d = {x.key: x for x in configdiff.differences(base, other, keys, allowed=["train.sched"])}
    assert d["model.fusion.type"].role == "the fusion"
    assert d["model.fusion.jac_weight"].role == "DEQ recipe: Jacobian weight"   # the longest prefix names it
    assert d["model.fusion.jac_weight"].baseline == configdiff.MISSING
    assert d["train.sched"].role.startswith("allowed by --allow-diff")
    assert d["train.lr"].role is None and set(d) == {"model.fusion.type", "model.fusion.jac_weight", "train.lr",
                                                     "train.sched"}
    assert configdiff.owner("model.fusionx", ["model.fusion"]) is None      # prefixes end at a dot
    assert configdiff.differences({"a": 1}, {"a": 1.0}, {})[0].key == "a"  # 1 and 1.0 are not the same setting
    msg = str(configdiff.ConfigMismatch("deq", "baseline", 3, [d["train.lr"]]))
    assert "train.lr: baseline 0.1, deq 0.2" in msg and "--allow-diff train.lr" in msg and "seed 3" in msg


def test_fingerprint_is_order_free_and_value_sensitive():
    assert configdiff.fingerprint({"a": 1, "b": 2}) == configdiff.fingerprint({"b": 2, "a": 1})
    assert configdiff.fingerprint({"a": 1}) != configdiff.fingerprint({"a": 2})


# -- statistics -------------------------------------------------------------------------------------------------
def test_t_quantiles_and_paired_interval_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 9, 30, 101):
        assert statistics.t_quantile(0.95, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
        assert statistics.t_two_sided(1.3, df) == pytest.approx(1 - 2 * scipy_stats.t.sf(1.3, df), rel=1e-9)
    a, b = [0.71, 0.74, 0.69, 0.75, 0.72], [0.70, 0.71, 0.70, 0.72, 0.69]
    d = statistics.paired(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    lo, hi = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=sum(diffs) / 5, scale=scipy_stats.sem(diffs))
    assert d["n"] == 5 and d["ci95"] == pytest.approx([lo, hi], rel=1e-9)
    assert statistics.paired([0.5], [0.4])["ci95"] is None                     # one seed: no interval
    assert statistics.describe([1.0, None, 3.0]) == {"mean": 2.0, "std": math.sqrt(2), "n": 2}
    with pytest.raises(ValueError, match="df"):
        statistics.t_two_sided(1.0, 0)


def test_parse_seeds():
    assert parse_seeds("1,2") == [1, 2] and parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    for bad in ("", "a", "3-1", "1,,2"):
        with pytest.raises(Exception, match="seeds like"):
            parse_seeds(bad)


def test_plan_arms():
    toy = ToyComparison()
    assert [(a.name, a.fusion, a.is_fusion) for a in plan_arms(toy, None, [])] == [("baseline", "sum", False),
                                                                                   ("deq", "deq", True)]
    assert [a.name for a in plan_arms(toy, None, ["sum", "concat"])] == ["baseline", "concat", "deq"]
    with pytest.raises(StudyError, match="--baseline: toy has no fusion 'nope'"):
        plan_arms(toy, None, ["nope"])
    with pytest.raises(StudyError, match="is the fusion under test"):
        plan_arms(toy, None, ["deq"])


def _record(arm, seed, val, test, final_test=None, solver=None):
    return {"arm": arm, "seed": seed, "command": "c", "selected_by": "val", "val": {"accuracy": val},
            "test": {"accuracy": test}, "also_selected_by": {"final": {"val": {"accuracy": val},
                                                                       "test": {"accuracy": final_test or test}}},
            "solver": solver, "wall_s": 2.0}


def test_summary_pairs_by_seed():
    solver = {"train_converged_fraction_last_quarter": 0.5, "eval_converged_fraction": 1.0, "mean_steps": 9.0,
              "mean_steps_eval": 7.0, "max_rel_residual_eval": 0.02, "tol": 0.01, "max_iter": 15}
    records = [_record("baseline", 1, 0.6, 0.5), _record("deq", 1, 0.7, 0.6, solver=solver),
               _record("baseline", 2, 0.6, 0.7), _record("deq", 2, 0.65, 0.75, solver={**solver, "max_rel_residual_eval": 0.5}),
               _record("deq", 3, 0.9, 0.9)]   # no baseline for seed 3: in the arm's mean, not in the pairs
    arms = [{"name": "baseline", "fusion": "sum", "is_fusion": False}, {"name": "deq", "fusion": "deq", "is_fusion": True}]
    s = summarize(records, study="t", integration="toy", metric="accuracy", arms=arms, seeds=[1, 2, 3])
    assert s["arms"]["deq"]["metrics"]["val"]["test"]["accuracy"]["mean"] == pytest.approx(0.75)
    pair = s["paired"][0]
    assert pair["seeds"] == [1, 2]
    assert pair["metrics"]["val"]["test"]["accuracy"]["mean"] == pytest.approx(0.075)
    assert s["arms"]["deq"]["solver"]["max_rel_residual_eval"]["max"] == 0.5
    assert s["arms"]["baseline"]["solver"] is None
    md = render_markdown(s)
    assert "| deq − baseline | val | test | +0.0750 [" in md and "| deq (deq) | final |" in md


# -- whole studies on the test double ---------------------------------------------------------------------------
@pytest.fixture
def toy_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("TOY_FAIL", raising=False)
    return monkeypatch


def _study(out, **kw):
    lines = []
    opts = StudyOptions(seeds=kw.pop("seeds", [1, 2]), out=out, smoke=True, command="deqfusion compare toy", **kw)
    status = run_study(ToyComparison(), opts, say=lines.append)
    return status, lines


def test_study_runs_both_arms_per_seed_and_resumes(tmp_path, toy_env):
    toy_env.setenv("TOY_FAIL", "deq:2")                  # the last run dies: an interrupted study
    status, lines = _study(tmp_path)
    assert status == 1 and any("[run 4/4] seed 2, deq (deq): FAILED" in line for line in lines)
    assert len(read_runs(tmp_path / "runs.jsonl")) == 3
    assert any("[run 1/4] seed 1, baseline (sum): step 3/3, val accuracy" in line and "ETA study" in line
               for line in lines)
    toy_env.delenv("TOY_FAIL")
    status, lines = _study(tmp_path)                     # the same command resumes
    assert status == 0 and any("4 runs, 3 already done" in line for line in lines)
    trained = (tmp_path / "work" / "trained.txt").read_text().split()
    assert trained == ["sum:1", "deq:1", "sum:2", "deq:2", "deq:2"]   # only the unfinished run again
    runs = read_runs(tmp_path / "runs.jsonl")
    assert sorted((r["arm"], r["seed"]) for r in runs) == [("baseline", 1), ("baseline", 2), ("deq", 1), ("deq", 2)]
    for r in runs:
        assert r["differs_from_baseline"] == ([] if r["arm"] == "baseline" else ["model.fusion.type",
                                                                                 "model.jac_weight"])
        assert r["selected_by"] == "val" and 0 <= r["test"]["accuracy"] <= 1
        assert set(r["also_selected_by"]) == {"final"} and r["command"] == "deqfusion compare toy"
        assert r["machine"].endswith("1 torch thread") and r["smoke"] is True
    deq = next(r for r in runs if r["arm"] == "deq")
    assert deq["solver"]["train_solves"] == 3 and 0 <= deq["solver"]["train_converged_fraction_last_quarter"] <= 1
    assert deq["solver"]["max_iter"] == 6 and deq["solver"]["eval_solves"] == 6   # val and test after each step
    assert deq["solver"]["max_iter_eval"] == 100      # f_max_iter_eval None: the larger of f_max_iter and 100   # val and test after each step
    assert next(r for r in runs if r["arm"] == "baseline")["solver"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == [1, 2] and summary["paired"][0]["seeds"] == [1, 2]
    assert [d["role"] for d in summary["differences"]["deq"]] == ["the fusion", "DEQ recipe: Jacobian weight"]
    assert "DEQ recipe: Jacobian weight" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "paired.png").stat().st_size > 0 and (tmp_path / ".gitignore").read_text() == "work/\n"
    # the same folder with another configuration is refused rather than mixed
    with pytest.raises(StudyError, match="another configuration"):
        _study(tmp_path, upstream_args=["--lr", "0.01"])


def test_mismatched_arms_are_refused_before_training(tmp_path, toy_env):
    with pytest.raises(StudyError, match=r"differ beyond the fusion.*\n  train\.clip: baseline null, deq 1\.0"):
        _study(tmp_path, seeds=[1], arm_args={"deq": ["--clip", "1.0"]})
    assert not (tmp_path / "work" / "trained.txt").exists() and not (tmp_path / "runs.jsonl").exists()
    toy_env.setenv("TOY_FAIL", "sum:1")     # allowed: the check passes and training starts (and stops here)
    status, lines = _study(tmp_path, seeds=[1], arm_args={"deq": ["--clip", "1.0"]}, allow_diff=["train.clip"])
    assert status == 1 and "DEQ recipe: Jacobian weight (1 key); allowed by --allow-diff train.clip (1 key)" in \
        next(line for line in lines if line.startswith("configurations checked"))
    assert json.loads((tmp_path / "summary.json").read_text())["allowed_differences"] == ["train.clip"]


def test_identical_arms_are_refused(tmp_path, toy_env):
    with pytest.raises(StudyError, match="same effective configuration: nothing to compare"):
        _study(tmp_path, seeds=[1], arm_args={"baseline": ["--fusion", "deq", "--jac-weight", "0.1"]})


def test_cli_errors_exit_2(capsys):
    from deqfusion_core.cli import main

    assert main(["compare", "nope", "--seeds", "1", "--out", "x"]) == 2
    assert "unknown integration 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compare", "mmf", "--seeds", "a", "--out", "x"])
    assert exc.value.code == 2 and "--seeds" in capsys.readouterr().err


@pytest.mark.parametrize("after", [["--dry-run"], ["dataset=x", "--smoke"], ["--out=y"], ["--robustness", "0,1"]])
def test_cli_refuses_compare_flags_after_dashes(tmp_path, capsys, after):
    """compare's own flags after `--` would reach the upstream (MMF: an unpacking error): refused, named."""
    from deqfusion_core.cli import main

    assert main(["compare", "mmf", "--seeds", "1", "--out", str(tmp_path / "o"), "--", *after]) == 2
    flag = next(a for a in after if a.startswith("--")).split("=")[0]
    err = capsys.readouterr().err
    assert f"{flag} is a flag of deqfusion compare, given after '--'" in err and "before '--'" in err, err
    assert not (tmp_path / "o").exists()


def test_upstream_flags_after_dashes_pass():
    from deqfusion_core.compare.command import misplaced_flag

    assert misplaced_flag(["-o", "options/vqa2/mutan.yaml", "--data-folder", "d", "--MODEL=large", "--seed",
                           "dataset=mmimdb", "--output", "x"]) is None   # block's -o, mmdynamics, mcan, MMF


def test_solver_recorder_sees_every_deq_forward():
    import torch

    from deqfusion_core import DEQFusion
    from deqfusion_core.compare.record import SolverRecorder

    fusion = DEQFusion([4, 4], 4, num_groups=2, f_max_iter=3, f_tol=1e-12)   # cannot converge in 3 steps
    xs = [torch.randn(5, 4), torch.randn(5, 4)]
    with SolverRecorder() as rec:
        for _ in range(8):
            fusion(xs)
        fusion.eval()
        stats = fusion(xs)[2]
    fusion(xs)                                     # outside: not recorded
    s = rec.summary()
    assert (s["train_solves"], s["eval_solves"]) == (8, 1)
    assert s["train_converged_fraction_last_quarter"] == 0.0 and s["mean_steps"] == 3
    assert s["max_rel_residual_eval"] == pytest.approx(stats.rel_residual) and s["tol"] == 1e-12
    easy = DEQFusion([4, 4], 4, num_groups=2, f_max_iter=50, f_tol=0.5)
    with SolverRecorder() as rec:
        easy(xs)
    assert rec.summary()["train_converged_fraction_last_quarter"] == 1.0
    assert rec.summary()["eval_converged_fraction"] is None
    assert rec.summary()["backward_solves"] == 0 and rec.summary()["backward_converged_fraction_last_quarter"] is None


def test_solver_recorder_reports_the_implicit_backward():
    """The backward solve runs after the forward hook: the recorder reads it once it ran, per solve, with
    the figures of the backward's own stats (a truncated backward shows as not converged)."""
    import torch

    from deqfusion_core import DEQFusion
    from deqfusion_core.compare.record import SolverRecorder

    torch.manual_seed(0)
    xs = [torch.randn(6, 4), torch.randn(6, 4)]
    for b_max_iter, b_tol in ((2, 1e-12), (60, 1e-4)):
        fusion = DEQFusion([4, 4], 4, num_groups=2, f_max_iter=60, f_tol=1e-6, b_max_iter=b_max_iter, b_tol=b_tol)
        seen = []
        with SolverRecorder() as rec:
            for _ in range(4):
                out, _, stats = fusion(xs)
                out.pow(2).sum().backward()
                seen.append(stats.backward)
            fusion(xs)                         # a forward whose backward never runs: not a backward solve
        s = rec.summary()
        assert s["backward_solves"] == 4 and (s["backward_tol"], s["backward_max_iter"]) == (b_tol, b_max_iter)
        assert s["backward_converged_fraction_last_quarter"] == float(seen[-1].converged)
        assert s["backward_mean_steps"] == seen[-1].nstep and s["backward_median_residual"] == pytest.approx(
            seen[-1].rel_residual)
        assert seen[-1].converged == (b_max_iter == 60)
