"""Running an upstream's code in this process: its entry script as ``__main__`` or its ``main()`` with the
command line swapped in (a ``SystemExit`` becomes the exit code), and its modules imported from a checkout.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["run_main", "run_path_as_main", "exit_code", "prepend_sys_path", "import_isolated", "provided"]


def exit_code(exc: SystemExit) -> int:
    """The process exit code a ``SystemExit`` stands for (a message is printed to stderr and gives 1)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_main(main: Callable[[], Any], argv: Sequence[str] | None = None, *, prog: str | None = None,
             cwd: str | os.PathLike | None = None) -> int:
    """Call an upstream's ``main()`` as its command line would: ``sys.argv = [prog, *argv]`` (when ``argv`` is
    given), in ``cwd`` (when given); restore both afterwards. Returns the exit code (0, or its ``SystemExit``'s)."""
    old_argv, old_cwd = sys.argv[:], os.getcwd()
    if argv is not None:
        sys.argv = [prog or sys.argv[0], *argv]
    try:
        if cwd is not None:
            os.chdir(cwd)
        main()
        return 0
    except SystemExit as exc:  # the upstream's sys.exit()
        return exit_code(exc)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)


def run_path_as_main(script: str | os.PathLike, argv: Sequence[str], cwd: str | os.PathLike | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``argv``, its folder first on sys.path (as ``python script`` does).
    Returns the script's exit code."""
    script = Path(script).resolve()
    old_path = sys.path[:]
    sys.path.insert(0, str(script.parent))
    try:
        return run_main(lambda: runpy.run_path(str(script), run_name="__main__"), argv, prog=str(script), cwd=cwd)
    finally:
        sys.path[:] = old_path


@contextlib.contextmanager
def prepend_sys_path(path: str | os.PathLike):
    """Temporarily put ``path`` first on sys.path (for importing a git-only upstream)."""
    path = str(path)
    sys.path.insert(0, path)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(path)


def import_isolated(root: str | os.PathLike, names: list[str]) -> dict[str, ModuleType]:
    """Import ``names`` (in order) from the checkout at ``root`` without leaving them in ``sys.modules`` under
    those generic names (``model``, ``utils``): two upstreams with a ``model.py`` coexist in one process.
    Whatever ``sys.modules`` held under those names before is put back; the modules import each other
    normally while this runs."""
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
