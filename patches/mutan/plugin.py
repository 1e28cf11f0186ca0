"""Mutan (Cadene/vqa.pytorch): DEQ fusion instead of Mutan's classifier fusion.

Patch points, in memory (the checkout's files are never edited):

- ``MutanAtt.__init__``: ``self.fusion_classif`` (MutanFusion, ``(x_v [B, dim_hv], x_q [B, dim_hq]) -> [B, dim_mm]``)
  becomes :class:`DEQMutanFusion` with the same call signature and output width.
- ``MutanNoAtt.__init__``: ``self.fusion`` (``(input_v [B, dim_v], input_q [B, dim_q]) -> [B, dim_mm]``) likewise.
- The Jacobian term reaches the engine's ``CrossEntropyLoss`` (a batch mean) without touching the engine: it is
  attached to the fused feature's backward with weight ``jac_weight``.

Conditional shims for the Python-2-era code (each applied only when the thing is broken today):
``vqa/lib/engine.py`` does not compile (``.cuda(async=True)``): it is loaded from its source with an in-memory
transform (``async=`` -> ``non_blocking=``, ``loss.data[0]``/``acc1[0]`` -> ``.item()``); ``utils.accuracy`` views a
non-contiguous tensor; ``yaml.load`` without Loader; ``collections.Iterable``; an unused ``torchvision`` import
that fails to load; ``.cuda()`` and ``torch.cuda.synchronize()`` without a GPU. Skip-thoughts come from PyPI's
``skipthoughts`` (the git submodule is not needed).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from deqfusion_core import Integration, hookimpl, prepend_sys_path, run_path_as_main
from deqfusion_patches import vqa_compat

SETTINGS: dict[str, Any] = {"fusion": {}, "jac_weight": 0.0}

# (old, new) source rewrites of vqa/lib/engine.py: Python 2 / torch 0.3 idioms -> today's
ENGINE_REWRITES = [("async=True", "non_blocking=True"), ("loss.data[0]", "loss.item()"),
                   ("acc1[0]", "acc1.item()"), ("acc5[0]", "acc5.item()")]   # 0-dim tensors today
UTILS_REWRITES = [("correct[:k].view(-1)", "correct[:k].reshape(-1)")]


def default_groups(dim: int) -> int:
    """GroupNorm groups for Mutan's widths (dim_mm is 510 = 2*3*5*17, which 4 does not divide)."""
    return next(g for g in (4, 5, 3, 2, 1) if dim % g == 0)


class DEQMutanFusion(nn.Module):
    """Same call as vqa.pytorch's MutanFusion: ``forward(x_v, x_q) -> [B, dim_mm]``, by DEQ fusion."""

    def __init__(self, dim_v: int, dim_q: int, dim_mm: int, jac_weight: float = 0.0, **deq_options: Any):
        super().__init__()
        from deqfusion_core import DEQFusion

        deq_options.setdefault("num_groups", default_groups(dim_mm))
        self.jac_weight = jac_weight
        self.deq = DEQFusion([dim_v, dim_q], dim_mm, **deq_options)

    def forward(self, x_v: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        from deqfusion_core.jacobian import attach_aux_loss

        fused, jac_loss, self.stats = self.deq([x_v, x_q])
        return attach_aux_loss(fused, jac_loss, self.jac_weight)


def deq_fusion(dim_v: int, dim_q: int, dim_mm: int) -> DEQMutanFusion:
    return DEQMutanFusion(dim_v, dim_q, dim_mm, jac_weight=SETTINGS["jac_weight"], **SETTINGS["fusion"])


def patch_models(att, noatt) -> None:
    mutan_att_init, mutan_noatt_init = att.MutanAtt.__init__, noatt.MutanNoAtt.__init__

    def att_init(self, opt={}, vocab_words=[], vocab_answers=[]):
        mutan_att_init(self, opt, vocab_words, vocab_answers)
        f = self.opt["fusion"]
        self.fusion_classif = deq_fusion(f["dim_hv"], f["dim_hq"], f["dim_mm"])

    def noatt_init(self, opt={}, vocab_words=[], vocab_answers=[]):
        mutan_noatt_init(self, opt, vocab_words, vocab_answers)
        self.fusion = deq_fusion(self.opt["dim_v"], self.opt["dim_q"], self.opt["fusion"]["dim_mm"])

    att.MutanAtt.__init__, noatt.MutanNoAtt.__init__ = att_init, noatt_init


# -- shims -----------------------------------------------------------------------------------------------
def load_rewritten(name: str, path: Path, rewrites: list[tuple[str, str]]) -> types.ModuleType:
    """Import module ``name`` from ``path``'s source with textual rewrites applied in memory (file untouched)."""
    source = path.read_text()
    for old, new in rewrites:
        source = source.replace(old, new)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    vqa_compat.APPLIED.add(name)
    return module


def compiles(path: Path) -> bool:
    try:
        compile(path.read_text(), str(path), "exec")
        return True
    except SyntaxError:
        return False


def accuracy_works(accuracy) -> bool:
    try:
        accuracy(torch.rand(3, 5), torch.tensor([0, 1, 2]), topk=(1, 2))
        return True
    except RuntimeError:
        return False


def shim_torchvision() -> bool:
    """vqa/models/utils.py imports torchvision.models without using it; a torchvision that does not match the
    installed torch fails at import: give that unused import an empty module."""
    try:
        import torchvision.models  # noqa: F401
        return False
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        tv, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
        tv.models = models
        sys.modules.update({"torchvision": tv, "torchvision.models": models})
        vqa_compat.APPLIED.add("torchvision")
        return True


def shim_cuda_synchronize() -> bool:
    """The engine calls torch.cuda.synchronize() after every step: a no-op without a GPU."""
    if torch.cuda.is_available() or getattr(torch.cuda.synchronize, "_deqfusion_cpu", False):
        return False

    def synchronize(*args, **kwargs):
        return None

    synchronize._deqfusion_cpu = True
    torch.cuda.synchronize = synchronize
    vqa_compat.APPLIED.add("torch.cuda.synchronize")
    return True


# -- the integration -------------------------------------------------------------------------------------
class MutanIntegration(Integration):
    name = "mutan"
    summary = "Mutan (vqa.pytorch): DEQ fusion instead of MutanAtt's classifier fusion / MutanNoAtt's fusion"
    env_var = "DEQFUSION_VQA_PYTORCH_ROOT"
    marker = "vqa/models/att.py"
    repository = "Cadene/vqa.pytorch"

    def apply(self, upstream, options: dict[str, Any] | None = None) -> None:
        SETTINGS["fusion"], SETTINGS["jac_weight"] = vqa_compat.split_fusion_options(options)
        if self.applied:
            return
        root = upstream.require().root
        vqa_compat.shim_yaml_load()          # train.py: yaml.load(handle)
        vqa_compat.shim_collections_abcs()   # vqa/lib/dataloader.py: collections.Iterable etc.
        vqa_compat.shim_cuda_on_cpu()        # engine and model factory: .cuda()
        shim_cuda_synchronize()
        shim_torchvision()
        with prepend_sys_path(root):
            import vqa.lib.utils as utils     # before the engine, which imports it
            if not accuracy_works(utils.accuracy):
                load_rewritten("vqa.lib.utils", root / "vqa" / "lib" / "utils.py", UTILS_REWRITES)
            engine_path = root / "vqa" / "lib" / "engine.py"
            if compiles(engine_path):
                import vqa.lib.engine  # noqa: F401
            else:
                load_rewritten("vqa.lib.engine", engine_path, ENGINE_REWRITES)
            from vqa.models import att, noatt
        if not vqa_compat.is_baseline(options):
            patch_models(att, noatt)
        self.applied = True

    def launch(self, upstream, argv: Sequence[str]) -> int:
        return run_path_as_main(upstream.root / "train.py", argv, cwd=upstream.root)


INTEGRATION = MutanIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
