"""Shims several upstreams share: ``collections`` aliases, ``yaml.load`` without a Loader, ``.cuda()`` without
a GPU, and stand-in modules for what cannot be imported (a torchvision built for another torch).

They are registered under the upstream ``common``; an upstream's module takes the ones it needs with
``deqfusion_core.compat.use``. They fix the environment (Python, PyYAML, torch), not an upstream's
objects, so they have no undo: code imported with them keeps needing them.
"""
from __future__ import annotations

import collections
import collections.abc
import functools
import importlib
import importlib.util
import inspect
import sys
import types

from deqfusion_core.compat import shim

__all__ = ["collections_aliases", "yaml_load", "cuda_on_cpu", "Unavailable", "Missing", "stand_in", "remove_stand_ins",
           "import_error", "purge"]

ABCS = ("Mapping", "MutableMapping", "Sequence", "Iterable", "Callable")


def _aliases_missing() -> bool:
    return any(not hasattr(collections, name) for name in ABCS)


@shim("common", "Python 3.10 removed collections.Mapping & co. (2018-era code uses them): alias collections.abc's",
      needed=_aliases_missing, name="collections.abc")
def collections_aliases():
    for name in ABCS:
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


def _yaml_load_needs_loader() -> bool:
    try:
        import yaml
    except ImportError:
        return False
    if getattr(yaml.load, "_deqfusion", False):
        return False
    param = inspect.signature(yaml.load).parameters.get("Loader")
    return param is not None and param.default is inspect.Parameter.empty


@shim("common", "PyYAML >= 6 requires yaml.load's Loader, 2018-era code calls yaml.load(f): default it to "
      "FullLoader (PyYAML 5's)", needed=_yaml_load_needs_loader, name="yaml.load")
def yaml_load():
    import yaml

    original = yaml.load

    @functools.wraps(original)
    def load(stream, Loader=None, **kwargs):
        return original(stream, Loader=Loader or yaml.FullLoader, **kwargs)

    load._deqfusion = True
    yaml.load = load


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available() and not getattr(torch.Tensor.cuda, "_deqfusion_cpu", False)


@shim("common", "the upstream calls .cuda() unconditionally: without a GPU, tensor and module .cuda() return "
      "themselves, so the same script runs on the CPU", needed=_cuda_missing, name="cuda->cpu")
def cuda_on_cpu():
    import torch

    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    tensor_cuda._deqfusion_cpu = module_cuda._deqfusion_cpu = True
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda


# -- stand-in modules --------------------------------------------------------------------------------------
def missing(module: str) -> bool:
    """No spec for ``module`` (a missing parent package counts as missing)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def import_error(module: str) -> str | None:
    """Why ``import module`` fails here (``None`` when it works). Broken builds raise more than ImportError;
    a stand-in another shim put in place does not count as working."""
    loaded = sys.modules.get(module)
    if isinstance(loaded, Unavailable):
        return f"a stand-in: {loaded.__doc__}"
    if loaded is not None:
        return None
    try:
        importlib.import_module(module)
    except Exception as exc:  # torchvision built for another torch raises RuntimeError, not ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def purge(name: str) -> None:
    """Forget a package that failed half-way through its import (``name`` and its submodules)."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


class Unavailable(types.ModuleType):
    """Stand-in for a module that cannot be imported: importing it (and ``from it import name``) works, using
    a name from it raises an ImportError that says why."""

    def __init__(self, name: str, reason: str, needed_for: str):
        super().__init__(name, f"deqfusion stand-in for the unusable {name}")
        self.__reason, self.__needed_for = reason, needed_for
        self.__path__: list[str] = []  # a package, so `from name import sub` goes through __getattr__

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self.__name__}.{attr}", f"{self.__reason}; the upstream needs it only for {self.__needed_for}")


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


def stand_in(names: list[str], reason: str, needed_for: str) -> None:
    """Put :class:`Unavailable` modules in ``sys.modules`` under ``names`` (a package, then its submodules)."""
    for name in names:
        sys.modules[name] = Unavailable(name, reason, needed_for)
    for name in names:  # parent.child attributes, for `import a.b as x` and `a.b.c`
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            object.__setattr__(sys.modules[parent], child, sys.modules[name])


def remove_stand_ins(names: list[str]) -> None:
    """Take the stand-ins among ``names`` out of ``sys.modules`` again."""
    for name in names:
        if isinstance(sys.modules.get(name), Unavailable):
            del sys.modules[name]
