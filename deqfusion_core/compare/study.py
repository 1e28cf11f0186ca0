"""A study: every (seed, arm) run of a comparison, checked, resumable, with progress and result files.

Order of work: the arms' upstream arguments; their effective configurations (one worker process); the check
that they differ only in the fusion (else exit 2 before anything trains); the finished runs of ``runs.jsonl``
(kept when their configuration is the planned one); then seed by seed, each arm in its own worker process,
one ``runs.jsonl`` line per finished run; finally ``summary.json``, ``summary.md`` and ``paired.png``.
Per-run folders (the upstream's logs, checkpoints) go under ``OUT/work/``, which ``OUT/.gitignore`` ignores.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import configdiff
from .spec import Arm, Comparison
from .robustness_report import plot_robustness, summarize_robustness
from .summary import duration, selections_of, summarize, write_summary

__all__ = ["StudyError", "StudyOptions", "plan_arms", "project_commit", "read_runs", "run_study"]


class StudyError(Exception):
    """Bad input or a study that must not run (exit code 2)."""


@dataclass
class StudyOptions:
    seeds: list[int]
    out: Path
    smoke: bool = False
    fusion: str | None = None                 # default: the comparison's
    baselines: list[str] = field(default_factory=list)   # default: [the upstream's own fusion]
    upstream: str | None = None
    allow_diff: list[str] = field(default_factory=list)
    fusion_options: dict[str, Any] = field(default_factory=dict)
    upstream_args: list[str] = field(default_factory=list)
    arm_args: dict[str, list[str]] = field(default_factory=dict)
    threads: int = 1
    study: str | None = None
    command: str = ""
    dry_run: bool = False        # check the configurations and say what would run; train nothing
    robustness: list[float] | None = None   # noise levels: evaluate each run's selected checkpoint under
                                            # perturbations of the test split (robustness.py); None: off


def plan_arms(comparison: Comparison, fusion: str | None, baselines: list[str]) -> list[Arm]:
    """Baselines first (``baseline`` for the upstream's own fusion, else the fusion's name), then the fusion."""
    fusion = fusion or comparison.fusion
    baselines = list(dict.fromkeys(baselines or [comparison.baseline]))
    known = comparison.fusions()
    for name, flag in [(fusion, "--fusion"), *((b, "--baseline") for b in baselines)]:
        if known is not None and name not in known:
            raise StudyError(f"{flag}: {comparison.integration} has no fusion {name!r}; it has {', '.join(known)}")
    if fusion in baselines:
        raise StudyError(f"--baseline: {fusion!r} is the fusion under test (--fusion)")
    arms = [Arm("baseline" if b == comparison.baseline else b, b, False) for b in baselines]
    arms.append(Arm("deq" if fusion == "deq" else fusion, fusion, True))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise StudyError(f"--baseline/--fusion: two arms would be named alike: {names}")
    return arms


def read_runs(path: Path) -> list[dict]:
    """The finished runs of ``runs.jsonl``; a torn last line (a study killed while writing) is skipped."""
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"deqfusion compare: {path}:{n} is not JSON (a torn write?): ignored", file=sys.stderr)
    return out


def project_commit() -> str | None:
    """The deqfusion checkout's commit, ``+dirty`` with uncommitted changes outside benchmarks/results."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty.strip() else "")) or None


class _Worker:
    """One worker process: its job file, its log, its progress pipe."""

    def __init__(self, comparison: Comparison, opts: StudyOptions, folder: Path, job: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "log.txt"
        self.result = folder / "result.json"
        self.result.unlink(missing_ok=True)
        self.job = {"comparison": comparison.ref, "upstream": opts.upstream,
                    "threads": opts.threads, "result": str(self.result), **job}
        self.folder = folder
        self.threads = opts.threads

    def run(self, on_event: Callable[[dict], None] = lambda e: None) -> dict:
        read, write = os.pipe()
        self.job["progress_fd"] = write
        (self.folder / "job.json").write_text(json.dumps(self.job, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        with open(self.log, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "deqfusion_core.compare.worker",
                                     str(self.folder / "job.json")], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, pass_fds=(write,))
        os.close(write)
        try:
            with os.fdopen(read) as events:
                for line in events:
                    try:
                        on_event(json.loads(line))
                    except json.JSONDecodeError:
                        pass
            code = proc.wait()
            self.process_s = round(time.perf_counter() - started, 1)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if code != 0 or not self.result.is_file():
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"worker exited with code {code}; the end of {self.log}:\n{tail}")
        return json.loads(self.result.read_text())


class _Eta:
    def __init__(self, arms: list[Arm], todo: list[tuple[int, Arm]]):
        self.durations: dict[str, list[float]] = {a.name: [] for a in arms}
        self.todo = todo

    def estimate(self, arm: Arm) -> float | None:
        own = self.durations[arm.name]
        every = [d for ds in self.durations.values() for d in ds]
        return sum(own) / len(own) if own else (sum(every) / len(every) if every else None)

    def remaining(self, index: int, arm: Arm, elapsed: float, fraction: float | None) -> float | None:
        est = self.estimate(arm)
        if fraction and fraction > 0.05:
            est = elapsed / fraction
        if est is None:
            return None
        rest = [self.estimate(a) for _, a in self.todo[index + 1:]]
        if any(r is None for r in rest):
            rest = [est] * len(rest)
        return max(est - elapsed, 0.0) + sum(rest)


def run_study(comparison: Comparison, opts: StudyOptions,
              say: Callable[[str], None] = lambda s: print(s, flush=True)) -> int:
    if not opts.seeds:
        raise StudyError("--seeds: no seeds")
    integration = comparison.integration
    arms = plan_arms(comparison, opts.fusion, opts.baselines)
    unknown_arms = set(opts.arm_args) - {a.name for a in arms}
    if unknown_arms:
        raise StudyError(f"--arm-args: no arm {sorted(unknown_arms)[0]!r}; the arms are {', '.join(a.name for a in arms)}")
    reference, fusion_arm = arms[0], arms[-1]
    if opts.robustness is not None and type(comparison).robustness_evaluator is Comparison.robustness_evaluator:
        raise StudyError(f"--robustness: {integration} has no robustness evaluation (docs/robustness.md)")
    out = Path(opts.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("work/\n")
    shared = (comparison.smoke_args(opts.upstream_args) if opts.smoke else []) + list(opts.upstream_args)
    study = opts.study or (("robustness_" if opts.robustness is not None else "") +
                           comparison.study_name(opts.upstream_args))
    headline = comparison.headline(opts.upstream_args)

    # 1. every run's arguments and effective configuration; the arms may differ only in the fusion
    try:
        argvs = {(a.name, s): comparison.argv(a, s, opts.fusion_options if a.is_fusion else {},
                                              shared + opts.arm_args.get(a.name, []), work / f"{a.name}-seed{s}")
                 for s in opts.seeds for a in arms}
    except (ValueError, KeyError) as exc:
        raise StudyError(str(exc.args[0] if exc.args else exc)) from None
    say(f"deqfusion compare {integration}: {study}, arms " +
        ", ".join(f"{a.name} ({a.fusion})" for a in arms) + f", seeds {', '.join(map(str, opts.seeds))}"
        + (" (smoke)" if opts.smoke else "") + f"; computing the arms' effective configurations ...")
    try:
        raw = _Worker(comparison, opts, work / "configs",
                      {"mode": "configs", "runs": {f"{a}:{s}": v for (a, s), v in argvs.items()}}).run()
    except RuntimeError as exc:
        raise StudyError(f"could not compute the arms' configurations ({exc})") from None
    configs = {tuple(k.rsplit(":", 1)): configdiff.drop(v, comparison.not_compared) for k, v in raw.items()}
    configs = {(a, int(s)): v for (a, s), v in configs.items()}
    diffs: dict[tuple[str, int], list[configdiff.Difference]] = {}
    for s in opts.seeds:
        for a in arms[1:]:
            d = configdiff.differences(configs[(reference.name, s)], configs[(a.name, s)], comparison.fusion_keys,
                                       opts.allow_diff)
            bad = [x for x in d if x.role is None]
            if bad:
                raise StudyError(str(configdiff.ConfigMismatch(a.name, reference.name, s, bad)))
            if a is fusion_arm and not d:
                raise StudyError(f"arms {reference.name!r} and {a.name!r} (seed {s}) have the same effective "
                                 f"configuration: nothing to compare (do the upstream arguments set the fusion?)")
            diffs[(a.name, s)] = d
    differing = {k for d in diffs.values() for x in d for k in [x.key]}
    unused = [k for k in opts.allow_diff if not any(configdiff.owner(x, [k]) for x in differing)]
    if unused:
        say(f"note: --allow-diff {' '.join(unused)}: no such difference between the arms")
    shas = {k: configdiff.fingerprint(v) for k, v in configs.items()}

    # 2. what is already done
    runs_file = out / "runs.jsonl"
    records = read_runs(runs_file)
    done = {}
    for r in records:
        key = (r.get("arm"), r.get("seed"))
        if key in shas:
            if r.get("config_sha") != shas[key]:
                raise StudyError(f"{runs_file} has a finished run of arm {key[0]!r}, seed {key[1]} with another "
                                 f"configuration than this command's: use another --out, or delete that line to "
                                 f"redo the run")
            if opts.robustness is not None and (r.get("robustness") or {}).get("levels") != list(opts.robustness):
                raise StudyError(f"{runs_file} has a finished run of arm {key[0]!r}, seed {key[1]} without the "
                                 f"robustness evaluation this command asks for (or with other noise levels): use "
                                 f"another --out, or delete that line to redo the run")
            done[key] = r
    todo = [(s, a) for s in opts.seeds for a in arms if (a.name, s) not in done]
    total = len(opts.seeds) * len(arms)
    roles: dict[str, set[str]] = {}
    for d in diffs.values():
        for x in d:
            roles.setdefault(x.role, set()).add(x.key)
    say("configurations checked; the arms differ only in: " +
        "; ".join(f"{role} ({len(keys)} key{'s' * (len(keys) > 1)})" for role, keys in roles.items()) +
        f". {total} runs, {total - len(todo)} already done in {runs_file}")

    if opts.dry_run:
        for a in arms:
            say(f"{a.name} ({a.fusion}), seed {opts.seeds[0]}: upstream arguments {argvs[(a.name, opts.seeds[0])]}")
        say(f"dry run: {len(todo)} of {total} runs would train; nothing was written to {runs_file}")
        return 0

    # 3. the runs
    commit = project_commit()
    eta = _Eta(arms, todo)
    status = 0
    for i, (seed, arm) in enumerate(todo):
        k = total - len(todo) + i + 1
        run_dir = work / f"{arm.name}-seed{seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)   # a run that did not finish: start it again from nothing
        tag = f"[run {k}/{total}] seed {seed}, {arm.name} ({arm.fusion})"
        say(f"{tag}: started; log {run_dir / 'log.txt'}")
        start = time.perf_counter()

        def on_event(event, tag=tag, start=start, i=i, arm=arm):
            done_, tot = event.get("done"), event.get("total")
            fraction = done_ / tot if done_ is not None and tot else None
            elapsed = time.perf_counter() - start
            metric = ", ".join(f"{name} {value:.4f}" if isinstance(value, float) else f"{name} {value}"
                               for name, value in (event.get("metric") or {}).items())
            where = f"{event.get('unit', 'step')} {done_}/{tot}" if done_ is not None else ""
            say(f"{tag}: {where}{', ' if where and metric else ''}{metric} | elapsed {duration(elapsed)}, "
                f"ETA study {duration(eta.remaining(i, arm, elapsed, fraction))}")

        worker = _Worker(comparison, opts, run_dir,
                         {"mode": "train", "argv": argvs[(arm.name, seed)], "run_dir": str(run_dir), "seed": seed,
                          "robustness": opts.robustness})
        try:
            result = worker.run(on_event)
            result["process_s"] = worker.process_s
        except KeyboardInterrupt:
            say(f"{tag}: interrupted; the same command resumes the study without redoing finished runs")
            status = 130
            break
        except RuntimeError as exc:
            say(f"{tag}: FAILED: {exc}\nthe same command resumes the study after a fix")
            status = 1
            break
        used = configdiff.fingerprint(configdiff.drop(result["config"], comparison.not_compared))
        if used != shas[(arm.name, seed)]:
            say(f"{tag}: FAILED: the run's effective configuration is not the one checked before training")
            status = 1
            break
        record = _record(comparison, integration, study, opts, arm, seed, result, diffs, reference, commit,
                         shas[(arm.name, seed)])
        with open(runs_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        records.append(record)
        eta.durations[arm.name].append(result["wall_s"])
        primary = selections_of(record)[record["selected_by"]]
        shown = ", ".join(f"{sp} {headline} {(primary.get(sp) or {}).get(headline, float('nan')):.4f}"
                          for sp in ("val", "test") if primary.get(sp))
        conv = ""
        if record["solver"]:
            sv = record["solver"]
            conv = (f"; DEQ converged {_pct(sv['train_converged_fraction_last_quarter'])} of training solves "
                    f"(last quarter), {_pct(sv['eval_converged_fraction'])} of eval solves")
            if sv.get("backward_converged_fraction_last_quarter") is not None:
                conv += f", implicit backward {_pct(sv['backward_converged_fraction_last_quarter'])} (last quarter)"
        say(f"{tag}: done in {duration(result['wall_s'])}: {shown} (selected by {record['selected_by']}){conv}"
            f" | ETA study {duration(eta.remaining(i, arm, 0.0, 1.0) if i + 1 < len(todo) else 0.0)}")

    # 4. the summary of every planned run that is done
    summary_arms = [{"name": a.name, "fusion": a.fusion, "is_fusion": a.is_fusion} for a in arms]
    summary = summarize(records, study=study, integration=integration, metric=headline, arms=summary_arms,
                        seeds=opts.seeds,
                        differences={a.name: [x.as_dict(reference.name, a.name) for x in diffs[(a.name, opts.seeds[0])]]
                                     for a in arms[1:]},
                        not_compared=dict(comparison.not_compared), allowed=opts.allow_diff)
    planned = [r for r in records if (r["arm"], r["seed"]) in shas]
    if opts.robustness is not None:
        summary["robustness"] = summarize_robustness(planned, summary_arms, headline)
    write_summary(out, summary)
    from .plot import plot_paired

    pngs = [plot_paired(planned, summary, out / "paired.png")]
    if opts.robustness is not None:
        pngs.append(plot_robustness(summary["robustness"], out / "robustness.png",
                                    f"{study} ({integration}): test {headline} of the {summary['primary_selection']}"
                                    f"-selected checkpoints under perturbations, mean ± std over seeds"))
    say(f"wrote {runs_file}, {out / 'summary.md'}, {out / 'summary.json'}" +
        "".join(f", {png}" for png in pngs if png))
    return status


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _record(comparison, integration, study, opts, arm, seed, result, diffs, reference, commit, sha) -> dict:
    sels = result["selections"]
    primary = next((s for s in comparison.selections if s in sels), None)
    if primary is None:
        raise RuntimeError(f"the run reported none of the selections {comparison.selections}")
    first = sels[primary]
    return {"study": study, "integration": integration, "arm": arm.name, "fusion": arm.fusion, "seed": seed,
            "command": opts.command, "commit": commit, "selected_by": primary,
            "selected_at": first.get("at", ""), "selection_criterion": first.get("criterion", ""),
            "val": first.get("val"), "test": first.get("test"),
            "also_selected_by": {k: v for k, v in sels.items() if k != primary},
            "solver": result.get("solver"),
            "differs_from_baseline": [] if arm == reference else [x.key for x in diffs[(arm.name, seed)]],
            "wall_s": result["wall_s"], "process_s": result.get("process_s"), "machine": result.get("machine"),
            "smoke": opts.smoke,
            "behaviour_changes": result.get("behaviour_changes", []), "shims": result.get("shims", []),
            "upstream": result.get("upstream"),
            "info": result.get("info", {}), "config_sha": sha,
            **({"robustness": result["robustness"]} if result.get("robustness") else {})}
