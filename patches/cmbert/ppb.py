"""What CM-BERT imports from ``pytorch_pretrained_bert`` (unmaintained since 2019), on HuggingFace
``transformers`` and ``torch.optim``:

- ``tokenization.BertTokenizer.from_pretrained(folder, do_lower_case)``: ``transformers.BertTokenizer`` on the
  folder's ``vocab.txt`` (no downloads);
- ``optimization.BertAdam``: ``torch.optim.AdamW`` with BertAdam's linear warm-up then linear decay
  (``transformers.get_linear_schedule_with_warmup``, stepped with the optimizer) and its per-parameter
  gradient-norm clip (``max_grad_norm``, 1.0). Unlike BertAdam, AdamW bias-corrects its moments;
- ``file_utils.cached_path``: local files and folders only (a model name or URL is an error naming it).
"""
from __future__ import annotations

import os
import types
from pathlib import Path

import torch

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deqfusion_cmbert"


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


def modules() -> dict[str, types.ModuleType]:
    """The ``pytorch_pretrained_bert`` package and the three submodules CM-BERT imports."""
    package = types.ModuleType("pytorch_pretrained_bert")
    package.__path__ = []
    package.__doc__ = __doc__
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

