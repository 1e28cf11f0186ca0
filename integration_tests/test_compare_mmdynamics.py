"""`deqfusion compare mmdynamics` on ROSMAP (--smoke): both arms through MM-Dynamics' own training script, the arms'
configurations differing only in the fusion, and refusal of a pair that differs beyond it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.environ.get("DEQFUSION_MMDYNAMICS_ROOT")
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "rosmap"
pytestmark = [
    pytest.mark.skipif(not ROOT, reason="DEQFUSION_MMDYNAMICS_ROOT is unset (git clone TencentAILabHealthcare/mmdynamics)"),
    pytest.mark.skipif(not (DATA / "labels_tr.csv").is_file(), reason=f"ROSMAP data not found at {DATA}"),
]
DEQFUSION = str(Path(sys.executable).parent / "deqfusion")


def compare(out, *extra):
    return subprocess.run([DEQFUSION, "compare", "mmdynamics", "--seeds", "1", "--smoke", "--upstream", ROOT,
                           "--out", str(out), *extra, "--", "--data-folder", str(DATA)],
                          capture_output=True, text=True, timeout=900)


def test_compare_mmdynamics_smoke(tmp_path):
    proc = compare(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"baseline", "deq"} and runs["baseline"]["fusion"] == "concat"
    assert runs["baseline"]["differs_from_baseline"] == [] and runs["baseline"]["solver"] is None
    diff = runs["deq"]["differs_from_baseline"]
    assert "model.fusion.type" in diff and all(k.startswith("model.fusion.") for k in diff), diff
    assert runs["deq"]["solver"]["train_solves"] == 4                   # epochs 0..3, full batch
    # the DEQ's solve of each split at each evaluation (and the final one's two: the recorder's count), and at the
    # evaluations selected; nothing of the kind for the concatenation
    info, solver = runs["deq"]["info"], runs["deq"]["solver"]
    solves = info["eval_solves"]
    assert [e["epoch"] for e in solves] == [0, 1, 2, 3] and 2 * len(solves) + 2 == solver["eval_solves"]
    assert max(e[s]["rel_residual"] for e in solves for s in ("test", "val")) <= solver["max_rel_residual_eval"]
    assert all(e[s]["converged"] == (e[s]["rel_residual"] <= solver["tol"]) for e in solves for s in ("test", "val"))
    for name, at in (("val", runs["deq"]["selected_at"]), ("test", runs["deq"]["also_selected_by"]["test"]["at"])):
        chosen = next(e for e in solves if f"epoch {e['epoch']}" == at)
        assert info["eval_solves_at_selected"][name] == {k: v for k, v in chosen.items() if k != "epoch"}
    assert "eval_solves" not in runs["baseline"]["info"]
    for r in runs.values():
        assert r["study"] == "rosmap" and r["selected_by"] == "val"
        assert set(r["also_selected_by"]) == {"final", "test"}          # the authors' test selection, beside
        assert "accuracy + weighted F1 + macro F1" in r["selection_criterion"]
        assert set(r["test"]) == {"acc", "f1", "auc", "f1_weighted", "f1_macro"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    roles = {d["key"]: d["role"] for d in summary["differences"]["deq"]}
    assert roles["model.fusion.deq.jac_weight"] == "DEQ recipe: Jacobian weight"


def test_compare_mmdynamics_refuses_clipping_one_arm(tmp_path):
    proc = compare(tmp_path, "--arm-args", "deq", "--grad-clip 30")
    assert proc.returncode == 2 and "train.grad_clip: baseline null, deq 30.0" in proc.stderr, proc.stderr
