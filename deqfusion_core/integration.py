"""The two bases an integration is written with.

:class:`Integration` says which upstream it targets and how to find it (a PyPI distribution, or a git
checkout given by a path or ``DEQFUSION_<NAME>_ROOT``), applies itself in memory (idempotent, never
editing upstream files), removes itself, and launches the upstream's entry script. A subclass states only
its upstream's particulars in :meth:`Integration.install` and :meth:`Integration.launch`::

    class MyIntegration(Integration):
        name, summary = "mine", "MyFramework: DEQ fusion instead of its concatenation"
        env_var, marker, repository = "DEQFUSION_MINE_ROOT", "model.py", "me/myframework"
        script = "train.py"                                      # what `deqfusion run mine -- ...` runs

        def install(self, upstream, options):
            apply_shims("mine")                                  # deqfusion_core.compat
            model = ...                                          # the upstream's module with the fusion
            self.patches.set(model, "Fusion", lambda d1, d2, out: MyFusion([d1, d2], out, options))

:class:`FusionAdapter` wraps ``DEQFusion`` in the upstream's fusion convention: it keeps the last solver
statistics as ``last_stats`` (and the unweighted Jacobian term as ``last_jac_loss``), applies the Jacobian
policy and reports solves that did not converge.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .jacobian import attach_aux_loss
from .options import FusionOptions

__all__ = ["Integration", "Upstream", "UpstreamNotFound", "Patches", "FusionAdapter", "NonConvergence", "locate",
           "git_describe"]


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


_ABSENT = object()


class Patches:
    """Changes to an upstream's objects that can be undone: ``set`` an attribute, put a registry ``item``,
    or ``call`` any undo function; :meth:`undo` reverts them, newest first (also on leaving a ``with`` block)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def set(self, owner: Any, attr: str, value: Any) -> Any:
        """``setattr(owner, attr, value)``; returns the attribute it replaced."""
        original, previous = vars(owner).get(attr, _ABSENT), getattr(owner, attr, None)
        setattr(owner, attr, value)
        self._undo.append(lambda: delattr(owner, attr) if original is _ABSENT else setattr(owner, attr, original))
        return previous

    def item(self, mapping: dict, key: Any, value: Any) -> None:
        """``mapping[key] = value`` (a framework's registry entry)."""
        original = mapping.get(key, _ABSENT)
        mapping[key] = value
        self._undo.append(lambda: mapping.pop(key, None) if original is _ABSENT else mapping.__setitem__(key, original))

    def call(self, undo: Callable[[], Any]) -> None:
        """Run ``undo`` when the patches are undone (for what ``set`` and ``item`` cannot express)."""
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


class Integration:
    """Base class of an integration. Subclasses set the class attributes and implement ``install``.

    Attributes:
        name: the name used on the command line (``deqfusion run NAME``).
        summary: one line for ``deqfusion list``.
        distribution: PyPI distribution of a pip-installable upstream (found with importlib.metadata).
        module: import name of a pip-installable upstream.
        env_var: environment variable holding a git checkout's path (``DEQFUSION_<NAME>_ROOT``).
        marker: a file, relative to the checkout root, that identifies the checkout.
        repository: where a user gets the checkout (shown when it is missing).
        script: the checkout's entry script (``run.py``): the default :meth:`launch` runs it as ``__main__``
            in the checkout, as ``python run.py`` there would.
        option_defaults: the integration's own option keys and its defaults for DEQFusion's
            (:class:`~deqfusion_core.options.FusionOptions`), e.g. ``{"jac_weight": 20.0, "grad_clip": 30.0}``.
        compat: modules that register the integration's shims (imported by ``deqfusion list -v``).

    A study of the integration (``deqfusion compare``) builds on the same pieces: an arm is a set of
    options given to :meth:`apply`, run by :meth:`launch`.
    """

    name: str = ""
    summary: str = ""
    distribution: str | None = None
    module: str | None = None
    env_var: str | None = None
    marker: str | None = None
    repository: str | None = None
    script: str | None = None
    option_defaults: Mapping[str, Any] = {}
    compat: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.applied = False
        self.options: FusionOptions | None = None
        self.patches = Patches()     # what install() changed in the upstream, undone by remove()

    # -- finding the upstream --------------------------------------------------------------------
    def locate(self, path: str | os.PathLike | None = None) -> Upstream:
        """Find the upstream: ``path`` first, then ``env_var``, then the installed distribution."""
        return locate(self.name, path, env_var=self.env_var, marker=self.marker, repository=self.repository,
                      distribution=self.distribution)

    # -- applying and removing -------------------------------------------------------------------
    def fusion_options(self, options: Mapping[str, Any] | None = None) -> FusionOptions:
        """``options`` checked against DEQFusion's keywords and this integration's ``option_defaults``."""
        return FusionOptions.coerce(options, defaults=self.option_defaults, where=f"{self.name} option")

    def apply(self, upstream: Upstream | None, options: Mapping[str, Any] | None = None) -> None:
        """Patch or register into the upstream, in memory. Applying again with the same options does nothing;
        with other options, the integration is removed and applied with those."""
        options = self.fusion_options(options)
        if self.applied:
            if options == self.options:
                return
            self.remove()
        try:
            self.install(upstream, options)
        except BaseException:
            self.remove()
            raise
        self.options, self.applied = options, True

    def install(self, upstream: Upstream | None, options: FusionOptions) -> None:
        """The upstream's particulars: its shims, then its fusion patched in with ``self.patches.set``."""
        raise NotImplementedError(f"integration {self.name!r} does not implement install()")

    def remove(self) -> None:
        """Undo :meth:`apply`: every object patched is the upstream's original again, this integration's shims
        that patched upstream objects are undone; shims that made the upstream importable stay."""
        from .compat import undo_shims

        self.patches.undo()
        undo_shims(self.name)
        self.options, self.applied = None, False

    # -- launching -------------------------------------------------------------------------------
    def launch(self, upstream: Upstream, argv: Sequence[str]) -> int:
        """Run the upstream's entry script with the integration applied; return its exit code."""
        if self.script is None:
            raise NotImplementedError(f"integration {self.name!r} has no launcher")
        from .process import run_path_as_main

        return run_path_as_main(upstream.require().root / self.script, argv, cwd=upstream.root)

    def __repr__(self) -> str:
        return f"<Integration {self.name}>"


def locate(name: str, path: str | os.PathLike | None = None, *, env_var: str | None = None,
           marker: str | None = None, repository: str | None = None, distribution: str | None = None) -> Upstream:
    """Find upstream ``name``: the checkout at ``path``, else at ``$env_var`` (identified by its ``marker``
    file), else the installed PyPI ``distribution``; or say why it was not found."""
    if path is None and env_var:
        path = os.environ.get(env_var) or None
    if path is not None:
        root = Path(path).expanduser().resolve()
        if not root.is_dir():
            return Upstream(name, False, root, reason=f"{root} is not a directory")
        if marker and not (root / marker).exists():
            return Upstream(name, False, root, reason=f"{root} has no {marker}: not a {repository or name} checkout")
        return Upstream(name, True, root, git_describe(root))
    if distribution:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return Upstream(name, False, reason=f"{distribution} is not installed (pip install {distribution})")
        return Upstream(name, True, None, version)
    hint = f" or set {env_var}" if env_var else ""
    where = f" (git clone of {repository})" if repository else ""
    return Upstream(name, False, reason=f"no checkout given: pass --upstream PATH{where}{hint}")


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


class NonConvergence:
    """Reports DEQ solves that did not converge: a RuntimeWarning the first time and then every ``every`` times,
    for the forward solves (``check``) and, apart, the implicit backward's (``check_backward``)."""

    def __init__(self, what: str, every: int = 50, hint: str = ""):
        self.what, self.every, self.hint, self.count, self.backward_count = what, every, hint, 0, 0

    def watch_backward(self, stats) -> None:
        """Check the implicit backward's solve of the forward of ``stats`` when it runs (every one, the last
        training step's and each of several forwards before one backward included)."""
        if stats.backward_report is not None:
            stats.backward_report.listeners.append(self.check_backward)

    def check_backward(self, report) -> None:
        """An implicit backward's solve that has run (its :class:`~deqfusion_core.stats.BackwardReport`)."""
        b = report.stats
        if b is None or b.converged:
            return
        self.backward_count += 1
        if self.backward_count % self.every == 1:
            warnings.warn(f"{self.what} DEQ fusion's implicit backward did not converge ({self.backward_count} backward "
                          f"solves so far): relative residual {b.rel_residual:.2e} after {b.nstep}/{b.max_iter} steps "
                          f"(b_tol={b.tol}): the gradient is not the implicit one; raise b_max_iter",
                          RuntimeWarning, stacklevel=3)

    def check(self, stats) -> None:
        if stats.converged:
            return
        self.count += 1
        if self.count % self.every == 1:
            warnings.warn(f"{self.what} DEQ fusion did not converge ({self.count} forwards so far): relative residual "
                          f"{stats.rel_residual:.2e} after {stats.nstep} steps (f_tol={stats.tol})"
                          + (f"; {self.hint}" if self.hint else ""), RuntimeWarning, stacklevel=3)


class FusionAdapter(nn.Module):
    """``DEQFusion`` in an upstream's fusion convention. A subclass builds it in ``__init__`` (through
    ``super().__init__(input_dims, dim, options)``) and calls :meth:`fuse` from a ``forward`` that has the
    upstream's signature.

    Jacobian policy (``jacobian``): ``"attach"`` (default) attaches ``jac_weight * jacobian_scale(xs) *
    jac_loss`` to the fused tensor's backward, as the core's ``jac_weight`` does, so the upstream's untouched
    ``loss.backward()`` includes it; ``"report"`` attaches nothing: the framework's own loss adds
    ``current_jac_weight * last_jac_loss`` (a loss entry, an objective, a criterion).
    """

    label = "DEQ"          # names the upstream in the non-convergence warning
    jacobian = "attach"
    warn_every = 50        # a non-converged solve is reported the first time and then every warn_every times
    hint = ""              # appended to that warning

    def __init__(self, input_dims: Sequence[int], dim: int | None = None,
                 options: Mapping[str, Any] | None = None, **shape_defaults: Any):
        super().__init__()
        options = FusionOptions.coerce(options)
        self.jac_weight = options.jac_weight
        self.deq = options.build(input_dims, dim, **shape_defaults)
        self.last_stats = None       # SolverStats of the latest forward
        self.last_jac_loss = None    # its Jacobian term, unweighted (zero outside training)
        self.nonconvergence = NonConvergence(self.label, self.warn_every, self.hint)

    def fuse(self, xs: Sequence[torch.Tensor], **solve: Any) -> torch.Tensor:
        """The fused state [B, dim] of ``xs``; ``solve``: DEQFusion.forward's ``z0``/``warm_start``."""
        xs = list(xs)
        fused, jac_loss, stats = self.deq(xs, **solve)
        self.last_stats, self.last_jac_loss = stats, jac_loss
        self.nonconvergence.check(stats)
        self.nonconvergence.watch_backward(stats)
        if self.jacobian == "attach":
            fused = attach_aux_loss(fused, jac_loss, self.current_jac_weight * self.jacobian_scale(xs))
        return fused

    @property
    def current_jac_weight(self) -> float:
        """``jac_weight`` as DEQFusion's Jacobian-weight schedule (``jac_schedule``) has it at the latest
        training forward; ``jac_weight`` itself without a schedule. Readers of ``last_jac_loss`` weight it so."""
        return self.deq.jac_weight_at(self.jac_weight)

    def jacobian_scale(self, xs: Sequence[torch.Tensor]) -> float:
        """The Jacobian weight's multiplier for this batch (1; an upstream whose loss is a sum: the batch size)."""
        return 1.0
