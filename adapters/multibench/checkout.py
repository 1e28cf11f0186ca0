"""Finding the user's MultiBench checkout and importing its modules (MultiBench is git-only, never copied).

The checkout is, in order: the ``root`` argument, the one given to ``use_checkout`` (``deqfusion run
multibench --upstream PATH`` calls it), or ``$DEQFUSION_MULTIBENCH_ROOT``.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from deqfusion_core.compat import applying
from deqfusion_core.integration import UpstreamNotFound, locate

NAME = "multibench"
ENV_VAR = "DEQFUSION_MULTIBENCH_ROOT"
MARKER = "training_structures/Supervised_Learning.py"
REPOSITORY = "pliang279/MultiBench"
_configured: Path | None = None


class MultiBenchNotFound(UpstreamNotFound):
    """The MultiBench checkout a MultiBench fusion or the trainer needs was not found."""


def use_checkout(path: str | os.PathLike | None) -> Path | None:
    """Use the checkout at ``path`` from now on in this process (``None``: back to ``$DEQFUSION_MULTIBENCH_ROOT``)."""
    global _configured
    _configured = None if path is None else find_checkout(path)
    return _configured


def find_checkout(root: str | os.PathLike | None = None, what: str = "this") -> Path:
    """The MultiBench checkout to use, or MultiBenchNotFound saying how to give one."""
    up = locate(NAME, root if root is not None else _configured, env_var=ENV_VAR, marker=MARKER, repository=REPOSITORY)
    if not up.found:
        raise MultiBenchNotFound(
            f"{what} needs a MultiBench checkout (git clone https://github.com/{REPOSITORY}), which was not "
            f"found: {up.reason}. Pass root=PATH (on the command line --upstream PATH) or set {ENV_VAR}.")
    return up.root


def import_multibench(module: str, root: str | os.PathLike | None = None):
    """Import ``module`` (e.g. ``fusions.common_fusions``) from the checkout, with the compatibility shims.

    The checkout goes first on ``sys.path`` (as MultiBench's own scripts do) and stays there: models it
    pickles refer to its modules by their top-level names.
    """
    from deqfusion_compat import multibench as shims

    root = find_checkout(root, what=f"importing MultiBench's {module}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    top = module.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None:
        where = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", []) or []), None)
        if where is not None and root not in Path(where).resolve().parents:
            raise ImportError(f"{module}: a module named {top!r} from {where} is already imported, and it is not "
                              f"MultiBench's ({root / top}); import MultiBench before it or in another process")
    with applying(NAME, shims.IMPORT):
        return importlib.import_module(module)
