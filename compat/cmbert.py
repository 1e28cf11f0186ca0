"""Shims and behaviour changes of CM-BERT (thuiar/Cross-Modal-BERT) on today's stack.

Shims: a torchvision built for another torch breaks ``import transformers.models.bert``; ``run_classifier.py``
sets ``CUDA_VISIBLE_DEVICES=1`` (its authors' second GPU) on import.

Behaviour changes, applied to both arms (the upstream fusion with ``-o deq=False``, and DEQ):

- ``pytorch_pretrained_bert`` (unmaintained since 2019), when it is not installed, is stood in for by
  ``transformers`` and ``torch.optim``: ``tokenization.BertTokenizer.from_pretrained(folder, do_lower_case)``
  is ``transformers.BertTokenizer`` on the folder's ``vocab.txt`` (no downloads); ``optimization.BertAdam`` is
  ``torch.optim.AdamW`` with BertAdam's linear warm-up then linear decay and its per-parameter gradient-norm
  clip (``max_grad_norm``, 1.0). Unlike BertAdam, AdamW bias-corrects its moments; ``file_utils.cached_path``
  takes local files and folders only.
- ``model.BertModel`` is ``transformers.BertModel`` behind the upstream's call signature (its parameter names
  are BERT's original ones, so the upstream ``from_pretrained`` loads a local folder into it).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

from deqfusion_core.compat import ALWAYS, restore, shim, swap

from . import common

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deqfusion_cmbert"


# -- shims -------------------------------------------------------------------------------------------------
def torchvision_broken() -> bool:
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    return common.import_error("torchvision") is not None


@shim("cmbert", "a torchvision built for another torch (its C ops fail to load) breaks `import transformers.models."
      "bert` (image utilities BERT does not use): tell transformers it is unavailable", needed=torchvision_broken,
      name="torchvision(transformers)")
def torchvision_unavailable():
    common.purge("torchvision")
    import transformers.utils
    import transformers.utils.import_utils as import_utils

    import_utils.is_torchvision_available = transformers.utils.is_torchvision_available = lambda: False


def _fewer_than_two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() < 2


@shim("cmbert", "run_classifier.py sets CUDA_VISIBLE_DEVICES=1 on import, which hides the only GPU: CUDA is "
      "initialised first, so the setting has no effect", needed=_fewer_than_two_gpus, name="CUDA_VISIBLE_DEVICES")
def cuda_initialised():
    torch.cuda.init()


# -- pytorch_pretrained_bert on transformers -----------------------------------------------------------------
def cached_path(url_or_filename, cache_dir=None):
    path = str(url_or_filename)
    if os.path.exists(path):
        return path
    raise EnvironmentError(f"--bert_model: {path!r} is not a local file or folder; deqfusion's CM-BERT reads BERT "
                           "from a local folder (bert_config.json, pytorch_model.bin, vocab.txt) and downloads nothing")


class BertTokenizer:
    @staticmethod
    def from_pretrained(folder, do_lower_case=True, **_):
        import transformers

        vocab = Path(cached_path(folder))
        vocab = vocab / "vocab.txt" if vocab.is_dir() else vocab
        if not vocab.is_file():
            raise FileNotFoundError(f"--bert_model: no vocab.txt in {folder}")
        return transformers.BertTokenizer(vocab_file=str(vocab), do_lower_case=bool(do_lower_case))


def warmup_linear(x, warmup=0.002):
    return x / warmup if x < warmup else 1.0 - x


class BertAdam(torch.optim.AdamW):
    """BertAdam's signature on AdamW: ``lr`` warms up linearly over ``warmup * t_total`` steps, then decays
    linearly to zero at ``t_total``; gradients are clipped to ``max_grad_norm`` per parameter first."""

    def __init__(self, params, lr, warmup=-1, t_total=-1, schedule="warmup_linear", b1=0.9, b2=0.999, e=1e-6,
                 weight_decay=0.01, max_grad_norm=1.0):
        if schedule != "warmup_linear":
            raise ValueError(f"schedule: only 'warmup_linear' is supported, got {schedule!r}")
        super().__init__(params, lr=lr, betas=(b1, b2), eps=e, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.scheduler = None
        if t_total and t_total > 0:
            from transformers import get_linear_schedule_with_warmup

            self.scheduler = get_linear_schedule_with_warmup(self, max(0, int(warmup * t_total)), int(t_total))

    def step(self, closure=None):
        if self.max_grad_norm > 0:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        torch.nn.utils.clip_grad_norm_(p, self.max_grad_norm)
        loss = super().step(closure)
        if self.scheduler is not None:
            self.scheduler.step()
        return loss


def ppb_modules() -> dict[str, types.ModuleType]:
    """The ``pytorch_pretrained_bert`` package and the three submodules CM-BERT imports."""
    package = types.ModuleType("pytorch_pretrained_bert")
    package.__path__ = []
    package.__doc__ = "deqfusion's stand-in for pytorch_pretrained_bert (deqfusion_compat.cmbert)"
    package._deqfusion = True
    parts = {"file_utils": {"cached_path": cached_path, "PYTORCH_PRETRAINED_BERT_CACHE": CACHE},
             "tokenization": {"BertTokenizer": BertTokenizer},
             "optimization": {"BertAdam": BertAdam, "warmup_linear": warmup_linear}}
    mods = {"pytorch_pretrained_bert": package}
    for name, attrs in parts.items():
        mod = types.ModuleType(f"pytorch_pretrained_bert.{name}")
        mod.__dict__.update(attrs)
        setattr(package, name, mod)
        mods[mod.__name__] = mod
    return mods


def ppb_missing() -> bool:
    return "pytorch_pretrained_bert" not in sys.modules and importlib.util.find_spec("pytorch_pretrained_bert") is None


PPB = ("pytorch_pretrained_bert", "pytorch_pretrained_bert.file_utils", "pytorch_pretrained_bert.tokenization",
       "pytorch_pretrained_bert.optimization")


def _remove_ppb():
    if getattr(sys.modules.get("pytorch_pretrained_bert"), "_deqfusion", False):
        for name in PPB:
            sys.modules.pop(name, None)


@shim("cmbert", "pytorch_pretrained_bert (2019) is not installed: its tokenizer, BertAdam and cached_path on "
      "transformers and torch.optim.AdamW (which bias-corrects its moments, BertAdam did not)",
      needed=ppb_missing, undo=_remove_ppb, behaviour_change=True, name="pytorch_pretrained_bert")
def pytorch_pretrained_bert():
    sys.modules.update(ppb_modules())


# -- BERT from transformers --------------------------------------------------------------------------------
def hf_config(config):
    """The upstream BertConfig as a transformers.BertConfig (same fields)."""
    import transformers

    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range)


def make_hf_bert():
    import transformers

    class HFBertModel(transformers.BertModel):
        """transformers.BertModel called as CM-BERT's BertModel: (ids, audio, token types, mask) ->
        (last hidden states, pooled output, the additive attention mask [B, 1, 1, L])."""

        def __init__(self, config):
            super().__init__(hf_config(config), add_pooling_layer=True)

        def forward(self, input_ids, all_audio_data=None, token_type_ids=None, attention_mask=None,
                    output_all_encoded_layers=True):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            dtype = out.last_hidden_state.dtype
            extended = (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0
            return out.last_hidden_state, out.pooler_output, extended

    return HFBertModel


@shim("cmbert", "the checkout's BertModel is transformers.BertModel behind the upstream's call signature (same "
      "parameter names: from_pretrained loads the same folder)", needed=ALWAYS,
      undo=lambda model: restore(model, "BertModel"), behaviour_change=True, name="BertModel->transformers")
def transformers_bert(model):
    swap(model, "BertModel", make_hf_bert())


BEFORE_IMPORT = ["torchvision(transformers)", "CUDA_VISIBLE_DEVICES", "pytorch_pretrained_bert"]
