"""CM-BERT with DEQ fusion: its own run_classifier.main (train, dev selection, test) on CMU-MOSI transcripts.

Needs a checkout of thuiar/Cross-Modal-BERT in DEQFUSION_CMBERT_ROOT and ../shared/data/cmu_mosi_text. No
downloads: a small randomly initialised BERT (hidden 768 as CM-BERT's fusion layer hard-codes, one layer)
is written to a temporary folder in the old pytorch_pretrained_bert format (LayerNorm gamma/beta), with a
vocabulary built from the transcripts; the audio features (not available here) are generated with their
shape [N, 50, 5].
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = os.environ.get("DEQFUSION_CMBERT_ROOT")
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "cmu_mosi_text"
pytestmark = [
    pytest.mark.skipif(not ROOT, reason="DEQFUSION_CMBERT_ROOT is unset (git clone thuiar/Cross-Modal-BERT)"),
    pytest.mark.skipif(not (DATA / "train.tsv").is_file(), reason=f"CMU-MOSI transcripts not found at {DATA}"),
]
pytest.importorskip("transformers", reason="transformers is not installed (./install.sh bert)")

ROWS = {"train": 48, "dev": 24, "test": 24}
CONFIG = {"vocab_size": None, "hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12,
          "intermediate_size": 128, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
          "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 64, "type_vocab_size": 2,
          "initializer_range": 0.02}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("cmbert"))


def write_workspace(tmp: Path, rows: dict = ROWS) -> dict:
    """Text subset (the first ``rows`` of each split), generated audio, and a tiny BERT folder in the old
    checkpoint format, under ``tmp`` (benchmarks/recipe_convergence.py asks for more rows)."""
    from deqfusion_compat.cmbert import hf_config
    from deqfusion_core.compat import apply_shims

    apply_shims("cmbert", ["torchvision(transformers)"])
    import transformers

    text, bert = tmp / "text", tmp / "bert"
    text.mkdir()
    bert.mkdir()
    words = collections.Counter()
    for split, n in rows.items():
        lines = (DATA / f"{split}.tsv").read_text().splitlines()[: n + 1]     # header + n rows
        (text / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        for line in lines[1:]:
            words.update(re.findall(r"\w+|[^\w\s]", line.split("\t")[0].lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = dict(CONFIG, vocab_size=len(vocab))
    (bert / "bert_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_config(type("C", (), config)))
    state = {}
    for key, value in hf.state_dict().items():
        if "LayerNorm" in key:                      # old pytorch_pretrained_bert names, random values
            key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            value = torch.rand_like(value)
        state["bert." + key] = value
    torch.save(state, bert / "pytorch_model.bin")
    rng = np.random.default_rng(0)
    audio = tuple(rng.normal(size=(n, 50, 5)).astype(np.float32) for n in rows.values())
    with open(tmp / "audio.pickle", "wb") as f:
        pickle.dump(audio, f)
    return {"tmp": tmp, "text": text, "bert": bert, "state": state}


def options(workspace, **more):
    return {"f_max_iter": 10, "b_max_iter": 10, "audio": str(workspace["tmp"] / "audio.pickle"),
            "workdir": str(workspace["tmp"] / "work"), **more}


@pytest.fixture(scope="module")
def cmbert(workspace):
    from deqfusion_patches.cmbert import plugin

    integ = plugin.INTEGRATION
    upstream = integ.locate(ROOT)
    integ.apply(upstream, options(workspace))
    return integ, upstream, plugin


def test_pretrained_folder_loads_into_transformers_bert(cmbert, workspace):
    integ, _, plugin = cmbert
    import transformers

    model = integ.modules["model"].BertForSequenceClassification.from_pretrained(str(workspace["bert"]), num_labels=1)
    assert isinstance(model.bert, transformers.BertModel)
    gamma = workspace["state"]["bert.embeddings.LayerNorm.gamma"]
    assert torch.equal(model.bert.embeddings.LayerNorm.weight.detach(), gamma)     # gamma -> weight
    assert isinstance(model.BertFinetun.deq_fusion, plugin.CmbertFusion) and model.BertFinetun.deq_fusion.deq.dim == 50
    deq = model.BertFinetun.deq_fusion.deq
    assert (deq.jac_term, deq.norm, deq.f_max_iter_eval) == ("diagonal", "contractive", 400)
    assert model.BertFinetun.deq_fusion.jac_weight == 0.1          # ours (the paper's 0.01: appendix C)


def test_training_run_with_deq_fusion(cmbert, workspace):
    integ, upstream, plugin = cmbert
    argv = ["--data_dir", str(workspace["text"]), "--bert_model", str(workspace["bert"]),
            "--num_train_epochs", "1", "--train_batch_size", "24", "--eval_batch_size", "24", "--test_batch_size", "24"]
    results = integ.run_once(upstream, argv)
    assert set(results) >= {"acc", "F1", "mae", "corr", "acc7"}
    assert np.isfinite(results["loss"]) and results["global_step"] == 2
    # the model selected on dev loss, written by the upstream loop: DEQ parameters trained (lr 0.01 group)
    saved = torch.load(workspace["tmp"] / "work" / "Cross-Modal-BERT-master" / "CM-BERT_output" / "pytorch_model.bin")
    assert not torch.equal(saved["BertFinetun.deq_fusion.deq.weights"], torch.ones(2))
    assert "bert.encoder.layer.0.attention.self.query.weight" in saved


def test_fused_map_is_the_deq_equilibrium(cmbert, workspace):
    integ, upstream, plugin = cmbert
    config = integ.modules["model"].BertConfig(vocab_size_or_config_json_file=30, **{
        k: v for k, v in CONFIG.items() if k != "vocab_size"})
    torch.manual_seed(0)
    fin = integ.modules["model"].BertFinetun(config).eval()
    seen = []
    deq_forward = fin.deq_fusion.deq.forward
    fin.deq_fusion.deq.forward = lambda xs, **kw: seen.append((xs, deq_forward(xs, **kw))) or seen[-1][1]
    hidden, audio = torch.randn(2, 50, 768), torch.randn(2, 50, 5)
    with torch.no_grad():
        _, text_map, fused_map = fin(hidden, None, audio, torch.zeros(2, 1, 1, 50))
    (xs, out), = seen
    # the DEQ saw the text and audio maps row by row; the map the upstream returns is ReLU of its fixed point
    assert torch.equal(xs[0], text_map.reshape(100, 50)) and xs[1].shape == (100, 50)
    assert torch.allclose(fused_map, torch.relu(out.fused).reshape(2, 50, 50))
    assert fin.deq_fusion.last_stats.nstep >= 1 and "bias" not in fin.__dict__     # the per-call overrides are gone
    with pytest.raises(ValueError, match="--max_seq_length"):
        fin(torch.randn(2, 40, 768), None, torch.randn(2, 40, 5), torch.zeros(2, 1, 1, 40))


def test_baseline_arm_and_remove(cmbert, workspace):
    integ, upstream, plugin = cmbert
    model = integ.modules["model"]
    assert model.BertModel.__module__ == "deqfusion_compat.cmbert"    # a behaviour change of both arms
    integ.remove()
    try:
        # the upstream's own objects again, and pytorch_pretrained_bert's stand-in is gone
        assert model.BertFinetun.__init__.__module__ == "model" and model.BertModel.__module__ == "model"
        assert "pytorch_pretrained_bert" not in sys.modules
        integ.apply(upstream, options(workspace, deq=False))            # -o deq=False: the upstream fusion
        config = integ.modules["model"].BertConfig(vocab_size_or_config_json_file=30, **{
            k: v for k, v in CONFIG.items() if k != "vocab_size"})
        assert not hasattr(integ.modules["model"].BertFinetun(config), "deq_fusion")
        assert integ.modules["model"].BertModel.__module__ == "deqfusion_compat.cmbert"
    finally:
        integ.apply(upstream, options(workspace))


def test_compare_cmbert_smoke(workspace, tmp_path):
    """`deqfusion compare cmbert --smoke`: the upstream's addition and DEQ, run_classifier's own selection on dev
    loss, the arms differing only in the fusion."""
    import subprocess

    out = tmp_path / "study"
    proc = subprocess.run([str(Path(sys.executable).parent / "deqfusion"), "compare", "cmbert", "--seeds", "3",
                           "--smoke", "--upstream", ROOT, "--f-max-iter", "6", "--b-max-iter", "6", "--out", str(out),
                           "--", "--data_dir", str(workspace["text"]), "--bert_model", str(workspace["bert"]),
                           "--audio", str(workspace["tmp"] / "audio.pickle")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert runs["baseline"]["fusion"] == "add" and runs["baseline"]["solver"] is None
    diff = runs["deq"]["differs_from_baseline"]
    assert "fusion.type" in diff and all(k.startswith("fusion.") for k in diff), diff
    # --f-max-iter caps the training solves; max_iter is the last solve's cap, an evaluation: max(6, 100)
    assert runs["deq"]["solver"]["mean_steps"] <= 6 and runs["deq"]["solver"]["max_iter"] == 6
    for r in runs.values():
        assert set(r["test"]) >= {"acc", "F1", "mae", "corr", "acc7"} and "loss" in r["val"]
        assert any("np.random.randint" in c for c in r["behaviour_changes"])
        assert any("BertModel->transformers" in c for c in r["behaviour_changes"])
