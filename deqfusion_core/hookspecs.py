"""pluggy hook specifications for deqfusion integrations.

An integration is a module (or object) that implements these hooks and is declared under the
entry-point group ``deqfusion.integrations``::

    [project.entry-points."deqfusion.integrations"]
    myframework = "my_package.deqfusion_plugin"

Every hook is optional except :func:`deqfusion_integration`.
"""
from __future__ import annotations

import pluggy

PROJECT = "deqfusion"
ENTRY_POINT_GROUP = "deqfusion.integrations"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def deqfusion_integration():
    """Return the :class:`deqfusion_core.integration.Integration` this plugin provides."""


@hookspec
def deqfusion_add_commands(subparsers):
    """Add sub-commands to the ``deqfusion`` command line (an ``argparse`` subparsers object).

    A command sets ``func=callable(args) -> int`` with ``parser.set_defaults``.
    """


@hookspec
def deqfusion_comparison():
    """Return the :class:`deqfusion_core.compare.Comparison` that runs this integration's upstream for
    ``deqfusion compare NAME`` (its ``integration`` attribute is NAME). Optional."""
