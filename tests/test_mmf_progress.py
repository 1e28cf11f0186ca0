"""The main job's console progress: MMF's progress lines and our solver lines, condensed (adapters/mmf/progress.py)."""
import io
import logging

from deqfusion_adapters.mmf.progress import console, converged_fraction

SOLVER = ("deq solver (update 200): 200 solves, mean steps 14.6/15, max rel residual 2.52e-01, "
          "not converged 145/200 (tol 0.01)")
TRAIN = ("progress: 200/1600, train/total_loss: 0.8155, train/total_loss/avg: 0.8155, train/easy_vqa/cross_entropy: "
         "0.8023, num_updates: 200, max_updates: 1600, lr: 0.002, ups: 15.38, time: 13s 255ms, eta: 01m 33s 020ms")
EVAL_SOLVER = ("deq solver (evaluation): 77 solves, mean steps 14.4/15, max rel residual 2.88e-02, "
               "not converged 52/77 (tol 0.01)")
VAL = ("progress: 400/1600, val/total_loss: 0.7784, val/easy_vqa/cross_entropy: 0.7784, val/easy_vqa/accuracy: 0.6672, "
       "num_updates: 400")


def test_console_echoes_progress_with_solver_lines_and_stops_after():
    out, log = io.StringIO(), logging.getLogger("mmf.train")
    log.setLevel(logging.INFO)
    with console(out) as handler:
        for line in (SOLVER, TRAIN, "Logging to: somewhere", EVAL_SOLVER, VAL):
            log.info(line)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("update  200/1600  loss 0.816 (avg 0.816)")
    assert "mean steps 14.6/15, converged 55/200 solves, max rel res 2.5e-01" in lines[0]
    assert lines[0].endswith("eta 01m 33s")
    assert lines[1].startswith("val at  400/1600  accuracy 0.6672")
    assert "converged 25/77 solves" in lines[1]
    assert [r["where"] for r in handler.solves] == ["update 200", "evaluation"]
    assert converged_fraction(handler.solves, 1600) is None            # nothing after update 1200
    assert converged_fraction(handler.solves, 200) == 55 / 200
    log.info(TRAIN)                     # the handler is gone after the context
    assert len(out.getvalue().splitlines()) == 2


def test_test_split_is_named():
    out, log = io.StringIO(), logging.getLogger("mmf.train")
    log.setLevel(logging.INFO)
    with console(out):
        log.info("progress: 1600/1600, test/total_loss: 0.4511, test/easy_vqa/cross_entropy: 0.4511, "
                 "test/easy_vqa/accuracy: 0.7700")
    assert out.getvalue().startswith("test at 1600/1600  accuracy 0.7700"), out.getvalue()


def test_progress_without_a_solver_line_is_echoed_alone():
    out, log = io.StringIO(), logging.getLogger("mmf.train")
    log.setLevel(logging.INFO)
    with console(out):
        log.info(TRAIN)
    assert "deq:" not in out.getvalue() and out.getvalue().startswith("update  200/1600")
