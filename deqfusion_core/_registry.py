"""A table of named components (solvers, Jacobian-weight schedules, norms): a decorator that registers one and
a lookup whose error names the argument it came from."""
from __future__ import annotations

from typing import Any, Callable


def registry(table: dict[str, Any], argument: str, kind: str) -> tuple[Callable, Callable]:
    """``(register, get)`` over ``table``: ``@register(name)`` adds a function; ``get(name)`` returns it or raises
    ``ValueError("<argument>: unknown <kind> 'name'; known: ...")``."""
    def register(name: str):
        def deco(fn):
            table[name] = fn
            return fn
        return deco

    def get(name: str):
        try:
            return table[name]
        except (KeyError, TypeError):     # TypeError: an unhashable name
            raise ValueError(f"{argument}: unknown {kind} {name!r}; known: {', '.join(sorted(table))}") from None

    return register, get
