"""`deqfusion compare mmf` in real MMF 1.0.0rc10 on easy-VQA (--smoke: a few updates on a few samples): both arms
per seed through MMF's own training, result files, numbers that are MMF's own, resume, and refusal of a pair
that differs beyond the fusion."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

if importlib.util.find_spec("mmf") is None or importlib.util.find_spec("easy_vqa") is None:
    pytest.skip("MMF or easy-vqa is not installed (./install.sh mmf)", allow_module_level=True)

DEQFUSION = str(Path(sys.executable).parent / "deqfusion")
EXPERIMENTS = Path(__file__).parents[1] / "adapters" / "mmf" / "configs" / "experiments"
FUSION_KEYS = ("model_config.fusion_classifier.fusion.", "model_config.fusion_classifier.track_gates")


def compare(*args, timeout=900):
    return subprocess.run([DEQFUSION, "compare", "mmf", *args], capture_output=True, text=True, timeout=timeout)


def test_compare_mmf_two_seeds_smoke_and_resume(tmp_path):
    out = tmp_path / "study"
    proc = compare("--seeds", "1,2", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[run 4/4] seed 2, deq (deq): done" in proc.stdout and "ETA study" in proc.stdout
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["seed"], r["arm"], r["fusion"]) for r in runs) == [
        (1, "baseline", "linear_sum"), (1, "deq", "deq"), (2, "baseline", "linear_sum"), (2, "deq", "deq")]
    for r in runs:
        assert r["integration"] == "mmf" and r["study"] == "easy_vqa" and r["smoke"] is True
        assert r["command"].startswith("deqfusion compare mmf --seeds 1,2 --smoke")
        if r["arm"] == "baseline":
            assert r["differs_from_baseline"] == [] and r["solver"] is None
            continue
        assert "model_config.fusion_classifier.fusion.type" in r["differs_from_baseline"]
        assert all(k.startswith(FUSION_KEYS) for k in r["differs_from_baseline"]), r["differs_from_baseline"]
        assert r["solver"]["train_solves"] >= 4 and r["solver"]["eval_solves"] > 0
        assert r["solver"]["tol"] == 0.01 and r["solver"]["max_iter"] == 40   # easy_vqa_deq.yaml's recipe
        # every training forward's implicit backward ran in MMF's loop and was recorded, with the recipe's cap
        assert r["solver"]["backward_solves"] == r["solver"]["train_solves"]
        assert r["solver"]["backward_max_iter"] == 10 and 0 <= r["solver"]["backward_converged_fraction_last_quarter"] <= 1
        # the numbers are MMF's own: its log's test accuracy (after restoring its best checkpoint) and the
        # validation accuracy at the update it selected
        log = "".join(p.read_text() for p in (out / "work" / f"deq-seed{r['seed']}" / "save" / "logs").glob("*.log"))
        test = re.findall(r"test/easy_vqa/accuracy: ([0-9.]+)", log)
        assert len(test) == 1 and float(test[0]) == pytest.approx(r["test"]["accuracy"], abs=1e-4)
        update = int(r["selected_at"].split()[-1])
        val = re.search(rf"progress: {update}/4, .*?val/easy_vqa/accuracy: ([0-9.]+)", log)
        assert float(val.group(1)) == pytest.approx(r["val"]["accuracy"], abs=1e-4)
        assert r["also_selected_by"]["final"]["at"] == "update 5"   # rc10 stops one update past max_updates
    summary = json.loads((out / "summary.json").read_text())
    roles = {d["key"]: d["role"] for d in summary["differences"]["deq"]}
    assert roles["model_config.fusion_classifier.fusion.params.jac_weight"] == "DEQ recipe: Jacobian weight"
    assert summary["paired"][0]["seeds"] == [1, 2] and summary["behaviour_changes"]
    assert (out / "summary.md").is_file() and (out / "paired.png").is_file()
    again = compare("--seeds", "1,2", "--smoke", "--out", str(out))   # resuming a finished study trains nothing
    assert again.returncode == 0 and "4 runs, 4 already done" in again.stdout and "started" not in again.stdout
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4


def test_compare_mmf_refuses_arms_that_differ_beyond_the_fusion(tmp_path):
    proc = compare("--seeds", "1", "--smoke", "--out", str(tmp_path),
                   "--arm-args", "deq", "training.max_grad_l2_norm=30 training.clip_gradients=True")
    assert proc.returncode == 2
    assert "training.max_grad_l2_norm: baseline null, deq 30" in proc.stderr
    assert "training.clip_gradients: baseline false, deq true" in proc.stderr
    assert not (tmp_path / "runs.jsonl").exists()


def test_compare_mmf_fusion_option_missing_from_the_packaged_params(tmp_path):
    """-o with a DEQFusion keyword easy_vqa_deq.yaml does not list (MMF's own command line refuses such a key):
    the deq arm's DEQFusion solves with it (its solver statistics say so), the result files show it as a fusion
    key; an unknown keyword is refused, named, before anything runs."""
    params = yaml.safe_load((EXPERIMENTS / "easy_vqa_deq.yaml").read_text())["model_config"]["fusion_classifier"]
    assert "f_stop" not in params["fusion"]["params"]
    proc = compare("--seeds", "1", "--smoke", "--out", str(tmp_path), "-o", "f_stop=abs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    key = "model_config.fusion_classifier.fusion.params.f_stop"
    assert runs["deq"]["solver"]["stop"] == "abs" and runs["deq"]["solver"]["train_solves"] >= 4
    assert key in runs["deq"]["differs_from_baseline"] and "-o f_stop=abs" in runs["deq"]["command"]
    diff = {d["key"]: d for d in json.loads((tmp_path / "summary.json").read_text())["differences"]["deq"]}
    assert diff[key]["deq"] == "abs" and diff[key]["baseline"] == "<missing>"
    bad = compare("--seeds", "1", "--smoke", "--out", str(tmp_path / "bad"), "-o", "f_stopp=abs")
    assert bad.returncode == 2 and "mmf option 'f_stopp': unknown; DEQFusion takes" in bad.stderr
    assert not (tmp_path / "bad" / "runs.jsonl").exists()


def test_compare_mmf_unknown_fusion_names_the_key(tmp_path):
    proc = compare("--seeds", "1", "--smoke", "--out", str(tmp_path), "--baseline", "nope")
    assert proc.returncode == 2
    assert "model_config.fusion_classifier.fusion.type: unknown fusion 'nope'" in proc.stderr


def test_compare_mmf_robustness_smoke(tmp_path):
    """--robustness: after training, each run's selected checkpoint on MMF's test loader under every condition."""
    proc = compare("--seeds", "1", "--smoke", "--robustness", "0,1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())}
    for arm, r in runs.items():
        rob = r["robustness"]
        assert r["study"] == "robustness_easy_vqa" and rob["modalities"] == ["image", "text"]
        assert rob["takes_mask"] == (arm == "deq") and rob["levels"] == [0.0, 1.0]
        removed = {"remove:image:zero_fill", "remove:text:zero_fill"} | (
            {"remove:image:mask", "remove:text:mask"} if arm == "deq" else set())
        assert set(rob["test"]) == {"clean", "noise:image:1", "noise:text:1"} | removed
        # the clean condition is MMF's own test accuracy of the checkpoint it selected
        assert rob["test"]["clean"]["accuracy"] == pytest.approx(r["test"]["accuracy"], abs=1e-6)
        assert rob["train_batches_for_std"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["robustness"]["paired"][0]["seeds"] == [1]
    assert (tmp_path / "robustness.png").is_file() and "## Robustness" in (tmp_path / "summary.md").read_text()
