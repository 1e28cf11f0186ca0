"""Conditional shims that let an unmodified MultiBench checkout import and run on today's Python and torch.

Each shim is applied only when the thing it stands in for is really missing or broken, and only while
MultiBench is importing (``shims()``): stand-in modules are taken out of ``sys.modules`` again afterwards,
so code outside MultiBench still sees the real state of the environment.

* ``torchvision``: ``unimodals/common_models.py`` imports it at top level, but uses it only in the
  ResNet/VGG encoders. Where torchvision is absent or broken (e.g. built for another torch), a stand-in
  lets the module import; using one of those encoders raises an ImportError that says why.
* ``gensim`` and the Theano VGG (``datasets/imdb/vgg.py``): ``datasets/imdb/get_data.py`` imports both at
  top level, but needs them only to re-extract features for the robustness tests (``no_robust=False``).
* ``torch.load``: MultiBench saves whole models (``torch.save(model, ...)``) and loads them with a bare
  ``torch.load(path)``, which torch >= 2.6 refuses (``weights_only=True`` by default).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import types

import torch

applied: list[str] = []  # names of the shims applied in this process (for tests and `deqfusion list`)


def import_error(module: str) -> str | None:
    """Why ``import module`` fails here (``None`` when it works). Broken builds raise more than ImportError."""
    if module in sys.modules and not isinstance(sys.modules[module], Unavailable):
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # torchvision built for another torch raises RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


class Unavailable(types.ModuleType):
    """Stand-in for a module that cannot be imported: importing it works, using anything in it says why not."""

    def __init__(self, name: str, reason: str, needed_for: str):
        super().__init__(name, f"deqfusion stand-in for the unusable {name}")
        self.__reason, self.__needed_for = reason, needed_for
        self.__path__: list[str] = []  # a package, so `from name import sub` goes through __getattr__

    def __getattr__(self, attr):  # `from name import attr` must work: the error comes when attr is used
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self.__name__}.{attr}", f"{self.__reason}; MultiBench needs it only for {self.__needed_for}")


class Missing:
    """A name imported from an :class:`Unavailable` module: calling it or any attribute raises ImportError."""

    def __init__(self, name: str, why: str):
        self._name, self._why = name, why

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is not available here ({self._why})")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}", self._why)

    def __repr__(self):
        return f"<unavailable {self._name}>"


# module name -> (the imports that must work, what MultiBench needs it for, stand-in submodules)
STAND_INS = {
    "torchvision": (("torchvision",), "the ResNet/VGG encoders of unimodals.common_models", ("models",)),
    "gensim": (("gensim.models",), "re-extracting MM-IMDB text features (get_dataloader(no_robust=False))", ("models",)),
    "datasets.imdb.vgg": (("theano", "blocks.bricks"), "re-extracting MM-IMDB image features (get_dataloader(no_robust=False))", ()),
}


@contextlib.contextmanager
def shims():
    """While MultiBench imports: stand-ins for its unusable top-level imports (see the module docstring)."""
    added = []
    for name, (probes, needed_for, subs) in STAND_INS.items():
        if name in sys.modules:
            continue
        reason = next(filter(None, map(import_error, probes)), None)
        if reason is None:
            continue
        for full in (name, *(f"{name}.{s}" for s in subs)):
            sys.modules[full] = Unavailable(full, reason, needed_for)
            added.append(full)
        for sub in subs:
            setattr(sys.modules[name], sub, sys.modules[f"{name}.{sub}"])
        if name not in applied:
            applied.append(name)
    try:
        yield
    finally:
        for full in added:
            if isinstance(sys.modules.get(full), Unavailable):
                del sys.modules[full]


def load_defaults_to_weights_only() -> bool:
    """Whether a bare ``torch.load(path)`` refuses pickled modules here (torch >= 2.6, unless forced off)."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0") not in ("0", ""):
        return False
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def load_model(path, map_location=None):
    """Load a model MultiBench's ``train`` saved (a pickled module, not a state dict)."""
    if load_defaults_to_weights_only():
        return torch.load(path, map_location=map_location, weights_only=False)
    return torch.load(path, map_location=map_location)


@contextlib.contextmanager
def full_torch_load():
    """While a MultiBench script runs: its bare ``torch.load(path)`` loads the whole pickled model again."""
    if not load_defaults_to_weights_only():
        yield
        return
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load
    if "torch.load" not in applied:
        applied.append("torch.load")
    try:
        yield
    finally:
        torch.load = original
