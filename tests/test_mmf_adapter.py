"""Unit tests of deqfusion_adapters.mmf's own logic: the shims' conditions and effects, the fusion builder's
errors, the DEQ fusion's MMF convention. The real MMF runs are in integration_tests/test_mmf.py."""
import collections
import importlib.util
import sys
import types

import pytest
import torch

if importlib.util.find_spec("mmf") is None:  # not importorskip: `import mmf` needs the shims first
    pytest.skip("MMF is not installed (./install.sh)", allow_module_level=True)
from deqfusion_adapters.mmf import register  # noqa: E402
from deqfusion_compat import common, mmf_rc10  # noqa: E402
from deqfusion_core import compat  # noqa: E402

register()


def applied() -> set[str]:
    return {s.name for s in compat.applied("mmf")}


def shim(name: str) -> compat.Shim:
    return next(s for s in compat.shims("mmf") if s.name == name)


def test_every_needed_shim_applied_and_mmf_imports():
    import mmf.common.registry  # noqa: F401 - would raise without the shims on this stack

    assert collections.Mapping is collections.abc.Mapping
    import demjson

    assert demjson.decode('{"a": 1}') == {"a": 1}
    from transformers.modeling_bert import BertLayerNorm  # noqa: F401 - alias of the moved module
    from transformers.optimization import AdamW

    opt = AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["weight_decay"] == 0.0          # transformers' old default, not torch's 0.01
    from torchtext import vocab

    assert vocab.pretrained_aliases == {}
    assert "defaults_config" in applied()
    from mmf.utils.configuration import get_default_config_path

    assert get_default_config_path() == str(mmf_rc10.DEFAULTS)


def test_shims_are_conditional(monkeypatch):
    # present things are left alone
    monkeypatch.setattr(collections, "Mapping", collections.abc.Mapping, raising=False)
    assert not shim("collections.abc").needed()
    fake = types.ModuleType("torchtext")
    monkeypatch.setitem(sys.modules, "torchtext", fake)
    monkeypatch.setattr(mmf_rc10, "missing", lambda name: False)
    assert not shim("torchtext").needed() and sys.modules["torchtext"] is fake
    assert not shim("demjson").needed()
    assert not shim("transformers_modules").needed()


def test_builder_shim_only_when_missing():
    class WithIt:
        class BaseDatasetBuilder:
            def update_registry_for_model(self, config):
                return "own"

    assert not shim("builder_update_registry_for_model").needed(module=WithIt)


def test_unavailable_stand_in_says_why():
    mod = common.Unavailable("thing", "because", "a test")
    with pytest.raises(ImportError, match="thing.anything is not available here .because; the upstream needs it only "
                                          "for a test"):
        mod.anything()


def test_remove_restores_mmf_and_apply_again_shims_it():
    from mmf.common.registry import registry
    from mmf.utils import configuration

    from deqfusion_adapters.mmf.plugin import INTEGRATION

    try:
        INTEGRATION.apply(None, {"f_max_iter": 7})
        assert registry.mapping["fusion_name_mapping"]["deq"]([4, 4], 4, num_groups=2).deq.f_max_iter == 7
        INTEGRATION.remove()
        assert "deq" not in registry.mapping["fusion_name_mapping"]
        assert "fusion_classifier" not in registry.mapping["model_name_mapping"]
        assert configuration.get_default_config_path() != str(mmf_rc10.DEFAULTS)    # rc10's own, again
        assert "get_default_config_path" in vars(configuration)
    finally:
        INTEGRATION.apply(None, {})
    assert configuration.get_default_config_path() == str(mmf_rc10.DEFAULTS)
    assert registry.mapping["fusion_name_mapping"]["deq"]([4, 4], 4, num_groups=2).deq.f_max_iter == 40


def test_env_resolver_in_defaults():
    from mmf.utils.configuration import Configuration

    config = Configuration().get_config()
    assert config.env.user_dir in ("", None) or isinstance(config.env.user_dir, str)
    assert config.training.device == "cpu" and config.checkpoint.resume is False


def test_deq_in_registry_with_mmf_convention():
    from mmf.common.registry import registry

    mapping = registry.mapping["fusion_name_mapping"]
    assert {"deq", "mutan", "linear_sum", "block"} <= set(mapping)
    fusion = mapping["deq"]([6, 10], 8, num_groups=2, f_max_iter=5)
    out = fusion([torch.randn(3, 6), torch.randn(3, 10)])
    assert isinstance(out, torch.Tensor) and out.shape == (3, 8)
    assert fusion.last_stats.nstep >= 1


def test_deq_attaches_jacobian_when_model_does_not_report_it():
    from deqfusion_adapters.mmf.fusion import DEQFusionMMF

    torch.manual_seed(0)
    xs = [torch.randn(4, 8), torch.randn(4, 8)]
    grads = []
    for weight in (0.0, 5.0):
        torch.manual_seed(1)
        f = DEQFusionMMF([8, 8], 8, jac_weight=weight, num_groups=2, f_max_iter=5)
        f(xs).sum().backward()
        grads.append(f.deq.fusion.gate.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.fixture
def deq_registered_plain():
    """Tests that register `deq` with command-line options leave it registered without any."""
    yield
    register({})


def test_command_line_options_layer_over_fusion_params(deq_registered_plain):
    """The params a `deq` registered with command-line options is built with, as ``params_with_options`` reports
    them (a compare run's recorded configuration): keys the config lacks are added, None means DEQFusion's
    default, a norm picked over the config's drops the config's norm_options."""
    from deqfusion_adapters.mmf.fusion import params_with_options, register_fusions
    from deqfusion_core.options import OptionError

    params = {"num_groups": 2, "f_tol": 1e-3, "norm": "contractive", "norm_options": {"max_gain": 0.25},
              "f_max_iter_eval": None}
    options = {"solver": "broyden", "f_stop": "abs", "f_tol": None, "norm": "none", "gating": False}
    assert params_with_options(params, options) == {
        "num_groups": 2, "f_tol": None, "norm": "none", "f_max_iter_eval": None, "solver": "broyden",
        "f_stop": "abs", "gating": False}
    fusion = register_fusions(options)["deq"]([8, 8], 8, **params)
    solve = fusion.deq.forward_solve
    assert (solve.solver, solve.stop, solve.tol) == ("broyden", "abs", 1e-2)   # f_tol=None: DEQFusion's 1e-2
    assert fusion.deq.norm is None and fusion.deq.gating is False
    with pytest.raises(OptionError, match="command-line fusion option 'bogus': unknown"):
        params_with_options(params, {"bogus": 1})
    with pytest.raises(OptionError, match="fusion.params 'bogus': unknown"):
        params_with_options({"bogus": 1}, {})


def test_compare_carries_fusion_options_missing_from_the_packaged_params(deq_registered_plain, tmp_path):
    """`compare mmf -o KEY=VALUE` with a DEQFusion keyword easy_vqa_deq.yaml does not list: not an MMF override
    (MMF refuses keys its config lacks) but the arm's --deq-option; the effective configuration (real MMF
    Configuration) shows it in fusion.params, and the `deq` it registered builds with it."""
    import yaml
    from mmf.common.registry import registry

    from deqfusion_adapters.mmf.compare import EXPERIMENTS, MMFComparison
    from deqfusion_core.compare import Arm

    packaged = yaml.safe_load((EXPERIMENTS / "easy_vqa_deq.yaml").read_text())
    assert not {"solver", "f_stop"} & set(packaged["model_config"]["fusion_classifier"]["fusion"]["params"])
    c = MMFComparison()
    options = {"solver": "broyden", "f_stop": "abs", "f_max_iter": 7}
    argv = c.argv(Arm("deq", "deq", True), 1, options, c.smoke_args([]), tmp_path)
    assert not any(a.startswith("model_config.fusion_classifier.fusion.params") for a in argv)
    params = c.effective_config(None, argv)["model_config"]["fusion_classifier"]["fusion"]["params"]
    assert {k: params[k] for k in options} == options and params["jac_term"] == "diagonal"   # the yaml's stay
    fusion = registry.mapping["fusion_name_mapping"]["deq"]([8, 8], 8, num_groups=2)
    assert (fusion.deq.forward_solve.solver, fusion.deq.forward_solve.stop) == ("broyden", "abs")
    assert fusion.deq.forward_solve.max_iter == 7
    # the baseline arm registers `deq` without them
    baseline = c.effective_config(None, c.argv(Arm("baseline", "linear_sum", False), 1, {}, [], tmp_path))
    assert baseline["model_config"]["fusion_classifier"]["fusion"]["type"] == "linear_sum"
    assert registry.mapping["fusion_name_mapping"]["deq"].command_line == {}
    with pytest.raises(ValueError, match="fusion 'deq'; the fusion under test is 'block'"):
        c.argv(Arm("block", "block", True), 1, options, [], tmp_path)
    linear = [a if not a.startswith("config=") else f"config={EXPERIMENTS / 'easy_vqa_linear_sum.yaml'}" for a in argv]
    with pytest.raises(KeyError, match="'linear_sum' takes no DEQFusion options"):
        c.effective_config(None, linear)


@pytest.mark.parametrize("cfg,match", [
    (None, "fusion: missing"),
    ({"params": {}}, r"fusion\.type: missing"),
    ({"type": "nope", "params": {}}, r"fusion\.type: unknown fusion 'nope'.*deq"),
    ({"type": "deq"}, r"fusion\.params: missing"),
    ({"type": "linear_sum", "params": {"bogus": 1}}, r"fusion\.params\.bogus"),
    ({"type": "deq", "params": {"num_groups": 3}}, r"fusion\.params.*num_groups"),
])
def test_build_fusion_errors_name_the_key(cfg, match):
    from deqfusion_adapters.mmf.fusion import build_fusion

    with pytest.raises((KeyError, ValueError), match=match):
        build_fusion(cfg, [8, 8], 8, key="fusion")


def test_packaged_config_name_resolves():
    from deqfusion_adapters.mmf.plugin import resolve_config_opts

    out = resolve_config_opts(["config=easy_vqa_deq", "model=fusion_classifier"])
    assert out[0].endswith("configs/experiments/easy_vqa_deq.yaml") and out[1] == "model=fusion_classifier"


SOLVER_KEYS = ("f_max_iter", "f_tol", "b_max_iter", "b_tol")


@pytest.mark.parametrize("name", ["experiments/mmimdb_deq.yaml", "baselines/mmimdb/concat_bert_deq.yaml",
                                  "baselines/hateful_memes/concat_bert_deq.yaml",
                                  "baselines/hateful_memes/concat_bow_deq.yaml",
                                  "baselines/hateful_memes/late_fusion_deq.yaml", "baselines/vqa2/movie_mcan_deq.yaml"])
def test_packaged_deq_configs_write_out_deqfusion_defaults(name):
    """The solver settings these configs write out (so MMF's command line can override them) are DEQFusion's
    defaults, and the Jacobian weight the paper's MM-IMDB one."""
    import inspect
    from pathlib import Path

    import yaml

    from deqfusion_core import DEQFusion

    config = yaml.safe_load((Path(__file__).parents[1] / "adapters" / "mmf" / "configs" / name).read_text())
    (model,) = config["model_config"].values()
    params = model["fusion"]["params"]
    defaults = inspect.signature(DEQFusion.__init__).parameters
    assert {k: params[k] for k in SOLVER_KEYS} == {k: defaults[k].default for k in SOLVER_KEYS}
    assert params["jac_weight"] == 0.1


class _Writer:
    def __init__(self):
        self.anomaly_at_start = None

    def write(self, text, level="info"):
        if text == "Starting training...":
            self.anomaly_at_start = torch.is_anomaly_enabled()


def _run_rc10_train(training):
    """The installed BaseTrainer.train up to its training loop (zero updates), on a bare trainer."""
    from mmf.common.registry import registry
    from mmf.trainers.base_trainer import BaseTrainer
    from omegaconf import OmegaConf

    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.config = OmegaConf.create({"training": training})
    trainer.writer, trainer.model, trainer.run_type = _Writer(), torch.nn.Linear(2, 2), "train"
    trainer.max_epochs, trainer.max_updates, trainer.num_updates = None, 0, 0
    trainer.profile = lambda text: None
    trainer.finalize = lambda: None
    state, previous_mode = registry.mapping["state"], torch.is_anomaly_enabled()
    previous_writer = state.pop("writer", _Writer)
    state["writer"] = trainer.writer
    try:
        trainer.train()
        return trainer.writer.anomaly_at_start
    finally:
        if previous_writer is _Writer:
            state.pop("writer")
        else:
            state["writer"] = previous_writer
        torch.autograd.set_detect_anomaly(previous_mode)


def test_anomaly_mode_follows_the_config_on_rc10():
    import mmf.trainers.base_trainer  # noqa: F401 - the shim applies when it executes

    assert "trainer_detect_anomaly_from_config" in applied()  # the installed rc10 hard-codes it
    assert _run_rc10_train({}) is False                            # default: off, as in MMF main
    assert _run_rc10_train({"detect_anomaly": False}) is False
    assert _run_rc10_train({"detect_anomaly": True}) is True
    from mmf.utils.configuration import Configuration

    assert Configuration().get_config().training.detect_anomaly is False  # the project's defaults.yaml


def test_anomaly_shim_only_when_hard_coded():
    class Trainer:
        def train(self):
            return "own"

    assert not shim("trainer_detect_anomaly_from_config").needed(module=types.SimpleNamespace(BaseTrainer=Trainer))
    assert shim("trainer_detect_anomaly_from_config").behaviour_change     # named as what it is


def _compose(*opts):
    """The config MMF's command line would build (MMF's own Configuration), without data or a run."""
    import argparse

    from mmf.utils.configuration import Configuration

    return Configuration(argparse.Namespace(config_override=None, opts=list(opts))).get_config()


@pytest.mark.parametrize("fusion", ["deq", "linear_sum"])
def test_mmimdb_configs_compose_and_model_runs_on_its_batch_format(fusion, monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from deqfusion_adapters.mmf import CONFIG_DIR

    config = _compose(f"config={CONFIG_DIR / 'experiments' / f'mmimdb_{fusion}.yaml'}", "model=fusion_classifier",
                      "dataset=mmimdb")
    data = config.dataset_config.mmimdb
    assert data.use_features and not data.use_images
    assert data.annotations.val[0].endswith("dev.jsonl") and data.features.train[0].endswith(".lmdb")
    assert data.processors.text_processor.type == "bert_tokenizer"
    assert data.processors.answer_processor.type == "multi_hot_answer_from_vocab"
    assert list(config.evaluation.metrics) == ["multilabel_micro_f1", "multilabel_macro_f1"]
    model_config = config.model_config.fusion_classifier
    assert model_config.fusion.type == fusion and [loss.type for loss in model_config.losses] == ["logit_bce"]
    assert list(model_config.encoders) == ["image", "text"]  # none of easy-VQA's encoders leaked in

    # the composed model on a batch shaped like rc10's mmimdb samples (a tiny untrained BERT: no download)
    from mmf.common.registry import registry
    from mmf.common.sample import SampleList

    from deqfusion_adapters.mmf.model import FusionClassifier

    model_config = OmegaConf.merge(model_config, {"model": "fusion_classifier", "encoders": {"text": {"params": {
        "pretrained": False, "config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 64}}}}})
    monkeypatch.setitem(registry.mapping["state"], "config", config)
    monkeypatch.setitem(registry.mapping["state"], "mmimdb_num_final_outputs", 24)  # 23 genres + <unk>
    model = FusionClassifier(model_config)
    model.build()
    model.init_losses()
    tokens = _bert_tokens(data.processors.text_processor, ["a man returns home", "the ship sinks at night"] * 2,
                          tmp_path)
    features = torch.randn(4, 100, 2048)
    features[:, 50:] = 0  # padding rows
    batch = SampleList([{**t, "image_feature_0": f, "targets": (torch.rand(24) > 0.7).float()}
                        for t, f in zip(tokens, features)])
    batch.dataset_type, batch.dataset_name = "train", "mmimdb"
    out = model(batch)
    assert out["scores"].shape == (4, 24)
    assert "train/mmimdb/logit_bce" in out["losses"]
    assert ("train/mmimdb/deq_jacobian" in out["losses"]) == (fusion == "deq")
    # the paper's MM-IMDB learning rates (appendix C): 1e-3 for all weights but the DEQ fusion's, 1e-4 for it
    assert config.optimizer.params.lr == 1e-3
    groups = model.get_optimizer_parameters(config)
    if fusion == "deq":
        assert "lr" not in groups[0] and groups[1]["lr"] == 1e-4
        assert len(groups[1]["params"]) == len(list(model.fusion.parameters()))
    else:
        assert len(groups) == len(list(model.parameters()))
    # BERT is a frozen feature extractor: no gradients, eval mode (no dropout) even while the model trains
    bert = model.encoders["text"].bert
    model.train()
    assert not any(p.requires_grad for p in bert.parameters()) and not bert.training and model.training
    out["losses"]["train/mmimdb/logit_bce"].sum().backward()
    assert all(p.grad is None for p in bert.parameters()) and model.classifier[1].weight.grad is not None


def _bert_tokens(processor_config, texts, folder):
    """rc10's own `bert_tokenizer` processor (current transformers) with the experiment's params, on a local
    word-piece vocabulary instead of bert-base-uncased's (no download)."""
    from mmf.datasets.processors.processors import Processor
    from omegaconf import OmegaConf

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a man returns home the ship sinks at night".split()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    config = OmegaConf.merge(processor_config, {"params": {"tokenizer_config": {"type": str(folder)}}})
    processor = Processor(config)
    out = [processor({"text": text}) for text in texts]
    assert out[0]["tokens"][:5] == ["[CLS]", "a", "man", "returns", "home"]
    assert out[0]["input_ids"].shape == (processor_config.params.max_seq_length,)
    return [{k: o[k] for k in ("input_ids", "input_mask", "segment_ids")} for o in out]


def test_mmimdb_shims_only_when_mmf_lacks_the_files(monkeypatch):
    builder, zoo = shim("mmimdb_dataset_config"), shim("dataset_zoo_missing")
    monkeypatch.setattr(mmf_rc10, "ships", lambda relative: True)  # an MMF with its configs and zoo (git main)

    class Builder:
        @classmethod
        def config_path(cls):
            return "configs/datasets/mmimdb/defaults.yaml"

    def missing_zoo(key):
        raise FileNotFoundError(2, "No such file", "configs/zoo/datasets.yaml")

    mod = types.SimpleNamespace(MMIMDbBuilder=Builder, get_zoo_config=missing_zoo)
    assert not builder.needed(module=mod) and not zoo.needed(module=mod)
    monkeypatch.setattr(mmf_rc10, "ships", lambda relative: False)  # rc10
    assert builder.needed(module=mod) and zoo.needed(module=mod)
    builder.apply(module=mod)
    zoo.apply(module=mod)
    assert Builder.config_path() == str(mmf_rc10.DATASET_CONFIGS / "mmimdb.yaml")
    with pytest.warns(UserWarning, match="nothing is downloaded for 'mmimdb'"):
        assert mod.get_zoo_config("mmimdb") == (None, None)
    builder.undo(module=mod)
    zoo.undo(module=mod)
    assert Builder.config_path() == "configs/datasets/mmimdb/defaults.yaml" and mod.get_zoo_config is missing_zoo


def test_multilabel_macro_f1_scores_multi_hot_targets():
    from mmf.common.registry import registry

    assert "multilabel_macro_f1" in applied()  # rc10 scores it as single-label
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    scores = torch.where(targets > 0, 5.0, -5.0)
    metric = registry.get_metric_class("multilabel_macro_f1")()
    assert float(metric.calculate({"targets": targets}, {"scores": scores})) == 1.0
