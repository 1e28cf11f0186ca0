"""MCAN (MILVLG/mcan-vqa): DEQ fusion instead of ``lang_feat + img_feat`` in ``core/model/net.py``.

Patch point, in memory (the checkout's files are never edited):

- ``Net.__init__`` adds ``self.deq_fusion = DEQFusion([FLAT_OUT_SIZE] * 2, FLAT_OUT_SIZE)``.
- ``Net.forward`` runs the upstream forward unchanged, except that ``proj_norm`` receives
  ``deq_fusion([lang_feat, img_feat])`` instead of the sum: the two ``AttFlat`` outputs are recorded on the
  way and the sum the upstream computes is discarded. The class is patched (``core/exec.py`` imports it by
  name), so train, val and test runs all build the fused model and its checkpoints load.
- The Jacobian term reaches the summed BCE loss of ``core/exec.py`` without touching its loop: it is
  attached to the fused feature's backward with weight ``jac_weight * sub-batch size`` (the loss is a sum
  over the sub-batch, the Jacobian term a mean).

Conditional shims for today's stack (each applied only when the thing is broken): ``yaml.load`` without a
Loader; spaCy 2's ``en_vectors_web_lg`` -> GloVe vectors from a text file the user names
(``DEQFUSION_GLOVE`` or ``-o glove=PATH``); ``--DATA_PATH``/``--FEAT_PATH`` ignored because ``init_path()``
runs before the arguments; ``.cuda()`` without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deqfusion_core import Integration, hookimpl, prepend_sys_path, run_path_as_main
from deqfusion_patches import vqa_compat

GLOVE_ENV = "DEQFUSION_GLOVE"
SETTINGS: dict[str, Any] = {"fusion": {}, "jac_weight": 0.0, "glove": None}
WARN_EVERY = 100     # a non-converged forward is reported the first time and then every WARN_EVERY times
_nonconverged = 0


# -- the fusion ------------------------------------------------------------------------------------------
def fuse(net, lang_feat, img_feat):
    """DEQ fusion of MCAN's two flattened features, with the weighted Jacobian term attached for training."""
    global _nonconverged
    from deqfusion_core.jacobian import attach_aux_loss

    fused, jac_loss, stats = net.deq_fusion([lang_feat, img_feat])
    if not stats.converged:
        _nonconverged += 1
        if _nonconverged % WARN_EVERY == 1:
            warnings.warn(f"MCAN DEQ fusion did not converge ({_nonconverged} forwards so far): relative residual "
                          f"{stats.rel_residual:.2e} after {stats.nstep} steps (f_tol={stats.tol}); "
                          "raise --f-max-iter or --jac-weight", RuntimeWarning, stacklevel=2)
    weight = SETTINGS["jac_weight"] * lang_feat.shape[0]     # the BCE loss is summed over the sub-batch
    return attach_aux_loss(fused, jac_loss, weight)


def patch_net(net_cls) -> None:
    upstream_init, upstream_forward = net_cls.__init__, net_cls.forward

    def __init__(self, cfg, pretrained_emb, token_size, answer_size):
        upstream_init(self, cfg, pretrained_emb, token_size, answer_size)
        from deqfusion_core import DEQFusion

        width = cfg.FLAT_OUT_SIZE
        self.deq_fusion = DEQFusion([width, width], width, **SETTINGS["fusion"])

    def forward(self, img_feat, ques_ix):
        """The upstream forward, with ``proj_norm(lang_feat + img_feat)`` -> ``proj_norm(DEQ(lang, img))``."""
        flat = []

        def record(module):
            def call(*args):
                flat.append(module(*args))
                return flat[-1]
            return call

        proj_norm = self.proj_norm

        def fused_norm(_summed):        # the upstream's lang_feat + img_feat, replaced
            if len(flat) != 2:
                raise RuntimeError(f"MCAN Net.forward: expected the two AttFlat outputs, saw {len(flat)}")
            return proj_norm(fuse(self, *flat))

        # instance attributes shadow the registered submodules for this call only (same replica, same call)
        overrides = {"attflat_lang": record(self.attflat_lang), "attflat_img": record(self.attflat_img),
                     "proj_norm": fused_norm}
        self.__dict__.update(overrides)
        try:
            return upstream_forward(self, img_feat, ques_ix)
        finally:
            for name in overrides:
                del self.__dict__[name]

    __init__.__doc__ = "Upstream Net.__init__, plus ``self.deq_fusion`` (DEQ fusion of the two FLAT_OUT_SIZE features)."
    net_cls.__init__, net_cls.forward = __init__, forward
    net_cls._deqfusion_upstream = (upstream_init, upstream_forward)


# -- shims -----------------------------------------------------------------------------------------------
def patch_paths(cfgs_cls) -> None:
    """``--DATA_PATH``/``--FEAT_PATH`` are ignored upstream (``init_path()`` runs in ``__init__``, before
    ``add_args``): recompute the derived paths when they are stale."""
    upstream_add_args = cfgs_cls.add_args

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
            vqa_compat.APPLIED.add("mcan.init_path")

    cfgs_cls.add_args = add_args
    cfgs_cls._deqfusion_upstream = upstream_add_args


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


def patch_glove(data_utils, load_data) -> None:
    """spaCy 2's ``en_vectors_web_lg`` (GloVe vectors) cannot be installed today: the vocabulary is built by
    the upstream ``tokenize`` without GloVe, then its vectors are read from the GloVe file the user names
    (words missing from it get zeros, as spaCy's vectors did)."""
    upstream_tokenize = data_utils.tokenize

    def tokenize(stat_ques_list, use_glove):
        token_to_ix, pretrained_emb = upstream_tokenize(stat_ques_list, False)
        if not use_glove:
            return token_to_ix, pretrained_emb
        path = SETTINGS["glove"] or os.environ.get(GLOVE_ENV)
        if not path:
            raise RuntimeError(f"MCAN uses GloVe word vectors (USE_GLOVE) and spaCy's en_vectors_web_lg is not "
                               f"installed: name a GloVe text file (e.g. glove.840B.300d.txt) with {GLOVE_ENV}=PATH "
                               "or `deqfusion run mcan -o glove=PATH`")
        vectors, width = read_glove(path, set(token_to_ix))
        words = sorted(token_to_ix, key=token_to_ix.get)
        emb = np.stack([vectors.get(w, np.zeros(width, np.float32)) for w in words])
        print(f"== GloVe vectors from {path}: {len(vectors)}/{len(words)} words found, width {width}")
        return token_to_ix, emb

    data_utils.tokenize = load_data.tokenize = tokenize


def shim_spacy_module() -> bool:
    """Let ``import en_vectors_web_lg`` succeed (its vectors come from :func:`patch_glove`)."""
    if "en_vectors_web_lg" in sys.modules or importlib.util.find_spec("en_vectors_web_lg") is not None:
        return False
    stub = types.ModuleType("en_vectors_web_lg")

    def load(*args, **kwargs):
        raise RuntimeError(f"en_vectors_web_lg is not installed; deqfusion reads GloVe vectors from {GLOVE_ENV}")

    stub.load = load
    sys.modules["en_vectors_web_lg"] = stub
    vqa_compat.APPLIED.add("en_vectors_web_lg")
    return True


# -- the integration -------------------------------------------------------------------------------------
class McanIntegration(Integration):
    name = "mcan"
    summary = "MCAN (mcan-vqa): DEQ fusion of the language and image features instead of their sum"
    env_var = "DEQFUSION_MCAN_ROOT"
    marker = "core/model/net.py"
    repository = "MILVLG/mcan-vqa"

    def apply(self, upstream, options: dict[str, Any] | None = None) -> None:
        SETTINGS["fusion"], SETTINGS["jac_weight"] = vqa_compat.split_fusion_options(options)
        SETTINGS["glove"] = SETTINGS["fusion"].pop("glove", None)
        if self.applied:
            return
        root = upstream.require().root
        loaded = sys.modules.get("core")
        if loaded is not None and Path(getattr(loaded, "__path__", [""])[0]).resolve() != (root / "core").resolve():
            raise RuntimeError(f"another package named 'core' is already imported ({loaded!r}); "
                               "run MCAN in its own process (deqfusion run mcan)")
        vqa_compat.shim_yaml_load()      # run.py: yaml.load(f)
        vqa_compat.shim_cuda_on_cpu()    # core/exec.py: net.cuda(), loss_fn.cuda(), batch.cuda()
        glove_shim = shim_spacy_module()  # core/data/data_utils.py: import en_vectors_web_lg
        with prepend_sys_path(root):
            from cfgs.base_cfgs import Cfgs
            from core.data import data_utils, load_data
            from core.model.net import Net
        if glove_shim:
            patch_glove(data_utils, load_data)
        patch_paths(Cfgs)
        if not vqa_compat.is_baseline(options):
            patch_net(Net)
        self.applied = True

    def launch(self, upstream, argv: Sequence[str]) -> int:
        # run.py reads cfgs/*.yml and writes results/, ckpts/ relative to the checkout, as `python run.py` there
        return run_path_as_main(upstream.root / "run.py", argv, cwd=upstream.root)


INTEGRATION = McanIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
