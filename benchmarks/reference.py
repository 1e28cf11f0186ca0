"""Load the paper authors' reference DEQ fusion (jinhong-ni/DEQFusion) from a checkout, in memory, on CPU.

The checkout is given by ``DEQFUSION_REFERENCE_ROOT`` (or a path). Its files are never copied: the
three modules are read, minimally transformed so that they run on today's torch and without CUDA,
and executed as in-memory modules:

- ``torch.solve(B, A)`` (removed from torch) -> ``torch.linalg.solve(A, B)`` (arguments swapped);
- ``.cuda()`` -> ``.to(<the input's device>)`` is unnecessary here: the zeros it makes are moved to the
  fusion feature's device instead; ``torch.cuda.synchronize()`` -> no-op when CUDA is absent;
- its ``print`` of the step count on every forward is silenced;
- ``termcolor`` (imported, used only in a debugging helper) is stubbed when not installed.
"""
from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

from deqfusion_core.process import provided

ENV = "DEQFUSION_REFERENCE_ROOT"


def reference_root(path: str | os.PathLike | None = None) -> Path | None:
    path = path or os.environ.get(ENV)
    if not path:
        return None
    root = Path(path).expanduser()
    if not (root / "DEQ_fusion.py").is_file():
        raise FileNotFoundError(f"{ENV}={root}: no DEQ_fusion.py there (expected a jinhong-ni/DEQFusion checkout)")
    return root


def _transform(src: str) -> str:
    src = src.replace("torch.solve(y[:,:n+1], H[:,:n+1,:n+1])[0]", "torch.linalg.solve(H[:,:n+1,:n+1], y[:,:n+1])")
    src = src.replace(".cuda()", ".to(fusion_feature.device)")
    src = src.replace("torch.cuda.synchronize()", "(torch.cuda.synchronize() if torch.cuda.is_available() else None)")
    src = re.sub(r"^(\s*)print\(", r"\1_quiet_print(", src, flags=re.M)
    return "_quiet_print = lambda *a, **k: None\n" + src


def load_reference(path: str | os.PathLike | None = None) -> types.ModuleType:
    """Return the reference's DEQ_fusion module (with ``DEQFusion``), loaded in memory."""
    root = reference_root(path)
    if root is None:
        raise FileNotFoundError(f"set {ENV} to a checkout of jinhong-ni/DEQFusion")
    if "termcolor" not in sys.modules:
        try:
            import termcolor  # noqa: F401
        except ImportError:  # only a debugging helper of the reference uses it
            sys.modules["termcolor"] = types.SimpleNamespace(colored=lambda text, *a, **k: text)
    helpers = {name: _exec_transformed(root, name) for name in ("solver", "jacobian")}
    with provided(helpers):  # DEQ_fusion does `from solver import ...`
        return _exec_transformed(root, "DEQ_fusion")


def _exec_transformed(root: Path, name: str) -> types.ModuleType:
    mod = types.ModuleType(f"deqfusion_reference.{name}")
    mod.__file__ = str(root / f"{name}.py")
    exec(compile(_transform((root / f"{name}.py").read_text()), mod.__file__, "exec"), mod.__dict__)
    return mod


def matching_parameters(ours, ref) -> list[tuple[str, object, list]]:
    """(name, our parameter, the reference's parameters) for each of ``ours.named_parameters()``.

    Our layout: ``blocks[i].{lin1,lin2,gn1,gn2,gn3}``, ``fusion.{gate,fuse,gn}``, ``weights`` (one
    vector; the reference has N scalar parameters) and ``bias``.
    """
    n = ours.num_modalities
    theirs = {"weights": list(ref.weights), "bias": [ref.bias]}
    block_names = {"lin1": "conv1", "lin2": "conv2", "gn1": "gn1", "gn2": "gn2", "gn3": "gn3"}
    for i in range(n):
        for mine, their in block_names.items():
            for kind in ("weight", "bias"):
                theirs[f"blocks.{i}.{mine}.{kind}"] = [getattr(getattr(ref.func_.branches[i], their), kind)]
    for mine, their in (("gate", "gate"), ("fuse", "fuse"), ("gn", "gn3")):
        for kind in ("weight", "bias"):
            theirs[f"fusion.{mine}.{kind}"] = [getattr(getattr(ref.func_.branches[n], their), kind)]
    return [(name, p, theirs[name]) for name, p in ours.named_parameters()]


def copy_weights_to_reference(ours, ref) -> None:
    """Give the reference module exactly our parameters."""
    import torch

    with torch.no_grad():
        for _, mine, theirs in matching_parameters(ours, ref):
            torch.nn.utils.vector_to_parameters(mine.detach().flatten().clone(), theirs)


def reference_grads(ours, ref):
    """The reference's parameter gradients, flattened in the order of ``ours.parameters()``."""
    import torch

    return torch.cat([p.grad.flatten() for _, _, theirs in matching_parameters(ours, ref) for p in theirs])
