"""Real MMF 1.0.0rc10 (from PyPI) training runs, in subprocesses with tiny settings: through
`deqfusion run mmf` and through plain `mmf_run ... env.user_dir=...`, with `fusion: deq` and MMF's built-in
`linear_sum`, on easy-VQA (data shipped in the `easy-vqa` package)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("mmf") is None or importlib.util.find_spec("easy_vqa") is None:
    pytest.skip("MMF or easy-vqa is not installed (./install.sh mmf)", allow_module_level=True)

BIN = Path(sys.executable).parent
TINY = ["model=fusion_classifier", "dataset=easy_vqa", "training.max_updates=4", "training.log_interval=2",
        "training.checkpoint_interval=2", "training.evaluation_interval=2", "training.batch_size=16",
        "dataset_config.easy_vqa.max_samples.train=96", "dataset_config.easy_vqa.max_samples.val=32",
        "dataset_config.easy_vqa.max_samples.test=32"]


def run(cmd, save_dir, env=None):
    proc = subprocess.run([*cmd, f"env.save_dir={save_dir}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    logs = "".join(p.read_text() for p in sorted((save_dir / "logs").glob("*.log"))) if save_dir.exists() else ""
    return proc, logs


def assert_full_run(proc, logs, save_dir):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Starting training" in logs
    assert re.search(r"progress: 4/4, train/total_loss", logs)
    assert "Checkpoint time. Saving a checkpoint." in logs and (save_dir / "models" / "model_4.ckpt").is_file()
    assert re.search(r"val/easy_vqa/accuracy: [0-9.]+", logs)
    assert "Starting inference on test set" in logs and re.search(r"test/easy_vqa/accuracy: [0-9.]+", logs)
    assert "Finished run" in logs


def fresh_model(fusion):
    from omegaconf import OmegaConf

    from deqfusion_adapters.mmf import CONFIG_DIR, register

    register()
    from mmf.utils.configuration import load_yaml  # resolves the experiment's `includes`

    from deqfusion_adapters.mmf.model import FusionClassifier

    cfg = OmegaConf.load(CONFIG_DIR / "models" / "fusion_classifier.yaml").model_config.fusion_classifier
    exp = load_yaml(str(CONFIG_DIR / "experiments" / f"easy_vqa_{fusion}.yaml")).model_config.fusion_classifier
    model = FusionClassifier(OmegaConf.merge(cfg, exp))
    model.build()
    return model


# the combining Linear's trained weight (theta_fuse, Eq. 11; every shipped DEQ config has it, gated or not) as the
# shipped DEQ configs store it (norm: contractive holds it as the spectral norm's raw weight, deqfusion_core/norms.py)
FUSE_WEIGHT = "fusion.deq.fusion.fuse.parametrizations.weight.original"


def assert_checkpoint_reloads(save_dir, fusion, key):
    import torch

    state = torch.load(save_dir / "models" / "model_4.ckpt", map_location="cpu", weights_only=False)["model"]
    assert key in state
    model = fresh_model(fusion)
    assert not torch.equal(model.state_dict()[key], state[key])
    model.load_state_dict(state)  # strict: every fusion parameter is in the checkpoint
    assert torch.equal(model.state_dict()[key], state[key])


def test_deqfusion_run_mmf_with_deq(tmp_path):
    save = tmp_path / "save"
    proc, logs = run([str(BIN / "deqfusion"), "run", "mmf", "--f-max-iter", "6", "--b-max-iter", "6", "--",
                      "config=easy_vqa_deq", *TINY], save)
    assert_full_run(proc, logs, save)
    # the Jacobian term is a loss entry, and MMF's total loss is its sum with the cross entropy
    m = re.search(r"train/total_loss: ([0-9.]+), .*?train/easy_vqa/cross_entropy: ([0-9.]+), .*?"
                  r"train/easy_vqa/deq_jacobian: ([0-9.]+)", logs)
    assert m, logs[-2000:]
    total, ce, jac = map(float, m.groups())
    assert jac > 0 and abs(total - (ce + jac)) < 2e-4
    # solver statistics in MMF's log, with the cap given on deqfusion's command line
    assert re.search(r"deq solver \(update 2\): 2 solves, mean steps [0-9.]+/6, max rel residual", logs)
    assert re.search(r"deq solver \(evaluation\)", logs)
    assert_checkpoint_reloads(save, "deq", FUSE_WEIGHT)


def test_main_job_prints_and_writes_its_result(tmp_path):
    """`deqfusion mmf-demo` (the README's main job) for 6 updates on a slice of easy-VQA: exit 0; the validation
    accuracy and the solver's lines printed; result.json with the accuracy, the solves' convergence and where the
    figure came from (the commit, the CPU); the convergence plot (the paper's Fig. 4). An unknown --fusion exits 2
    naming it (it raised UnboundLocalError before: the function's later rebinding of ``print`` shadowed it)."""
    cmd = [str(BIN / "deqfusion"), "mmf-demo", "--max-updates", "6", "--out", str(tmp_path), *TINY[2:]]
    proc = subprocess.run([c.replace("max_updates=4", "max_updates=6") for c in cmd], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"== easy-VQA, fusion deq: validation accuracy [0-9.]+ \(32 questions", proc.stdout), proc.stdout
    assert re.search(r"== DEQ solver on validation: mean steps [0-9.]+/\d+, .* converged \d+/\d+ batches",
                     proc.stdout), proc.stdout
    result = json.loads((tmp_path / "deq" / "result.json").read_text())
    assert 0 <= result["val_accuracy"] <= 1 and result["val_samples"] == 32 and result["fusion"] == "deq"
    solver = result["solver"]
    assert solver["batches"] == 2 and 0 <= solver["converged_batches"] <= 2 and solver["samples"] == 32
    assert solver["max_rel_residual"] >= 0 and solver["mean_steps"] >= 1
    assert result["machine"]["commit"] and result["machine"]["cpu"] and result["machine"]["torch"]
    assert (tmp_path / "deq" / "convergence.png").stat().st_size > 1000
    for name in ("nope", "common"):     # common: the settings the packaged configs include, not a fusion
        bad = subprocess.run([str(BIN / "deqfusion"), "mmf-demo", "--fusion", name, "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2, bad.stderr
        assert f"--fusion: no packaged config for {name!r}; known: deq, linear_sum" in bad.stderr, bad.stderr


def test_plain_mmf_run_with_user_dir_and_builtin_fusion(tmp_path):
    user_dir = subprocess.run([str(BIN / "deqfusion"), "mmf-user-dir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    from deqfusion_adapters.mmf import CONFIG_DIR

    save = tmp_path / "save"
    # rc10 cannot even `import mmf` on this stack without the shims: the user dir on PYTHONPATH installs them at
    # start-up (its sitecustomize.py); env.user_dir then registers deqfusion's fusion, model and dataset.
    proc, logs = run([str(BIN / "mmf_run"), f"config={CONFIG_DIR / 'experiments' / 'easy_vqa_linear_sum.yaml'}",
                      *TINY, f"env.user_dir={user_dir}"], save, env={"PYTHONPATH": user_dir})
    assert_full_run(proc, logs, save)
    assert "deq_jacobian" not in logs and "deq solver" not in logs
    assert_checkpoint_reloads(save, "linear_sum", "fusion.linear0.weight")


def test_mmf_user_dir_env_var_and_deq(tmp_path):
    user_dir = str(Path(__file__).parents[1] / "adapters" / "mmf" / "deqfusion_mmf")
    from deqfusion_adapters.mmf import USER_DIR

    save = tmp_path / "save"
    proc, logs = run([str(BIN / "mmf_run"), f"config={USER_DIR.parent / 'configs/experiments/easy_vqa_deq.yaml'}",
                      *TINY[:2], "training.max_updates=2", "training.log_interval=1", "training.batch_size=8",
                      "dataset_config.easy_vqa.max_samples.train=16", "dataset_config.easy_vqa.max_samples.val=8",
                      "dataset_config.easy_vqa.max_samples.test=8", "run_type=train"],
                     save, env={"PYTHONPATH": str(USER_DIR), "MMF_USER_DIR": str(USER_DIR)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train/easy_vqa/deq_jacobian" in logs and Path(user_dir).resolve() == USER_DIR.resolve()


@pytest.mark.parametrize("fusion,match", [
    ("{type: nope, params: {}}", r"model_config\.fusion_classifier\.fusion\.type: unknown fusion 'nope'"),
    ("{type: mutan, params: null}", r"model_config\.fusion_classifier\.fusion\.params: missing"),
])
def test_bad_fusion_config_names_the_key(tmp_path, fusion, match):
    from deqfusion_adapters.mmf import CONFIG_DIR

    config = tmp_path / "bad.yaml"
    config.write_text(f"includes: [{CONFIG_DIR / 'experiments' / 'easy_vqa_common.yaml'}]\n"
                      f"model_config: {{fusion_classifier: {{fusion: {fusion}}}}}\n")
    proc, _ = run([str(BIN / "deqfusion"), "run", "mmf", "--", f"config={config}", *TINY], tmp_path / "save")
    assert proc.returncode != 0
    assert re.search(match, proc.stderr), proc.stderr[-3000:]


# -- missing modalities (issue 13): the mask a data set puts in the sample list, through the real model ----------
def configured_model(fusion):
    """FusionClassifier of ``easy_vqa_<fusion>.yaml`` built the way MMF builds it (its merged config registered)."""
    import argparse

    from deqfusion_adapters.mmf import CONFIG_DIR, register

    register()
    from mmf.common.registry import registry
    from mmf.utils.configuration import Configuration

    from deqfusion_adapters.mmf.model import FusionClassifier

    opts = [f"config={CONFIG_DIR / 'experiments' / f'easy_vqa_{fusion}.yaml'}", "model=fusion_classifier",
            "dataset=easy_vqa"]
    config = Configuration(argparse.Namespace(config_override=None, opts=opts)).get_config()
    registry.register("config", config)
    model = FusionClassifier(config.model_config.fusion_classifier)
    model.build()
    model.init_losses()
    return model


def masked_batch(n=6):
    import torch
    from mmf.common.sample import Sample, SampleList

    g = torch.Generator().manual_seed(0)
    present = torch.ones(n, 2, dtype=torch.bool)
    present[[1, 4], 0] = False          # no image
    present[2, 1] = False               # no question
    samples = []
    for i in range(n):
        s = Sample()
        s.image = torch.rand(3, 32, 32, generator=g)
        s.text = torch.rand(26, generator=g).round()
        s.targets = torch.tensor(i % 13)
        samples.append(s)
    batch = SampleList(samples)
    batch.dataset_type, batch.dataset_name = "train", "easy_vqa"
    return batch, present


def with_absent(batch, present, value):
    """The batch with ``value`` in every absent entry (NaN, garbage)."""
    import torch

    out = batch.copy()
    out.image = torch.where(present[:, 0, None, None, None], batch.image, value)
    out.text = torch.where(present[:, 1, None], batch.text, value)
    return out


def test_fusion_classifier_takes_the_mask_from_the_sample_list():
    import torch

    from deqfusion_adapters.mmf.missing import zero_absent

    model = configured_model("deq").eval()
    batch, present = masked_batch()
    nan = with_absent(batch, present, float("nan"))
    nan.modality_present = present
    garbage = with_absent(batch, present, 7.0)
    garbage.image_present, garbage.text_present = present[:, 0], present[:, 1]
    with torch.no_grad():
        a, b = model(nan)["scores"], model(garbage)["scores"]
        # the mask path: the encoders' features of the zero-filled inputs, fused by DEQFusion with the mask
        feats = [model.encoders["image"](zero_absent(batch.image, present[:, 0])),
                 model.encoders["text"](zero_absent(batch.text, present[:, 1]))]
        direct = model.classifier(model.fusion.deq(feats, present=present)[0])
        unmasked = model(batch)["scores"]
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6) and torch.allclose(a, direct, atol=1e-6)
    assert not torch.allclose(a[~present.all(1)], unmasked[~present.all(1)], atol=1e-3)   # the mask does something
    # training on NaN in absent entries: MMF's losses (with the Jacobian term) and finite gradients everywhere
    model.train()
    out = model(nan)
    assert "train/easy_vqa/deq_jacobian" in out["losses"]
    sum(v.sum() for v in out["losses"].values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.encoders["image"].out[0].weight.grad.abs().sum() > 0


def test_mmf_fusion_without_a_mask_gets_the_zero_filled_inputs():
    import torch

    model = configured_model("linear_sum").eval()
    batch, present = masked_batch()
    nan = with_absent(batch, present, float("nan"))
    nan.modality_present = present
    with torch.no_grad():
        a = model(nan)["scores"]
        b = model(with_absent(batch, present, 0.0))["scores"]
    assert torch.isfinite(a).all() and torch.equal(a, b)
