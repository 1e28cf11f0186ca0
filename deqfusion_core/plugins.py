"""Plugin manager and the :class:`Integration` base class every integration derives from.

An integration says which upstream it targets, how to find it (an installed PyPI distribution, or a
git checkout given by a path or ``DEQFUSION_<NAME>_ROOT``), how to apply itself in memory
(idempotent, reversible, never editing upstream files) and how to launch the upstream entry script
with it applied.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pluggy

from . import hookspecs


@dataclass
class Upstream:
    """Where an integration's upstream was found (or why it was not)."""

    name: str
    found: bool
    root: Path | None = None
    version: str | None = None
    reason: str = ""

    def require(self) -> "Upstream":
        if not self.found:
            raise UpstreamNotFound(self.reason)
        return self


class UpstreamNotFound(RuntimeError):
    """The upstream an integration needs is not installed or its checkout was not given."""


class Integration:
    """Base class of an integration. Subclasses set the class attributes and implement ``apply``.

    Attributes:
        name: the name used on the command line (``deqfusion run NAME``).
        summary: one line for ``deqfusion list``.
        distribution: PyPI distribution of a pip-installable upstream (found with importlib.metadata).
        module: import name of a pip-installable upstream.
        env_var: environment variable holding a git checkout's path (``DEQFUSION_<NAME>_ROOT``).
        marker: a file, relative to the checkout root, that identifies the checkout.
        repository: where a user gets the checkout (shown when it is missing).
    """

    name: str = ""
    summary: str = ""
    distribution: str | None = None
    module: str | None = None
    env_var: str | None = None
    marker: str | None = None
    repository: str | None = None

    def __init__(self) -> None:
        self.applied = False

    # -- finding the upstream --------------------------------------------------------------------
    def locate(self, path: str | os.PathLike | None = None) -> Upstream:
        """Find the upstream: ``path`` first, then ``env_var``, then the installed distribution."""
        if path is None and self.env_var:
            path = os.environ.get(self.env_var) or None
        if path is not None:
            root = Path(path).expanduser().resolve()
            if not root.is_dir():
                return Upstream(self.name, False, root, reason=f"{root} is not a directory")
            if self.marker and not (root / self.marker).exists():
                return Upstream(self.name, False, root,
                                reason=f"{root} has no {self.marker}: not a {self.repository or self.name} checkout")
            return Upstream(self.name, True, root, git_describe(root))
        if self.distribution:
            try:
                version = importlib.metadata.version(self.distribution)
            except importlib.metadata.PackageNotFoundError:
                return Upstream(self.name, False,
                                reason=f"{self.distribution} is not installed (pip install {self.distribution})")
            return Upstream(self.name, True, None, version)
        hint = f" or set {self.env_var}" if self.env_var else ""
        where = f" (git clone of {self.repository})" if self.repository else ""
        return Upstream(self.name, False, reason=f"no checkout given: pass --upstream PATH{where}{hint}")

    # -- applying and launching ------------------------------------------------------------------
    def apply(self, upstream: Upstream, options: dict[str, Any] | None = None) -> None:
        """Patch or register into the upstream, in memory. Must be idempotent."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo :meth:`apply` (best effort; patches are in memory, so a new process is clean anyway)."""

    def launch(self, upstream: Upstream, argv: Sequence[str]) -> int:
        """Run the upstream's entry script with the integration applied; return its exit code."""
        raise NotImplementedError(f"integration {self.name!r} has no launcher")

    def __repr__(self) -> str:
        return f"<Integration {self.name}>"


def git_describe(root: Path) -> str | None:
    """Short commit of a git checkout, or None when ``root`` is not one (e.g. an extracted archive)."""
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_path_as_main(script: str | os.PathLike, argv: Sequence[str], cwd: str | os.PathLike | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``argv``, its folder first on sys.path (as ``python script``).

    Returns the script's exit code (a ``SystemExit`` is caught and turned into it).
    """
    script = Path(script).resolve()
    old_argv, old_path, old_cwd = sys.argv[:], sys.path[:], os.getcwd()
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))
    try:
        if cwd is not None:
            os.chdir(cwd)
        runpy.run_path(str(script), run_name="__main__")
        return 0
    except SystemExit as exc:  # the upstream's sys.exit()
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
        os.chdir(old_cwd)


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


@dataclass
class LoadError:
    name: str
    error: str


@dataclass
class Registry:
    """What the plugin manager found: integrations by name, and the entry points that failed."""

    integrations: dict[str, Integration] = field(default_factory=dict)
    errors: list[LoadError] = field(default_factory=list)


_manager: pluggy.PluginManager | None = None


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    """The process-wide plugin manager with every ``deqfusion.integrations`` entry point loaded.

    An entry point that fails to import does not break the others: it is recorded on
    ``manager.deqfusion_load_errors`` and shown by ``deqfusion list``.
    """
    global _manager
    if _manager is not None and not reload:
        return _manager
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    errors: list[LoadError] = []
    for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the CLI
            errors.append(LoadError(ep.name, f"{type(exc).__name__}: {exc}"))
            continue
        pm.register(plugin, name=ep.name)
    pm.deqfusion_load_errors = errors  # type: ignore[attr-defined]
    _manager = pm
    return pm


def integrations(reload: bool = False) -> Registry:
    """Every integration provided by the installed plugins, by name."""
    pm = get_plugin_manager(reload)
    reg = Registry(errors=list(pm.deqfusion_load_errors))  # type: ignore[attr-defined]
    for integ in pm.hook.deqfusion_integration():
        if integ is None:
            continue
        if not integ.name:
            reg.errors.append(LoadError(repr(integ), "integration has no name"))
            continue
        reg.integrations[integ.name] = integ
    return reg


def get_integration(name: str) -> Integration:
    reg = integrations()
    if name not in reg.integrations:
        known = ", ".join(sorted(reg.integrations)) or "none"
        broken = {e.name: e.error for e in reg.errors}
        if name in broken:
            raise KeyError(f"integration {name!r} failed to load: {broken[name]}")
        raise KeyError(f"unknown integration {name!r}; installed: {known}")
    return reg.integrations[name]
