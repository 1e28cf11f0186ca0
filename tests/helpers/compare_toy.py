"""A test double of an integration's comparison, for the unit tests of ``deqfusion compare``'s own logic
(tests/test_compare.py): a tiny two-modality classifier trained on generated data, with ``sum``, ``concat`` or
``deq`` fusion, its "upstream arguments" a small argparse command line. Real upstreams: integration_tests/."""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

from deqfusion_core.compare import Comparison, RunOutcome, Selection


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--fusion", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--jac-weight", type=float, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--opt", action="append", default=[])
    return p.parse_args(argv)


class _Evaluator:
    noise_on = "the toy's inputs"

    def __init__(self, modalities, takes_mask, train, evaluate):
        self.modalities, self.takes_mask, self.train, self.evaluate = modalities, takes_mask, train, evaluate

    def train_inputs(self):
        yield self.train, None


class ToyComparison(Comparison):
    integration = "toy"
    study = "toy"
    baseline = "sum"
    metric = "accuracy"
    fusion_keys = {"model.fusion": "the fusion", "model.jac_weight": "DEQ recipe: Jacobian weight"}
    not_compared = {"out": "where the run writes"}

    def fusions(self):
        return ["sum", "concat", "deq"]

    def locate(self, path):
        return None

    def smoke_args(self, upstream_args):
        return ["--steps", "3"]

    def argv(self, arm, seed, fusion_options, upstream_args, run_dir):
        extra = ["--jac-weight", "0.1"] if arm.fusion == "deq" else []
        return ["--fusion", arm.fusion, "--seed", str(seed), "--out", str(run_dir), *extra,
                *(f"--opt={k}={v}" for k, v in fusion_options.items()), *upstream_args]

    def effective_config(self, upstream, argv):
        a = parse(argv)
        model = {"fusion": {"type": a.fusion, **dict(o.split("=", 1) for o in a.opt)}}
        if a.jac_weight is not None:
            model["jac_weight"] = a.jac_weight
        return {"model": model, "train": {"seed": a.seed, "steps": a.steps, "lr": a.lr, "clip": a.clip},
                "out": a.out}

    def robustness_evaluator(self):
        return self.evaluator

    def train(self, upstream, argv, run_dir, progress):
        import torch
        from torch import nn

        from deqfusion_core import DEQFusion

        a = parse(argv)
        with open(Path(run_dir).parent / "trained.txt", "a") as f:   # which runs trained, for the resume test
            f.write(f"{a.fusion}:{a.seed}\n")
        if os.environ.get("TOY_FAIL") == f"{a.fusion}:{a.seed}":
            raise RuntimeError("injected failure")
        g = torch.Generator().manual_seed(1000)   # the data: the same for every seed and arm
        x1, x2 = torch.randn(192, 6, generator=g), torch.randn(192, 4, generator=g)
        y = ((x1[:, 0] + x2[:, 0] > 0)).long()
        split = {"train": slice(0, 128), "val": slice(128, 160), "test": slice(160, 192)}
        torch.manual_seed(a.seed)
        enc = nn.ModuleList([nn.Linear(6, 8), nn.Linear(4, 8)])
        fusion = DEQFusion([8, 8], 8, num_groups=2, f_max_iter=6, jac_weight=a.jac_weight or 0.0) \
            if a.fusion == "deq" else None
        head = nn.Linear(16 if a.fusion == "concat" else 8, 2)
        params = [*enc.parameters(), *head.parameters(), *(fusion.parameters() if fusion else [])]
        opt = torch.optim.Adam(params, lr=a.lr)
        modules = [m for m in (enc, head, fusion) if m is not None]

        def forward(part, transform=None):
            s = split[part]
            xs, present = [x1[s], x2[s]], None
            if transform is not None:
                xs, present = transform(xs, present)
            h = [torch.relu(e(x)) for e, x in zip(enc, xs)]
            if a.fusion == "deq":
                z = fusion(h, present=present)[0]
            else:
                z = torch.cat(h, 1) if a.fusion == "concat" else h[0] + h[1]
            return head(z), y[s]

        def accuracy(part, transform=None):
            for m in (enc, head, fusion):
                m is not None and m.eval()
            with torch.no_grad():
                out, t = forward(part, transform)
            for m in (enc, head, fusion):
                m is not None and m.train()
            return {"accuracy": float((out.argmax(1) == t).float().mean())}

        history = []
        for step in range(1, a.steps + 1):
            out, t = forward("train")
            loss = nn.functional.cross_entropy(out, t)
            opt.zero_grad()
            loss.backward()
            if a.clip:
                nn.utils.clip_grad_norm_(params, a.clip)
            opt.step()
            history.append((step, accuracy("val"), accuracy("test")))
            if max(history, key=lambda h: h[1]["accuracy"]) is history[-1]:   # the selected step so far
                best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            progress(done=step, total=a.steps, unit="step", metric={"val accuracy": history[-1][1]["accuracy"]})
        best = max(history, key=lambda h: h[1]["accuracy"])
        for m, state in zip(modules, best_state):
            m.load_state_dict(state)
        self.evaluator = _Evaluator(["x1", "x2"], a.fusion == "deq", [x1[split["train"]], x2[split["train"]]],
                                    lambda transform: accuracy("test", transform))
        return RunOutcome({"val": Selection(best[1], best[2], at=f"step {best[0]}", criterion="best val accuracy"),
                           "final": Selection(history[-1][1], history[-1][2], at=f"step {a.steps}",
                                              criterion="the last step")},
                          ["the toy changes nothing"], {"steps": a.steps})
