"""Shims that let an unmodified MultiBench checkout import and run on today's Python and torch.

The stand-ins apply only while MultiBench is importing (``deqfusion_core.compat.applying("multibench",
IMPORT)``) and are taken out of ``sys.modules`` afterwards, so code outside MultiBench still sees the real
state of the environment; the ``torch.load`` shim applies only while a MultiBench script runs.
"""
from __future__ import annotations

import functools
import os
import sys

from deqfusion_core.compat import restore, shim, swap

from . import common

# stand-in module -> (the imports that must work, what MultiBench needs it for, stand-in submodules)
STAND_INS = {
    "torchvision": (("torchvision",), "the ResNet/VGG encoders of unimodals.common_models", ("models",)),
    "gensim": (("gensim.models",), "re-extracting MM-IMDB text features (get_dataloader(no_robust=False))",
               ("models",)),
    "datasets.imdb.vgg": (("theano", "blocks.bricks"),
                          "re-extracting MM-IMDB image features (get_dataloader(no_robust=False))", ()),
}
IMPORT = list(STAND_INS)      # the shims that apply while MultiBench imports
SCRIPT = ["torch.load"]       # ... while a MultiBench script runs


def _reason(name: str) -> str | None:
    if name in sys.modules:
        return None
    return next(filter(None, map(common.import_error, STAND_INS[name][0])), None)


def _stand_in_shim(name: str, why: str):
    probes, needed_for, subs = STAND_INS[name]
    names = [name, *(f"{name}.{s}" for s in subs)]

    def apply():
        common.stand_in(names, _reason(name), needed_for)

    return shim("multibench", why, needed=lambda: _reason(name) is not None,
                undo=lambda: common.remove_stand_ins(names), name=name)(apply)


torchvision = _stand_in_shim("torchvision", "unimodals/common_models.py imports torchvision (absent, or built for "
                             "another torch) for its ResNet/VGG encoders only: a stand-in that says why when used")
gensim = _stand_in_shim("gensim", "datasets/imdb/get_data.py imports gensim, needed only to re-extract features "
                        "(no_robust=False): a stand-in that says why when used")
vgg = _stand_in_shim("datasets.imdb.vgg", "datasets/imdb/get_data.py imports the Theano VGG, needed only to "
                     "re-extract features (no_robust=False): a stand-in that says why when used")


def load_defaults_to_weights_only() -> bool:
    """Whether a bare ``torch.load(path)`` refuses pickled modules here (torch >= 2.6, unless forced off)."""
    import torch

    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") not in ("0", ""):
        return False
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def load_model(path, map_location=None):
    """Load a model MultiBench's ``train`` saved (a pickled module, not a state dict)."""
    import torch

    if load_defaults_to_weights_only():
        return torch.load(path, map_location=map_location, weights_only=False)
    return torch.load(path, map_location=map_location)


def _restore_torch_load():
    import torch

    restore(torch, "load")


@shim("multibench", "MultiBench saves whole models and loads them with a bare torch.load(path), which torch >= 2.6 "
      "refuses (weights_only=True): default weights_only=False while its script runs",
      needed=load_defaults_to_weights_only, undo=_restore_torch_load, name="torch.load")
def full_torch_load():
    import torch

    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    swap(torch, "load", load)
