"""Shims that let MMF from git main (installed from a source checkout, pinned to torch 1.11, transformers <= 4.10,
pytorch-lightning 1.6) import and train on today's Python 3.11, torch, torchvision, transformers and Lightning 2.

Measured on a checkout of main (b0ffc7f, 2026-07-07) with torch 2.13.0 CPU, torchvision 0.28, transformers 5.24,
omegaconf 2.4, pytorch-lightning 2.6: each shim below is one thing that breaks without it (docs/mmf.md has the
table); none of rc10's shims (``deqfusion_compat.mmf_rc10``) is needed by main. MMF main's ``mmf_run`` imports
every trainer, dataset and model module before it reads a config, so an import-time break in any of them
(charades' video reader, the Lightning trainer's callbacks) stops every run.

:func:`install` arms them before ``import mmf`` (idempotent). ``DEQFUSION_MMF_SHIMS_OFF=name,name`` leaves the
named ones out, to measure what breaks without them.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import types

from deqfusion_core.compat import shim, swap, watch_imports

from .common import missing

UPSTREAM = "mmf-main"
OFF_VARIABLE = "DEQFUSION_MMF_SHIMS_OFF"


def install() -> None:
    """Apply the needed shims when ``mmf`` is first imported (now, if it already is)."""
    watch_imports(UPSTREAM)


def switched_off(name: str) -> bool:
    return name in {n.strip() for n in os.environ.get(OFF_VARIABLE, "").split(",")}


def before_mmf(reason: str, needed, name: str):
    """A shim applied when ``mmf`` is first imported, before it executes."""
    return shim(UPSTREAM, reason, needed=lambda: not switched_off(name) and needed(), name=name, module="mmf",
                before=True)


def after(module: str, reason: str, needed, name: str):
    """A shim applied right after ``module`` (an MMF module) executed; ``needed`` and the shim get the module."""
    return shim(UPSTREAM, reason, needed=lambda module: not switched_off(name) and needed(module), name=name,
                module=module)


# -- applied before `import mmf` ---------------------------------------------------------------------------
@before_mmf("torchtext has no build for torch >= 2.4 (its last release pairs with 2.3); main's mmf.utils.vocab "
            "imports it at top level and reads only vocab.pretrained_aliases (GloVe downloads): a stand-in with none",
            needed=lambda: missing("torchtext"), name="torchtext")
def torchtext():
    package = _module("torchtext", "deqfusion stand-in: torchtext has no build for current torch", package=True)
    package.vocab = _module("torchtext.vocab", "deqfusion stand-in: no pretrained vectors")
    package.vocab.pretrained_aliases = {}


def _module(name: str, doc: str, package: bool = False) -> types.ModuleType:
    """An empty module in sys.modules with a real ``__spec__`` (transformers and Lightning call find_spec on it)."""
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    sys.modules[name] = module
    return module


@before_mmf("torchaudio has no build for current torch (its last release pairs with 2.11); main's torchvision_transforms "
            "processor looks a transform up in torchaudio.transforms before its own registry (GrayScaleTo3Channels, "
            "in its image recipes): a stand-in with no transforms, so the lookup goes on", needed=lambda: missing(
                "torchaudio"), name="torchaudio")
def torchaudio():
    package = _module("torchaudio", "deqfusion stand-in: torchaudio has no build for current torch", package=True)
    package.transforms = _module("torchaudio.transforms", "deqfusion stand-in: no audio transforms")


TORCHVISION_OPS = ("nms", "qnms")   # the ops torchvision registers fake kernels for without checking its C library
_torchvision_schemas = None          # the torch.library.Library that holds their schemas (freed = undefined)


def _torchvision_c_ops_missing() -> bool:
    if "torchvision" in sys.modules or missing("torchvision"):
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as exc:
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
        return bool(re.search(r"operator torchvision::\w+ does not exist", str(exc)))


@before_mmf("torchvision's C ops do not load (PyPI's wheel is built against CUDA torch, here beside the CPU torch) "
            "and `import torchvision` then dies registering fake nms/qnms kernels: declare those two schemas so its "
            "pure-Python transforms and models import; its ops keep raising torchvision's own error",
            needed=_torchvision_c_ops_missing, name="torchvision_ops")
def torchvision_ops():
    global _torchvision_schemas
    import torch

    _torchvision_schemas = torch.library.Library("torchvision", "DEF")
    for op in TORCHVISION_OPS:
        _torchvision_schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _read_video_missing() -> bool:
    if missing("torchvision"):
        return False
    try:
        import torchvision.io
    except Exception:  # noqa: BLE001 - an unusable torchvision: nothing to add a function to
        return False
    return not hasattr(torchvision.io, "read_video")


@before_mmf("torchvision >= 0.24 removed read_video (video decoding moved to TorchCodec); main's charades builder "
            "imports it at top level: a read_video that says so when called",
            needed=_read_video_missing, name="torchvision_read_video")
def torchvision_read_video():
    import torchvision.io

    def read_video(*args, **kwargs):
        raise ImportError("torchvision.io.read_video was removed in torchvision 0.24 (video decoding moved to "
                          "TorchCodec); MMF main's video datasets (charades) need an older torchvision")

    torchvision.io.read_video = read_video


@before_mmf("demjson (py2-era) does not install on Python 3.11; main imports it only for --config_override: its "
            "maintained fork demjson3, same API", needed=lambda: missing("demjson") and not missing("demjson3"),
            name="demjson")
def demjson():
    sys.modules["demjson"] = importlib.import_module("demjson3")


def _callbacks_base_missing() -> bool:
    return not missing("pytorch_lightning") and missing("pytorch_lightning.callbacks.base")


@before_mmf("Lightning 2 removed pytorch_lightning.callbacks.base (Callback lives in pytorch_lightning.callbacks); "
            "main's Lightning trainer imports it, and mmf_run imports every trainer: an alias",
            needed=_callbacks_base_missing, name="lightning_callbacks_base")
def lightning_callbacks_base():
    import pytorch_lightning.callbacks as callbacks

    alias = _module("pytorch_lightning.callbacks.base", "deqfusion alias: Lightning 1.x's callbacks.base")
    alias.Callback = callbacks.Callback
    callbacks.base = alias


def _eager_transformers_patch(module=None) -> bool:
    """MMF's patch_transformers imports every module of every model of transformers >= 4 (its `models`)."""
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, "models") and (module is None or hasattr(module, "patch_transformers"))


@after("mmf.utils.patch", "main's patch_transformers imports every module of every transformers model to alias the "
       "pre-4.0 paths (transformers.modeling_bert, ...): ~400 models in transformers 5, 27 s at each start on 2 "
       "cores; the same aliases, each resolved when first imported (speed only: the same modules result)",
       needed=_eager_transformers_patch, name="transformers_lazy_aliases")
def transformers_lazy_aliases(module):
    def patch_transformers(log_incompatible=False):
        import transformers

        if transformers.__spec__ is None:  # as MMF's own: Lightning calls find_spec on it
            transformers.__spec__ = "MISSING"
        if _TransformersAliases not in map(type, sys.meta_path):
            sys.meta_path.append(_TransformersAliases(os.path.dirname(transformers.models.__file__)))

    swap(module, "patch_transformers", patch_transformers)


class _TransformersAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``transformers.<name>`` -> ``transformers.models.<model>.<name>`` (the pre-4.0 layout), on first import."""

    def __init__(self, models_dir: str):
        self.models_dir = models_dir

    @functools.cached_property
    def index(self) -> dict[str, str]:
        out = {}
        for model in sorted(os.listdir(self.models_dir)):
            folder = os.path.join(self.models_dir, model)
            if os.path.isfile(os.path.join(folder, "__init__.py")):
                for file in os.listdir(folder):
                    if file.endswith(".py") and not file.startswith("_"):
                        out.setdefault(file[:-3], f"transformers.models.{model}.{file[:-3]}")
        return out

    def find_spec(self, fullname, path, target=None):
        head, _, name = fullname.rpartition(".")
        if head != "transformers" or name not in self.index:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self.index[spec.name.rpartition(".")[2]])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.specs[module.__name__]  # importlib gave the real module the alias's spec

    specs: dict = {}


# -- Lightning 2 under main's Lightning trainer (written for Lightning 1.6) -----------------------------------
def _trainer_takes_v1_arguments() -> bool:
    from pytorch_lightning import Trainer

    return "resume_from_checkpoint" in inspect.signature(Trainer.__init__).parameters


@after("mmf.trainers.lightning_trainer", "Lightning 2 removed Trainer(resume_from_checkpoint=, gpus=), which main's "
       "Lightning trainer passes (gpus from trainer.params): the checkpoint goes to fit(ckpt_path=), gpus to "
       "accelerator/devices", needed=lambda module: not missing("pytorch_lightning") and not _trainer_takes_v1_arguments(),
       name="lightning_trainer_arguments")
def lightning_trainer_arguments(module):
    swap(module, "Trainer", _lightning_v1_trainer(module.Trainer))


def _lightning_v1_trainer(base):
    class Trainer(base):
        """Lightning 2's Trainer taking Lightning 1.6's ``resume_from_checkpoint`` and ``gpus``."""

        def __init__(self, *args, resume_from_checkpoint=None, gpus=None, **kwargs):
            if gpus is not None and "accelerator" not in kwargs and "devices" not in kwargs:
                kwargs["accelerator"], kwargs["devices"] = ("gpu", gpus) if gpus else ("cpu", "auto")
            super().__init__(*args, **kwargs)
            self._deqfusion_resume = resume_from_checkpoint

        def fit(self, *args, ckpt_path=None, **kwargs):
            return super().fit(*args, ckpt_path=ckpt_path or self._deqfusion_resume, **kwargs)

    Trainer.__qualname__ = Trainer.__name__ = base.__name__
    return Trainer


def _batch_end_without_dataloader_idx() -> bool:
    from pytorch_lightning import Callback

    return "dataloader_idx" not in inspect.signature(Callback.on_train_batch_end).parameters


LOOP_CALLBACKS = {"mmf.trainers.lightning_core.loop_callback": "LightningLoopCallback",
                  "mmf.trainers.lightning_core.loop_callback_with_torchmetrics": "LightningTorchMetricsCallback"}


def _default_dataloader_idx(module):
    cls = getattr(module, LOOP_CALLBACKS[module.__name__])
    for hook in ("on_train_batch_end", "on_validation_batch_end"):
        original = vars(cls).get(hook)
        params = inspect.signature(original).parameters if original else {}
        if "dataloader_idx" in params and params["dataloader_idx"].default is inspect.Parameter.empty:
            swap(cls, hook, _with_default_dataloader_idx(original))


def _with_default_dataloader_idx(hook):
    @functools.wraps(hook)
    def wrapper(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        return hook(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    return wrapper


for _module_name in LOOP_CALLBACKS:
    after(_module_name, "Lightning 2 calls on_train_batch_end without dataloader_idx, which main's loop callbacks "
          "require: it defaults to 0 (one train loader)", needed=lambda module: not missing("pytorch_lightning")
          and _batch_end_without_dataloader_idx(),
          name="lightning_dataloader_idx" + ("" if _module_name.endswith("loop_callback") else "_torchmetrics"),
          )(_default_dataloader_idx)
