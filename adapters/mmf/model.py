"""`fusion_classifier`: an MMF model whose modality encoders' outputs are fused by any fusion in MMF's registry.

    model_config:
      fusion_classifier:
        encoders:   {image: {type: cnn, ...}, text: {type: bow, ...}}   # order = order of the fusion's inputs
        fusion:     {type: deq, params: {jac_weight: 0.1, f_max_iter: 30}}   # or mutan, linear_sum, block, ...
        fusion_dim: 128
        num_labels: 13
        losses:     [{type: cross_entropy}]

Changing ``fusion.type`` is the paper's replace-only-the-fusion comparison. With `deq`, the Jacobian term is an
entry ``<split>/<dataset>/deq_jacobian`` of the ``losses`` dict (weight ``fusion.params.jac_weight``), so it is
part of MMF's ``total_loss``; the solver's steps and residual go to MMF's log every ``training.log_interval``
updates and after each evaluation.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import compat
from .fusion import DEQFusionMMF, build_fusion

compat.install()  # before the first `import mmf`
from mmf.common.registry import registry  # noqa: E402
from mmf.models.base_model import BaseModel  # noqa: E402


class CNNEncoder(nn.Module):
    """Small CNN from scratch: [B, 3, H, W] -> [B, out_dim]."""

    def __init__(self, out_dim: int = 64, channels=(16, 32, 64), in_channels: int = 3):
        super().__init__()
        layers, c = [], in_channels
        for width in channels:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.conv = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.out = nn.Sequential(nn.Linear(4 * c, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        return self.out(self.conv(x))


class BagOfWordsEncoder(nn.Module):
    """Bag of words [B, V] -> MLP -> [B, out_dim]."""

    def __init__(self, vocab_size: int, out_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vocab_size, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


class FeatureEncoder(nn.Module):
    """Precomputed features [B, D] -> Linear + ReLU -> [B, out_dim] (e.g. MM-IMDB's image/text features)."""

    def __init__(self, in_dim: int, out_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


ENCODERS = {"cnn": CNNEncoder, "bow": BagOfWordsEncoder, "features": FeatureEncoder}


def _encoder(key: str, cfg) -> nn.Module:
    kind = cfg.get("type") if hasattr(cfg, "get") else None
    if kind not in ENCODERS:
        raise KeyError(f"{key}.type: expected one of {', '.join(ENCODERS)}, got {kind!r}")
    params = dict(cfg.get("params", None) or {})
    try:
        return ENCODERS[kind](**params)
    except TypeError as exc:
        raise KeyError(f"{key}.params: {exc}") from exc


@registry.register_model("fusion_classifier")
class FusionClassifier(BaseModel):
    def __init__(self, config):
        super().__init__(config)
        self._solver_log = {"train": _SolverLog(), "eval": _SolverLog()}

    @classmethod
    def config_path(cls):
        from . import CONFIG_DIR

        return str(CONFIG_DIR / "models" / "fusion_classifier.yaml")

    last_built = None  # weakref to the latest instance, for `deqfusion mmf-demo` after MMF's run returns

    def build(self):
        type(self).last_built = weakref.ref(self)
        key = f"model_config.{self.config.get('model', 'fusion_classifier')}"
        encoders = self.config.get("encoders", None)
        if not encoders:
            raise KeyError(f"{key}.encoders: missing (one entry per modality, in the order the fusion gets them)")
        self.modalities = list(encoders.keys())
        self.encoders = nn.ModuleDict({m: _encoder(f"{key}.encoders.{m}", encoders[m]) for m in self.modalities})
        for name in ("fusion_dim", "num_labels"):
            if self.config.get(name, None) is None:
                raise KeyError(f"{key}.{name}: missing")
        dims = [self.encoders[m].out_dim for m in self.modalities]
        self.fusion = build_fusion(self.config.get("fusion", None), dims, self.config.fusion_dim, key=f"{key}.fusion")
        if isinstance(self.fusion, DEQFusionMMF):
            self.fusion.report_jacobian = True   # we put it into the losses dict ourselves
            self.fusion.deq.track_gates = bool(self.config.get("track_gates", False))
        self.classifier = nn.Sequential(nn.Dropout(float(self.config.get("dropout", 0.0))),
                                        nn.Linear(self.config.fusion_dim, self.config.num_labels))

    def forward(self, sample_list):
        features = [self.encoders[m](sample_list[m]) for m in self.modalities]
        output = {"scores": self.classifier(self.fusion(features))}
        if isinstance(self.fusion, DEQFusionMMF):
            self._record(self.fusion.last_stats)
            jac = self.fusion.last_jac_loss
            if self.training and jac is not None and self.fusion.jac_weight > 0:
                losses = self.losses(sample_list, output)
                name = f"{sample_list.dataset_type}/{sample_list.dataset_name}/deq_jacobian"
                losses[name] = (self.fusion.jac_weight * jac).view(1)
                output["losses"] = losses
        return output

    # -- solver statistics into MMF's log --------------------------------------------------------------------
    def _record(self, stats):
        log = self._solver_log["train" if self.training else "eval"]
        log.add(stats)
        if self.training:
            interval = int(registry.get("config").training.log_interval or 1) if registry.get("config") else 1
            updates = (registry.get("num_updates", 0, no_warning=True) or 0) + 1
            if updates % interval == 0:
                self._write(log.flush(f"update {updates}"))

    def train(self, mode: bool = True):
        if mode and not self.training and self._solver_log["eval"].count:  # evaluation just finished
            self._write(self._solver_log["eval"].flush("evaluation"))
        return super().train(mode)

    def _write(self, line):
        writer = registry.get("writer")
        if writer is not None:
            writer.write(line)
        else:
            print(line, flush=True)


class _SolverLog:
    """Running statistics of the DEQ forward solves since the last log line."""

    def __init__(self):
        self.count = self.steps = self.unconverged = 0
        self.max_residual = 0.0
        self.last = None

    def add(self, stats):
        self.count += 1
        self.steps += stats.nstep
        self.unconverged += not stats.converged
        self.max_residual = max(self.max_residual, stats.rel_residual)
        self.last = stats

    def flush(self, where: str) -> str:
        line = (f"deq solver ({where}): {self.count} solves, mean steps {self.steps / max(self.count, 1):.1f}"
                f"/{self.last.max_iter}, max rel residual {self.max_residual:.2e}, "
                f"not converged {self.unconverged}/{self.count} (tol {self.last.tol:g})")
        self.__init__()
        return line
