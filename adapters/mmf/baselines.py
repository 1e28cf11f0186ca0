"""`fusion:` in MMF's own multimodal baselines that fuse by concatenation or summation, so that each of MMF's
recipes for them is a baseline / DEQ pair one config key apart. Only the fusion is replaced; encoders, classifier
type, losses, optimizer and data stay MMF's.

    model_config.concat_bert.fusion.type=deq      # on the command line, or in a config (configs/baselines/)
    model_config.concat_bert.fusion: {type: null, params: {}, output_dim: 768}   # the default: MMF's own fusion

| model | MMF's fusion | with ``fusion.type`` set |
|---|---|---|
| ``concat_bert``, ``concat_bow`` | ``cat([text, modal])`` into the classifier | the fusion of the two (the concatenation split back into them), into MMF's classifier built for ``output_dim`` |
| ``late_fusion`` | the mean of the text and the image classifier's scores | the fusion of the two score vectors, then a linear map from ``output_dim`` to the scores |
| ``movie_mcan`` | the main branch of its BranchCombineLayer: ``LN(W_q q + W_cbn v_cbn + W_cga v_cga)`` | ``LN(fusion([v_cga, v_cbn, q]))``; its two auxiliary training branches stay |

Any fusion in MMF's fusion registry works (``deq``, ``linear_sum``, ...). With ``deq`` the Jacobian term is a
loss entry ``<split>/<dataset>/deq_jacobian`` (weight ``fusion.params.jac_weight``), so it is part of MMF's
``total_loss``. Written for MMF main (its models and configs); rc10's copies of these models are not patched.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from .fusion import DEQFusionMMF, add_jacobian_loss, build_fusion

__all__ = ["patch", "unpatch", "CONFIGS", "MODELS"]

CONFIGS = Path(__file__).parent / "configs" / "baselines"   # each MMF model's config plus the `fusion` key
MODELS = {"concat_bert": "mmf.models.fusions", "concat_bow": "mmf.models.fusions", "late_fusion": "mmf.models.fusions",
          "movie_mcan": "mmf.models.movie_mcan"}
_ORIGINAL: dict[tuple[type, str], object] = {}


class SplitFusion(nn.Module):
    """Stands where MMF's classifier got ``cat([a, b])``: splits it back into ``a`` and ``b``, fuses them, classifies."""

    def __init__(self, widths: list[int], fusion: nn.Module, classifier: nn.Module):
        super().__init__()
        self.widths, self.fusion, self.classifier = list(widths), fusion, classifier

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fusion(list(embedding.split(self.widths, dim=-1))))


class BranchFusion(nn.Module):
    """MoViE+MCAN's BranchCombineLayer with its main branch's sum of projections replaced by ``fusion``."""

    def __init__(self, combine: nn.Module, fusion: nn.Module):
        super().__init__()
        self.combine, self.fusion, self.out_dim = combine, fusion, combine.out_dim

    def forward(self, v_cga: torch.Tensor, v_cbn: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        main = self.combine.layer_norm[0](self.fusion([v_cga, v_cbn, q]))
        if not self.training:
            return main                                    # MMF's layer returns its main branch in evaluation
        auxiliary = self.combine(v_cga, v_cbn, q)[:, 1:]   # MMF's own two auxiliary branches (training only)
        return torch.cat([main.unsqueeze(1), auxiliary], dim=1)


def _fusion(model, in_dims: list[int], output_dim: int | None = None) -> nn.Module | None:
    """The fusion ``model_config.<model>.fusion`` asks for (None: MMF's own, the baseline); ``output_dim``: the
    width the model requires (the config's ``output_dim`` may then be null, or must agree)."""
    config = model.config.get("fusion", None)
    if config is None or config.get("type", None) is None:
        return None
    key = f"model_config.{model.config.get('model', type(model).__name__)}.fusion"
    given = config.get("output_dim", None)
    if given is None and output_dim is None:
        raise KeyError(f"{key}.output_dim: missing (the width of the fused feature)")
    if given is not None and output_dim is not None and int(given) != output_dim:
        raise ValueError(f"{key}.output_dim: must be {output_dim} here (the width this model fuses into), got {given}")
    fusion = build_fusion(config, in_dims, int(given if given is not None else output_dim), key=key)
    if isinstance(fusion, DEQFusionMMF):
        fusion.jacobian = "report"   # a loss entry, by the forward below
    return fusion


def _concat_widths(model) -> list[int]:
    """Text and modal widths of the concatenation, as MMF's ConcatBERT/ConcatBoW.build compute the classifier's input."""
    config = model.config
    features = config.num_features if config.direct_features_input else config.modal_encoder.params.num_output_features
    return [int(config.text_hidden_size), int(features * config.modal_hidden_size)]


def _build_concat(model):
    widths = _concat_widths(model)
    fusion = _fusion(model, widths)
    if fusion is not None:
        from mmf.utils.build import build_classifier_layer

        classifier = copy.deepcopy(model.config.classifier)
        classifier.params.in_dim = int(model.config.fusion.output_dim)
        model.classifier = SplitFusion(widths, fusion, build_classifier_layer(classifier))
        model.fusion = fusion


def _build_late(model):
    widths = [int(model.config.text_classifier.params.out_dim), int(model.config.modal_classifier.params.out_dim)]
    fusion = _fusion(model, widths)
    if fusion is not None:
        model.fusion = fusion
        model.fusion_classifier = nn.Linear(int(model.config.fusion.output_dim), widths[0])
        model._scores = {}
        for name in ("text_classifier", "modal_classifier"):
            getattr(model, name).register_forward_hook(functools.partial(_keep, model._scores, name))


def _keep(store, name, module, args, output):
    store[name] = output


def _build_movie_mcan(model):
    combine = model.image_text_multi_modal_combine_layer
    dims = [combine.linear_cga[0].in_features, combine.linear_cbn[0].in_features, combine.linear_ques[0].in_features]
    fusion = _fusion(model, dims, combine.out_dim)
    if fusion is not None:
        model.image_text_multi_modal_combine_layer = BranchFusion(combine, fusion)
        model.fusion = fusion


BUILD = {"concat_bert": _build_concat, "concat_bow": _build_concat, "late_fusion": _build_late,
         "movie_mcan": _build_movie_mcan}


def _patched_build(original, extend):
    @functools.wraps(original)
    def build(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        extend(self)
        return out

    return build


def _patched_forward(original):
    @functools.wraps(original)
    def forward(self, sample_list, *args, **kwargs):
        output = original(self, sample_list, *args, **kwargs)
        fusion = getattr(self, "fusion", None)
        if fusion is None:
            return output
        scores = getattr(self, "_scores", None)
        if scores is not None:   # late_fusion: the fusion of the two classifiers' scores instead of their mean
            output["scores"] = self.fusion_classifier(fusion([scores.pop("text_classifier"),
                                                              scores.pop("modal_classifier")]))
        add_jacobian_loss(self, fusion, sample_list, output)
        return output

    return forward


def _config_path(name):
    return classmethod(lambda cls: str(CONFIGS / f"{name}.yaml"))


def patch() -> list[str]:
    """Give MMF's baseline models the `fusion` key (idempotent). Returns the names of the models patched."""
    import importlib

    from mmf.common.registry import registry

    done = []
    for name, module in MODELS.items():
        importlib.import_module(module)
        cls = registry.get_model_class(name)
        if cls is None or (cls, "build") in _ORIGINAL:
            continue
        for attr, value in (("config_path", _config_path(name)), ("build", _patched_build(cls.build, BUILD[name])),
                            ("forward", _patched_forward(cls.forward))):
            _ORIGINAL[(cls, attr)] = vars(cls)[attr]
            setattr(cls, attr, value)
        done.append(name)
    return done


def unpatch() -> None:
    """MMF's models as they were."""
    for (cls, attr), value in _ORIGINAL.items():
        setattr(cls, attr, value)
    _ORIGINAL.clear()
