"""The plugin manager: every integration declared under the entry-point group ``deqfusion.integrations``.

An entry point that fails to import does not break the others: it is listed among the load errors, which
``deqfusion list`` shows.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs

if TYPE_CHECKING:
    from .integration import Integration

__all__ = ["LoadError", "Registry", "get_plugin_manager", "load_errors", "integrations", "get_integration",
           "get_comparison"]


@dataclass
class LoadError:
    name: str
    error: str


@dataclass
class Registry:
    """What the plugin manager found: integrations by name, and the entry points that failed."""

    integrations: dict[str, "Integration"] = field(default_factory=dict)
    errors: list[LoadError] = field(default_factory=list)


@dataclass
class _Loaded:
    manager: pluggy.PluginManager
    errors: list[LoadError]


_loaded: _Loaded | None = None


def _load(reload: bool = False) -> _Loaded:
    global _loaded
    if _loaded is not None and not reload:
        return _loaded
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
    _loaded = _Loaded(pm, errors)
    return _loaded


def get_plugin_manager(reload: bool = False) -> pluggy.PluginManager:
    """The process-wide plugin manager with every ``deqfusion.integrations`` entry point loaded."""
    return _load(reload).manager


def load_errors(reload: bool = False) -> list[LoadError]:
    """The entry points that failed to import."""
    return list(_load(reload).errors)


def integrations(reload: bool = False) -> Registry:
    """Every integration provided by the installed plugins, by name."""
    loaded = _load(reload)
    reg = Registry(errors=list(loaded.errors))
    for integ in loaded.manager.hook.deqfusion_integration():
        if integ is None:
            continue
        if not integ.name:
            reg.errors.append(LoadError(repr(integ), "integration has no name"))
            continue
        reg.integrations[integ.name] = integ
    return reg


def get_integration(name: str) -> "Integration":
    reg = integrations()
    if name not in reg.integrations:
        known = ", ".join(sorted(reg.integrations)) or "none"
        broken = {e.name: e.error for e in reg.errors}
        if name in broken:
            raise KeyError(f"integration {name!r} failed to load: {broken[name]}")
        raise KeyError(f"unknown integration {name!r}; installed: {known}")
    return reg.integrations[name]


def get_comparison(name: str):
    """The :class:`deqfusion_core.compare.Comparison` of integration ``name`` (``deqfusion compare NAME``)."""
    found = [c for c in get_plugin_manager().hook.deqfusion_comparison() if c is not None and c.integration == name]
    if not found:
        get_integration(name)  # an unknown or broken integration says so first
        raise KeyError(f"integration {name!r} has no comparison for `deqfusion compare` yet")
    return found[0]
