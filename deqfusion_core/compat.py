"""Conditional compatibility shims: the machinery. The shims themselves live in ``deqfusion_compat``
(the project's ``compat/`` folder), one module per upstream and ``common.py`` for those several share.

A shim fixes one thing that is missing or broken when an upstream runs on today's stack. It is applied
only when its ``needed()`` says so, says why in one line, and is recorded when applied::

    @shim("mcan", "spaCy 2's en_vectors_web_lg cannot be installed today", needed=spacy_vectors_missing)
    def glove_vectors(root, glove=None):      # takes from the context what it needs
        ...

    apply_shims("mcan", root=root, glove=path)   # the needed ones, once each; returns their names
    applied("mcan")                              # what was applied in this process

``needed``, ``apply`` and ``undo`` take from the keyword context of :func:`apply_shims` the arguments they
name. A shim with ``module=`` applies when that module is imported (:func:`watch_imports`), right after
it executed (it gets it as ``module``) or, with ``before=True``, right before. A change of the upstream's
behaviour that is not a fix is registered with ``behaviour_change=True``: it is applied to both arms of a
comparison and listed as what it is.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import inspect
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

__all__ = ["Shim", "shim", "register", "use", "shims", "apply_shims", "undo_shims", "applied", "applying",
           "watch_imports", "unwatch_imports", "swap", "restore", "ALWAYS"]


def ALWAYS() -> bool:
    """``needed`` of a behaviour change applied on every stack."""
    return True


@dataclass(frozen=True)
class Shim:
    """One conditional fix (or named behaviour change) for one upstream."""

    name: str
    upstream: str
    reason: str                                   # one line: what is missing or broken, and what stands in
    needed: Callable[..., bool]
    apply: Callable[..., Any]
    undo: Callable[..., Any] | None = None        # None: it stays (e.g. what made the upstream importable)
    behaviour_change: bool = False                # not a fix: changes what the upstream does, in both arms
    module: str | None = None                     # applied when this module is imported
    before: bool = False                          # ... before it executes instead of after

    def __str__(self) -> str:
        kind = " [behaviour change, both arms]" if self.behaviour_change else ""
        return f"{self.upstream}:{self.name}{kind}: {self.reason}"


_SHIMS: dict[str, dict[str, Shim]] = {}          # upstream -> name -> shim, in registration order
_ACTIVE: dict[tuple[str, str], dict] = {}        # (upstream, name) -> the context it was applied with
_HISTORY: list[Shim] = []                        # every application in this process, in order


def register(s: Shim) -> Shim:
    """Add ``s`` to its upstream's shims (again with the same record is a no-op; another of that name is an error)."""
    known = _SHIMS.setdefault(s.upstream, {})
    if s.name in known and known[s.name] != s:
        raise ValueError(f"shim {s.upstream}:{s.name} is already registered with another definition")
    known[s.name] = s
    return s


def shim(upstream: str, reason: str, *, needed: Callable[..., bool], undo: Callable[..., Any] | None = None,
         name: str | None = None, behaviour_change: bool = False, module: str | None = None,
         before: bool = False) -> Callable[[Callable[..., Any]], Shim]:
    """Decorator: register the decorated ``apply`` function as a shim of ``upstream``; returns the :class:`Shim`."""
    def deco(apply: Callable[..., Any]) -> Shim:
        return register(Shim(name or apply.__name__, upstream, reason, needed, apply, undo, behaviour_change,
                             module, before))
    return deco


def use(upstream: str, *shared: Shim, **fields: Any) -> None:
    """Register shims written for several upstreams (``deqfusion_compat.common``) for ``upstream`` too
    (``fields``: e.g. ``module="mmf", before=True`` to apply them when that module is imported)."""
    for s in shared:
        register(replace(s, upstream=upstream, **fields))


def shims(upstream: str | None = None) -> list[Shim]:
    """The registered shims of ``upstream`` (all when None), in registration order."""
    groups = [_SHIMS.get(upstream, {})] if upstream is not None else list(_SHIMS.values())
    return [s for group in groups for s in group.values()]


_ABSENT = object()
_ORIGINALS: dict[tuple[int, str], tuple[Any, Any]] = {}   # (id(owner), attr) -> (owner, what swap replaced)


def swap(owner: Any, attr: str, value: Any) -> Any:
    """``setattr(owner, attr, value)``, remembering the original for :func:`restore`; returns the attribute
    it replaced (for a wrapper to call)."""
    previous = getattr(owner, attr, None)
    _ORIGINALS.setdefault((id(owner), attr), (owner, vars(owner).get(attr, _ABSENT)))
    setattr(owner, attr, value)
    return previous


def restore(owner: Any, attr: str) -> None:
    """Undo :func:`swap`: ``owner.attr`` is the original again (a no-op when it was not swapped)."""
    entry = _ORIGINALS.pop((id(owner), attr), None)
    if entry is None:
        return
    if entry[1] is _ABSENT:
        delattr(owner, attr)
    else:
        setattr(owner, attr, entry[1])


def _call(func: Callable[..., Any], context: dict, s: Shim) -> Any:
    """``func`` with the context's keyword arguments it names (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(func).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return func(**context)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in context]
    if missing:
        raise TypeError(f"shim {s.upstream}:{s.name} needs {', '.join(missing)} in the context of apply_shims")
    return func(**{k: v for k, v in context.items() if k in params})


def _apply(s: Shim, context: dict) -> bool:
    key = (s.upstream, s.name)
    if key in _ACTIVE or not _call(s.needed, context, s):
        return False
    _call(s.apply, context, s)
    _ACTIVE[key] = context
    if s not in _HISTORY:
        _HISTORY.append(s)
    return True


def apply_shims(upstream: str, only: list[str] | None = None, **context: Any) -> list[str]:
    """Apply ``upstream``'s needed shims (those without ``module=``; of them ``only`` these names, when given)
    that are not in place; idempotent. Returns the names applied now."""
    unknown = set(only or ()) - {s.name for s in shims(upstream)}
    if unknown:
        raise KeyError(f"no shim {sorted(unknown)[0]!r} registered for {upstream!r}")
    return [s.name for s in shims(upstream)
            if s.module is None and (only is None or s.name in only) and _apply(s, context)]


def undo_shims(upstream: str, names: list[str] | None = None) -> list[str]:
    """Undo ``upstream``'s shims in place (or only ``names``) that have an ``undo``, newest first; the others stay."""
    done = []
    for s in reversed(shims(upstream)):
        key = (upstream, s.name)
        if key in _ACTIVE and s.undo is not None and (names is None or s.name in names):
            _call(s.undo, _ACTIVE.pop(key), s)
            done.append(s.name)
    return done


def applied(upstream: str | None = None) -> list[Shim]:
    """The shims applied in this process (of ``upstream``, or all), in the order of their first application,
    including any undone since."""
    return [s for s in _HISTORY if upstream is None or s.upstream == upstream]


@contextlib.contextmanager
def applying(upstream: str, only: list[str] | None = None, **context: Any) -> Iterator[list[str]]:
    """Apply ``upstream``'s needed shims (``only`` these) for the duration of the block, then undo those
    applied here."""
    names = apply_shims(upstream, only, **context)
    try:
        yield names
    finally:
        undo_shims(upstream, names)


# -- shims applied when a module is imported ---------------------------------------------------------------
class _ImportHook(importlib.abc.MetaPathFinder):
    """Applies the ``module=`` shims of the watched upstreams when their module is imported."""

    def __init__(self) -> None:
        self.upstreams: set[str] = set()

    def targeting(self, fullname: str, before: bool) -> list[Shim]:
        return [s for u in sorted(self.upstreams) for s in shims(u) if s.module == fullname and s.before == before]

    def find_spec(self, fullname, path, target=None):
        for s in self.targeting(fullname, before=True):
            _apply(s, {})
        after = self.targeting(fullname, before=False)
        if not after:
            return None
        spec = next((spec for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                     for spec in [finder.find_spec(fullname, path, target)] if spec is not None), None)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, after)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, after: list[Shim]):
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for s in self.after:
            _apply(s, {"module": module})

    def __getattr__(self, attr):  # get_source, is_package, ... of the real loader
        return getattr(self.loader, attr)


_hook = _ImportHook()


def watch_imports(upstream: str) -> list[str]:
    """Apply ``upstream``'s ``module=`` shims when their modules are imported (now, for those already imported).
    Idempotent. Returns the names applied now."""
    _hook.upstreams.add(upstream)
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    done = []
    for s in shims(upstream):
        if s.module is not None and s.module in sys.modules:
            if _apply(s, {} if s.before else {"module": sys.modules[s.module]}):
                done.append(s.name)
    return done


def unwatch_imports(upstream: str) -> None:
    """Stop applying ``upstream``'s ``module=`` shims on import (those applied stay until :func:`undo_shims`)."""
    _hook.upstreams.discard(upstream)
    if not _hook.upstreams and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
