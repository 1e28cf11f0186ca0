"""``deqfusion compare``: the paper's replace-only-the-fusion A/B inside an upstream, as result files.

- ``spec``: what an integration provides (:class:`Comparison`), and what a run reports.
- ``configdiff``: the arms' effective configurations, key by key; only the fusion may differ.
- ``study``: the runs of a study, checked, resumable, with progress; ``worker``: one run in its own process.
- ``record``: the DEQ solver statistics of a run; ``statistics``, ``summary``, ``plot``: the result files.
"""
from .spec import (Arm, Comparison, RunOutcome, Selection, arg_value, deq_option_args, deq_recipe_keys, deq_settings,
                   split_deq_options)

__all__ = ["Arm", "Comparison", "RunOutcome", "Selection", "deq_settings", "deq_option_args", "split_deq_options",
           "arg_value", "deq_recipe_keys"]
