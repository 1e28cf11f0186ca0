"""Does each shipped MMF DEQ config contract at initialisation? (issue 10, item 3; configs we cannot train here.)

    python benchmarks/init_contraction.py [--out benchmarks/results/init_contraction] [--seeds 3]

The MM-IMDB, hateful-memes and VQA2 configs need data and GPUs we do not have. What can be measured without
them is f at initialisation at each config's shapes: DEQFusion built from the config's own ``fusion.params``,
without a norm and with ``norm=contractive``, on random features of the encoders' widths (post-ReLU for image
features, tanh for pooled BERT ones, raw Gaussian for summed embeddings and scores), in evaluation mode: the
spectral radius rho of df/dz at the solved state per sample (power iteration on the VJP, 30 steps) and whether
the evaluation solve (the config's cap; DEQFusion's evaluation cap when it gives none) reaches the tolerance;
then, in training mode, one forward and backward of a cross-entropy over a random linear head of the fused
feature (10 classes): whether the implicit backward solve reaches the config's ``b_tol`` within its ``b_max_iter``.
A config whose f is not contractive at initialisation starts its training from solves that do not converge;
with the paper's fusion learning rate of 1e-4 (MM-IMDB) f hardly moves from there (docs/convergence.md,
section 3, MultiBench MM-IMDB).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "adapters" / "mmf" / "configs"
# config -> (the fusion's input widths, kind of each input, the fused width) and where the widths come from
SHAPES = {
    "experiments/mmimdb_deq.yaml": ([512, 768], ["relu", "tanh"], 512,
                                    "mmimdb_common.yaml: features encoder out_dim 512, BERT pooled 768, fusion_dim 512"),
    "baselines/mmimdb/concat_bert_deq.yaml": ([768, 2048], ["tanh", "relu"], 768,
                                              "MMF concat_bert: text_hidden_size 768, modal_hidden_size 2048; output_dim 768"),
    "baselines/hateful_memes/concat_bert_deq.yaml": ([768, 2048], ["tanh", "relu"], 768,
                                                     "as mmimdb/concat_bert_deq.yaml"),
    "baselines/hateful_memes/concat_bow_deq.yaml": ([300, 2048], ["none", "relu"], 768,
                                                    "MMF concat_bow: text_hidden_size 300 (summed GloVe), modal 2048"),
    "baselines/hateful_memes/late_fusion_deq.yaml": ([2, 2], ["none", "none"], 768,
                                                     "MMF late_fusion: the text and image classifiers' 2 scores each"),
    "baselines/vqa2/movie_mcan_deq.yaml": ([1024, 1024, 1024], ["relu", "relu", "tanh"], 1024,
                                           "MMF movie_mcan: v_cga, v_cbn, q at hidden_dim 1024"),
    "experiments/easy_vqa_deq.yaml": ([64, 64], ["relu", "relu"], 64, "easy_vqa_common.yaml: out_dim 64, fusion_dim 64"),
}


def fusion_params(path: Path) -> dict:
    """The config's ``fusion.params`` (the first ``fusion: {type: deq}`` block found)."""
    def find(node):
        if isinstance(node, dict):
            if isinstance(node.get("fusion"), dict) and node["fusion"].get("type") == "deq":
                return dict(node["fusion"].get("params") or {})
            for v in node.values():
                if (found := find(v)) is not None:
                    return found
        return None
    params = find(yaml.safe_load(path.read_text()))
    if params is None:
        raise ValueError(f"{path}: no fusion of type deq")
    return params


def measure(params: dict, dims, kinds, dim: int, seed: int, batch: int = 64) -> dict:
    from deqfusion_core import DEQFusion
    torch.manual_seed(seed)
    keep = {k: v for k, v in params.items() if k not in ("jac_weight", "jac_schedule", "jac_weight_final",
                                                          "jac_schedule_steps", "jac_term")}
    model = DEQFusion(dims, dim, spectral_radius_iters=30, **keep).eval()
    act = {"relu": torch.relu, "tanh": torch.tanh, "none": lambda t: t}
    xs = [act[k](torch.randn(batch, d)) for d, k in zip(dims, kinds)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = model(xs)[-1]
    rho = stats.spectral_radius
    model.train().spectral_radius_iters = 0
    head, labels = torch.randn(dim, 10) / dim ** 0.5, torch.randint(0, 10, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(xs)
        torch.nn.functional.cross_entropy(out.fused @ head, labels).backward()
    back = out.stats.backward
    return {"seed": seed, "rho_median": float(rho.median()), "rho_max": float(rho.max()),
            "rho_ge_1": float((rho >= 1).float().mean()), "converged": bool(stats.converged), "steps": stats.nstep,
            "max_iter": stats.max_iter, "max_rel_residual": float(stats.rel_residuals.max()),
            "backward_converged": bool(back.converged), "backward_steps": back.nstep, "backward_max_iter": back.max_iter,
            "backward_max_rel_residual": float(back.rel_residuals.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "init_contraction")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    rows = []
    for name, (dims, kinds, dim, source) in SHAPES.items():
        params = fusion_params(CONFIGS / name)
        for norm in (None, "contractive"):
            over = {**params, "norm": norm}
            runs = [measure(over, dims, kinds, dim, s) for s in range(a.seeds)]
            rows.append({"config": name, "norm": norm, "shipped": params.get("norm") == norm, "params": over,
                         "input_dims": dims, "dim": dim, "shapes_from": source, "runs": runs})
            print(name, norm, [(round(r["rho_median"], 2), r["converged"]) for r in runs], flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    summary = {"study": "init_contraction", "command": "python benchmarks/init_contraction.py" +
               ("" if a.seeds == 3 else f" --seeds {a.seeds}"), "commit": commit,
               "machine": f"torch {torch.__version__}, 1 thread", "rows": rows}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# Contraction of f at initialisation, per shipped MMF DEQ config", "",
             __doc__.split("\n\n", 2)[2].strip(), "", f"Command: `{summary['command']}`; commit {commit[:10]}; "
             f"{a.seeds} seeds (model initialisation and features), batch 64.", "",
             "| config | norm | rho median (mean over seeds) | rho max | samples with rho >= 1 | evaluation solves "
             "converged | mean steps / cap | max rel residual | implicit backward converged (training mode) | "
             "mean steps / cap | max rel residual |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["runs"]
        lines.append(f"| {r['config']} | {r['norm'] or 'none'}{' (shipped)' if r['shipped'] else ''} | {statistics.mean(x['rho_median'] for x in runs):.2f} | "
                     f"{max(x['rho_max'] for x in runs):.2f} | {statistics.mean(x['rho_ge_1'] for x in runs):.0%} | "
                     f"{sum(x['converged'] for x in runs)}/{len(runs)} | "
                     f"{statistics.mean(x['steps'] for x in runs):.1f} / {runs[0]['max_iter']} | "
                     f"{max(x['max_rel_residual'] for x in runs):.2g} | {sum(x['backward_converged'] for x in runs)}/"
                     f"{len(runs)} | {statistics.mean(x['backward_steps'] for x in runs):.1f} / "
                     f"{runs[0]['backward_max_iter']} | {max(x['backward_max_rel_residual'] for x in runs):.2g} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
