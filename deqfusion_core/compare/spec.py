"""What an integration provides to ``deqfusion compare``: a :class:`Comparison`.

The harness (``study.py``) owns the seeds, the arms, the configuration check, resuming, progress and the result
files. A comparison owns what only the integration knows: the upstream arguments of an arm, the upstream's
effective (merged) configuration for those arguments, and running the upstream's own training entry. The last
two run in a worker process (``worker.py``), one per training run, so every run starts from a clean interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["Arm", "Comparison", "deq_recipe_keys", "RunOutcome", "Selection", "deq_settings", "deq_option_args", "split_deq_options",
           "arg_value"]

DEQ_OPTION = "--deq-option"   # KEY=VALUE: a fusion option of the fusion arm, carried in its argv


def deq_option_args(options: Mapping[str, Any]) -> list[str]:
    """``{"f_tol": 1e-4}`` -> ``["--deq-option", "f_tol=0.0001"]``: fusion options in a run's argv."""
    return [x for k, v in options.items() for x in (DEQ_OPTION, f"{k}={v!r}")]


def arg_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in a command line (``--flag VALUE`` or ``--flag=VALUE``; the last one), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def split_deq_options(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The fusion options :func:`deq_option_args` put in ``argv``, and the rest (the upstream's arguments)."""
    from deqfusion_core.options import parse_fusion_option

    options, rest, it = {}, [], iter(argv)
    for arg in it:
        if arg == DEQ_OPTION:
            key, value = parse_fusion_option(next(it))
            options[key] = value
        else:
            rest.append(arg)
    return options, rest


def deq_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """A DEQ fusion's whole recipe for an effective configuration: DEQFusion's defaults (its constructor's
    keywords but the shapes) updated with ``options`` (which may add an integration's own, e.g. ``jac_weight``)."""
    import inspect

    from deqfusion_core import DEQFusion

    defaults = {k: p.default for k, p in inspect.signature(DEQFusion.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("input_dims", "dim")}
    return {**defaults, **dict(options)}


@dataclass(frozen=True)
class Arm:
    """One side of the A/B: ``name`` as written in result files, ``fusion`` as the upstream names it."""

    name: str        # "baseline" (the upstream's own fusion), "deq", or the fusion's name for a further baseline
    fusion: str      # e.g. "linear_sum", "concat", "deq"
    is_fusion: bool  # the fusion under test (the arm that may carry the DEQ recipe)


@dataclass
class Selection:
    """The metrics of one way of picking the reported epoch or update: ``val`` (chosen on validation by the
    upstream's own criterion), ``final`` (the last one) or ``test`` (an upstream's or the paper's protocol that
    chooses on the test split). ``at`` says which epoch/update it picked, ``criterion`` how."""

    val: dict[str, float] | None
    test: dict[str, float] | None
    at: str = ""
    criterion: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"val": self.val, "test": self.test, "at": self.at, "criterion": self.criterion}


@dataclass
class RunOutcome:
    """What one training run reports. ``selections`` maps a selection name to its metrics; the first one listed
    in :attr:`Comparison.selections` is the run's primary selection. ``behaviour_changes``: changes to the
    upstream's behaviour this run applied (the same in both arms; stated in the summary)."""

    selections: dict[str, Selection]
    behaviour_changes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)   # anything else worth keeping (epochs run, ...)


Progress = Callable[..., None]   # progress(done=, total=, unit=, metric={name: value})


RECIPE_ROLES = {"jac_weight": "DEQ recipe: Jacobian weight", "dropout": "DEQ recipe: dropout in the fusion",
                "fusion_lr": "DEQ recipe: the fusion's learning rate"}


def deq_recipe_keys(prefix: str, *names: str) -> dict[str, str]:
    """``fusion_keys`` entries for the DEQ recipe's settings under ``prefix`` (default: jac_weight, dropout)."""
    return {prefix + n: RECIPE_ROLES[n] for n in (names or ("jac_weight", "dropout"))}


class Comparison:
    """Base class: an integration's plugin returns an instance from the ``deqfusion_comparison`` hook.

    The class must be constructible without arguments (workers rebuild it from ``module:qualname``).

    Attributes:
        integration: the integration's name (``deqfusion compare NAME``).
        study: the default study name in the result files (e.g. ``easy_vqa``); :meth:`study_name` may refine it.
        baseline: the upstream's own fusion: the arm named ``baseline``.
        fusion: the fusion under test (``--fusion``; default ``deq``).
        metric: the headline metric (first column of the summary).
        selections: the selections every run reports, the primary one first.
        fusion_keys: configuration keys (a key or a dotted prefix) that belong to the fusion arm, with what each
            is. The DEQ recipe beyond the fusion itself (Jacobian weight, the fusion's learning rate, dropout in
            the fusion) is named ``"DEQ recipe: ..."``. The longest matching prefix names a key.
        not_compared: keys that say where a run writes or which file holds its settings (whose contents are
            compared key by key), never training settings; with why.
    """

    integration: str = ""
    study: str = ""
    baseline: str = ""
    fusion: str = "deq"
    metric: str = "accuracy"
    selections: tuple[str, ...] = ("val", "final")
    fusion_keys: dict[str, str] = {}
    not_compared: dict[str, str] = {}

    # -- in the parent process (cheap: no upstream import) --------------------------------------------------------
    def study_name(self, upstream_args: Sequence[str]) -> str:
        return self.study

    def headline(self, upstream_args: Sequence[str]) -> str:
        """The headline metric for these upstream arguments (default: :attr:`metric`)."""
        return self.metric

    def fusions(self) -> list[str] | None:
        """Fusion names this comparison can run, or None when only the upstream knows (checked by the worker)."""
        return None

    def smoke_args(self, upstream_args: Sequence[str]) -> list[str]:
        """Upstream arguments that make a run a few updates or epochs on a few samples (``--smoke``)."""
        raise NotImplementedError(f"{self.integration}: no --smoke settings")

    def argv(self, arm: Arm, seed: int, fusion_options: dict[str, Any], upstream_args: Sequence[str],
             run_dir: Path) -> list[str]:
        """The upstream's arguments for one run of ``arm`` at ``seed``. ``upstream_args`` (the user's, plus the
        smoke settings) are the same for every arm; ``fusion_options`` (DEQFusion keywords from the command line)
        belong to the fusion arm only; ``run_dir`` is the run's own folder for anything the upstream writes."""
        raise NotImplementedError

    # -- in a worker process ----------------------------------------------------------------------------------
    def locate(self, path: str | None):
        """The upstream (``deqfusion_core.Upstream``) the runs use: the integration's, found from ``path``."""
        from deqfusion_core import plugins

        return plugins.get_integration(self.integration).locate(path).require()

    def effective_config(self, upstream, argv: Sequence[str]) -> dict[str, Any]:
        """The configuration the upstream would train with for ``argv``, as nested plain data."""
        raise NotImplementedError

    def train(self, upstream, argv: Sequence[str], run_dir: Path, progress: Progress) -> RunOutcome:
        """Run the upstream's own training entry with ``argv``; report progress; return the run's metrics."""
        raise NotImplementedError

    def robustness_evaluator(self):
        """After :meth:`train`, in the same worker: a :class:`deqfusion_core.compare.robustness.Evaluator` of the
        run's selected checkpoint on the test split (``deqfusion compare --robustness``)."""
        raise NotImplementedError(f"{self.integration}: no robustness evaluation (--robustness)")

    @property
    def ref(self) -> str:
        """``module:qualname``: how a worker process rebuilds this comparison."""
        return f"{type(self).__module__}:{type(self).__qualname__}"
