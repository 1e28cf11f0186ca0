"""Training-step time and peak memory of DEQ fusion against the upstream's own fusion, inside the upstreams' own
training loops (issue 14, item 4). A speed study, not an accuracy one: short runs on generated or shipped data.

    .venv/bin/python benchmarks/end_to_end.py [NAME ...] [--steps N] [--out DIR]

NAME: ``mmf`` (MMF's own trainer on easy-VQA: ``linear_sum`` against ``deq``), ``mcan`` (MCAN-small's run.py on
generated VQA-v2 data in its layout, integration_tests/test_mcan.make_dataset: the sum against ``deq``),
``mmdynamics`` (MM-Dynamics' own script on ROSMAP, ../shared/data/rosmap: concatenation against ``deq``),
``cmbert`` (CM-BERT's run_classifier on the shipped CMU-MOSI transcripts, a one-layer random BERT and generated
audio, integration_tests/test_cmbert.write_workspace: the addition against ``deq``). Each arm runs in its own
process through the integration's ``deqfusion compare`` arm (``Comparison.argv`` / ``Comparison.train``, so the
arms differ only in the fusion), with DEQFusion's and the integration's defaults.

How a step is split (:class:`StepTimer`, global hooks, no upstream code touched): a training step ends at each
optimizer step (torch's global optimizer-step hook). In it, ``forward`` is the time inside the outermost module
calls made with autograd on (the model, and a loss module if the upstream has one), ``fusion_forward`` the time
inside ``DEQFusion`` calls, ``backward`` the time inside ``torch.autograd.backward`` (``loss.backward()``),
``fusion_backward`` the span from the gradient reaching DEQFusion's output to the last gradient leaving it for
its inputs (tensor hooks); ``encoder_forward`` = forward - fusion_forward (encoders, heads and the baseline's
own fusion: a sum or a concatenation, not a module to time), ``other_backward`` = backward - fusion_backward,
``rest`` = step - forward - backward (data loading, optimizer, logging). On CUDA each boundary synchronises the
device (so the parts are true, and the steps a little slower than unobserved). Medians over the steps after the
first ``WARMUP``. Peak memory: the process's peak resident set (CPU) or ``torch.cuda.max_memory_allocated``.

Writes ``runs.jsonl`` (one arm a line, RESULTS.md's fields where they apply, plus ``timing`` and ``memory``),
``summary.json`` and ``summary.md`` (ratios deq / baseline, measured in the same invocation) under --out
(default benchmarks/results/end_to_end/).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "benchmarks" / "results" / "end_to_end"
WARMUP = 3
PARTS = ("encoder_forward", "fusion_forward", "fusion_backward", "other_backward", "rest")
sys.path.insert(0, str(ROOT / "integration_tests"))


# -- step timing ----------------------------------------------------------------------------------------------------
class StepTimer:
    """Per training step (between optimizer steps): forward, DEQ fusion forward, backward, DEQ fusion backward
    (see the module docstring). Global hooks, removed on exit."""

    def __init__(self):
        import torch

        self.torch = torch
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.steps: list[dict] = []
        self._reset(time.perf_counter())
        self.depth, self.top_start, self.fusion_start = 0, None, []
        self.grad_in, self.grad_out = None, None

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _reset(self, t):
        self.t0, self.acc = t, dict(forward=0.0, fusion_forward=0.0, backward=0.0, fusion_backward=0.0)

    def __enter__(self):
        from torch.nn.modules import module as nn_module
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from deqfusion_core import DEQFusion

        self.deq = DEQFusion
        self.handles = [nn_module.register_module_forward_pre_hook(self._pre),
                        nn_module.register_module_forward_hook(self._post),
                        register_optimizer_step_post_hook(self._step)]
        self.upstream_backward = self.torch.autograd.backward
        self.torch.autograd.backward = self._backward
        self._reset(self._now())
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.torch.autograd.backward = self.upstream_backward

    def _pre(self, module, args):
        grad = self.torch.is_grad_enabled()
        if self.depth == 0 and grad:
            self.top_start = self._now()
        if isinstance(module, self.deq) and grad and module.training:
            self.fusion_start.append(self._now())
            for x in (args[0] if args and isinstance(args[0], (list, tuple)) else []):
                if isinstance(x, self.torch.Tensor) and x.requires_grad:
                    x.register_hook(self._left)
        self.depth += 1

    def _post(self, module, args, output):
        self.depth -= 1
        if isinstance(module, self.deq) and self.fusion_start:
            self.acc["fusion_forward"] += self._now() - self.fusion_start.pop()
            fused = output[0]
            if fused.requires_grad:
                fused.register_hook(self._arrived)
        if self.depth == 0 and self.top_start is not None:
            self.acc["forward"] += self._now() - self.top_start
            self.top_start = None

    def _arrived(self, grad):
        if self.grad_in is None:
            self.grad_in = self._now()

    def _left(self, grad):
        self.grad_out = self._now()

    def _backward(self, *args, **kwargs):
        start = self._now()
        try:
            return self.upstream_backward(*args, **kwargs)
        finally:
            end = self._now()
            self.acc["backward"] += end - start
            if self.grad_in is not None:
                self.acc["fusion_backward"] += max(self.grad_out or end, self.grad_in) - self.grad_in
            self.grad_in = self.grad_out = None

    def _step(self, optimizer, args, kwargs):
        t = self._now()
        if self.acc["backward"] > 0:      # an optimizer step after a backward: a training step
            a = self.acc
            self.steps.append(dict(step=t - self.t0, encoder_forward=a["forward"] - a["fusion_forward"],
                                   fusion_forward=a["fusion_forward"], fusion_backward=a["fusion_backward"],
                                   other_backward=a["backward"] - a["fusion_backward"],
                                   rest=t - self.t0 - a["forward"] - a["backward"]))
        self._reset(t)

    def summary(self) -> dict:
        kept = self.steps[WARMUP:] if len(self.steps) > 2 * WARMUP else self.steps
        med = {k: statistics.median(s[k] for s in kept) for k in ("step", *PARTS)} if kept else {}
        share = statistics.median((s["fusion_forward"] + s["fusion_backward"]) / s["step"] for s in kept) if kept else None
        return {"steps_timed": len(kept), "steps_total": len(self.steps), "warmup_steps": len(self.steps) - len(kept),
                "median_s": med, "median_fusion_share": share}


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"kind": "torch.cuda.max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    return {"kind": "peak resident set of the process (ru_maxrss)",
            "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- the recipes: data and the upstream's arguments -------------------------------------------------------------------
def mmf(tmp: Path, steps: int):
    args = ["training.max_updates=%d" % steps, "training.log_interval=%d" % steps,
            "training.checkpoint_interval=%d" % steps, "training.evaluation_interval=%d" % steps,
            "training.batch_size=16", "dataset_config.easy_vqa.max_samples.train=%d" % (16 * steps),
            "dataset_config.easy_vqa.max_samples.val=32", "dataset_config.easy_vqa.max_samples.test=32"]
    return None, args, f"easy-VQA (the adapter's), batch 16, {steps} updates, one evaluation at the end"


def mcan(tmp: Path, steps: int):
    import test_mcan
    import upstreams

    root = upstreams.checkout("DEQFUSION_MCAN_ROOT", "mcan-vqa")
    if not root:
        raise SystemExit(upstreams.missing("DEQFUSION_MCAN_ROOT", "mcan-vqa"))
    checkout = upstreams.writable_copy(root, tmp / "mcan-vqa")
    images = max(4, steps * 8 // 2)            # 2 questions an image, batch 8: `steps` updates in one epoch
    data, feats, glove = test_mcan.make_dataset(tmp / "data", splits={
        "train": ("train2014", images, 2), "val": ("val2014", 8, 2), "test": ("test2015", 2, 1)})
    args = ["--MODEL=small", f"--DATA_PATH={data}/", f"--FEAT_PATH={feats}/", "--GPU=0", "--glove", str(glove),
            "--MAX_EPOCH=1", "--BS=8", "--NW=0"]
    return checkout, args, f"generated VQA-v2 in MCAN's layout, {images * 2} train questions, batch 8, one epoch"


def mmdynamics(tmp: Path, steps: int):
    root = os.environ.get("DEQFUSION_MMDYNAMICS_ROOT")
    if not root:
        raise SystemExit("DEQFUSION_MMDYNAMICS_ROOT is unset")
    args = ["--data-folder", str(SHARED / "data" / "rosmap"), "--epochs", str(steps), "--eval-every", str(steps)]
    return root, args, f"ROSMAP (../shared/data/rosmap), MM-Dynamics' full-batch epochs, {steps} epochs"


def cmbert(tmp: Path, steps: int):
    import test_cmbert

    root = os.environ.get("DEQFUSION_CMBERT_ROOT")
    if not root:
        raise SystemExit("DEQFUSION_CMBERT_ROOT is unset")
    rows = {"train": 16 * steps, "dev": 24, "test": 24}
    ws = test_cmbert.write_workspace(tmp, rows)
    args = ["--data_dir", str(ws["text"]), "--bert_model", str(ws["bert"]), "--audio", str(tmp / "audio.pickle"),
            "--num_train_epochs", "1", "--train_batch_size", "16", "--eval_batch_size", "24", "--test_batch_size", "24"]
    return root, args, (f"CMU-MOSI transcripts (first {rows['train']} train rows), generated audio, a one-layer "
                        "random BERT, batch 16, one epoch")


RECIPES = {"mmf": (mmf, 40), "mcan": (mcan, 40), "mmdynamics": (mmdynamics, 40), "cmbert": (cmbert, 24)}


# -- one arm in its own process ---------------------------------------------------------------------------------------
def worker(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    import torch

    torch.set_num_threads(job["threads"])
    from deqfusion_core.compare.record import SolverRecorder
    from deqfusion_core.compare.worker import load_comparison

    comparison = load_comparison(job["comparison"])
    upstream = comparison.locate(job["upstream"])
    start = time.perf_counter()
    with SolverRecorder() as recorder, StepTimer() as timer:
        comparison.train(upstream, job["argv"], Path(job["run_dir"]), lambda **event: None)
    result = {"timing": timer.summary(), "memory": peak_memory(), "solver": recorder.summary(),
              "train_s": round(time.perf_counter() - start, 1), "cuda": torch.cuda.is_available()}
    Path(job["result"]).write_text(json.dumps(result, default=repr))
    return 0


def run_arm(name: str, comparison, arm, upstream, upstream_args, tmp: Path, threads: int, log: Path,
            options: dict) -> dict:
    """One arm in its own process; ``options``: DEQFusion keywords for its argv."""
    run_dir = tmp / f"run-{arm.name}"
    job = {"comparison": comparison.ref, "upstream": None if upstream is None else str(upstream), "threads": threads,
           "argv": comparison.argv(arm, 1, options, upstream_args, run_dir), "run_dir": str(run_dir),
           "result": str(tmp / f"result-{arm.name}.json")}
    (tmp / f"job-{arm.name}.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(tmp / f"job-{arm.name}.json")], env=env,
                              cwd=tmp, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode or not Path(job["result"]).is_file():
        raise RuntimeError(f"{name} {arm.name}: the worker exited {proc.returncode}; log {log}:\n"
                           + log.read_text()[-3000:])
    return {**json.loads(Path(job["result"]).read_text()), "wall_s": round(time.perf_counter() - start, 1)}


def study(name: str, steps: int, threads: int, out: Path, command: str, fusion_options: dict | None = None) -> list[dict]:
    from deqfusion_core import plugins
    from deqfusion_core.compare.study import plan_arms

    from recipe_convergence import commit  # noqa: E402 - the same commit stamp as the other studies

    import torch

    comparison = plugins.get_comparison(name)
    records = []
    with tempfile.TemporaryDirectory(prefix=f"e2e-{name}-") as tmp:
        tmp = Path(tmp)
        upstream, args, data_note = RECIPES[name][0](tmp, steps)
        for arm in plan_arms(comparison, None, []):
            log = out / "work" / f"{name}-{arm.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            options = (fusion_options or {}) if arm.is_fusion else {}    # DEQFusion keywords: the deq arm's only
            r = run_arm(name, comparison, arm, upstream, args, tmp, threads, log, options)
            machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {threads} torch thread(s)"
            if r["cuda"]:
                machine += f", {torch.cuda.get_device_name(0)}"
            records.append({"study": "end_to_end", "integration": name, "arm": arm.name, "fusion": arm.fusion,
                            "seed": 1, "command": command, "commit": commit(), "selected_by": None, "val": None,
                            "test": None, "solver": r["solver"] if arm.is_fusion else None, "timing": r["timing"],
                            "memory": r["memory"], "data": data_note,
                            "fusion_options": options,
                            "upstream_args": [a.replace(str(tmp), "$TMP") for a in args], "wall_s": r["wall_s"],
                            "train_s": r["train_s"], "load_avg_1m": os.getloadavg()[0], "machine": machine})
            print(f"{name} {arm.name}: {fmt_timing(records[-1])}", flush=True)
    return records


# -- summary ----------------------------------------------------------------------------------------------------------
def fmt_timing(r: dict) -> str:
    med = r["timing"]["median_s"]
    if not med:
        return "no training step seen"
    parts = ", ".join(f"{k} {med[k] * 1e3:.1f}" for k in PARTS)
    return f"step {med['step'] * 1e3:.1f} ms ({parts}); peak memory {r['memory']['bytes'] / 2**20:.0f} MiB"


def summarise(records: list[dict]) -> dict:
    by = {}
    for r in records:
        by.setdefault(r["integration"], {})[r["arm"]] = r
    rows = {}
    for name, arms in by.items():
        base, deq = arms.get("baseline"), arms.get("deq")
        if not (base and deq and base["timing"]["median_s"] and deq["timing"]["median_s"]):
            continue
        b, d = base["timing"]["median_s"], deq["timing"]["median_s"]
        rows[name] = {"baseline_fusion": base["fusion"], "step_s": {"baseline": b["step"], "deq": d["step"]},
                      "step_ratio_deq_over_baseline": d["step"] / b["step"],
                      "fusion_share_of_deq_step": deq["timing"]["median_fusion_share"],
                      "deq_parts_s": {k: d[k] for k in PARTS}, "baseline_parts_s": {k: b[k] for k in PARTS},
                      "peak_memory_ratio_deq_over_baseline": deq["memory"]["bytes"] / base["memory"]["bytes"],
                      "peak_memory_bytes": {"baseline": base["memory"]["bytes"], "deq": deq["memory"]["bytes"]},
                      "memory_kind": deq["memory"]["kind"], "steps_timed": [base["timing"]["steps_timed"],
                                                                           deq["timing"]["steps_timed"]],
                      "deq_mean_solver_steps": (deq["solver"] or {}).get("mean_steps"),
                      "deq_converged_last_quarter": {   # training solves: forward, implicit backward
                          "forward": (deq["solver"] or {}).get("train_converged_fraction_last_quarter"),
                          "backward": (deq["solver"] or {}).get("backward_converged_fraction_last_quarter")},
                      "deq_eval_solves": _eval_solves(deq["solver"] or {}),
                      "load_avg_1m": [base["load_avg_1m"], deq["load_avg_1m"]], "machine": deq["machine"],
                      "data": deq["data"], "command": deq["command"], "commit": deq["commit"],
                      "deq_fusion_options": deq.get("fusion_options") or {}}
    return rows


def _eval_solves(solver: dict) -> dict | None:
    """The deq arm's evaluation solves: how many converged of how many, the largest relative residual, the tolerance."""
    n, frac = solver.get("eval_solves"), solver.get("eval_converged_fraction")
    if not n or frac is None:
        return None
    return {"converged": round(frac * n), "solves": n, "max_rel_residual": solver.get("max_rel_residual_eval"),
            "tol": solver.get("tol"), "max_iter": solver.get("max_iter_eval")}


def converged_cell(row: dict) -> str:
    """The deq arm's solves that converged: the last quarter's training forward / implicit backward solves, then the
    evaluation solves (a count; the largest residual when one missed). Also the README's (readme_tables.py)."""
    c = row.get("deq_converged_last_quarter")
    if c is None:
        return "not recorded"     # summaries written before the fractions were
    cell = " / ".join("–" if c.get(k) is None else f"{c[k]:.0%}" for k in ("forward", "backward"))
    e = row.get("deq_eval_solves")
    if e is None:
        return cell + " / –"
    cell += f" / {e['converged']} of {e['solves']}"
    if e["converged"] < e["solves"]:
        cell += f" (residual up to {e['max_rel_residual']:.1e} at the cap of {e['max_iter']}, tol {e['tol']:g})"
    return cell


def write_summary(out: Path, records: list[dict]) -> dict:
    rows = summarise(records)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    ms = lambda s: f"{s * 1e3:.1f}"
    lines = ["# DEQ fusion against the upstream's own fusion, inside the upstreams' own training loops", "",
             "Training-step time and peak memory (benchmarks/end_to_end.py; a speed study, not an accuracy one: short",
             "runs on generated or shipped data, one seed, each arm in its own process, both arms in one invocation).",
             f"Medians over the steps after the first {WARMUP}; times in ms. A step runs from one optimizer step to",
             "the next; its parts: encoder forward (the model's forward outside DEQFusion, so for the baseline it",
             "includes its own fusion), DEQ fusion forward, DEQ fusion backward, the other backward, and the rest",
             "(data loading, optimizer, logging); the parts' medians need not add up to the step's. The fusion's",
             "share is the median over steps of (fusion forward + backward) / step. DEQFusion with its and the",
             "integration's defaults.", "",
             "| upstream | baseline fusion | step baseline | step deq | deq / baseline | fusion fwd + bwd share of the "
             "deq step | deq: encoder fwd / fusion fwd / fusion bwd / other bwd / rest | baseline: encoder fwd / "
             "other bwd / rest | peak memory deq / baseline | mean solver steps (deq, training) | solves converged: "
             "training forward / implicit backward (last quarter) / evaluation | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d, b = r["deq_parts_s"], r["baseline_parts_s"]
        steps = r["deq_mean_solver_steps"]
        lines.append(
            f"| {name} | {r['baseline_fusion']} | {ms(r['step_s']['baseline'])} | {ms(r['step_s']['deq'])} | "
            f"{r['step_ratio_deq_over_baseline']:.2f} | {r['fusion_share_of_deq_step']:.0%} | "
            + " / ".join(ms(d[k]) for k in PARTS) + " | "
            + " / ".join(ms(b[k]) for k in ("encoder_forward", "other_backward", "rest")) + " | "
            f"{r['peak_memory_ratio_deq_over_baseline']:.2f} ({r['peak_memory_bytes']['deq'] / 2**20:.0f} / "
            f"{r['peak_memory_bytes']['baseline'] / 2**20:.0f} MiB) | {'-' if steps is None else f'{steps:.1f}'} | "
            f"{converged_cell(r)} | {' / '.join(f'{x:.1f}' for x in r['load_avg_1m'])} |")
    lines += ["", "Data, commands, machine:", ""]
    for name, r in rows.items():
        opts = r.get("deq_fusion_options")
        lines.append(f"- {name}: {r['data']}; `{r['command']}`; commit {r['commit'][:12]}; {r['machine']}; "
                     f"memory: {r['memory_kind']}" + (f"; deq arm's fusion options {opts}" if opts else ""))
    lines += ["", "Load is the machine's 1-minute load average when each arm finished (2 cores shared with other",
              "work: timings under a load above the core count are noisy; the ratios compare arms run one after the",
              "other in the same invocation)."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv=None) -> int:
    from recipe_convergence import study_args, study_parser

    p = study_parser(__doc__, RECIPES, "upstream", OUT)
    p.add_argument("--steps", type=int, help="training steps per arm (default: each upstream's: "
                   + ", ".join(f"{k} {v[1]}" for k, v in RECIPES.items()) + ")")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per arm (default 1: two threads on a loaded 2-core machine stall on each other)")
    p.add_argument("-o", "--fusion-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a DEQFusion keyword for the deq arm over the integration's defaults (a Python literal), "
                        "e.g. -o b_max_iter=40")
    a = study_args(p, argv, RECIPES, "upstream")
    if a.worker:
        return worker(a.worker)
    if a.steps is not None and a.steps < 2 * WARMUP + 1:
        p.error(f"--steps: at least {2 * WARMUP + 1} (the first {WARMUP} are not timed)")
    from deqfusion_core.options import parse_fusion_option
    try:
        options = dict(parse_fusion_option(o) for o in a.fusion_option)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / ".gitignore").write_text("work/\n")
    command = shlex.join(["python", "benchmarks/end_to_end.py", *(argv if argv is not None else sys.argv[1:])])
    records = []
    runs = a.out / "runs.jsonl"
    for name in a.names:
        new = study(name, a.steps or RECIPES[name][1], a.threads, a.out, command, options)
        with open(runs, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
        records += new
    # the summary reads this invocation's runs and, for upstreams it did not run, the latest ones in runs.jsonl
    latest = {}
    for r in map(json.loads, runs.read_text().splitlines()):
        latest[(r["integration"], r["arm"])] = r
    latest.update({(r["integration"], r["arm"]): r for r in records})
    for name, r in write_summary(a.out, list(latest.values())).items():
        print(f"{name}: deq / baseline step {r['step_ratio_deq_over_baseline']:.2f}, fusion share "
              f"{r['fusion_share_of_deq_step']:.0%}, peak memory {r['peak_memory_ratio_deq_over_baseline']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
