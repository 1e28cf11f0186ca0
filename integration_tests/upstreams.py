"""The upstream checkouts the integration tests run against.

A test takes ``$DEQFUSION_<NAME>_ROOT``; for the upstreams whose licences allow redistribution (MultiBench,
mcan-vqa) it falls back to the unmodified snapshot in ``../shared/upstreams/`` beside the project, which is
how CI runs them. Snapshots are read-only: tests run on a copy (:func:`writable_copy`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

SNAPSHOTS = Path(__file__).resolve().parents[1].parent / "shared" / "upstreams"


def checkout(env_var: str, snapshot: str | None = None) -> str | None:
    """``$env_var``, else the snapshot ``../shared/upstreams/<snapshot>`` when it is there, else None."""
    given = os.environ.get(env_var)
    if given:
        return given
    if snapshot is not None and (SNAPSHOTS / snapshot).is_dir():
        return str(SNAPSHOTS / snapshot)
    return None


def missing(env_var: str, snapshot: str | None = None) -> str:
    """The one-line skip reason when :func:`checkout` found nothing."""
    where = f" and no snapshot at {SNAPSHOTS / snapshot}" if snapshot else ""
    return f"{env_var} is not set{where}"


def writable_copy(root: str | os.PathLike, dest: Path) -> Path:
    """A copy of the checkout at ``root`` in ``dest`` (upstream scripts write beside themselves)."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".git", "ckpts", "__pycache__"))
    return dest
