"""Conditional compatibility shims shared by the VQA integrations (MCAN, vqa.pytorch, block.bootstrap.pytorch).

Each shim is applied only when the thing it fixes is really broken on the running stack, is
idempotent, and says why in one line. Nothing here edits an installed or checked-out file.
"""
from __future__ import annotations

import collections
import collections.abc
import functools
import inspect

import torch

APPLIED: set[str] = set()   # names of the shims applied in this process (tests and `deqfusion list` read it)


def yaml_load_needs_loader() -> bool:
    import yaml

    if getattr(yaml.load, "_deqfusion", False):
        return False
    param = inspect.signature(yaml.load).parameters.get("Loader")
    return param is not None and param.default is inspect.Parameter.empty


def shim_yaml_load() -> bool:
    """PyYAML >= 6 made ``Loader`` required; 2018-era code calls ``yaml.load(f)``: default it to FullLoader
    (what PyYAML 5 used). Process-wide, because upstream scripts ``import yaml`` themselves."""
    import yaml

    if not yaml_load_needs_loader():
        return False
    original = yaml.load

    @functools.wraps(original)
    def load(stream, Loader=None, **kwargs):
        return original(stream, Loader=Loader or yaml.FullLoader, **kwargs)

    load._deqfusion = True
    yaml.load = load
    APPLIED.add("yaml.load")
    return True


def shim_collections_abcs() -> bool:
    """``collections.Mapping``/``Iterable``/... moved to ``collections.abc`` (removed in Python 3.10)."""
    done = False
    for name in ("Mapping", "MutableMapping", "Iterable", "Sequence", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
            done = True
    if done:
        APPLIED.add("collections.abc")
    return done


def shim_cuda_on_cpu() -> bool:
    """Upstream code calls ``.cuda()`` unconditionally: with no CUDA device, make tensor/module ``.cuda()``
    a no-op (and ``torch.cuda.manual_seed*`` already is one) so the same script runs on CPU."""
    if torch.cuda.is_available() or getattr(torch.Tensor.cuda, "_deqfusion_cpu", False):
        return False

    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    tensor_cuda._deqfusion_cpu = module_cuda._deqfusion_cpu = True
    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    APPLIED.add("cuda->cpu")
    return True


def split_fusion_options(options: dict | None) -> tuple[dict, float]:
    """``deqfusion run`` options -> (DEQFusion keyword arguments, Jacobian-term weight), checking the weight."""
    options = dict(options or {})
    options.pop("baseline", None)
    jac_weight = float(options.pop("jac_weight", 0.0))
    if jac_weight < 0:
        raise ValueError(f"jac_weight: must be >= 0, got {jac_weight}")
    return options, jac_weight


def is_baseline(options: dict | None) -> bool:
    """``-o baseline=True``: apply the shims only, keep the upstream's own fusion (the comparison run)."""
    return bool((options or {}).get("baseline", False))
