"""deqfusion in MMF: `fusion: deq` in MMF's fusion registry, a fusion-agnostic classifier model, an easy-VQA
dataset builder, packaged configs and the shims that make MMF 1.0.0rc10 run on today's stack.

    from deqfusion_adapters.mmf import register
    register()          # shims (only those needed), then registers into MMF's registry
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
USER_DIR = Path(__file__).parent / "deqfusion_mmf"   # for `env.user_dir=` / MMF_USER_DIR


def register(options: dict | None = None):
    """Apply the shims this MMF needs, import MMF and register deqfusion's fusion, model and dataset."""
    from .registration import register as _register

    return _register(options)
