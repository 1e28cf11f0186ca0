"""Import a git-only upstream's top-level modules (``model``, ``utils``, ...) without leaving them in
``sys.modules`` under those generic names, so that two upstreams with a ``model.py`` coexist in one process."""
from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

from deqfusion_core import prepend_sys_path


def import_isolated(root: str | Path, names: list[str]) -> dict[str, ModuleType]:
    """Import ``names`` (in order) from the checkout at ``root``; whatever ``sys.modules`` held under those
    names before is put back afterwards. Modules import each other normally while this runs."""
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        with prepend_sys_path(root):
            mods = {n: importlib.import_module(n) for n in names}
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    for n, m in mods.items():
        if Path(m.__file__).resolve().parent != Path(root).resolve():
            raise RuntimeError(f"{n!r} was imported from {m.__file__}, not from the checkout {root}")
    return mods


@contextlib.contextmanager
def provided(mods: dict[str, ModuleType]):
    """Put ``mods`` in ``sys.modules`` for the duration (an upstream script importing ``model`` gets the
    patched one), then restore what was there."""
    saved = {n: sys.modules.get(n) for n in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
