"""Conditional shims that let MMF 1.0.0rc10 (PyPI, 2020) import and train on today's Python, torch,
transformers and omegaconf. Nothing under site-packages is edited: every shim is applied in memory,
and only when the thing it replaces is really missing or broken (an MMF from git main on its own
stack gets none of them). ``install()`` puts an import hook in place *before* ``import mmf``:

* pre-import shims (module aliases and stand-ins that rc10 imports at top level) are applied when
  ``mmf`` is first imported, because rc10's ``import mmf.common.registry`` imports every model;
* post-import shims patch an MMF module right after it has executed (``POST_IMPORT``).

``applied`` lists the names of the shims that were applied in this process.
"""
from __future__ import annotations

import ast
import collections
import collections.abc
import importlib
import importlib.abc
import importlib.util
import inspect
import os
import sys
import textwrap
import types
import warnings
from pathlib import Path

DEFAULTS = Path(__file__).parent / "configs" / "defaults.yaml"
applied: list[str] = []


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package that is itself missing
        return True


def _alias_module(name: str, target: str, extras: dict | None = None) -> None:
    """sys.modules[name] forwards attribute access to ``target`` (imported on first use), plus ``extras``."""
    mod = types.ModuleType(name, f"deqfusion alias of {target}")

    def __getattr__(attr, _target=target):
        return getattr(importlib.import_module(_target), attr)

    mod.__getattr__ = __getattr__
    mod.__dict__.update(extras or {})
    sys.modules[name] = mod


class _Unavailable(types.ModuleType):
    """Stand-in for a package that cannot be imported: importing works, using it says why not."""

    def __init__(self, name: str, reason: str):
        super().__init__(name, f"stand-in for {name}: {reason}")
        self.__reason = reason
        self.__path__ = []  # a package, so that `import name.sub` finds the stand-in submodules

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise ImportError(f"{self.__name__}.{attr} is unavailable ({self.__reason}); MMF needs it only for the "
                          f"features that use it")


def _stand_in(names: list[str], reason: str) -> None:
    for name in names:
        sys.modules[name] = _Unavailable(name, reason)
    for name in names:  # parent.child attributes, for `import a.b.c as x`
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            object.__setattr__(sys.modules[parent], child, sys.modules[name])


# -- shims applied before `import mmf` ---------------------------------------------------------------------
def shim_collections_aliases() -> bool:
    # Python 3.10 removed collections.Mapping & co.; rc10's logger uses collections.Mapping.
    if hasattr(collections, "Mapping"):
        return False
    for name in ("Mapping", "MutableMapping", "Sequence", "Iterable", "Callable"):
        setattr(collections, name, getattr(collections.abc, name))
    return True


def shim_demjson() -> bool:
    # demjson (py2-era) does not install on Python 3.11; demjson3 is its maintained fork, same API.
    if not _missing("demjson") or _missing("demjson3"):
        return False
    sys.modules["demjson"] = importlib.import_module("demjson3")
    return True


TRANSFORMERS_MOVED = {  # transformers 4 moved these under transformers.models.*
    "transformers.modeling_bert": "transformers.models.bert.modeling_bert",
    "transformers.configuration_bert": "transformers.models.bert.configuration_bert",
    "transformers.configuration_auto": "transformers.models.auto.configuration_auto",
    "transformers.modeling_auto": "transformers.models.auto.modeling_auto",
    "transformers.tokenization_auto": "transformers.models.auto.tokenization_auto",
}


def shim_transformers_modules() -> bool:
    # rc10 imports transformers 2.x module paths, moved in 4.x; BertLayerNorm was always torch's LayerNorm.
    if _missing("transformers"):
        return False
    done = False
    for old, new in TRANSFORMERS_MOVED.items():
        if _missing(old) and not _missing(new):
            extras = {}
            if old == "transformers.modeling_bert":
                import torch

                extras["BertLayerNorm"] = torch.nn.LayerNorm
            _alias_module(old, new, extras)
            done = True
    return done


def shim_transformers_adamw() -> bool:
    # transformers 4.x removed its AdamW (rc10's `adam_w` optimizer); torch's AdamW is the same algorithm.
    if _missing("transformers"):
        return False
    import transformers.optimization as opt

    if hasattr(opt, "AdamW"):
        return False
    import torch

    class AdamW(torch.optim.AdamW):
        """transformers' old AdamW signature (weight_decay 0.0 by default, ``correct_bias``) on torch's AdamW."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
            if not correct_bias:
                raise ValueError("correct_bias=False is not supported by torch.optim.AdamW")
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    opt.AdamW = AdamW
    return True


def shim_torchtext() -> bool:
    # torchtext has no build for current torch; rc10 only reads vocab.pretrained_aliases (GloVe downloads).
    if not _missing("torchtext"):
        return False
    _stand_in(["torchtext"], "torchtext is not installed; it has no build for current torch")
    vocab = types.ModuleType("torchtext.vocab", "stand-in: no pretrained vectors")
    vocab.pretrained_aliases = {}
    sys.modules["torchtext.vocab"] = vocab
    object.__setattr__(sys.modules["torchtext"], "vocab", vocab)
    return True


def shim_torchvision() -> bool:
    # rc10 imports torchvision at top level (image loaders, ResNet encoders); it may be absent, or a build
    # for another torch whose C ops fail to load (PyPI's CUDA wheel beside the CPU torch).
    if "torchvision" in sys.modules and not isinstance(sys.modules["torchvision"], _Unavailable):
        return False
    if _missing("torchvision"):
        reason = "torchvision is not installed"
    else:
        try:
            importlib.import_module("torchvision")
            return False
        except Exception as exc:  # noqa: BLE001 - any import failure means unusable
            reason = f"import torchvision failed: {type(exc).__name__}: {exc}"
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    _stand_in(["torchvision", "torchvision.datasets", "torchvision.datasets.folder", "torchvision.transforms",
               "torchvision.models"], reason)
    # rc10's ImageDatabase uses folder.default_loader as a default argument at class definition.
    object.__setattr__(sys.modules["torchvision.datasets.folder"], "default_loader", _pil_rgb_loader)
    return True


def _pil_rgb_loader(path):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


PRE_IMPORT = [shim_collections_aliases, shim_demjson, shim_transformers_modules, shim_transformers_adamw,
              shim_torchtext, shim_torchvision]


# -- shims applied right after an MMF module executed --------------------------------------------------------
def patch_configuration(mod) -> list[str]:
    done = []
    # rc10's sdist ships no configs/: point the default config at the project's own defaults.
    if not os.path.isfile(mod.get_default_config_path()):
        mod.get_default_config_path = lambda: str(DEFAULTS)
        done.append("defaults_config")
    # omegaconf >= 2.1 dropped the legacy `${env:VAR,default}` resolver, and rc10 clears resolvers each time.
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("env"):
        original = mod.Configuration._register_resolvers

        def _register_resolvers(self):
            original(self)
            if not OmegaConf.has_resolver("env"):
                with warnings.catch_warnings():  # omegaconf 2.4 flags register_new_resolver as deprecated
                    warnings.simplefilter("ignore")
                    OmegaConf.register_new_resolver("env", _env_resolver)

        mod.Configuration._register_resolvers = _register_resolvers
        done.append("omegaconf_env_resolver")
    # omegaconf >= 2.1 raises on a missing key where 2.0 returned None; rc10 reads `config`, `model`, `dataset`
    # and `datasets` of the command-line options that way.
    if _missing_key_raises():
        original_opts = mod.Configuration._build_opt_list

        def _build_opt_list(self, opts):
            config = original_opts(self, opts)
            for key in OPT_KEYS:
                if key not in config:
                    config[key] = None
            return config

        mod.Configuration._build_opt_list = _build_opt_list
        done.append("omegaconf_missing_opts")
    return done


OPT_KEYS = ("config", "model", "dataset", "datasets")


def _missing_key_raises() -> bool:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create({}).absent_key is not None
    except Exception:  # noqa: BLE001 - ConfigAttributeError (omegaconf >= 2.1)
        return True


def _env_resolver(name, default=None):
    value = os.environ.get(name)
    if value is not None:
        return value
    return "" if default is None else str(default).strip()


def patch_dataset_builder(mod) -> list[str]:
    # rc10's build_dataset calls builder.update_registry_for_model, which BaseDatasetBuilder lacks.
    if hasattr(mod.BaseDatasetBuilder, "update_registry_for_model"):
        return []
    mod.BaseDatasetBuilder.update_registry_for_model = lambda self, config: None
    return ["builder_update_registry_for_model"]


def patch_dictconfig_pretty() -> bool:
    # omegaconf >= 2.1 removed DictConfig.pretty(), which rc10's trainers call to log the config.
    from omegaconf import DictConfig, OmegaConf

    if hasattr(DictConfig, "pretty"):
        return False
    DictConfig.pretty = lambda self, resolve=False: OmegaConf.to_yaml(self, resolve=resolve)
    return True


ANOMALY_ON = "torch.autograd.set_detect_anomaly(True)"
ANOMALY_FROM_CONFIG = 'torch.autograd.set_detect_anomaly(bool(self.config.training.get("detect_anomaly", False)))'


def patch_trainer_anomaly(mod) -> list[str]:
    # rc10's BaseTrainer.train hard-codes anomaly mode (a debugging leftover that makes every backward, and a
    # DEQ's many VJPs, several times slower); later MMF reads `training.detect_anomaly` (default false), so do we.
    train = mod.BaseTrainer.train
    try:
        lines, first = inspect.getsourcelines(train)
    except (OSError, TypeError):  # no source to inspect: leave the trainer as it is
        return []
    source = textwrap.dedent("".join(lines))
    if source.count(ANOMALY_ON) != 1:
        return []
    tree = ast.parse(source.replace(ANOMALY_ON, ANOMALY_FROM_CONFIG))
    ast.increment_lineno(tree, first - 1)  # tracebacks keep pointing at the installed file's lines
    namespace: dict = {}
    exec(compile(tree, inspect.getsourcefile(train), "exec"), mod.__dict__, namespace)
    patched = namespace[train.__name__]
    patched.__qualname__, patched.__doc__ = train.__qualname__, train.__doc__
    mod.BaseTrainer.train = patched
    return ["trainer_detect_anomaly_from_config"]


DATASET_CONFIGS = Path(__file__).parent / "configs" / "datasets"


def _ships(relative: str) -> bool:
    """Whether the installed MMF package has this file (configs/... paths are relative to its root)."""
    from mmf.utils.general import get_mmf_root

    return os.path.isfile(os.path.join(get_mmf_root(), relative))


def patch_mmimdb_builder(mod) -> list[str]:
    # rc10 registers `mmimdb` but ships no configs/datasets/mmimdb/defaults.yaml: use the project's own.
    builder = mod.MMIMDbBuilder
    if _ships(builder.config_path()):
        return []
    builder.config_path = classmethod(lambda cls: str(DATASET_CONFIGS / "mmimdb.yaml"))
    return ["mmimdb_dataset_config"]


def patch_dataset_zoo(mod) -> list[str]:
    # rc10 ships no configs/zoo/datasets.yaml, so its builders' download step dies on the missing file; without a
    # zoo there is nothing to download: say so and go on with the data the user brought (docs/mmf.md).
    if _ships(os.path.join("configs", "zoo", "datasets.yaml")):
        return []
    original = mod.get_zoo_config

    def get_zoo_config(key, *args, **kwargs):
        try:
            return original(key, *args, **kwargs)
        except FileNotFoundError as exc:
            warnings.warn(f"MMF's dataset zoo is missing ({exc.filename}): nothing is downloaded for {key!r}; "
                          f"its data must already be under env.data_dir (see deqfusion's docs/mmf.md)")
            return None, None

    mod.get_zoo_config = get_zoo_config
    return ["dataset_zoo_missing"]


def patch_multilabel_macro_f1(mod) -> list[str]:
    # rc10's multilabel_macro_f1 derives from F1, not MultiLabelF1: it scores the argmax class of multi-hot targets.
    cls = mod.MultiLabelMacroF1
    if issubclass(cls, mod.MultiLabelF1):
        return []
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._multilabel = True

    cls.__init__ = __init__
    return ["multilabel_macro_f1"]


POST_IMPORT = {"mmf.utils.configuration": patch_configuration,
               "mmf.datasets.base_dataset_builder": patch_dataset_builder,
               "mmf.trainers.base_trainer": patch_trainer_anomaly,
               "mmf.datasets.mmf_dataset_builder": patch_dataset_zoo,
               "mmf.datasets.builders.mmimdb.builder": patch_mmimdb_builder,
               "mmf.modules.metrics": patch_multilabel_macro_f1}


class _Hook(importlib.abc.MetaPathFinder):
    """Applies PRE_IMPORT on the first `import mmf` and POST_IMPORT after each listed module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "mmf":
            apply_pre_import()
        if fullname not in POST_IMPORT:
            return None
        spec = _find_without(self, fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, POST_IMPORT[fullname]

        class PatchingLoader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                _patched.add(fullname)
                applied.extend(patch(module))

        spec.loader = PatchingLoader()
        return spec


def _find_without(hook, fullname, path, target):
    for finder in sys.meta_path:
        if finder is hook or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


_hook = _Hook()


def apply_pre_import() -> None:
    for shim in PRE_IMPORT:
        name = shim.__name__.removeprefix("shim_")
        if name not in applied and shim():
            applied.append(name)
    if "dictconfig_pretty" not in applied and patch_dictconfig_pretty():
        applied.append("dictconfig_pretty")


def install() -> list[str]:
    """Make `import mmf` work on the current stack (idempotent). Returns the shims applied so far."""
    if "mmf" in sys.modules:  # imported before us: patch what already executed
        apply_pre_import()
        for name, patch in POST_IMPORT.items():
            if name in sys.modules and name not in _patched:
                _patched.add(name)
                applied.extend(patch(sys.modules[name]))
        return list(applied)
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    return list(applied)


_patched: set[str] = set()
