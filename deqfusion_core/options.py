"""Fusion options: one validated object from CLI flags, ``-o key=value`` pairs and config dicts.

``deqfusion run`` hands its flags and pairs to the integration as a dict, which checks them with its own
keys (``Integration.fusion_options``); MMF's ``fusion.params`` and block's ``fusion:`` are config dicts.

Every integration builds its ``DEQFusion`` from a :class:`FusionOptions`. Key names are checked here
(DEQFusion's keywords, read from its signature, plus the integration's own keys); values are checked by
``DEQFusion`` when it is built, except ``jac_weight``, which no ``DEQFusion`` sees: the integration's
adapter owns the Jacobian term (:class:`deqfusion_core.integration.FusionAdapter`).

    options = FusionOptions({"f_max_iter": 50}, defaults={"jac_weight": 20.0, "grad_clip": 30.0},
                            where="mmdynamics option")
    options["jac_weight"], options.get("f_tol")          # 20.0, None (DEQFusion's default applies)
    fusion = options.build([500, 500], 500)              # DEQFusion(..., f_max_iter=50)
"""
from __future__ import annotations

import argparse
import ast
import functools
import inspect
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["FusionOptions", "OptionError", "parse_fusion_option", "deqfusion_keywords", "STRUCTURAL"]

# DEQFusion's arguments that an integration gives from its upstream's shapes, never from options.
STRUCTURAL = ("input_dims", "dim")


class OptionError(ValueError):
    """An option that is unknown (by name) or invalid; the message names the key and where it came from."""


@functools.lru_cache(maxsize=None)
def deqfusion_keywords() -> frozenset[str] | None:
    """DEQFusion's keyword arguments (by its signature), or None when it takes ``**kwargs`` (then it checks)."""
    from .module import DEQFusion

    params = inspect.signature(DEQFusion.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(n for n in params if n != "self" and n not in STRUCTURAL)


def parse_fusion_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``f_tol=1e-4``, ``gating=False``); else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--fusion-option expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


class FusionOptions(Mapping[str, Any]):
    """DEQFusion keywords and an integration's own keys, checked by name; read-only.

    Args:
        values: the options given (CLI flags, ``-o`` pairs, a config dict); ``None`` values count as not given.
        defaults: the integration's own keys with their defaults (``{"glove": None, "baseline": False}``) and
            its defaults for DEQFusion keywords (``{"jac_weight": 20.0}``). A key neither DEQFusion nor the
            defaults know is an :class:`OptionError`.
        where: how errors name the options' origin (``"mcan option"``, ``"fusion.params"``).
    """

    def __init__(self, values: Mapping[str, Any] | None = None, *, defaults: Mapping[str, Any] | None = None,
                 where: str = "fusion option"):
        self._defaults = dict(defaults or {})
        self._values = {k: v for k, v in dict(values or {}).items() if v is not None}
        self.where = where
        keywords = deqfusion_keywords()
        if keywords is not None:
            known = keywords | set(self._defaults)
            unknown = sorted(set(self._values) - known)
            if unknown:
                own = sorted(set(self._defaults) - keywords)
                raise OptionError(f"{where} {unknown[0]!r}: unknown; DEQFusion takes {', '.join(sorted(keywords))}"
                                  + (f"; this integration also takes {', '.join(own)}" if own else ""))
        weight = self.get("jac_weight", 0.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise OptionError(f"{where} 'jac_weight': must be a number >= 0, got {weight!r}")

    @classmethod
    def coerce(cls, options: Mapping[str, Any] | None, *, defaults: Mapping[str, Any] | None = None,
               where: str = "fusion option") -> "FusionOptions":
        """``options`` (None, a dict or FusionOptions) as FusionOptions with these defaults; given values win.
        FusionOptions without new defaults are returned as they are."""
        if isinstance(options, FusionOptions) and defaults is None:
            return options
        values = options.given() if isinstance(options, FusionOptions) else options
        return cls(values, defaults=defaults, where=where)

    # -- reading ---------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return _layered(self._defaults, self._values)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_layered(self._defaults, self._values))

    def __len__(self) -> int:
        return len(_layered(self._defaults, self._values))

    def given(self) -> dict[str, Any]:
        """The options that were given (not the defaults)."""
        return dict(self._values)

    @property
    def jac_weight(self) -> float:
        """The Jacobian term's weight (0 unless given or defaulted): the adapter applies it, DEQFusion never."""
        return float(self.get("jac_weight", 0.0))

    def fusion_kwargs(self) -> dict[str, Any]:
        """The DEQFusion keyword arguments among these options, without ``jac_weight``."""
        keywords = deqfusion_keywords()
        own = set(self._defaults) - (keywords or set())
        return {k: v for k, v in self.items() if k != "jac_weight" and (k in keywords if keywords else k not in own)}

    # -- combining and building ------------------------------------------------------------------------
    def updated(self, values: Mapping[str, Any] | None, where: str | None = None) -> "FusionOptions":
        """These options with ``values`` on top (``values`` win), checked the same way."""
        return FusionOptions(_layered(self._values, dict(values or {})), defaults=self._defaults,
                             where=where or self.where)

    def build(self, input_dims: Sequence[int], dim: int | None = None, **shape_defaults: Any):
        """``DEQFusion(input_dims, dim, **fusion_kwargs)``; ``shape_defaults`` are the integration's defaults that
        depend on the shapes (``num_groups`` that divides its width): given options win over them."""
        from .module import DEQFusion

        return DEQFusion(list(input_dims), dim, **{**shape_defaults, **self.fusion_kwargs()})

    def __repr__(self) -> str:
        return f"FusionOptions({self._values!r}, defaults={self._defaults!r})"


def _layered(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
    """``upper`` over ``lower``; ``norm_options`` belong to the norm of their layer: an upper layer that picks
    another norm without options of its own does not inherit the lower one's (``-o norm=none`` over a plugin's
    contractive norm with a gain bound needs no ``-o "norm_options={}"``)."""
    merged = {**lower, **upper}
    if ("norm" in upper and "norm_options" not in upper and upper["norm"] != lower.get("norm")
            and "norm_options" in lower):
        del merged["norm_options"]
    return merged
