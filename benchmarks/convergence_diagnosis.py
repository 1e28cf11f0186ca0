"""Why DEQ fusion solves stall, measured while training (issue 10; docs/convergence.md).

A standalone replica of the easy-VQA main job, written so that the solver can be instrumented between updates:
the same data (the ``easy-vqa`` package: 38,575 training questions; validation = the package's test questions on
images 0-499, as ``adapters/mmf/easy_vqa.py`` splits them), the same encoders and widths as
``adapters/mmf/configs/experiments/easy_vqa_common.yaml`` (CNN 16-32-64 -> 64, bag of words 26 -> 64 -> 64),
DEQFusion([64, 64], 64, num_groups=4), a linear classifier, AdamW lr 2e-3, batch 64, 1,600 updates. It is not MMF
(no MMF trainer, checkpoints or early stopping: the validation figures are after the last update), so its numbers
are for comparing fusion settings with each other; the MMF figures come from ``deqfusion compare mmf``.

Every ``--diag-every`` updates, on the current training batch (eval mode, no dropout):
- the spectral radius of df/dz at the solved state, per sample (power iteration on the VJP:
  ``deqfusion_core.contraction.spectral_radius`` when present, else the same computation here);
- the relative residual after the training solve, and after re-solving from zero with 200 steps of Anderson
  and of plain fixed-point iteration: does more compute converge (slow contraction) or not (no contraction:
  rho >= 1, cycles, several fixed points)?
- the mean norm of each encoder's feature (the injection).

    python benchmarks/convergence_diagnosis.py --recipe shipped --seed 1 --out benchmarks/results/convergence_diagnosis
    python benchmarks/convergence_diagnosis.py --list

Writes ``<out>/<recipe>_seed<seed>.json`` (arguments, every log row, diagnostics, evaluation) and rewrites
``<out>/summary.md`` from every run file in ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"num_groups": 4, "f_max_iter": 15, "f_tol": 1e-2, "b_max_iter": 10, "b_tol": 1e-3}

# name -> (DEQFusion options over SHIPPED, options changed for evaluation, Jacobian weight, what it tests)
RECIPES = {
    "shipped": ({}, {}, 0.1, "the main job's recipe before issue 10: forward cap 15, backward cap 10"),
    "cap40": ({"f_max_iter": 40}, {"f_max_iter": 100}, 0.1, "forward cap 40 (evaluation 100), backward cap 10"),
    "cap40_exact": ({"f_max_iter": 40, "b_max_iter": 40}, {"f_max_iter": 100}, 0.1,
                    "cap40 with the implicit backward solved to its tolerance (cap 40)"),
    "cap40_phantom": ({"f_max_iter": 40, "backward": "phantom"}, {"f_max_iter": 100}, 0.1,
                      "cap40 with the phantom gradient (5 damped steps)"),
    "cap40_onestep": ({"f_max_iter": 40, "backward": "onestep"}, {"f_max_iter": 100}, 0.1,
                      "cap40 with the one-step (Jacobian-free) gradient"),
    "cap40_jac03": ({"f_max_iter": 40}, {"f_max_iter": 100}, 0.3, "cap40 with Jacobian weight 0.3"),
    "cap80": ({"f_max_iter": 80}, {"f_max_iter": 100}, 0.1, "forward cap 80 (evaluation 100), backward cap 10"),
    "cap80_jac03": ({"f_max_iter": 80}, {"f_max_iter": 100}, 0.3, "cap80 with Jacobian weight 0.3"),
    "cap40_full_jac1": ({"f_max_iter": 40}, {"f_max_iter": 100}, 1.0, "cap40 with the full Jacobian term at weight 1"),
    "cap40_diagonal_jac1": ({"f_max_iter": 40, "jac_term": "diagonal"}, {"f_max_iter": 100}, 1.0,
                            "cap40 with the diagonal-block Jacobian term at weight 1"),
    "recipe": ({"f_max_iter": 40, "jac_term": "diagonal", "jac_weight": 0.1, "jac_schedule": "linear",
                "jac_weight_final": 1.0, "jac_schedule_steps": 1600}, {"f_max_iter": 100}, None,
               "the shipped recipe after issue 10: cap40, diagonal-block Jacobian term ramped 0.1 -> 1.0 "
               "(DEQFusion attaches it)"),
}


# -- data and model -------------------------------------------------------------------------------------------
def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def load_easy_vqa(size: int = 32) -> dict:
    """easy-VQA as tensors: images [N, 3, size, size] uint8, bag of words [N, V], answer ids [N]."""
    import easy_vqa
    from PIL import Image

    root = Path(easy_vqa.__file__).parent / "data"
    answers = [a.strip() for a in (root / "answers.txt").read_text().splitlines() if a.strip()]

    def split(folder):
        rows = json.loads((root / folder / "questions.json").read_text())
        return [r[0] for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows]

    train, test = split("train"), split("test")
    vocab = {w: i for i, w in enumerate(sorted({w for q in train[0] for w in _tokens(q)}))}
    answer_id = {a: i for i, a in enumerate(answers)}

    def build(rows, folder, keep=lambda image_id: True):
        questions, answer, ids = rows
        picked = [j for j in range(len(questions)) if keep(ids[j])]
        text = torch.zeros(len(picked), len(vocab))
        images = {}
        for k, j in enumerate(picked):
            for w in _tokens(questions[j]):
                if w in vocab:
                    text[k, vocab[w]] = 1
            if ids[j] not in images:
                with Image.open(root / folder / "images" / f"{ids[j]}.png") as im:
                    im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                    images[ids[j]] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        image = torch.stack([images[ids[j]] for j in picked])
        return image, text, torch.tensor([answer_id[answer[j]] for j in picked])

    return {"train": build(train, "train"), "val": build(test, "test", lambda i: i < 500),
            "vocab": len(vocab), "answers": len(answers)}


class CNN(nn.Module):
    def __init__(self, out_dim: int = 64, channels=(16, 32, 64)):
        super().__init__()
        layers, c = [], 3
        for w in channels:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.out = nn.Sequential(nn.Linear(4 * c, out_dim), nn.ReLU())

    def forward(self, x):
        return self.out(self.conv(x))


class Model(nn.Module):
    def __init__(self, vocab: int, answers: int, fusion: nn.Module):
        super().__init__()
        self.image = CNN()
        self.text = nn.Sequential(nn.Linear(vocab, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.fusion, self.classifier = fusion, nn.Linear(64, answers)
        self.last = None

    def features(self, image, text):
        return [self.image(image.float() / 255), self.text(text)]

    def forward(self, image, text):
        out = self.fusion(self.features(image, text))
        if isinstance(out, tuple):
            fused, jac, stats = out
            self.last = (jac, stats)
        else:
            fused, self.last = out, None
        return self.classifier(fused)


# -- diagnostics ----------------------------------------------------------------------------------------------
def spectral_radius(fusion, inj, z: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """Per sample, the growth rate of v -> v J (J = df/dz at z) over the second half of ``iters`` steps."""
    try:
        from deqfusion_core.contraction import spectral_radius as core

        return core(fusion.layer, z, inj, iters=iters)
    except ImportError:
        pass
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        fz = fusion.layer(z, inj)
        v = torch.randn_like(z)
        v = v / v.norm(dim=1, keepdim=True)
        logs = []
        for _ in range(iters):
            (v,) = torch.autograd.grad(fz, z, v, retain_graph=True)
            n = v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            logs.append(n.squeeze(1).log())
            v = v / n
    return torch.stack(logs[iters // 2:]).mean(0).exp()


def resolve(fusion, inj, batch: int, solver: str, iters: int) -> torch.Tensor:
    from deqfusion_core.solvers import get_solver

    with torch.no_grad():
        z0 = torch.zeros(batch, fusion.state_width)
        f = lambda z, rows: fusion.layer(z, inj if rows is None else inj.select(rows))  # noqa: E731
        return get_solver(solver)(f, z0, max_iter=iters, tol=1e-9, stop="rel").rel_residuals


def jacobian_terms(fusion, inj, z: torch.Tensor, samples: int = 16) -> dict:
    """The full Jacobian term and its diagonal blocks' part at z (Hutchinson, ``samples`` probes)."""
    from deqfusion_core.jacobian import jacobian_loss

    with torch.enable_grad():
        z = z.detach().requires_grad_()
        fz = fusion.layer(z, inj)
        full = jacobian_loss(fz, z, samples, create_graph=False)
        diagonal = jacobian_loss(fz, z, samples, create_graph=False, blocks=fusion.num_modalities + 1)
    return {"jacobian_full": float(f"{float(full):.4g}"), "jacobian_diagonal": float(f"{float(diagonal):.4g}")}


def quantiles(t: torch.Tensor) -> list[float]:
    return [float(f"{float(t.quantile(q)):.4g}") for q in (0.5, 0.9, 1.0)]


def diagnose(model, image, text) -> dict:
    fusion = model.fusion
    with torch.no_grad():
        xs = model.features(image, text)
        out = fusion(xs)
        inj = fusion.inject(xs)
    rho = spectral_radius(fusion, inj, out.stats.state)
    return {"rho_q50_q90_max": quantiles(rho), "rho_ge_1": int((rho >= 1).sum()), "samples": len(rho),
            "rel_residual_q50_q90_max": quantiles(out.stats.rel_residuals),
            "anderson200_q50_q90_max": quantiles(resolve(fusion, inj, len(rho), "anderson", 200)),
            "fixed_point200_q50_q90_max": quantiles(resolve(fusion, inj, len(rho), "fixed_point", 200)),
            "feature_norm_mean": [round(float(x.norm(dim=1).mean()), 3) for x in xs],
            "fused_norm_mean": round(float(out.fused.norm(dim=1).mean()), 3),
            **jacobian_terms(fusion, inj, out.stats.state),
            "gain_mean": {name: round(float(m.weight.abs().mean()), 4) for name, m in fusion.named_modules()
                          if isinstance(m, nn.GroupNorm)},
            "corr_rho_min_feature_norm": round(float(np.corrcoef(
                rho.numpy(), torch.stack([x.norm(dim=1) for x in xs]).min(0).values.numpy())[0, 1]), 3)}


def evaluate(model, data, batch_size: int = 64) -> dict:
    """Accuracy and DEQ solver figures on validation, in batches of the training batch size (as MMF's own)."""
    model.eval()
    image, text, y = data
    correct, stats = 0, []
    with torch.no_grad():
        for s in range(0, len(y), batch_size):
            out = model(image[s:s + batch_size], text[s:s + batch_size])
            correct += int((out.argmax(1) == y[s:s + batch_size]).sum())
            if model.last is not None:
                stats.append(model.last[1])
    model.train()
    result = {"accuracy": correct / len(y)}
    if stats:
        result.update(converged_fraction=sum(s.converged for s in stats) / len(stats),
                      mean_steps=sum(s.nstep for s in stats) / len(stats),
                      max_rel_residual=max(s.rel_residual for s in stats))
    return result


# -- one run --------------------------------------------------------------------------------------------------
def run(recipe: str, seed: int, updates: int, diag_every: int, log_every: int, data: dict) -> dict:
    from deqfusion_core import DEQFusion

    options, eval_options, jac_weight, _ = RECIPES[recipe]
    torch.manual_seed(seed)
    fusion = DEQFusion([64, 64], 64, **{**SHIPPED, **options})
    model = Model(data["vocab"], data["answers"], fusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    image, text, y = data["train"]
    generator = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(y), generator=generator), 0
    rows, diags, window = [], [], []
    t0 = time.time()
    for u in range(1, updates + 1):
        if pos + 64 > len(y):
            order, pos = torch.randperm(len(y), generator=generator), 0
        b, pos = order[pos:pos + 64], pos + 64
        logits = model(image[b], text[b])
        ce = F.cross_entropy(logits, y[b])
        jac, stats = model.last
        loss = ce if jac_weight is None else ce + jac_weight * jac    # None: DEQFusion attaches its own
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        back = stats.backward
        window.append((float(ce), float(jac), stats.converged, stats.nstep, stats.rel_residual,
                       None if back is None else back.converged))
        if u % log_every == 0:
            cols = list(zip(*window))
            row = {"update": u, "cross_entropy": float(np.mean(cols[0])), "jacobian": float(np.mean(cols[1])),
                   "converged_fraction": float(np.mean(cols[2])), "mean_steps": float(np.mean(cols[3])),
                   "max_rel_residual": float(max(cols[4])), "seconds": round(time.time() - t0, 1)}
            if cols[5][0] is not None:
                row["backward_converged_fraction"] = float(np.mean(cols[5]))
            rows.append(row)
            window = []
            print(json.dumps(row), flush=True)
        if diag_every and u % diag_every == 0:
            model.eval()
            d = {"update": u, **diagnose(model, image[b], text[b])}
            model.train()
            diags.append(d)
            print("diagnostics", json.dumps(d), flush=True)
    train_seconds = time.time() - t0
    for key, value in eval_options.items():
        setattr(fusion, key, value)
    last_quarter = [r for r in rows if r["update"] > 0.75 * updates]
    return {"recipe": recipe, "description": RECIPES[recipe][3], "seed": seed, "updates": updates,
            "options": {**SHIPPED, **options}, "eval_options": eval_options, "jac_weight": jac_weight,
            "train": rows, "diagnostics": diags, "val": evaluate(model, data["val"]),
            "train_converged_fraction_last_quarter": float(np.mean([r["converged_fraction"] for r in last_quarter])),
            "train_mean_steps_last_quarter": float(np.mean([r["mean_steps"] for r in last_quarter])),
            "train_cross_entropy_last_quarter": float(np.mean([r["cross_entropy"] for r in last_quarter])),
            "train_seconds": round(train_seconds, 1)}


def _jac(d: dict) -> str:
    return f"{d['jacobian_full']:.3g} / {d['jacobian_diagonal']:.3g}" if "jacobian_full" in d else "–"


def _gains(d: dict) -> str:
    gains = d.get("gain_mean", {})
    last = [v for k, v in gains.items() if k.endswith("gn3")] + [v for k, v in gains.items() if k == "fusion.gn"]
    return ", ".join(f"{v:.2f}" for v in last) or "–"


# -- summary --------------------------------------------------------------------------------------------------
def summarize(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*.json"))]
    lines = ["# Convergence diagnosis: easy-VQA replica (benchmarks/convergence_diagnosis.py)", "",
             "Generated from the run files in this folder. Validation after the last update (no selection); "
             "converged = every sample of the batch at relative residual <= 1e-2; train figures over the last "
             "quarter of the updates; rho = spectral radius of df/dz at the solved state (power iteration), "
             "quantiles 50/90/max over the diagnosed batch at the last diagnosis.", "",
             "| recipe | seed | val acc | val converged | val steps | train converged (last 1/4) | train steps | "
             "train CE | rho q50/q90/max | plain iteration 200 steps: max rel res | Anderson 200: max | fused norm | "
             "last GroupNorm gains (blocks, fuse) | Jacobian term full / diagonal | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        d = r["diagnostics"][-1] if r["diagnostics"] else {}
        rho = "/".join(f"{v:.2f}" for v in d.get("rho_q50_q90_max", [])) or "–"
        fp = f"{d['fixed_point200_q50_q90_max'][2]:.1e}" if d else "–"
        an = f"{d['anderson200_q50_q90_max'][2]:.1e}" if d else "–"
        v = r["val"]
        lines.append(f"| {r['recipe']} | {r['seed']} | {v['accuracy']:.4f} | {v.get('converged_fraction', 0):.2f} | "
                     f"{v.get('mean_steps', 0):.1f} | {r['train_converged_fraction_last_quarter']:.2f} | "
                     f"{r['train_mean_steps_last_quarter']:.1f} | {r['train_cross_entropy_last_quarter']:.3f} | {rho} | "
                     f"{fp} | {an} | {d.get('fused_norm_mean', '–')} | {_gains(d)} | {_jac(d)} | {r['train_seconds']:.0f} |")
    lines += ["", "Recipes:", ""] + [f"- `{k}`: {v[3]}; options {json.dumps({**SHIPPED, **v[0]})}, evaluation "
                                     f"{json.dumps(v[1])}, Jacobian weight {'in the options' if v[2] is None else v[2]}"
                                     for k, v in RECIPES.items()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="shipped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--updates", type=int, default=1600)
    p.add_argument("--diag-every", type=int, default=400)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "convergence_diagnosis")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md from the run files and exit")
    a = p.parse_args(argv)
    if a.list:
        for k, v in RECIPES.items():
            print(f"{k:14s} {v[3]}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.summary_only:
        torch.set_num_threads(1)
        result = run(a.recipe, a.seed, a.updates, a.diag_every, a.log_every, load_easy_vqa())
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        result.update(command="python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
                      commit=commit, machine=f"{platform.machine()}, torch {torch.__version__}, 1 thread")
        (a.out / f"{a.recipe}_seed{a.seed}.json").write_text(json.dumps(result, indent=1))
        print("val", json.dumps(result["val"]))
    print(summarize(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
