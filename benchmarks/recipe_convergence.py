"""Do the DEQ fusion's solves converge in each shipped recipe? The real upstream training loops, short runs.

A convergence study, not an accuracy one (issue 10, item 3): each run trains briefly on generated or shipped
data (generators of integration_tests/ where they exist) and records, from every DEQFusion forward in the
process (``deqfusion_core.compare.record.SolverRecorder``), the fraction of training solves converged over the
last quarter of training, the fraction of evaluation solves converged, and the mean steps. A solve converged
when every sample of its batch reached the tolerance. The accuracies of these runs mean nothing and are not
recorded.

    .venv/bin/python benchmarks/recipe_convergence.py [NAME ...] [--escalate] [--epochs N]

NAME: ``mcan`` (MCAN's run.py, MCAN-small, generated VQA-v2 data in its layout; checkout DEQFUSION_MCAN_ROOT
or ../shared/upstreams/mcan-vqa), ``cmbert`` (run_classifier's main, one run: CMU-MOSI transcripts from
../shared/data/cmu_mosi_text, a tiny random BERT and generated audio; DEQFUSION_CMBERT_ROOT),
``multibench-rosmap`` and ``multibench-mmimdb`` (our MultiBench runner, MultiBench's own train(): ROSMAP from
../shared/data/rosmap, MM-IMDB generated in its HDF5 layout), ``mmdynamics-rosmap`` (MM-Dynamics' train_test.train,
the ROSMAP study's DEQ arm: fair protocol, hidden 100, evaluation every 10 epochs; DEQFUSION_MMDYNAMICS_ROOT),
``mutan`` (vqa.pytorch's train.py, MutanAtt; DEQFUSION_VQA_PYTORCH_ROOT) and ``block`` (block.bootstrap's runner,
its VQA2 network with ``type: deq`` as its classifier fusion; the installed package), both on VQA-v2 generated in
their layouts (integration_tests/vqa_data). Each runs with the integration's defaults as
shipped; ``--escalate``: while a run stays under 95% (training, last quarter, or evaluation), again with
``jac_term=diagonal``, then with ``norm=contractive`` too. ``--set KEY=VALUE`` (repeatable): run once with these
fusion options over the integration's defaults (instead of the ladder). ``--diagnose``: after every evaluation
solve, on its batch (no gradient, its own random generator, so training is unchanged): the spectral radius of
df/dz at the solved state per sample (``contraction.spectral_radius``, 30 power iterations) and the residual
after re-solving from zero with a cap of 400 (do more steps help?), and from the solve's own start (a warm start);
the same, in eval mode, after every training solve that did not converge (``diagnosis_train``). Every run also records the options of the
DEQFusion as built (norm, Jacobian term, caps), whoever set them. Appends to ``runs.jsonl`` and rewrites
``summary.md`` from every run in it (default folder benchmarks/results/recipe_convergence/).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deqfusion_core.options import parse_fusion_option

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "benchmarks" / "results" / "recipe_convergence"
TARGET = 0.95
LADDER = ({}, {"jac_term": "diagonal"}, {"jac_term": "diagonal", "norm": "contractive"})
sys.path.insert(0, str(ROOT / "integration_tests"))


# -- each recipe: its data, the upstream's arguments, the options that only locate files ----------------------------
def mcan(tmp: Path, epochs: int, seed: int):
    import test_mcan
    import upstreams

    root = upstreams.checkout("DEQFUSION_MCAN_ROOT", "mcan-vqa")
    if not root:
        raise SystemExit(upstreams.missing("DEQFUSION_MCAN_ROOT", "mcan-vqa"))
    checkout = upstreams.writable_copy(root, tmp / "mcan-vqa")
    splits = {"train": ("train2014", 80, 2), "val": ("val2014", 16, 2), "test": ("test2015", 2, 1)}
    data, feats, glove = test_mcan.make_dataset(tmp / "data", splits=splits)
    argv = ["--RUN=train", "--SPLIT=train", "--MODEL=small", "--BS=8", f"--MAX_EPOCH={epochs}", "--VERSION=conv",
            f"--DATA_PATH={data}", f"--FEAT_PATH={feats}", "--NW=0", "--GPU=0", "--SEED=1"]
    data_note = "generated VQA-v2 in MCAN's layout (integration_tests/test_mcan.make_dataset): 160 train / 32 val questions"
    return checkout, argv, {"glove": str(glove)}, data_note


def cmbert(tmp: Path, epochs: int, seed: int):
    import test_cmbert

    root = os.environ.get("DEQFUSION_CMBERT_ROOT")
    if not root:
        raise SystemExit("DEQFUSION_CMBERT_ROOT is unset")
    rows = {"train": 192, "dev": 48, "test": 48}
    ws = test_cmbert.write_workspace(tmp, rows)
    argv = ["--data_dir", str(ws["text"]), "--bert_model", str(ws["bert"]), "--num_train_epochs", str(epochs),
            "--train_batch_size", "16", "--eval_batch_size", "24", "--test_batch_size", "24"]
    data_note = (f"CMU-MOSI transcripts (first {rows['train']}/{rows['dev']}/{rows['test']} rows), generated audio "
                 "[N, 50, 5], a one-layer random BERT (integration_tests/test_cmbert.write_workspace)")
    return root, argv, {"audio": str(tmp / "audio.pickle"), "workdir": str(tmp / "work")}, data_note


def multibench(data_kind: str):
    def recipe(tmp: Path, epochs: int, seed: int):
        import upstreams

        root = upstreams.checkout("DEQFUSION_MULTIBENCH_ROOT", "MultiBench")
        if not root:
            raise SystemExit(upstreams.missing("DEQFUSION_MULTIBENCH_ROOT", "MultiBench"))
        if data_kind == "rosmap":
            data, limit = SHARED / "data" / "rosmap", []
            note = "ROSMAP (../shared/data/rosmap), the runner's mogonet recipe"
        else:
            from deqfusion_adapters.multibench import mmimdb

            data, limit = mmimdb.write_synthetic(tmp / "multimodal_imdb.hdf5", rows_per_split=256), ["--limit", "256"]
            note = "MM-IMDB generated in its HDF5 layout (mmimdb.write_synthetic, 256 rows a split)"
        argv = ["--data", str(data), "--epochs", str(epochs), "--no-early-stop", "--save", str(tmp / "best.pt"),
                *limit]
        return root, argv, {}, note
    return recipe


def mutan(tmp: Path, epochs: int, seed: int):
    import test_mutan_train

    root = os.environ.get("DEQFUSION_VQA_PYTORCH_ROOT")
    if not root:
        raise SystemExit("DEQFUSION_VQA_PYTORCH_ROOT is unset")
    checkout = Path(shutil.copytree(root, tmp / "vqa.pytorch", ignore=shutil.ignore_patterns(".git", "doc", "demo_web")))
    path = test_mutan_train.options(tmp, epochs, per_image=VQA_PER_IMAGE)
    note = (f"VQA-v2 generated in vqa.pytorch's layout (integration_tests/test_mutan_train.options): "
            f"{8 * VQA_PER_IMAGE} train / {4 * VQA_PER_IMAGE} val questions, MutanAtt at small widths, batch 8")
    return checkout, ["--path_opt", str(path), "-j", "0"], {}, note


def block(tmp: Path, epochs: int, seed: int):
    import test_block_runner
    import yaml

    opts = test_block_runner.options(tmp, epochs=epochs, per_image=VQA_PER_IMAGE)
    fusion = opts["model"]["network"]["classif"]["fusion"]        # the test's solver settings out: the plugin's
    for key in ("num_groups", "f_max_iter", "b_max_iter", "jac_weight"):
        fusion.pop(key)
    (tmp / "options.yaml").write_text(yaml.safe_dump(opts))
    note = (f"VQA-v2 generated in block's layout (integration_tests/test_block_runner.options, `type: deq` with "
            f"only its shape keys): {8 * VQA_PER_IMAGE} train / {4 * VQA_PER_IMAGE} val questions, batch 8")
    return None, ["-o", str(tmp / "options.yaml"), "--misc.seed", str(seed)], {}, note


def mmdynamics(tmp: Path, epochs: int, seed: int):
    root = os.environ.get("DEQFUSION_MMDYNAMICS_ROOT")
    if not root:
        raise SystemExit("DEQFUSION_MMDYNAMICS_ROOT is unset")
    # the DEQ arm of the ROSMAP study (benchmarks/results/rosmap/summary.md: its command, --fusion deq, fair protocol)
    argv = ["--data-folder", str(SHARED / "data" / "rosmap"), "--epochs", str(epochs), "--eval-every", "10",
            "--hidden", "100", "--fusion", "deq", "--protocol", "fair", "--seed", str(seed),
            "--modelpath", str(tmp / "model"), "--quiet"]
    return root, argv, {}, "ROSMAP (../shared/data/rosmap), the ROSMAP study's DEQ arm (fair protocol, hidden 100)"


VQA_PER_IMAGE = 12      # questions per generated image (8 train / 4 val images)
RECIPES = {"mcan": (mcan, 2), "cmbert": (cmbert, 3), "multibench-rosmap": (multibench("rosmap"), 20),
           "multibench-mmimdb": (multibench("mmimdb"), 5), "mmdynamics-rosmap": (mmdynamics, 200),
           "mutan": (mutan, 6), "block": (block, 6)}
INTEGRATION = {"mcan": "mcan", "cmbert": "cmbert", "multibench-rosmap": "multibench", "multibench-mmimdb": "multibench",
               "mmdynamics-rosmap": "mmdynamics", "mutan": "mutan", "block": "block"}
LOCATION_KEYS = ("glove", "audio", "workdir")      # options that only say where files are
# the options a recipe's command gives over the integration's defaults (docs/recipes.md: `--jac-weight 0.1` for VQA-v2)
COMMAND_OPTIONS = {"mcan": {"jac_weight": 0.1}, "mutan": {"jac_weight": 0.1}, "block": {"jac_weight": 0.1}}


# -- the worker: one training run in its own process ---------------------------------------------------------------
BUILT = ("norm", "norm_options", "jac_term", "f_max_iter", "f_max_iter_eval", "backward", "b_max_iter")
DIAGNOSE_CAP, DIAGNOSE_ITERS = 400, 30


class FusionProbe:
    """A global forward hook on every DEQFusion: its options as built (:data:`BUILT`) and, with ``diagnose``,
    after each evaluation solve the spectral radius at the solved state and a re-solve with a cap of
    :data:`DIAGNOSE_CAP` (no gradient; a generator of its own, so the run's random stream is unchanged)."""

    def __init__(self, diagnose: bool):
        self.diagnose, self.built, self.diagnosis, self.train_solves = diagnose, None, [], 0
        self.diagnosis_train = []       # the training solves that did not converge, measured the same way
        self._handle = None

    def __enter__(self):
        import torch

        self._handle = torch.nn.modules.module.register_module_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def hook(self, module, args, kwargs, output):
        from deqfusion_core import DEQFusion

        if not isinstance(module, DEQFusion):
            return
        if self.built is None:
            self.built = {k: getattr(module, k) for k in BUILT}
        if module.training:
            self.train_solves += 1
            if self.diagnose and module.equilibrium and not output[2].converged:
                # a training solve that missed: measured in eval mode (the normalisers' state does not advance)
                module.eval()
                try:
                    self.diagnosis_train.append(self.measure(module, args[0], kwargs.get("present"), output[2],
                                                             kwargs.get("z0")))
                finally:
                    module.train()
        elif self.diagnose and module.equilibrium:
            self.diagnosis.append(self.measure(module, args[0], kwargs.get("present"), output[2], kwargs.get("z0")))

    def measure(self, module, xs, present, stats, z0=None) -> dict:
        import torch

        from deqfusion_core.contraction import spectral_radius
        from deqfusion_core.norms import normalised_once

        tol = stats.tol
        with torch.no_grad(), normalised_once(module):
            xs, present = module._check_inputs(xs, present)
            inj = module.inject(xs, present)
            rho = spectral_radius(module.layer, stats.state, inj, DIAGNOSE_ITERS,
                                  generator=torch.Generator(stats.state.device).manual_seed(0))
            cap, module.f_max_iter_eval = module.f_max_iter_eval, DIAGNOSE_CAP
            try:
                longer = module.solve(torch.zeros_like(stats.state), inj).rel_residuals
                # the same start as the solve (a warm start: the previous evaluation's state of the split)
                longer_warm = None if z0 is None else module.solve(z0.detach().to(stats.state), inj).rel_residuals
            finally:
                module.f_max_iter_eval = cap
        frac = lambda r: float((r <= tol).float().mean())
        norms = torch.stack([x.flatten(1).norm(dim=1) for x in inj.xs], 1)      # [B, N]: the injection's scale
        worst = int(rho.argmax())
        return {"after_train_solves": self.train_solves, "batch": int(rho.numel()), "converged": bool(stats.converged),
                "samples_converged": frac(stats.rel_residuals), "max_rel_residual": float(stats.rel_residuals.max()),
                f"samples_converged_cap{DIAGNOSE_CAP}": frac(longer), f"max_rel_residual_cap{DIAGNOSE_CAP}":
                float(longer.max()), "rho_median": float(rho.median()), "rho_max": float(rho.max()),
                "rho_ge1_fraction": float((rho >= 1).float().mean()),
                "input_norm_median": norms.median(0).values.tolist(), "input_norm_at_rho_max": norms[worst].tolist(),
                "rel_residual_at_rho_max": float(stats.rel_residuals[worst]), "nstep": int(stats.nstep),
                "max_iter": int(stats.max_iter), "warm_started": z0 is not None,
                # the samples the solve left above the tolerance: their rho, and their residual at the longer cap
                "rho_unconverged": rho[stats.rel_residuals > tol].tolist(),
                f"max_rel_residual_warm_cap{DIAGNOSE_CAP}": None if longer_warm is None else float(longer_warm.max())}


def worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    seed_everything(job["seed"])
    from deqfusion_core import plugins
    from deqfusion_core.compare.record import SolverRecorder

    integ = plugins.get_integration(job["integration"])
    upstream = integ.locate(job["root"])
    integ.apply(upstream, job["options"])
    resolved = {k: v for k, v in dict(integ.options).items() if k not in LOCATION_KEYS}
    selected = None
    probe = FusionProbe(job.get("diagnose", False))
    start = time.perf_counter()
    with SolverRecorder() as recorder, probe:
        if hasattr(integ, "run_once"):          # CM-BERT: one run of run_classifier's main (its launcher runs 5)
            integ.run_once(upstream, job["argv"])
            code = 0
        elif job["integration"] == "mmdynamics":   # its summary names the validation-selected epoch
            selected = integ.run(job["argv"]).summary.get("val_selected", {}).get("epoch")
            code = 0
        else:
            code = integ.launch(upstream, job["argv"])
    result = {"exit": code, "solver": recorder.summary(), "options": resolved, "built": probe.built,
              "diagnosis": probe.diagnosis if probe.diagnose else None, "selected_epoch": selected,
              "diagnosis_train": probe.diagnosis_train if probe.diagnose else None,
              "train_s": round(time.perf_counter() - start, 1)}
    Path(job["result"]).write_text(json.dumps(result, default=repr))
    return 0


def seed_everything(seed: int) -> None:
    """The process's global generators (random, numpy, torch), before the upstream runs: CM-BERT's
    run_classifier draws its own seed from the unseeded numpy generator, so without this no two runs match."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(name: str, overrides: dict, epochs: int, threads: int, out: Path, command: str,
        diagnose: bool = False, seed: int = 1) -> dict:
    recipe, _ = RECIPES[name]
    with tempfile.TemporaryDirectory(prefix=f"conv-{name}-") as tmp:
        tmp = Path(tmp)
        root, argv, location, data_note = recipe(tmp, epochs, seed)
        job = {"integration": INTEGRATION[name], "root": root and str(root), "argv": argv, "threads": threads,
               "options": {**location, **COMMAND_OPTIONS.get(name, {}), **overrides},
               "result": str(tmp / "result.json"), "diagnose": diagnose, "seed": seed}
        (tmp / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        log = out / "work" / f"{name}-{len(overrides)}.log"     # the upstream's own output
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(tmp / "job.json")], env=env, cwd=tmp,
                                  stdout=f, stderr=subprocess.STDOUT)
        wall = round(time.perf_counter() - start, 1)
        if proc.returncode or not (tmp / "result.json").is_file():
            raise SystemExit(f"{name} {overrides}: the worker exited {proc.returncode}; log: {log}\n"
                             + log.read_text()[-3000:])
        result = json.loads((tmp / "result.json").read_text())
    import torch

    return {"study": "recipe_convergence", "integration": INTEGRATION[name], "recipe": name,
            "arm": "deq", "seed": seed, "seeded": True, "overrides": {**COMMAND_OPTIONS.get(name, {}), **overrides}, "settings": result["options"], "epochs": epochs,
            "data": data_note, "upstream_argv": [a.replace(str(tmp), "$TMP") for a in argv],
            "upstream_exit": result["exit"], "command": command, "commit": commit(), "selected_by": "final",
            "val": None, "test": None, "solver": result["solver"], "built": result["built"],
            "diagnosis": result["diagnosis"], "diagnosis_train": result.get("diagnosis_train"),
            "selected_epoch": result.get("selected_epoch"), "wall_s": wall, "train_s": result["train_s"],
            "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} torch thread(s)"}


def commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # this study's own result files do not count (each run rewrites them)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            f":!{OUT.relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")


def _backward(s: dict) -> str:
    """The implicit backward's last-quarter convergence of a run's solver summary ("not recorded" before it was)."""
    if "backward_converged_fraction_last_quarter" not in s:
        return "not recorded"
    if s["backward_converged_fraction_last_quarter"] is None:
        return "-"
    return (f"{s['backward_converged_fraction_last_quarter']:.0%} ({s['backward_mean_steps']:.1f} / "
            f"{s['backward_max_iter']})")


def converged(record: dict) -> bool:
    s = record["solver"] or {}
    return all((s.get(k) or 0) >= TARGET for k in ("train_converged_fraction_last_quarter", "eval_converged_fraction"))


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def write_summary(out: Path) -> None:
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    lines = ["# Convergence of the DEQ fusion's solves in each shipped recipe (issue 10, item 3)", "",
             "A convergence study, not an accuracy one: short trainings with the real upstream training loops on",
             "generated or shipped data (the `data` field of each run); their accuracies mean nothing and are not",
             f"recorded. A solve converged when every sample of its batch reached the tolerance; target >= "
             f"{TARGET:.0%} in training (last quarter of the solves) and in evaluation. Every run of runs.jsonl, "
             "oldest first. `seed`: of the process's generators (random, numpy, torch) before the upstream starts; "
             "`-`: a run from before the script seeded them (CM-BERT's run_classifier then drew a random seed of "
             "its own, so those CM-BERT runs cannot be repeated; the MultiBench runner and MCAN seed themselves, "
             "`--seed 0` and `--SEED=1`; block's runner seeds itself with `--misc.seed`, the run's seed).", "",
             "| recipe | seed | settings over the integration's defaults | resolved fusion options | DEQFusion as built | epochs "
             "| train converged (last quarter) | eval converged | implicit backward converged (last quarter; mean "
             "steps / cap) | mean steps train / eval | max eval rel residual | "
             "tol / cap (last solve) | solves train / eval | wall | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = r["solver"] or {}
        opts = ", ".join(f"{k}={v}" for k, v in sorted(r["settings"].items()))
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(as shipped)"
        steps = "/".join("-" if s.get(k) is None else f"{s[k]:.1f}" for k in ("mean_steps", "mean_steps_eval"))
        res = "-" if s.get("max_rel_residual_eval") is None else f"{s['max_rel_residual_eval']:.1e}"
        built = r.get("built")
        built = "-" if not built else ", ".join(f"{k}={built[k]}" for k in ("norm", "jac_term", "f_max_iter",
                                                                            "f_max_iter_eval") if k in built)
        lines.append(f"| {r['recipe']} | {r['seed'] if r.get('seeded') else '-'} | {over} | {opts} | {built} | {r['epochs']} | "
                     f"{pct(s.get('train_converged_fraction_last_quarter'))} | {pct(s.get('eval_converged_fraction'))} "
                     f"| {_backward(s)} | {steps} | {res} | {s.get('tol')} / {s.get('max_iter')} | {s.get('train_solves')} / "
                     f"{s.get('eval_solves')} | {r['wall_s']:.0f} s | {r['commit'][:10]}{'+dirty' * r['commit'].endswith('+dirty')} |")
    diagnosed = [(i, r) for i, r in enumerate(records, 1) if r.get("diagnosis")]
    if diagnosed:
        lines += ["", f"Diagnosis of the evaluation solves (`--diagnose`): after each, on its batch, the spectral radius "
                  f"rho of df/dz at the solved state per sample ({DIAGNOSE_ITERS} power iterations) and a re-solve "
                  f"from zero with a cap of {DIAGNOSE_CAP}. Per run: its first and its last evaluation solve, and "
                  "over all of them.", "",
                  "| run (row above) | recipe | settings | eval solves | first: rho median / max, samples converged "
                  f"at the cap / at {DIAGNOSE_CAP} | last: the same | all: solves converged at the cap / at "
                  f"{DIAGNOSE_CAP}, samples at rho >= 1, rho max |", "|---|---|---|---|---|---|---|"]
        for i, r in diagnosed:
            d = r["diagnosis"]
            one = lambda x: (f"{x['rho_median']:.2f} / {x['rho_max']:.2f}, {pct(x['samples_converged'])} / "
                             f"{pct(x[f'samples_converged_cap{DIAGNOSE_CAP}'])}")
            longer = sum(x[f"max_rel_residual_cap{DIAGNOSE_CAP}"] <= r["solver"]["tol"] for x in d) / len(d)
            ge1 = sum(x["rho_ge1_fraction"] * x["batch"] for x in d) / sum(x["batch"] for x in d)
            over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(as shipped)"
            lines.append(f"| {i} | {r['recipe']} | {over} | {len(d)} | {one(d[0])} | {one(d[-1])} | "
                         f"{pct(sum(x['converged'] for x in d) / len(d))} / {pct(longer)}, {100 * ge1:.2f}%, "
                         f"{max(x['rho_max'] for x in d):.2f} |")
    missed = [(i, r) for i, r in enumerate(records, 1) if r.get("diagnosis_train")]
    if missed:
        lines += ["", f"Training solves that did not converge (`--diagnose`), measured after the solve in eval mode: "
                  f"rho of the rows it left above the tolerance, and re-solves with a cap of {DIAGNOSE_CAP} from zero "
                  "and from the solve's own start.", "",
                  "| run (row above) | recipe | settings | missed training solves (at solve no.) | rho of the rows "
                  f"left: min / max | converged at {DIAGNOSE_CAP}: from zero / from its start |",
                  "|---|---|---|---|---|---|"]
        for i, r in missed:
            d, tol = r["diagnosis_train"], r["solver"]["tol"]
            rows = [x for m in d for x in m["rho_unconverged"]]
            warm = [m[f"max_rel_residual_warm_cap{DIAGNOSE_CAP}"] for m in d]
            over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(as shipped)"
            lines.append(f"| {i} | {r['recipe']} | {over} | {len(d)} ({', '.join(str(m['after_train_solves']) for m in d)} "
                         f"of {r['solver']['train_solves']}) | {min(rows, default=float('nan')):.2f} / "
                         f"{max(rows, default=float('nan')):.2f} | "
                         f"{sum(m[f'max_rel_residual_cap{DIAGNOSE_CAP}'] <= tol for m in d)}/{len(d)} / "
                         f"{sum(w is not None and w <= tol for w in warm)}/{sum(w is not None for w in warm)} |")
    lines += ["", "Data and commands:", ""]
    seen = set()
    for r in records:
        if (r["recipe"], r["command"]) not in seen:
            seen.add((r["recipe"], r["command"]))
            lines.append(f"- {r['recipe']}: {r['data']}; upstream arguments `{shlex.join(r['upstream_argv'])}`; "
                         f"command `{r['command']}`")
    lines += ["", "Evaluation solves are every solve in eval mode: the upstream's validation after each epoch (and, for",
              "CM-BERT, its dev and test runs), so they include early, barely trained models. `+dirty`: the run's",
              "working tree had uncommitted changes (this script and the test generators it imports, before their",
              "commit; for the runs of commit 26a0d45 after its first, only this folder's runs.jsonl and summary.md,",
              "which the check counted until the next commit). Wall times are on a shared machine (load 2-7 on 2",
              "cores).",
              "", f"Machine: {records[-1]['machine']}." if records else ""]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def study_parser(doc: str, known, kind: str, out: Path) -> argparse.ArgumentParser:
    """The arguments every study script here takes: the names to run (of ``known``), --out, and --worker (one run in
    its own process)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=list(known), help=f"{kind}s ({', '.join(known)})")
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def study_args(p: argparse.ArgumentParser, argv, known, kind: str) -> argparse.Namespace:
    a = p.parse_args(argv)
    unknown = sorted(set(a.names) - set(known))
    if unknown and not a.worker:
        p.error(f"unknown {kind}(s) {unknown}; known: {', '.join(known)}")
    return a


def main(argv=None) -> int:
    p = study_parser(__doc__, RECIPES, "recipe", OUT)
    p.add_argument("--escalate", action="store_true", help="under 95%%: jac_term=diagonal, then norm=contractive")
    p.add_argument("--set", action="append", type=parse_fusion_option, default=[], metavar="KEY=VALUE",
                   help="run once with these fusion options over the integration's defaults (repeatable)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds of the process's generators (default 1)")
    p.add_argument("--diagnose", action="store_true", help="rho and a longer re-solve after each evaluation solve")
    p.add_argument("--epochs", type=int, help="override each recipe's epochs")
    p.add_argument("--threads", type=int, default=2)
    a = study_args(p, argv, RECIPES, "recipe")
    if a.worker:
        return worker(a.worker)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / ".gitignore").write_text("work/\n")
    command = shlex.join(["python", "benchmarks/recipe_convergence.py", *(argv if argv is not None else sys.argv[1:])])
    if a.set and a.escalate:
        p.error("--set and --escalate: one or the other")
    try:
        seeds = [int(x) for x in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: comma-separated ints, got {a.seeds!r}")
    for name, seed in ((n, s) for n in a.names for s in seeds):
        for overrides in ([dict(a.set)] if a.set else LADDER if a.escalate else LADDER[:1]):
            record = run(name, overrides, a.epochs or RECIPES[name][1], a.threads, a.out, command, a.diagnose, seed)
            with open(a.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            write_summary(a.out)
            s = record["solver"] or {}
            print(f"{name} seed {seed} {overrides or '(as shipped)'}: train converged (last quarter) "
                  f"{pct(s.get('train_converged_fraction_last_quarter'))}, eval {pct(s.get('eval_converged_fraction'))}, "
                  f"mean steps {s.get('mean_steps')}/{s.get('mean_steps_eval')}, {record['wall_s']:.0f} s", flush=True)
            if converged(record):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
