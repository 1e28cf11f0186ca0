"""The main job's progress on the console while MMF trains.

MMF writes its progress lines (and our DEQ solver lines, ``FusionClassifier._write``) to its log file; with
``training.stdout_capture`` nothing reaches the terminal until training ends. :func:`console` puts a handler on
MMF's loggers that echoes one condensed line per log interval (training) and per evaluation:

    update  200/1600  loss 0.816 (avg 0.816)  deq: mean steps 15.0/15, converged 7/200 solves, max rel res 4.4e-01  eta 01m 33s
    val at  400/1600  accuracy 0.6672         deq: mean steps 14.4/15, converged 25/77 solves, max rel res 2.9e-02
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator, TextIO

__all__ = ["ConsoleProgress", "console", "converged_fraction"]

SOLVER_LINE = re.compile(r"deq solver \((?P<where>[^)]*)\): (?P<count>\d+) solves, mean steps (?P<steps>[\d.]+)/"
                         r"(?P<cap>\d+), max rel residual (?P<res>\S+), not converged (?P<bad>\d+)/\d+")


def _fields(message: str) -> dict[str, str]:
    """MMF's simple log format: ``progress: 200/1600, key: value, key: value, ...``."""
    out = {}
    for part in message.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


class ConsoleProgress(logging.Handler):
    """Echoes MMF's progress lines, condensed and with the last DEQ solver line beside them, to ``stream``."""

    def __init__(self, stream: TextIO):
        super().__init__(logging.INFO)
        self.stream, self.solver = stream, ""
        self.solves: list[dict] = []     # every DEQ solver line: where ("update 200", "evaluation"), counts, steps

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a log record that does not format is not ours to report
            return
        match = SOLVER_LINE.search(message)
        if match:
            count, bad = int(match["count"]), int(match["bad"])
            self.solves.append({"where": match["where"], "solves": count, "converged": count - bad,
                                "mean_steps": float(match["steps"]), "max_rel_residual": float(match["res"])})
            self.solver = (f"deq: mean steps {float(match['steps']):.1f}/{match['cap']}, converged {count - bad}/{count} "
                           f"solves, max rel res {float(match['res']):.1e}")
            return
        if not message.startswith("progress:"):
            return
        fields = _fields(message)
        where = fields.get("progress", "?")
        if "train/total_loss" in fields:
            line = (f"update {where:>9}  loss {float(fields['train/total_loss']):.3f} "
                    f"(avg {float(fields.get('train/total_loss/avg', 'nan')):.3f})  {self.solver}")
            if "eta" in fields:
                line += f"  eta {fields['eta'].rsplit(' ', 1)[0]}"
        else:
            split = next((k.split("/", 1)[0] for k in fields if k.endswith("/total_loss")), "val")
            metric = next((k for k in fields if k.startswith(f"{split}/") and k.endswith("/accuracy")), None)
            score = f"accuracy {float(fields[metric]):.4f}" if metric else \
                f"loss {fields.get(f'{split}/total_loss', '?')}"
            line = f"{split + ' at':<6} {where:>9}  {score:<24} {self.solver}"
        self.solver = ""
        self.stream.write(line.rstrip() + "\n")
        self.stream.flush()


def converged_fraction(solves: list[dict], max_updates: int, last: float = 0.25) -> float | None:
    """Converged fraction of the training solves logged after update ``(1 - last) * max_updates``."""
    rows = [r for r in solves if r["where"].startswith("update ")
            and int(r["where"].split()[1]) > (1 - last) * max_updates]
    total = sum(r["solves"] for r in rows)
    return sum(r["converged"] for r in rows) / total if total else None


@contextlib.contextmanager
def console(stream: TextIO, logger: str = "mmf") -> Iterator[ConsoleProgress]:
    """For the duration, echo MMF's progress (loggers under ``logger``) to ``stream``."""
    handler, log = ConsoleProgress(stream), logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
