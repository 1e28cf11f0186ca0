"""Shims that let MMF 1.0.0rc10 (PyPI, 2020) import and train on today's Python, torch, transformers and
omegaconf. Nothing under site-packages is edited; every shim applies only when the thing it replaces is
really missing or broken (an MMF from git main on its own stack gets none of them).

:func:`install` arms them *before* ``import mmf``: the stand-ins and aliases rc10 imports at top level apply
when ``mmf`` is first imported (rc10's ``import mmf.common.registry`` imports every model); the others patch
an MMF module right after it has executed. One is a behaviour change, applied to both arms: rc10's trainer
hard-codes anomaly mode; it follows ``training.detect_anomaly`` (default false) as later MMF does.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
import textwrap
import types
import warnings
from pathlib import Path

from deqfusion_core.compat import restore, shim, swap, use, watch_imports

from . import common
from .common import missing

# rc10 ships no configs: the project's own, packaged with the MMF adapter
CONFIGS = Path(importlib.util.find_spec("deqfusion_adapters.mmf").origin).parent / "configs"
DEFAULTS = CONFIGS / "defaults.yaml"
DATASET_CONFIGS = CONFIGS / "datasets"


def install() -> None:
    """Make ``import mmf`` work on the current stack (idempotent): apply the shims when MMF imports."""
    watch_imports("mmf")


def before_mmf(reason: str, needed, name: str):
    """A shim applied when ``mmf`` is first imported, before it executes."""
    return shim("mmf", reason, needed=needed, name=name, module="mmf", before=True)


use("mmf", common.collections_aliases, module="mmf", before=True)   # rc10's logger: collections.Mapping


# -- applied before `import mmf` ---------------------------------------------------------------------------
@before_mmf("demjson (py2-era) does not install on Python 3.11: its maintained fork demjson3, same API",
            needed=lambda: missing("demjson") and not missing("demjson3"), name="demjson")
def demjson():
    sys.modules["demjson"] = importlib.import_module("demjson3")


TRANSFORMERS_MOVED = {  # transformers 4 moved these under transformers.models.*
    "transformers.modeling_bert": "transformers.models.bert.modeling_bert",
    "transformers.configuration_bert": "transformers.models.bert.configuration_bert",
    "transformers.configuration_auto": "transformers.models.auto.configuration_auto",
    "transformers.modeling_auto": "transformers.models.auto.modeling_auto",
    "transformers.tokenization_auto": "transformers.models.auto.tokenization_auto",
}


def _moved_modules() -> list[str]:
    if missing("transformers"):
        return []
    return [old for old, new in TRANSFORMERS_MOVED.items() if missing(old) and not missing(new)]


def alias_module(name: str, target: str, extras: dict | None = None) -> None:
    """sys.modules[name] forwards attribute access to ``target`` (imported on first use), plus ``extras``."""
    mod = types.ModuleType(name, f"deqfusion alias of {target}")

    def __getattr__(attr, _target=target):
        return getattr(importlib.import_module(_target), attr)

    mod.__getattr__ = __getattr__
    mod.__dict__.update(extras or {})
    sys.modules[name] = mod


@before_mmf("rc10 imports transformers 2.x module paths, moved in 4.x: aliases (BertLayerNorm was always torch's "
            "LayerNorm)", needed=lambda: bool(_moved_modules()), name="transformers_modules")
def transformers_modules():
    import torch

    for old in _moved_modules():
        extras = {"BertLayerNorm": torch.nn.LayerNorm} if old == "transformers.modeling_bert" else {}
        alias_module(old, TRANSFORMERS_MOVED[old], extras)


def _adamw_missing() -> bool:
    if missing("transformers"):
        return False
    import transformers.optimization as opt

    return not hasattr(opt, "AdamW")


@before_mmf("transformers 4.x removed its AdamW (rc10's `adam_w` optimizer): torch's AdamW, the same algorithm, "
            "with the old signature", needed=_adamw_missing, name="transformers_adamw")
def transformers_adamw():
    import torch
    import transformers.optimization as opt

    class AdamW(torch.optim.AdamW):
        """transformers' old AdamW signature (weight_decay 0.0 by default, ``correct_bias``) on torch's AdamW."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
            if not correct_bias:
                raise ValueError("correct_bias=False is not supported by torch.optim.AdamW")
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    opt.AdamW = AdamW


@before_mmf("torchtext has no build for current torch; rc10 only reads vocab.pretrained_aliases (GloVe "
            "downloads): a stand-in with none", needed=lambda: missing("torchtext"), name="torchtext")
def torchtext():
    common.stand_in(["torchtext"], "torchtext is not installed; it has no build for current torch",
                    "pretrained word vectors")
    vocab = types.ModuleType("torchtext.vocab", "stand-in: no pretrained vectors")
    vocab.pretrained_aliases = {}
    sys.modules["torchtext.vocab"] = vocab
    object.__setattr__(sys.modules["torchtext"], "vocab", vocab)


def _torchvision_unusable() -> str | None:
    if isinstance(sys.modules.get("torchvision"), common.Unavailable):
        return None
    if missing("torchvision"):
        return "torchvision is not installed"
    return common.import_error("torchvision")


@before_mmf("rc10 imports torchvision at top level (image loaders, ResNet encoders); absent, or built for another "
            "torch: stand-ins (PIL's RGB loader as the folder loader)", needed=lambda: bool(_torchvision_unusable()),
            name="torchvision")
def torchvision():
    reason = _torchvision_unusable()
    common.purge("torchvision")
    common.stand_in(["torchvision", "torchvision.datasets", "torchvision.datasets.folder", "torchvision.transforms",
                     "torchvision.models"], reason, "the image features that use it")
    # rc10's ImageDatabase uses folder.default_loader as a default argument at class definition.
    object.__setattr__(sys.modules["torchvision.datasets.folder"], "default_loader", pil_rgb_loader)


def pil_rgb_loader(path):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _pretty_missing() -> bool:
    from omegaconf import DictConfig

    return not hasattr(DictConfig, "pretty")


@before_mmf("omegaconf >= 2.1 removed DictConfig.pretty(), which rc10's trainers call to log the config",
            needed=_pretty_missing, name="dictconfig_pretty")
def dictconfig_pretty():
    from omegaconf import DictConfig, OmegaConf

    DictConfig.pretty = lambda self, resolve=False: OmegaConf.to_yaml(self, resolve=resolve)


# -- applied right after an MMF module executed ------------------------------------------------------------
def after(module: str, reason: str, needed, attr: tuple[str, str], name: str, **kwargs):
    """A shim that swaps ``attr`` = (object path in ``module``, attribute) when ``module`` has executed."""
    owner_path, attribute = attr

    def owner(module):
        obj = module
        for part in filter(None, owner_path.split(".")):
            obj = getattr(obj, part)
        return obj

    return shim("mmf", reason, needed=needed, undo=lambda module: restore(owner(module), attribute),
                name=name, module=module, **kwargs)


CONFIGURATION = "mmf.utils.configuration"


@after(CONFIGURATION, "rc10's sdist ships no configs/: the default config is the project's own defaults.yaml",
       needed=lambda module: not os.path.isfile(module.get_default_config_path()),
       attr=("", "get_default_config_path"), name="defaults_config")
def defaults_config(module):
    swap(module, "get_default_config_path", lambda: str(DEFAULTS))


def _env_resolver_missing() -> bool:
    from omegaconf import OmegaConf

    return not OmegaConf.has_resolver("env")


@after(CONFIGURATION, "omegaconf >= 2.1 dropped the legacy ${env:VAR,default} resolver (and rc10 clears resolvers "
       "each time): register it again", needed=_env_resolver_missing,
       attr=("Configuration", "_register_resolvers"), name="omegaconf_env_resolver")
def omegaconf_env_resolver(module):
    from omegaconf import OmegaConf

    original = module.Configuration._register_resolvers

    def _register_resolvers(self):
        original(self)
        if not OmegaConf.has_resolver("env"):
            with warnings.catch_warnings():  # omegaconf 2.4 flags register_new_resolver as deprecated
                warnings.simplefilter("ignore")
                OmegaConf.register_new_resolver("env", env_resolver)

    swap(module.Configuration, "_register_resolvers", _register_resolvers)


def env_resolver(name, default=None):
    value = os.environ.get(name)
    if value is not None:
        return value
    return "" if default is None else str(default).strip()


OPT_KEYS = ("config", "model", "dataset", "datasets")


def missing_key_raises() -> bool:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create({}).absent_key is not None
    except Exception:  # noqa: BLE001 - ConfigAttributeError (omegaconf >= 2.1)
        return True


@after(CONFIGURATION, "omegaconf >= 2.1 raises on a missing key where 2.0 returned None; rc10 reads config, model, "
       "dataset and datasets of the command-line options that way: they default to None",
       needed=missing_key_raises, attr=("Configuration", "_build_opt_list"), name="omegaconf_missing_opts")
def omegaconf_missing_opts(module):
    original = module.Configuration._build_opt_list

    def _build_opt_list(self, opts):
        config = original(self, opts)
        for key in OPT_KEYS:
            if key not in config:
                config[key] = None
        return config

    swap(module.Configuration, "_build_opt_list", _build_opt_list)


@after("mmf.datasets.base_dataset_builder", "rc10's build_dataset calls builder.update_registry_for_model, which "
       "BaseDatasetBuilder lacks: a no-op", needed=lambda module: not hasattr(module.BaseDatasetBuilder,
                                                                          "update_registry_for_model"),
       attr=("BaseDatasetBuilder", "update_registry_for_model"), name="builder_update_registry_for_model")
def builder_update_registry_for_model(module):
    swap(module.BaseDatasetBuilder, "update_registry_for_model", lambda self, config: None)


ANOMALY_ON = "torch.autograd.set_detect_anomaly(True)"
ANOMALY_FROM_CONFIG = 'torch.autograd.set_detect_anomaly(bool(self.config.training.get("detect_anomaly", False)))'


def _train_source(module):
    try:
        lines, first = inspect.getsourcelines(module.BaseTrainer.train)
    except (OSError, TypeError):  # no source to inspect: leave the trainer as it is
        return None, 0
    return textwrap.dedent("".join(lines)), first


@after("mmf.trainers.base_trainer", "rc10's BaseTrainer.train hard-codes anomaly mode (a debugging leftover that "
       "makes every backward several times slower); it follows training.detect_anomaly (default false) as later MMF "
       "does", needed=lambda module: (_train_source(module)[0] or "").count(ANOMALY_ON) == 1,
       attr=("BaseTrainer", "train"), name="trainer_detect_anomaly_from_config", behaviour_change=True)
def trainer_detect_anomaly_from_config(module):
    train = module.BaseTrainer.train
    source, first = _train_source(module)
    tree = ast.parse(source.replace(ANOMALY_ON, ANOMALY_FROM_CONFIG))
    ast.increment_lineno(tree, first - 1)  # tracebacks keep pointing at the installed file's lines
    namespace: dict = {}
    exec(compile(tree, inspect.getsourcefile(train), "exec"), module.__dict__, namespace)
    patched = namespace[train.__name__]
    patched.__qualname__, patched.__doc__ = train.__qualname__, train.__doc__
    swap(module.BaseTrainer, "train", patched)


def ships(relative: str) -> bool:
    """Whether the installed MMF package has this file (configs/... paths are relative to its root)."""
    from mmf.utils.general import get_mmf_root

    return os.path.isfile(os.path.join(get_mmf_root(), relative))


@after("mmf.datasets.mmf_dataset_builder", "rc10 ships no configs/zoo/datasets.yaml, so its builders' download step "
       "dies on the missing file: without a zoo, nothing is downloaded (the data must be under env.data_dir)",
       needed=lambda module: not ships(os.path.join("configs", "zoo", "datasets.yaml")),
       attr=("", "get_zoo_config"), name="dataset_zoo_missing")
def dataset_zoo_missing(module):
    original = module.get_zoo_config

    def get_zoo_config(key, *args, **kwargs):
        try:
            return original(key, *args, **kwargs)
        except FileNotFoundError as exc:
            warnings.warn(f"MMF's dataset zoo is missing ({exc.filename}): nothing is downloaded for {key!r}; "
                          f"its data must already be under env.data_dir (see deqfusion's docs/mmf.md)")
            return None, None

    swap(module, "get_zoo_config", get_zoo_config)


@after("mmf.datasets.builders.mmimdb.builder", "rc10 registers mmimdb but ships no configs/datasets/mmimdb/"
       "defaults.yaml: the project's own", needed=lambda module: not ships(module.MMIMDbBuilder.config_path()),
       attr=("MMIMDbBuilder", "config_path"), name="mmimdb_dataset_config")
def mmimdb_dataset_config(module):
    swap(module.MMIMDbBuilder, "config_path", classmethod(lambda cls: str(DATASET_CONFIGS / "mmimdb.yaml")))


def _macro_f1_single_label(module) -> bool:
    return not issubclass(module.MultiLabelMacroF1, module.MultiLabelF1)


@after("mmf.modules.metrics", "rc10's multilabel_macro_f1 derives from F1, not MultiLabelF1: it scored the argmax "
       "class of multi-hot targets; it scores them as multi-label", needed=_macro_f1_single_label,
       attr=("MultiLabelMacroF1", "__init__"), name="multilabel_macro_f1")
def multilabel_macro_f1(module):
    cls = module.MultiLabelMacroF1
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._multilabel = True

    swap(cls, "__init__", __init__)
