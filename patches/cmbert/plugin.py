"""CM-BERT (thuiar/Cross-Modal-BERT): DEQ fusion of the text and audio attention maps in ``BertFinetun``.

Patch point, in memory (the checkout's files are never edited):

- ``model.BertFinetun`` (after BERT's last layer) builds the text map ReLU(T T^T) and the audio map
  ReLU(A A^T) [B, L, L] and fuses them as ``w_t * text + w_a * audio + b`` before the mask and softmax. The
  patched forward runs the upstream one, but the fused map is the fixed point of ``DEQFusion`` over the
  two maps (each of the B*L rows a sample of width L; x_fuse is DEQFusion's weighted sum, initialised to
  the upstream's w=1, b=0): the joint equilibrium of the text map, the audio map and the fused map, as in
  the paper. Its Jacobian term (weight 0.01) is attached to the fused map, so the upstream loss
  ``0.5 * (logit - label)^2`` becomes 0.5 MSE + 0.01 Jacobian without touching the training loop.
- ``model.BertModel`` -> :class:`HFBertModel`, HuggingFace ``transformers.BertModel`` with the upstream's call
  signature; its parameter names are the old ones, so the upstream ``from_pretrained`` (which maps
  gamma/beta -> weight/bias) loads a local ``bert_config.json`` + ``pytorch_model.bin`` folder into it.
- ``pytorch_pretrained_bert`` (tokenizer, BertAdam, cached_path) -> :mod:`deqfusion_patches.cmbert.ppb`
  (transformers' tokenizer, AdamW with linear warm-up).

The launcher runs ``run_classifier.py`` (its 5 runs) in a work folder holding the paths it hard-codes:
``Cross-Modal-BERT-master/data/audio/MOSI_cmu_audio_CLS.pickle`` (linked to ``-o audio=PATH`` or
``DEQFUSION_CMBERT_AUDIO``) and ``Cross-Modal-BERT-master/CM-BERT_output``.
Conditional shim: run_classifier sets ``CUDA_VISIBLE_DEVICES=1`` (its authors' second GPU) on import; with
fewer than two GPUs CUDA is initialised first, so the setting cannot hide the only GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from deqfusion_core import Integration, hookimpl, run_path_as_main
from deqfusion_patches.nonconvergence import NonConvergence
from deqfusion_patches.isolated_import import import_isolated, provided

from . import ppb

AUDIO_ENV = "DEQFUSION_CMBERT_AUDIO"
AUDIO_PATH = Path("Cross-Modal-BERT-master/data/audio/MOSI_cmu_audio_CLS.pickle")   # as run_classifier reads it
PAPER = {"jac_weight": 0.01}
SETTINGS: dict[str, Any] = {"fusion": {}, "jac_weight": PAPER["jac_weight"], "seq_len": 50, "deq": True}
NONCONVERGED = NonConvergence("CM-BERT")


# -- BERT from transformers ------------------------------------------------------------------------------
def hf_config(config):
    """The upstream BertConfig as a transformers.BertConfig (same fields)."""
    import transformers

    return transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range)


def make_hf_bert():
    import transformers

    class HFBertModel(transformers.BertModel):
        """transformers.BertModel called as CM-BERT's BertModel: (ids, audio, token types, mask) ->
        (last hidden states, pooled output, the additive attention mask [B, 1, 1, L])."""

        def __init__(self, config):
            super().__init__(hf_config(config), add_pooling_layer=True)

        def forward(self, input_ids, all_audio_data=None, token_type_ids=None, attention_mask=None,
                    output_all_encoded_layers=True):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            dtype = out.last_hidden_state.dtype
            extended = (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0
            return out.last_hidden_state, out.pooler_output, extended

    return HFBertModel


# -- the fusion ------------------------------------------------------------------------------------------
def fuse_maps(module, text_map: torch.Tensor, audio_map: torch.Tensor) -> torch.Tensor:
    """The fused attention map [B, L, L]: DEQ equilibrium over the text and audio maps, row by row."""
    B, L, _ = text_map.shape
    if L != module.deq_fusion.dim:
        raise ValueError(f"--max_seq_length: the DEQ fusion was built for {module.deq_fusion.dim} tokens, the "
                         f"attention maps have {L}")
    fused, _, stats = module.deq_fusion([text_map.reshape(B * L, L), audio_map.reshape(B * L, L)])
    module.deq_stats = stats
    NONCONVERGED.check(stats)
    return fused.reshape(B, L, L)


def patch_finetune(model_module) -> None:
    cls = model_module.BertFinetun
    upstream_init, upstream_forward = cls.__init__, cls.forward

    def __init__(self, config):
        upstream_init(self, config)
        if SETTINGS["deq"]:
            from deqfusion_core import DEQFusion

            L = SETTINGS["seq_len"]
            options = {"num_groups": 5 if L % 5 == 0 else 1, **SETTINGS["fusion"], "jac_weight": SETTINGS["jac_weight"]}
            self.deq_fusion = DEQFusion([L, L], L, **options)

    def forward(self, hidden_states, pooled_output, audio_data, attention_mask):
        """The upstream forward; w_t * text_map + w_a * audio_map + b -> DEQ(text_map, audio_map)."""
        if not hasattr(self, "deq_fusion"):
            return upstream_forward(self, hidden_states, pooled_output, audio_data, attention_mask)
        relu, maps = self.activation, []

        def activation(x):      # called on the text map, the audio map, then the fused map
            out = relu(x)
            maps.append(out)
            if len(maps) == 2:  # both maps built: the sum the upstream computes next becomes 0 + 0 + DEQ
                self.__dict__["bias"] = fuse_maps(self, maps[0], maps[1])
            return out

        zero = hidden_states.new_zeros(())
        # instance attributes shadow the submodule/parameters for this call only
        self.__dict__.update(activation=activation, text_weight_1=zero, audio_weight_1=zero)
        try:
            return upstream_forward(self, hidden_states, pooled_output, audio_data, attention_mask)
        finally:
            for name in ("activation", "text_weight_1", "audio_weight_1", "bias"):
                self.__dict__.pop(name, None)

    cls.__init__, cls.forward = __init__, forward
    cls._deqfusion_upstream = (upstream_init, upstream_forward)


def shim_broken_torchvision() -> bool:
    """A torchvision built for another torch (its C ops fail to load) breaks ``import transformers.models.bert``
    (transformers imports it for image utilities BERT does not use): tell transformers it is unavailable."""
    import importlib.util

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # noqa: BLE001 - a RuntimeError from its operator registrations, typically
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    import transformers.utils
    import transformers.utils.import_utils as import_utils

    import_utils.is_torchvision_available = transformers.utils.is_torchvision_available = lambda: False
    return True


def shim_cuda_visible_devices() -> bool:
    """run_classifier.py sets CUDA_VISIBLE_DEVICES=1 on import: with fewer than two GPUs that hides the GPU
    (or the only one); initialising CUDA first makes the later setting ineffective."""
    if not torch.cuda.is_available() or torch.cuda.device_count() >= 2:
        return False
    torch.cuda.init()
    return True


def argument(argv: Sequence[str], name: str, default=None):
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def absolute_paths(argv: Sequence[str]) -> list[str]:
    """The path arguments, made absolute: the script runs in the work folder."""
    out, argv = [], list(argv)
    for i, a in enumerate(argv):
        if i and argv[i - 1] in ("--data_dir", "--bert_model", "--output_dir", "--cache_dir") and a:
            a = str(Path(a).expanduser().resolve())
        out.append(a)
    return out


# -- the integration -------------------------------------------------------------------------------------
class CmbertIntegration(Integration):
    name = "cmbert"
    summary = "CM-BERT (CMU-MOSI): DEQ fusion of the text and audio attention maps; BERT from transformers"
    env_var = "DEQFUSION_CMBERT_ROOT"
    marker = "run_classifier.py"
    repository = "thuiar/Cross-Modal-BERT"

    def apply(self, upstream, options: dict[str, Any] | None = None) -> None:
        """Options: DEQFusion keyword arguments, plus ``jac_weight`` (0.01), ``deq`` (False: the upstream
        fusion, with transformers' BERT), ``audio`` (the audio features pickle) and ``workdir``."""
        options = dict(options or {})
        SETTINGS["jac_weight"] = float(options.pop("jac_weight", PAPER["jac_weight"]))
        if SETTINGS["jac_weight"] < 0:
            raise ValueError(f"jac_weight: must be >= 0, got {SETTINGS['jac_weight']}")
        SETTINGS["deq"] = bool(options.pop("deq", True))
        SETTINGS["audio"] = options.pop("audio", None) or os.environ.get(AUDIO_ENV)
        SETTINGS["workdir"] = options.pop("workdir", "cmbert_work")
        SETTINGS["fusion"] = options
        if self.applied:
            return
        root = upstream.require().root
        shim_broken_torchvision()
        with provided(ppb.modules()):
            self.modules = import_isolated(root, ["utils", "model"])
        self.modules["model"].BertModel = make_hf_bert()
        patch_finetune(self.modules["model"])
        self.applied = True

    @contextlib.contextmanager
    def environment(self, upstream, argv: Sequence[str]):
        """Work folder with the paths run_classifier hard-codes, the patched modules importable, cwd, argv."""
        seq_len = int(argument(argv, "--max_seq_length", 50))
        SETTINGS["seq_len"] = seq_len
        bert = argument(argv, "--bert_model")
        if bert is None or not (Path(bert) / "bert_config.json").is_file():
            raise FileNotFoundError(f"--bert_model: give a local BERT folder with bert_config.json, pytorch_model.bin "
                                    f"and vocab.txt (got {bert!r})")
        audio = SETTINGS["audio"] or upstream.root / "data" / "audio" / AUDIO_PATH.name
        if not Path(audio).is_file():
            raise FileNotFoundError(f"audio: the CMU-MOSI audio features pickle {audio} does not exist; name it "
                                    f"with -o audio=PATH or {AUDIO_ENV}")
        work = Path(SETTINGS["workdir"]).expanduser().resolve()
        link = work / AUDIO_PATH
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(audio).resolve())
        shim_cuda_visible_devices()
        old_argv, old_cwd = sys.argv[:], os.getcwd()
        sys.argv = [str(upstream.root / "run_classifier.py"), *absolute_paths(argv)]
        try:
            with provided({**ppb.modules(), **self.modules}):
                os.chdir(work)
                yield work
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)

    def run_once(self, upstream, argv: Sequence[str]) -> dict:
        """One run of run_classifier's ``main`` (train, select on dev loss, test): its results dict."""
        with self.environment(upstream, argv) as work:
            (work / "Cross-Modal-BERT-master" / "CM-BERT_output").mkdir(exist_ok=True)
            run_classifier = import_isolated(upstream.root, ["run_classifier"])["run_classifier"]
            return run_classifier.main(0)

    def launch(self, upstream, argv: Sequence[str]) -> int:
        with self.environment(upstream, argv):
            return run_path_as_main(upstream.root / "run_classifier.py", absolute_paths(argv))


INTEGRATION = CmbertIntegration()


@hookimpl
def deqfusion_integration():
    return INTEGRATION
