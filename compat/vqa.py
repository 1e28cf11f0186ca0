"""Shims of the VQA codebases: MCAN (MILVLG/mcan-vqa), Mutan (Cadene/vqa.pytorch) and block.bootstrap.pytorch.
Each applies only when the thing it fixes is broken on the running stack; nothing edits a file."""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np

from deqfusion_core.compat import restore, shim, swap, use
from deqfusion_core.process import prepend_sys_path

from . import common

use("mcan", common.yaml_load, common.cuda_on_cpu)            # run.py: yaml.load(f); core/exec.py: .cuda()
use("mutan", common.yaml_load, common.collections_aliases, common.cuda_on_cpu)
use("block", common.yaml_load, common.collections_aliases)   # bootstrap 0.0.13's Options

GLOVE_ENV = "DEQFUSION_GLOVE"


# -- MCAN ------------------------------------------------------------------------------------------------
def spacy_vectors_missing() -> bool:
    return "en_vectors_web_lg" not in sys.modules and importlib.util.find_spec("en_vectors_web_lg") is None


def read_glove(path: str | os.PathLike, words: set[str]) -> tuple[dict[str, np.ndarray], int]:
    """Vectors of ``words`` from a GloVe text file (``word v1 ... vD`` per line), in one streaming pass."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file ({GLOVE_ENV} / -o glove=PATH): {path} does not exist")
    vectors: dict[str, np.ndarray] = {}
    width = None
    with open(path, encoding="utf8", errors="replace") as f:
        for line in f:
            parts = line.rstrip().split(" ")
            if width is None:
                width = len(parts) - 1
            if len(parts) - 1 != width:     # glove.840B has a few words containing spaces
                continue
            if parts[0] in words and parts[0] not in vectors:
                vectors[parts[0]] = np.asarray(parts[1:], dtype=np.float32)
    if not width:
        raise ValueError(f"GloVe file {path} is empty")
    return vectors, width


def _mcan_data_modules(root):
    with prepend_sys_path(root):
        from core.data import data_utils, load_data
    return data_utils, load_data


def _glove_undo(root):
    for module in _mcan_data_modules(root):
        restore(module, "tokenize")
    if getattr(sys.modules.get("en_vectors_web_lg"), "_deqfusion", False):
        del sys.modules["en_vectors_web_lg"]


@shim("mcan", "spaCy 2's en_vectors_web_lg (GloVe) cannot be installed today: the vocabulary is built without it, "
      "then the vectors are read from the GloVe text file the user names", needed=spacy_vectors_missing,
      undo=_glove_undo, name="en_vectors_web_lg")
def glove_vectors(root, glove=None):
    stub = types.ModuleType("en_vectors_web_lg")   # core/data/data_utils.py imports it at the top

    def load(*args, **kwargs):
        raise RuntimeError(f"en_vectors_web_lg is not installed; deqfusion reads GloVe vectors from {GLOVE_ENV}")

    stub.load, stub._deqfusion = load, True
    sys.modules["en_vectors_web_lg"] = stub
    data_utils, load_data = _mcan_data_modules(root)
    upstream_tokenize = data_utils.tokenize

    def tokenize(stat_ques_list, use_glove):
        token_to_ix, pretrained_emb = upstream_tokenize(stat_ques_list, False)
        if not use_glove:
            return token_to_ix, pretrained_emb
        path = glove or os.environ.get(GLOVE_ENV)
        if not path:
            raise RuntimeError(f"MCAN uses GloVe word vectors (USE_GLOVE) and spaCy's en_vectors_web_lg is not "
                               f"installed: name a GloVe text file (e.g. glove.840B.300d.txt) with {GLOVE_ENV}=PATH "
                               "or `deqfusion run mcan -o glove=PATH`")
        vectors, width = read_glove(path, set(token_to_ix))
        words = sorted(token_to_ix, key=token_to_ix.get)
        emb = np.stack([vectors.get(w, np.zeros(width, np.float32)) for w in words])
        print(f"== GloVe vectors from {path}: {len(vectors)}/{len(words)} words found, width {width}")
        return token_to_ix, emb

    swap(data_utils, "tokenize", tokenize)
    swap(load_data, "tokenize", tokenize)


def _cfgs(root):
    with prepend_sys_path(root):
        from cfgs.base_cfgs import Cfgs
    return Cfgs


def paths_ignored(root) -> bool:
    """Whether the upstream's ``add_args`` leaves the derived paths on the defaults (``init_path()`` runs in
    ``__init__``, before the arguments)."""
    Cfgs, recomputed = _cfgs(root), []
    probe = Cfgs.__new__(Cfgs)
    probe.__dict__.update(DATASET_PATH="a/", FEATURE_PATH="a/", IMG_FEAT_PATH={"train": "a/train2014/"},
                          QUESTION_PATH={"train": "a/questions.json"})
    probe.init_path = lambda: recomputed.append(True)    # (the real one creates folders in the cwd)
    Cfgs.add_args(probe, {"DATASET_PATH": "b/", "FEATURE_PATH": "b/"})
    return not recomputed and probe.IMG_FEAT_PATH["train"].startswith("a/")


@shim("mcan", "--DATA_PATH/--FEAT_PATH are ignored (init_path() runs in __init__, before add_args): recompute the "
      "derived paths when they are stale", needed=paths_ignored, undo=lambda root: restore(_cfgs(root), "add_args"),
      name="Cfgs.add_args")
def recompute_paths(root):
    Cfgs = _cfgs(root)
    upstream_add_args = Cfgs.add_args

    def add_args(self, args_dict):
        upstream_add_args(self, args_dict)
        for attr in ("DATASET_PATH", "FEATURE_PATH"):
            value = getattr(self, attr)
            if not value.endswith("/"):     # the upstream concatenates file names to these
                setattr(self, attr, value + "/")
        stale = (not self.IMG_FEAT_PATH["train"].startswith(self.FEATURE_PATH)
                 or not self.QUESTION_PATH["train"].startswith(self.DATASET_PATH))
        if stale:
            self.init_path()

    swap(Cfgs, "add_args", add_args)


# -- Mutan (vqa.pytorch) ---------------------------------------------------------------------------------
def _synchronize_missing() -> bool:
    import torch

    return not torch.cuda.is_available() and not getattr(torch.cuda.synchronize, "_deqfusion_cpu", False)


@shim("mutan", "the engine calls torch.cuda.synchronize() after every step: a no-op without a GPU",
      needed=_synchronize_missing, name="torch.cuda.synchronize")
def cuda_synchronize():
    import torch

    def synchronize(*args, **kwargs):
        return None

    synchronize._deqfusion_cpu = True
    torch.cuda.synchronize = synchronize


@shim("mutan", "vqa/models/utils.py imports torchvision.models without using it, and vqa/datasets/coco.py imports "
      "torchvision.transforms for image input only (train.py imports both); a torchvision built for another torch "
      "fails to import: stand-in modules (unless another shim's stand-in is there)",
      needed=lambda: not isinstance(sys.modules.get("torchvision.models"), common.Unavailable)
      and common.import_error("torchvision.models") is not None, name="torchvision")
def torchvision_stand_in():
    reason = common.import_error("torchvision.models")
    common.purge("torchvision")
    common.stand_in(["torchvision", "torchvision.models", "torchvision.transforms"], reason,
                    "nothing with extracted features (models: an unused import; transforms: image input)")


# (old, new) source rewrites: Python 2 / torch 0.3 idioms -> today's
ENGINE_REWRITES = [("async=True", "non_blocking=True"), ("loss.data[0]", "loss.item()"),
                   ("acc1[0]", "acc1.item()"), ("acc5[0]", "acc5.item()"),    # 0-dim tensors today
                   ("'question_id': sample['question_id'][j]",             # an int in torch 0.3, a tensor today:
                    "'question_id': int(sample['question_id'][j])")]        # the results JSON needs the int
UTILS_REWRITES = [("correct[:k].view(-1)", "correct[:k].reshape(-1)")]


def load_rewritten(name: str, path: Path, rewrites: list[tuple[str, str]]) -> types.ModuleType:
    """Import module ``name`` from ``path``'s source with textual rewrites applied in memory (file untouched).
    What ``sys.modules`` held under ``name`` is kept as ``_deqfusion_original``."""
    source = path.read_text()
    for old, new in rewrites:
        source = source.replace(old, new)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module._deqfusion_original = sys.modules.get(name)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    _set_child(name, module)
    return module


def unload_rewritten(name: str) -> None:
    """Undo :func:`load_rewritten`: ``sys.modules[name]`` is what it was before (or nothing)."""
    module = sys.modules.get(name)
    if module is None or not hasattr(module, "_deqfusion_original"):
        return
    original = module._deqfusion_original
    if original is None:
        del sys.modules[name]
    else:
        sys.modules[name] = original
    _set_child(name, original)


def _set_child(name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        if module is None:
            sys.modules[parent].__dict__.pop(child, None)
        else:
            setattr(sys.modules[parent], child, module)


def compiles(path: Path) -> bool:
    try:
        compile(path.read_text(), str(path), "exec")
        return True
    except SyntaxError:
        return False


def _views_fail(accuracy) -> bool:
    """Whether the top-k ``accuracy`` of 2017-era code fails on today's torch (``.view`` of a non-contiguous slice)."""
    import torch

    try:
        accuracy(torch.rand(3, 5), torch.tensor([0, 1, 2]), topk=(1, 2))
        return False
    except RuntimeError:
        return True


def accuracy_fails(root) -> bool:
    with prepend_sys_path(root):
        import vqa.lib.utils as utils     # before the engine, which imports it
    return _views_fail(utils.accuracy)


@shim("mutan", "vqa/lib/utils.py's accuracy views a non-contiguous tensor: load it with .view -> .reshape "
      "(in memory)", needed=accuracy_fails, undo=lambda: unload_rewritten("vqa.lib.utils"), name="vqa.lib.utils")
def rewrite_utils(root):
    load_rewritten("vqa.lib.utils", root / "vqa" / "lib" / "utils.py", UTILS_REWRITES)


@shim("mutan", "vqa/lib/engine.py does not compile today (.cuda(async=True), loss.data[0]): load it from its source "
      "with async= -> non_blocking=, [0] -> .item(), question ids as ints (in memory)",
      needed=lambda root: not compiles(root / "vqa" / "lib" / "engine.py"),
      undo=lambda: unload_rewritten("vqa.lib.engine"), name="vqa.lib.engine")
def rewrite_engine(root):
    with prepend_sys_path(root):
        load_rewritten("vqa.lib.engine", root / "vqa" / "lib" / "engine.py", ENGINE_REWRITES)


def bootstrap_accuracy_fails() -> bool:
    from bootstrap.models.metrics import accuracy as metrics

    return _views_fail(metrics.accuracy)


@shim("block", "bootstrap 0.0.13's models/metrics/accuracy.py views a non-contiguous tensor (block's VQA accuracy "
      "calls it every batch): load it with .view -> .reshape (in memory)", needed=bootstrap_accuracy_fails,
      undo=lambda: unload_rewritten("bootstrap.models.metrics.accuracy"), name="bootstrap.models.metrics.accuracy")
def rewrite_bootstrap_accuracy():
    from bootstrap.models.metrics import accuracy as metrics

    load_rewritten("bootstrap.models.metrics.accuracy", Path(metrics.__file__), UTILS_REWRITES)


def _norm_is_a_tensor() -> bool:
    import torch

    return torch.is_tensor(torch.nn.utils.clip_grad_norm_([torch.zeros(1, requires_grad=True)], 1.0))


def _logger_class():
    from bootstrap.lib.logger import Logger

    return Logger


@shim("block", "block's optimizer logs clip_grad_norm_'s result, a tensor since torch 0.4 (a float before): "
      "bootstrap's Logger cannot write logs.json (it prints the error and goes on); log_value stores one-element "
      "tensors as numbers", needed=_norm_is_a_tensor, undo=lambda: restore(_logger_class(), "log_value"),
      name="bootstrap.Logger.log_value(tensor)")
def log_tensors_as_numbers():
    logger = _logger_class()
    log_value = logger.log_value

    def log_value_as_number(self, name, value, *args, **kwargs):
        if hasattr(value, "numel") and value.numel() == 1:
            value = value.item()
        return log_value(self, name, value, *args, **kwargs)

    swap(logger, "log_value", log_value_as_number)


def _pinning_fails() -> bool:
    import torch

    try:
        torch.zeros(1).pin_memory()
        return False
    except RuntimeError:
        return True


def _dataloader_module(root):
    with prepend_sys_path(root):
        import vqa.lib.dataloader as dataloader
    return dataloader


@shim("mutan", "vqa/lib/dataloader.py pins every batch (its data_loader passes pin_memory=True); without an "
      "accelerator today's torch refuses to pin: batches stay in ordinary memory", needed=_pinning_fails,
      undo=lambda root: restore(_dataloader_module(root), "pin_memory_batch"), name="vqa.lib.dataloader.pin_memory")
def unpinned_batches(root):
    swap(_dataloader_module(root), "pin_memory_batch", lambda batch: batch)
