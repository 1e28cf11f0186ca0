"""One worker process of ``deqfusion compare``: the arms' effective configurations, or one training run.

    python -m deqfusion_core.compare.worker JOB.json

The job names the comparison (``module:qualname``) and the upstream's path (or null), and either ``configs``
(``{key: argv}``: write each one's effective configuration) or one training run (``argv``, ``run_dir``). The
result is written as JSON to ``job["result"]``; progress events go, one JSON object a line, to the file
descriptor ``job["progress_fd"]`` (the upstream's own output goes to this process's stdout and stderr).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["load_comparison", "machine", "main"]


def load_comparison(ref: str):
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj()


def machine(threads: int) -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cores} CPU cores, torch {torch.__version__}, {threads} torch thread{'s' * (threads != 1)}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


class _Progress:
    def __init__(self, fd: int | None):
        self.stream = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def __call__(self, **event) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(event, default=float) + "\n")


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    threads = int(job.get("threads") or 1)
    import torch

    torch.set_num_threads(threads)
    from .configdiff import flatten

    comparison = load_comparison(job["comparison"])
    upstream = comparison.locate(job.get("upstream"))
    result: dict = {}
    if job["mode"] == "configs":
        result = {key: flatten(comparison.effective_config(upstream, args)) for key, args in job["runs"].items()}
    elif job["mode"] == "train":
        from .record import SolverRecorder

        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        config = flatten(comparison.effective_config(upstream, job["argv"]))
        progress = _Progress(job.get("progress_fd"))
        start = time.perf_counter()
        with SolverRecorder() as recorder:
            outcome = comparison.train(upstream, job["argv"], run_dir, progress)
        wall_s = round(time.perf_counter() - start, 1)
        robustness = None
        if job.get("robustness") is not None:
            from .robustness import evaluate

            started = time.perf_counter()
            robustness = evaluate(comparison.robustness_evaluator(), int(job["seed"]), job["robustness"],
                                  lambda name, k, n: progress(done=k, total=n, unit="robustness condition",
                                                              metric={"condition": name}))
            robustness["wall_s"] = round(time.perf_counter() - started, 1)
        from deqfusion_core import compat

        shims = compat.applied()
        changes = list(outcome.behaviour_changes) + [f"{s.upstream}: {s.name}: {s.reason}" for s in shims
                                                     if s.behaviour_change]
        result = {"selections": {k: s.as_dict() for k, s in outcome.selections.items()},
                  "solver": recorder.summary(), "wall_s": wall_s, "robustness": robustness,
                  "machine": machine(threads), "behaviour_changes": list(dict.fromkeys(changes)),
                  "shims": list(dict.fromkeys(f"{s.upstream}: {s.name}" for s in shims if not s.behaviour_change)),
                  "info": outcome.info, "config": config,
                  "upstream": None if upstream is None else
                  {"root": str(upstream.root) if upstream.root else None, "version": upstream.version}}
    else:
        raise ValueError(f"job mode: expected 'configs' or 'train', got {job['mode']!r}")
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=repr))
    tmp.replace(job["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
