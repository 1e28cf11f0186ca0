"""Real MMF from git main, installed from a source checkout, on today's stack: the snapshot beside the project
(../shared/upstreams/mmf), installed by `./install.sh test` into .venv-mmf-main (rc10 and main are both `mmf`, so
each has a venv of its own; DEQFUSION_MMF_MAIN_VENV names another). Everything runs in subprocesses of that venv
with tiny settings: `fusion_classifier` with `deq` under MMF main's default trainer and its Lightning trainer, one
of MMF's own baselines (concat_bert, hateful-memes recipe) with and without `fusion.type: deq` on generated data in
the layout MMF's dataset reads, checkpoint reloads, and each import-time shim's symptom when it is left out."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT.parent / "shared" / "upstreams" / "mmf"
VENV = Path(os.environ.get("DEQFUSION_MMF_MAIN_VENV", ROOT / ".venv-mmf-main"))
BIN = VENV / "bin"
if not (BIN / "mmf_run").exists():
    if SNAPSHOT.is_dir():  # CI has the snapshot: a missing venv is a failed install, never a skip
        pytest.fail(f"{VENV} has no MMF main although {SNAPSHOT} is there: run ./install.sh test", pytrace=False)
    pytest.skip("no MMF main venv (./install.sh test with ../shared/upstreams/mmf beside the project)",
                allow_module_level=True)

CHECKOUT = Path(subprocess.run([str(BIN / "python"), "-c", "import importlib.util; "   # without importing it
                                "print(importlib.util.find_spec('mmf').submodule_search_locations[0])"],
                               capture_output=True, text=True, check=True).stdout.strip()).parent
USER_DIR = ROOT / "adapters" / "mmf" / "deqfusion_mmf"
CONFIGS = ROOT / "adapters" / "mmf" / "configs"
TINY = ["model=fusion_classifier", "dataset=easy_vqa", "training.max_updates=4", "training.log_interval=2",
        "training.checkpoint_interval=2", "training.evaluation_interval=2", "training.batch_size=16",
        "dataset_config.easy_vqa.max_samples.train=96", "dataset_config.easy_vqa.max_samples.val=32",
        "dataset_config.easy_vqa.max_samples.test=32"]
IMPORT_SHIMS = {  # shim -> what `import mmf` + MMF's setup_imports (every mmf_run) dies of without it
    "torchtext": r"No module named 'torchtext'",
    "torchvision_ops": r"operator torchvision::nms does not exist",
    "torchvision_read_video": r"cannot import name 'read_video'",
    "lightning_callbacks_base": r"No module named 'pytorch_lightning.callbacks.base'",
}


def run(cmd, save_dir=None, env=None, timeout=600):
    """A command of the MMF main venv; returns the process and MMF's log (from the save dir)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(USER_DIR), "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("DEQFUSION_MMF_ROOT", None)
    args = [str(BIN / cmd[0]), *cmd[1:]] + ([f"env.save_dir={save_dir}"] if save_dir else [])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    logs = "".join(p.read_text() for p in sorted(Path(save_dir).glob("logs/*.log"))) if save_dir else ""
    return proc, logs


def python(code, env=None):
    proc, _ = run(["python", "-c", code], env=env)
    return proc


def assert_jacobian_in_total(logs, dataset):
    m = re.search(rf"train/total_loss: ([0-9.]+), .*?train/{dataset}/cross_entropy: ([0-9.]+), .*?"
                  rf"train/{dataset}/deq_jacobian: ([0-9.]+)", logs) or \
        re.search(rf"train/{dataset}/cross_entropy: ([0-9.]+), .*?train/{dataset}/deq_jacobian: ([0-9.]+), .*?"
                  rf"train/total_loss: ([0-9.]+)", logs)
    assert m, logs[-3000:]
    values = list(map(float, m.groups()))
    total, ce, jac = (values[0], values[1], values[2]) if logs[m.start():].startswith("train/total") else \
        (values[2], values[0], values[1])
    assert jac > 0 and abs(total - (ce + jac)) < 2e-4


RELOAD = """
import sys, torch
from omegaconf import OmegaConf
from deqfusion_adapters.mmf import register
register()
from mmf.common.registry import registry
from mmf.utils.build import build_model
import os
checkpoint = torch.load(sys.argv[2], map_location="cpu", weights_only=False)
# MMF's trainer saves the composed config beside its checkpoints; under Lightning, MMF's model puts it into them
config = OmegaConf.load(sys.argv[1]) if os.path.exists(sys.argv[1]) else OmegaConf.create(checkpoint["config"])
registry.register("config", config)
model_config = config.model_config[config.model]
model_config.model = config.model
model = build_model(model_config)
state = checkpoint.get("model", checkpoint.get("state_dict"))
key = sys.argv[3]
assert key in state, sorted(state)[:20]
assert not torch.equal(model.state_dict()[key], state[key])
model.load_state_dict(state)   # strict: every parameter of the patched model is in MMF's checkpoint
assert torch.equal(model.state_dict()[key], state[key])
print("reloaded", len(state))
"""


# the combining Linear's trained weight (theta_fuse, Eq. 11; every shipped DEQ config has it, gated or not) as the
# shipped DEQ configs store it (norm: contractive holds it as the spectral norm's raw weight, deqfusion_core/norms.py)
FUSE_WEIGHT = "fusion.deq.fusion.fuse.parametrizations.weight.original"


def assert_reloads(save_dir, checkpoint, key, env=None):
    proc = python(RELOAD.replace("sys.argv[1]", repr(str(save_dir / "config.yaml")))
                  .replace("sys.argv[2]", repr(str(checkpoint))).replace("sys.argv[3]", repr(key)), env=env)
    assert proc.returncode == 0 and "reloaded" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_list_reports_main_and_its_shims():
    proc, _ = run(["deqfusion", "list"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(row for row in proc.stdout.splitlines() if row.startswith("mmf "))
    assert re.search(r"found main 1\.0\.0rc12\s+\S+/mmf\s", line), line
    shims = line.split("shims: ")[1].split(", ")
    assert set(IMPORT_SHIMS) | {"torchaudio", "lightning_trainer_arguments"} <= set(shims), line


@pytest.mark.parametrize("left_out", [None, *IMPORT_SHIMS])
def test_each_import_shim_is_needed(left_out):
    """Without a shim, `import mmf` and MMF's setup_imports (what mmf_run does first) fail with its symptom."""
    proc = python("from deqfusion_adapters.mmf.flavour import install_shims, shims_applied\n"
                  "install_shims()\nimport mmf\nfrom mmf.utils.env import setup_imports\nsetup_imports()\n"
                  "print('applied', shims_applied())", env={"DEQFUSION_MMF_SHIMS_OFF": left_out or ""})
    if left_out is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert set(IMPORT_SHIMS) <= set(re.search(r"applied \[(.*)\]", proc.stdout).group(1).replace("'", "")
                                        .split(", "))
    else:
        assert proc.returncode != 0 and re.search(IMPORT_SHIMS[left_out], proc.stderr), proc.stderr[-3000:]


def test_fusion_classifier_deq_with_mmf_trainer_through_upstream_path(tmp_path):
    save = tmp_path / "save"
    proc, logs = run(["deqfusion", "run", "mmf", "--upstream", str(CHECKOUT), "--f-max-iter", "6",
                      "--b-max-iter", "6", "--", "config=easy_vqa_deq", *TINY], save)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mmf.trainers.mmf_trainer" in logs and re.search(r"progress: 4/4, train/", logs)
    assert_jacobian_in_total(logs, "easy_vqa")
    assert re.search(r"deq solver \(update 2\): 2 solves, mean steps [0-9.]+/6", logs)
    assert re.search(r"deq solver \(evaluation\)", logs) and re.search(r"test/easy_vqa/accuracy: [0-9.]+", logs)
    assert_reloads(save, save / "models" / "model_4.ckpt", FUSE_WEIGHT)


def test_fusion_classifier_deq_with_lightning_trainer(tmp_path):
    save = tmp_path / "save"
    proc, logs = run(["mmf_run", f"config={CONFIGS / 'experiments' / 'easy_vqa_deq.yaml'}", *TINY,
                      "training.trainer=lightning", "trainer.params.gpus=0", "trainer.params.max_steps=4",
                      "trainer.params.val_check_interval=2", "trainer.params.log_every_n_steps=2",
                      f"env.user_dir={USER_DIR}"], save)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"lightning_core\.loop_callback\s*: progress: 4/4, train/", logs), logs[-2000:]
    assert_jacobian_in_total(logs, "easy_vqa")
    assert re.search(r"deq solver \(update 4\)", logs) and re.search(r"val/easy_vqa/accuracy: [0-9.]+", logs)
    assert_reloads(save, save / "models" / "model_step=4.ckpt", FUSE_WEIGHT)


# -- one of MMF's own baselines: concat_bert on hateful memes, MMF's recipe, one key apart -----------------------
WORDS = "a man returns home the ship sinks at night cat dog love hate".split()


def hateful_memes(root: Path) -> Path:
    """Generated hateful-memes data where MMF's config looks for it, and a tiny `bert-base-uncased` (config and
    word pieces, no weights: the recipe's encoder is built with random_init) in a Hugging Face cache."""
    import numpy as np
    from omegaconf import OmegaConf
    from PIL import Image

    data = root / "datasets" / "hateful_memes" / "defaults"
    (data / "annotations").mkdir(parents=True)
    (data / "images" / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ident = 10000
    for split, n in (("train", 24), ("dev_unseen", 8), ("test_unseen", 8)):
        with open(data / "annotations" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                ident += 1
                image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(image).save(data / "images" / "img" / f"{ident}.png")
                f.write(json.dumps({"id": ident, "img": f"img/{ident}.png", "label": i % 2,
                                    "text": " ".join(rng.choice(WORDS, 5))}) + "\n")
    # MMF's marker that the zoo's files are in place (its mark_done: the version as MMF's yaml loader reads it)
    zoo = OmegaConf.load(CHECKOUT / "mmf" / "configs" / "zoo" / "datasets.yaml")
    (data / ".built.json").write_text(json.dumps({"version": zoo.hateful_memes.defaults.version}))
    snapshot = root / "hf" / "hub" / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    (snapshot / "tokenizer_config.json").write_text('{"do_lower_case": true}')
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 5 + len(WORDS)}))
    return root


SMALL = """
includes:
- {recipe}
model_config:
  concat_bert:
    text_hidden_size: 32
    modal_hidden_size: 512
    text_encoder:
      params: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, random_init: true}}
    modal_encoder:
      type: torchvision_resnet
      params: {{name: resnet18, pretrained: false, zero_init_residual: false, num_output_features: 1, out_dim: 512}}
    classifier:
      params: {{hidden_dim: 32}}
dataset_config:
  hateful_memes:
    processors:
      text_processor:
        params: {{max_seq_length: 16}}
      image_processor:
        params:
          transforms: [{{type: Resize, params: {{size: [32, 32]}}}}, ToTensor, GrayScaleTo3Channels]
training: {{max_updates: 4, batch_size: 4, log_interval: 2, checkpoint_interval: 2, evaluation_interval: 2,
           num_workers: 0, seed: 1}}
"""


@pytest.fixture(scope="module")
def memes(tmp_path_factory):
    return hateful_memes(tmp_path_factory.mktemp("memes"))


@pytest.mark.parametrize("arm", ["baseline", "deq"])
def test_concat_bert_hateful_memes_recipe_one_key_apart(memes, tmp_path, arm):
    recipe = CONFIGS / "baselines" / "hateful_memes" / f"concat_bert_{arm}.yaml"
    config = tmp_path / "small.yaml"   # MMF's recipe (through ours) at a CPU test's size
    config.write_text(SMALL.format(recipe=recipe))
    deq = ["model_config.concat_bert.fusion.params.f_max_iter=6", "model_config.concat_bert.fusion.output_dim=64"] \
        if arm == "deq" else []
    save = tmp_path / "save"
    proc, logs = run(["mmf_run", f"config={config}", "model=concat_bert", "dataset=hateful_memes",
                      f"env.data_dir={memes}", f"env.user_dir={USER_DIR}", *deq], save,
                     env={"HF_HOME": str(memes / "hf")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"progress: 4/4, val/hateful_memes/cross_entropy: [0-9.]+, .*roc_auc", logs)
    assert re.search(r"test/hateful_memes/accuracy: [0-9.]+", logs)
    composed = (save / "config.yaml").read_text()
    if arm == "baseline":   # MMF's own concatenation, untouched
        assert "deq_jacobian" not in logs and "SplitFusion" not in logs
        assert re.search(r"fusion:\n\s+type: null", composed)
        return
    assert "(classifier): SplitFusion(" in logs and "(fusion): DEQFusionMMF(" in logs
    assert_jacobian_in_total(logs, "hateful_memes")
    assert re.search(r"fusion:\n\s+type: deq", composed)
    assert_reloads(save, save / "models" / "model_4.ckpt", "classifier." + FUSE_WEIGHT,
                   env={"HF_HOME": str(memes / "hf")})


def test_compare_mmf_smoke_both_arms(tmp_path):
    """`deqfusion compare mmf` on main's default trainer, whose evaluation is `evaluation_loop(dataset_type)` (rc10's
    `BaseTrainer.evaluate(loader)` is gone) and whose early stopping is a callback's: both arms train, and each
    run's row holds MMF's own logged numbers (validation at the update it selected, test after its restore);
    --robustness evaluates the selected checkpoint through the same evaluation (clean = MMF's own test number)."""
    out = tmp_path / "study"
    proc, _ = run(["deqfusion", "compare", "mmf", "--seeds", "1", "--smoke", "--robustness", "0,1", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["arm"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert sorted((r["arm"], r["fusion"], r["seed"]) for r in runs.values()) == [
        ("baseline", "linear_sum", 1), ("deq", "deq", 1)]
    for arm, r in runs.items():
        assert r["upstream"]["version"] == "main 1.0.0rc12" and r["info"] == {"updates": 4, "evaluations": 2}
        log = "".join(p.read_text() for p in (out / "work" / f"{arm}-seed1" / "save" / "logs").glob("*.log"))
        assert "mmf.trainers.mmf_trainer" in log
        test = re.findall(r"test/easy_vqa/accuracy: ([0-9.]+)", log)
        assert len(test) == 1 and float(test[0]) == pytest.approx(r["test"]["accuracy"], abs=1e-4)
        update = int(r["selected_at"].split()[-1])
        val = re.search(rf"progress: {update}/4, .*?val/easy_vqa/accuracy: ([0-9.]+)", log)
        assert float(val.group(1)) == pytest.approx(r["val"]["accuracy"], abs=1e-4)
        final = r["also_selected_by"]["final"]
        assert final["at"] == "update 4" and set(final["val"]) == set(final["test"]) == {"accuracy"}  # main stops at 4
        assert r["robustness"]["test"]["clean"]["accuracy"] == pytest.approx(r["test"]["accuracy"], abs=1e-6)
        assert {"noise:image:1", "noise:text:1", "remove:image:zero_fill"} <= set(r["robustness"]["test"])
    assert runs["baseline"]["solver"] is None
    assert runs["deq"]["solver"]["train_solves"] >= 4 and runs["deq"]["solver"]["eval_solves"] > 0
