"""The arms' effective configurations, compared key by key: only the fusion may differ.

Configurations are flattened to dotted keys (``training.max_grad_l2_norm``); lists are compared whole. Each
key that differs is the fusion's (a ``fusion_keys`` prefix of the comparison, named with its role), allowed by
the user (``--allow-diff KEY``, stated in the summary), or a mismatch that stops the study before it trains.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["MISSING", "ConfigMismatch", "Difference", "differences", "fingerprint", "flatten", "owner"]

MISSING = "<missing>"   # a key one arm has and the other has not


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``; an empty mapping stays a key (``{}``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = _plain(value)
    return out


def owner(key: str, prefixes: Iterable[str]) -> str | None:
    """The longest of ``prefixes`` that is ``key`` or a dotted parent of it."""
    best = None
    for p in prefixes:
        if (key == p or key.startswith(p + ".")) and (best is None or len(p) > len(best)):
            best = p
    return best


def drop(flat: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    prefixes = list(prefixes)
    return {k: v for k, v in flat.items() if owner(k, prefixes) is None}


def fingerprint(flat: Mapping[str, Any]) -> str:
    """A short hash of a flattened configuration (resuming checks that a finished run had the same one)."""
    text = json.dumps(flat, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Difference:
    key: str
    baseline: Any
    other: Any
    role: str | None          # the fusion key's role, "allowed by --allow-diff", or None: not allowed

    def as_dict(self, baseline_name: str, other_name: str) -> dict[str, Any]:
        return {"key": self.key, baseline_name: self.baseline, other_name: self.other, "role": self.role}


def differences(baseline: Mapping[str, Any], other: Mapping[str, Any], fusion_keys: Mapping[str, str],
                allowed: Iterable[str] = ()) -> list[Difference]:
    """Every key whose value differs between two flattened configurations, with its role."""
    allowed = list(allowed)
    out = []
    for key in sorted(set(baseline) | set(other)):
        a, b = baseline.get(key, MISSING), other.get(key, MISSING)
        if a == b and type(a) is type(b):
            continue
        fusion = owner(key, fusion_keys)
        if fusion is not None:
            role = fusion_keys[fusion]
        elif owner(key, allowed) is not None:
            role = f"allowed by --allow-diff {owner(key, allowed)}"
        else:
            role = None
        out.append(Difference(key, a, b, role))
    return out


class ConfigMismatch(ValueError):
    """The arms differ in more than the fusion (and the extra keys were not named with --allow-diff)."""

    def __init__(self, arm: str, baseline: str, seed: int, diffs: list[Difference]):
        self.diffs = diffs
        lines = [f"  {d.key}: {baseline} {_show(d.baseline)}, {arm} {_show(d.other)}" for d in diffs]
        keys = " ".join(f"--allow-diff {d.key}" for d in diffs)
        super().__init__(f"arms {baseline!r} and {arm!r} (seed {seed}) differ beyond the fusion in "
                         f"{len(diffs)} key(s):\n" + "\n".join(lines) +
                         f"\nmake them equal, or name each difference to run anyway: {keys}")


def _show(value: Any) -> str:
    text = json.dumps(value) if value is not MISSING else MISSING
    return text if len(text) <= 80 else text[:77] + "..."
