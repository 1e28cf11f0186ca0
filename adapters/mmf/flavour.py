"""Which MMF this is, found without importing it: the PyPI release 1.0.0rc10 or a source install of git main
(``pip install -e`` of a checkout, or a checkout given by ``--upstream PATH`` / ``DEQFUSION_MMF_ROOT``), and
arming the shims that flavour needs before ``import mmf``.

    info = detect()        # MMFInfo(flavour='main', version='1.0.0rc12', path=..., commit='b0ffc7f')
    install_shims()        # rc10's or main's shims, applied when `mmf` is first imported
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MMFInfo", "detect", "use_checkout", "install_shims", "shims_needed", "shims_applied", "RC10", "MAIN", "ROOT_VARIABLE"]

RC10, MAIN = "rc10", "main"
RC10_VERSION = "1.0.0rc10"           # MMF's only PyPI release; every other version is a source install of main
ROOT_VARIABLE = "DEQFUSION_MMF_ROOT"


@dataclass(frozen=True)
class MMFInfo:
    flavour: str          # "rc10" or "main"
    version: str          # mmf/version.py's __version__
    path: Path            # the `mmf` package folder
    commit: str | None    # the checkout's git commit, when it is one

    def __str__(self) -> str:
        commit = f", git {self.commit}" if self.commit else ""
        return f"MMF {self.flavour} ({self.version}{commit}) at {self.path}"


def use_checkout(root: str | os.PathLike | None = None) -> Path | None:
    """Put an MMF checkout (``root``, else ``$DEQFUSION_MMF_ROOT``) first on sys.path, so that ``import mmf`` and
    ``mmf_cli`` come from it. Returns its resolved path (None when neither is given)."""
    root = root or os.environ.get(ROOT_VARIABLE) or None
    if root is None:
        return None
    root = Path(root).expanduser().resolve()
    if not (root / "mmf" / "version.py").is_file():
        raise FileNotFoundError(f"--upstream / {ROOT_VARIABLE}: {root} has no mmf/version.py: not an MMF checkout")
    if "mmf" in sys.modules and Path(sys.modules["mmf"].__file__).resolve().parent != root / "mmf":
        raise RuntimeError(f"another mmf is already imported ({sys.modules['mmf'].__file__}); cannot switch to {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
    return root


def detect() -> MMFInfo | None:
    """The MMF that ``import mmf`` would import (None when there is none), without importing it."""
    spec = importlib.util.find_spec("mmf") if "mmf" not in sys.modules else sys.modules["mmf"].__spec__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).resolve()
    version_file = path / "version.py"
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", version_file.read_text(), re.M) \
        if version_file.is_file() else None
    version = match.group(1) if match else "unknown"
    return MMFInfo(RC10 if version == RC10_VERSION else MAIN, version, path, _git_commit(path.parent))


def _git_commit(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    from deqfusion_core.integration import git_describe

    return git_describe(root)


def _shims_module(flavour: str):
    if flavour == MAIN:
        from deqfusion_compat import mmf_main

        return mmf_main
    from deqfusion_compat import mmf_rc10

    return mmf_rc10


def _upstream(info: MMFInfo | None) -> str:
    """The name the flavour's shims are registered under in deqfusion_core.compat."""
    return "mmf-main" if info is not None and info.flavour == MAIN else "mmf"


def install_shims() -> MMFInfo | None:
    """Arm the shims of the MMF that ``import mmf`` would import (idempotent; only the needed ones apply)."""
    use_checkout()
    info = detect()
    _shims_module(info.flavour if info else RC10).install()
    return info


def shims_needed(info: MMFInfo | None = None) -> list[str]:
    """Names of the shims this MMF needs on this stack, without importing MMF (``deqfusion list``): those applied
    already, then those that go before ``import mmf`` applied in order, as on an import (a later one's condition may
    need an earlier fix); the others' conditions are only evaluated, or named as checked when their module imports."""
    from deqfusion_core.compat import applied, apply_shims, shims

    info = info or detect()
    upstream = _upstream(info)
    _shims_module(info.flavour if info else RC10)
    names, done = [], {s.name for s in applied(upstream)}
    for s in shims(upstream):
        if s.name in done:
            names.append(s.name)
        elif s.module == "mmf" and s.before:
            if s.needed():
                names += apply_shims(upstream, only=[s.name])
        elif s.module is None:
            if s.needed():
                names.append(s.name)
        elif upstream == "mmf-main" and s.needed(module=None):   # main's conditions read the checkout's files
            names.append(s.name)
    if upstream == "mmf":
        names.append("(more when MMF's modules import)")
    return names


def shims_applied(info: MMFInfo | None = None) -> list[str]:
    """Names of the shims applied in this process for this MMF flavour."""
    from deqfusion_core.compat import applied

    return [s.name for s in applied(_upstream(info or detect()))]
