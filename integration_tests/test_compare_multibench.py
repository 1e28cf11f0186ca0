"""`deqfusion compare multibench` (--smoke): ROSMAP through MultiBench's own train() and single_test(), both arms
with MultiBench's recipe, the DEQ's recipe named as the fusion arm's."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import upstreams

GIVEN = upstreams.checkout("DEQFUSION_MULTIBENCH_ROOT", "MultiBench")
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "rosmap"
pytestmark = [pytest.mark.skipif(not GIVEN, reason=upstreams.missing("DEQFUSION_MULTIBENCH_ROOT", "MultiBench")),
              pytest.mark.skipif(not (DATA / "labels_tr.csv").is_file(), reason=f"ROSMAP data not found at {DATA}")]


def test_compare_multibench_rosmap_smoke(tmp_path):
    root = upstreams.writable_copy(GIVEN, tmp_path / "MultiBench")
    out = tmp_path / "study"
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "compare", "multibench", "--seeds", "1",
                           "--smoke", "--upstream", str(root), "--out", str(out), "--", "--data", str(DATA)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert runs["baseline"]["fusion"] == "concat" and runs["baseline"]["study"] == "rosmap_multibench"
    diff = runs["deq"]["differs_from_baseline"]
    assert {"fusion.type", "fusion.jac_weight"} <= set(diff) and all(k.startswith("fusion.") for k in diff), diff
    assert runs["deq"]["solver"]["train_solves"] > 0 and 0 <= runs["deq"]["test"]["accuracy"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    roles = {d["key"]: d["role"] for d in summary["differences"]["deq"]}
    assert roles["fusion.jac_weight"] == "DEQ recipe: Jacobian weight" and summary["metric"] == "accuracy"
