"""`fusion_classifier`: an MMF model whose modality encoders' outputs are fused by any fusion in MMF's registry.

    model_config:
      fusion_classifier:
        encoders:   {image: {type: cnn, ...}, text: {type: bow, ...}}   # order = order of the fusion's inputs;
                    # each reads the batch field named like it, or `field: image_feature_0` (`bert`: the tokens)
        fusion:     {type: deq, params: {jac_weight: 0.1}}                  # or mutan, linear_sum, block, ...
        fusion_dim: 128
        num_labels: 13          # null: the dataset's answer vocabulary size (mmimdb, vqa2, ...)
        fusion_lr:  1.0e-4      # optional: the fusion's own learning rate
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

from .flavour import install_shims
from .fusion import DEQFusionMMF, _to_container, add_jacobian_loss, build_fusion
from .missing import modality_mask, zero_absent

install_shims()  # before the first `import mmf`
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
    """Precomputed features [B, D], or [B, N, D] region/grid features (mean over the non-zero, i.e. not padded,
    rows) -> Linear + ReLU -> [B, out_dim] (e.g. MM-IMDB's 2048-d image features)."""

    def __init__(self, in_dim: int, out_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        if x.dim() == 3:
            keep = (x.abs().sum(-1, keepdim=True) > 0).to(x.dtype)
            x = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.net(x.float())


class BertEncoder(nn.Module):
    """BERT over the fields of MMF's `bert_tokenizer` processor (input_ids, input_mask, segment_ids) -> pooled
    [CLS] -> [B, hidden] (MMBT's text side). ``pretrained: false`` builds an untrained BERT from ``config``;
    ``freeze: true`` uses it as a fixed feature extractor (eval mode, no gradients)."""

    reads_sample_list = True

    def __init__(self, model: str = "bert-base-uncased", pretrained: bool = True, config: dict | None = None,
                 dropout: float = 0.1, freeze: bool = False):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel.from_pretrained(model) if pretrained else BertModel(BertConfig(**(config or {})))
        self.freeze = bool(freeze)
        if self.freeze:
            self.bert.requires_grad_(False)
            self.bert.eval()
        self.dropout = nn.Dropout(dropout)
        self.out_dim = self.bert.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze:
            self.bert.eval()
        return self

    def forward(self, sample_list):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            out = self.bert(input_ids=sample_list["input_ids"], attention_mask=sample_list["input_mask"],
                            token_type_ids=sample_list["segment_ids"])
        return self.dropout(out.pooler_output)


ENCODERS = {"cnn": CNNEncoder, "bow": BagOfWordsEncoder, "features": FeatureEncoder, "bert": BertEncoder}


def _encoder(key: str, cfg) -> nn.Module:
    kind = cfg.get("type") if hasattr(cfg, "get") else None
    if kind not in ENCODERS:
        raise KeyError(f"{key}.type: expected one of {', '.join(ENCODERS)}, got {kind!r}")
    params = dict(_to_container(cfg.get("params", None) or {}))
    try:
        encoder = ENCODERS[kind](**params)
    except TypeError as exc:
        raise KeyError(f"{key}.params: {exc}") from exc
    encoder.field = cfg.get("field", None)   # the sample list's key it reads (default: the modality's name)
    return encoder


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
        if self.config.get("fusion_dim", None) is None:
            raise KeyError(f"{key}.fusion_dim: missing")
        self.num_labels = self.config.get("num_labels", None) or _labels_from_dataset(key)
        dims = [self.encoders[m].out_dim for m in self.modalities]
        self.fusion = build_fusion(self.config.get("fusion", None), dims, self.config.fusion_dim, key=f"{key}.fusion")
        if isinstance(self.fusion, DEQFusionMMF):
            self.fusion.jacobian = "report"      # we put it into the losses dict ourselves
            self.fusion.deq.track_gates = bool(self.config.get("track_gates", False))
        self.classifier = nn.Sequential(nn.Dropout(float(self.config.get("dropout", 0.0))),
                                        nn.Linear(self.config.fusion_dim, self.num_labels))

    input_transform = None   # (inputs, present) -> (inputs, present) before the encoders (robustness evaluation)

    def forward(self, sample_list):
        inputs = [self._input(m, sample_list) for m in self.modalities]
        batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor)), None)
        present = modality_mask(sample_list, self.modalities, batch) if batch is not None else None
        if self.input_transform is not None:
            inputs, present = self.input_transform(inputs, present)
        if present is not None:   # an absent modality's encoder input is zero (NaN there never reaches a gradient)
            inputs = [zero_absent(x, present[:, i]) if isinstance(x, torch.Tensor) else x
                      for i, x in enumerate(inputs)]
        features = [self.encoders[m](x) for m, x in zip(self.modalities, inputs)]
        if present is not None:   # an encoder that reads the sample list (`bert`): its absent rows' features are zero
            features = [zero_absent(f, present[:, i]) if not isinstance(x, torch.Tensor) else f
                        for i, (f, x) in enumerate(zip(features, inputs))]
        if present is not None and isinstance(self.fusion, DEQFusionMMF):
            fused = self.fusion(features, present=present)
        else:   # MMF's fusions take no mask: an absent modality is its encoder's output for a zero input
            fused = self.fusion(features)
        output = {"scores": self.classifier(fused)}
        if isinstance(self.fusion, DEQFusionMMF):
            self._record(self.fusion.last_stats)
            add_jacobian_loss(self, self.fusion, sample_list, output)
        return output

    def get_optimizer_parameters(self, config):
        """``fusion_lr``: a learning rate of the fusion's own (the paper's MM-IMDB setting, appendix C: 1e-4 for the
        DEQ fusion, 1e-3 for all other weights); null: one group at the optimizer's learning rate."""
        lr = self.config.get("fusion_lr", None)
        if lr is None:
            return list(self.parameters())
        fusion = {id(p) for p in self.fusion.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in fusion]},
                {"params": list(self.fusion.parameters()), "lr": float(lr)}]

    def _input(self, modality, sample_list):
        """What the modality's encoder reads: its batch field (or the whole sample list, for `bert`)."""
        encoder = self.encoders[modality]
        if getattr(encoder, "reads_sample_list", False):
            return sample_list
        field = encoder.field or modality
        if field not in sample_list:
            raise KeyError(f"model_config.{self.config.get('model', 'fusion_classifier')}.encoders.{modality}: the "
                           f"batch has no field {field!r} (set `field:`); it has {', '.join(sorted(sample_list))}")
        return sample_list[field]

    # -- solver statistics into MMF's log --------------------------------------------------------------------
    def _record(self, stats):
        log = self._solver_log["train" if self.training else "eval"]
        log.add(stats)
        if self.training:
            interval = int(registry.get("config").training.log_interval or 1) if registry.get("config") else 1
            updates = self._update_number()
            if updates % interval == 0:
                self._write(log.flush(f"update {updates}"))

    def _update_number(self) -> int:
        """The update (1-based) this training batch is part of: from Lightning's global step under MMF main's
        Lightning trainer, else from the training batches seen in this process and ``training.update_frequency``."""
        trainer = getattr(self, "_trainer", None)   # MMF main's models are LightningModules
        if trainer is not None:
            return int(trainer.global_step) + 1
        config = registry.get("config", no_warning=True)
        every = int(config.training.get("update_frequency", 1) or 1) if config is not None else 1
        self._train_batches = getattr(self, "_train_batches", 0) + 1
        return (self._train_batches - 1) // every + 1

    def train(self, mode: bool = True):
        if mode and not self.training:  # evaluation just finished (MMF's trainers)
            self._flush_evaluation()
        return super().train(mode)

    def on_validation_epoch_end(self):  # MMF main's Lightning trainer (Lightning restores modes without train())
        self._flush_evaluation()

    def _flush_evaluation(self):
        if self._solver_log["eval"].count:
            self._write(self._solver_log["eval"].flush("evaluation"))

    def _write(self, line):
        writer = registry.get("writer", no_warning=True)
        if writer is None:
            print(line, flush=True)
        elif hasattr(writer, "write"):   # rc10's Logger
            writer.write(line)
        else:                            # MMF main registers a logging.Logger
            writer.info(line)


def _labels_from_dataset(key: str) -> int:
    """`num_labels: null`: the answer vocabulary's size, which MMF's VQA-style builders (mmimdb, vqa2, ...)
    register as `<dataset>_num_final_outputs`."""
    config = registry.get("config", no_warning=True)
    datasets = str(config.get("datasets", "") if config is not None else "").split(",")
    sizes = {registry.get(f"{d}_num_final_outputs", None, no_warning=True) for d in datasets if d}
    sizes.discard(None)
    if len(sizes) != 1:
        raise KeyError(f"{key}.num_labels: missing, and the dataset registered no single answer vocabulary size")
    return int(sizes.pop())


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
