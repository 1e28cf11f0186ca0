"""The README's (and docs') result tables equal what benchmarks/readme_tables.py generates from the committed
summary.json files, and every summary.json the project commits is shown somewhere."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme_tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


@pytest.mark.parametrize("doc", tables.documents(), ids=lambda p: p.name)
def test_result_tables_equal_their_summary_json(doc):
    text = doc.read_text()
    assert tables.regenerate(text) == text, f"{doc.name}: run python benchmarks/readme_tables.py"


def test_every_table_names_an_existing_summary_and_is_closed():
    for doc in tables.documents():
        text = doc.read_text()
        opened, closed = re.findall(r"^<!-- results: ", text, re.M), re.findall(r"^<!-- /results -->", text, re.M)
        assert len(opened) == len(closed) == len(tables.BLOCK.findall(text))
        for m in tables.BLOCK.finditer(text):
            if m.group("view") == "bench_runs":     # a glob of bench_core.py run files
                assert list(ROOT.glob(m.group("path"))), f"{doc.name}: {m.group('path')}"
            else:
                assert (ROOT / m.group("path")).is_file(), f"{doc.name}: {m.group('path')}"


def test_bench_runs_ratio_is_between_the_fastest_configurations_under_the_bar():
    run = json.loads((ROOT / "benchmarks/results/core_cpu_issue14/kernels_run1.json").read_text())
    steps = run["train_step"] = {
        "deqfusion anderson f 1e-05 b 0.0003": dict(step_s=0.5, grad_rel_err=2e-3),    # fast but over the bar
        "deqfusion anderson f 1e-06 b 0.0003": dict(step_s=1.0, grad_rel_err=4e-4),
        "deqfusion fixed_point f 1e-06 b 1e-05": dict(step_s=1.2, grad_rel_err=1e-5),
        "reference f 1e-06 b 0.0003": dict(step_s=4.0, grad_rel_err=9e-4),
        "reference f 1e-06 b 1e-05": dict(step_s=6.0, grad_rel_err=2e-4)}
    table = tables.render_bench_runs([run], "x")
    assert "| ratio (reference / ours) | **4.0x** |" in table
    steps["reference f 1e-06 b 0.0003"]["grad_rel_err"] = 2e-3
    assert "| ratio (reference / ours) | **6.0x** |" in tables.render_bench_runs([run], "x")
    for name in [k for k in steps if k.startswith("reference")]:
        steps[name]["grad_rel_err"] = 1.0
    assert "| ratio (reference / ours) | not defined |" in tables.render_bench_runs([run], "x")


def test_render_changes_with_the_summary(tmp_path):
    summary = {"metric": "accuracy", "primary_selection": "val", "selections": ["val", "final"], "seeds": [1, 2],
               "commits": ["abcdef1234567"], "machines": ["2 CPU cores"], "commands": ["deqfusion compare x"],
               "arms": {"baseline": {"fusion": "sum", "solver": None, "wall_s": {"mean": 61.0},
                                     "metrics": {"val": {"val": {"accuracy": {"mean": 0.5, "std": 0.01}},
                                                         "test": {"accuracy": {"mean": 0.4, "std": None}}}}}},
               "paired": []}
    path = tmp_path / "results" / "s" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    doc = "x\n<!-- results: results/s/summary.json -->\nold\n<!-- /results -->\ny\n"
    new = tables.regenerate(doc, tmp_path)
    assert "| baseline (sum) | 0.500 ± 0.010 | 0.400 | – | – | – | – | 1 min 01 s |" in new and "old" not in new
    assert new.startswith("x\n<!-- results: results/s/summary.json -->\n| arm (fusion) |") and new.endswith("y\n")
    assert tables.regenerate(new, tmp_path) == new


def test_backward_convergence_shown_and_not_recorded_said(tmp_path):
    """A summary with the implicit backward's figures shows them; an older one says they were not recorded."""
    sv = {"train_converged_fraction_last_quarter": {"mean": 0.99, "std": 0.01},
          "eval_converged_fraction": {"mean": 1.0, "std": 0.0}, "mean_steps": {"mean": 12.0, "std": None}}
    arm = {"fusion": "deq", "wall_s": {"mean": 10.0}, "metrics": {"val": {"val": {"accuracy": {"mean": 0.5}}}}}
    path = tmp_path / "results" / "s" / "summary.json"
    path.parent.mkdir(parents=True)
    doc = "<!-- results: results/s/summary.json -->\n<!-- /results -->\n"
    rows = []
    for solver in (sv, {**sv, "backward_converged_fraction_last_quarter": {"mean": 0.25, "std": 0.05}}):
        path.write_text(json.dumps({"metric": "accuracy", "primary_selection": "val", "selections": ["val"],
                                    "seeds": [1], "commits": ["a"], "machines": ["m"], "commands": ["c"],
                                    "arms": {"deq": {**arm, "solver": solver}}, "paired": []}))
        rows.append(next(l for l in tables.regenerate(doc, tmp_path).splitlines() if l.startswith("| deq (deq)")))
    assert "| 0.99 ± 0.01 / 1.00 ± 0.00 | not recorded | 12.0 |" in rows[0]
    assert "| 0.99 ± 0.01 / 1.00 ± 0.00 | 0.25 ± 0.05 | 12.0 |" in rows[1]


def test_end_to_end_view_shows_forward_and_backward_convergence():
    row = {"data": "d", "baseline_fusion": "sum", "step_ratio_deq_over_baseline": 2.0,
           "step_s": {"deq": 0.02, "baseline": 0.01}, "fusion_share_of_deq_step": 0.5,
           "peak_memory_ratio_deq_over_baseline": 1.1, "deq_mean_solver_steps": 9.0, "commit": "abcdef123456",
           "machine": "m", "load_avg_1m": [0.5, 0.6]}
    old = tables.render_end_to_end({"x": row}, "s.json")
    new = tables.render_end_to_end({"x": {**row, "deq_converged_last_quarter": {"forward": 0.96, "backward": 1.0}}},
                                   "s.json")
    assert "| 9.0 | not recorded |" in old and "| 9.0 | 96% / 100% / – |" in new


def test_end_to_end_summary_reports_evaluation_solves_that_missed():
    """end_to_end's summary carries the deq arm's evaluation solves, and both its summary.md and the README view say
    how many converged and, when one missed, how far from the tolerance (non-convergence is never hidden)."""
    import end_to_end   # readme_tables put benchmarks/ on the path

    def record(arm, frac):
        solver = None if arm == "baseline" else {
            "mean_steps": 12.0, "train_converged_fraction_last_quarter": 1.0, "backward_converged_fraction_last_quarter": 1.0,
            "eval_solves": 4, "eval_converged_fraction": frac, "max_rel_residual_eval": 0.0235, "tol": 0.01,
            "max_iter_eval": 400}
        median = {"step": 0.2 if solver else 0.1, **{k: 0.01 for k in end_to_end.PARTS}}
        return {"integration": "x", "arm": arm, "fusion": arm, "solver": solver, "load_avg_1m": 0.5, "machine": "m",
                "timing": {"median_s": median, "median_fusion_share": 0.3, "steps_timed": 5},
                "memory": {"bytes": 2**20, "kind": "k"}, "data": "d", "command": "c", "commit": "abcdef123456"}

    for frac, cell in ((1.0, "100% / 100% / 4 of 4 |"),
                       (0.5, "100% / 100% / 2 of 4 (residual up to 2.4e-02 at the cap of 400, tol 0.01) |")):
        rows = end_to_end.summarise([record("baseline", None), record("deq", frac)])
        assert rows["x"]["deq_eval_solves"] == {"converged": round(4 * frac), "solves": 4, "max_rel_residual": 0.0235,
                                                "tol": 0.01, "max_iter": 400}
        assert cell in tables.render_end_to_end(rows, "s.json")
