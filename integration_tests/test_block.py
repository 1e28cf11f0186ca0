"""block.bootstrap.pytorch with `fusion: {type: deq}`: its real VQANet, built by bootstrap's model factory from
an options file, forward + criterion + backward on tiny generated inputs.

Skip-thoughts weights cannot be downloaded here: the test writes small random files in the layout the
`skipthoughts` package reads (dictionary.txt, utable.npy, uni_skip.npz), so block's real text encoder
(BayesianUniSkip, 620 -> 2400) is built without a download.
"""
from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("block", reason="block.bootstrap.pytorch is not installed (./install.sh vqa)")
yaml = pytest.importorskip("yaml")

from deqfusion_compat import common  # noqa: E402
from deqfusion_patches.block import plugin  # noqa: E402

import vqa_data  # noqa: E402

WORDS = ["what", "color", "is", "the", "cat", "how", "many", "dogs"]
ANSWERS = ["red", "blue", "two", "three", "yes"]
DV = 16           # visual feature width (bottom-up features are 2048; tiny here)
JAC_WEIGHT = 0.5


@pytest.fixture(scope="module")
def skipthoughts_dir(tmp_path_factory):
    """Random skip-thoughts files with the real shapes (float16 keeps them ~40 MB)."""
    return vqa_data.write_skipthoughts(tmp_path_factory.mktemp("skipthoughts"), WORDS)


@pytest.fixture
def options_file(tmp_path, skipthoughts_dir):
    opts = {
        "exp": {"dir": str(tmp_path / "exp"), "resume": None},
        "misc": {"cuda": False, "seed": 1337},
        "model": {
            "name": "default",
            "network": {
                "import": "block.models.networks.factory",
                "name": "vqa_net",
                "txt_enc": {"name": "skipthoughts", "type": "BayesianUniSkip", "dropout": 0.25,
                            "fixed_emb": False, "dir_st": str(skipthoughts_dir)},
                "self_q_att": True,
                "attention": {"mlp_glimpses": 2,
                              "fusion": {"type": "mutan", "input_dims": [4800, DV], "output_dim": 32,
                                         "mm_dim": 32, "rank": 3}},
                "classif": {"fusion": {"type": "deq", "input_dims": [4800, 2 * DV], "output_dim": len(ANSWERS),
                                       "mm_dim": 32, "num_groups": 4, "f_max_iter": 15,
                                       "jac_weight": JAC_WEIGHT}},
            },
            "criterion": {"import": "block.models.criterions.factory", "name": "vqa_cross_entropy"},
            "metric": None,
        },
    }
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(opts))
    return path


class _Split:
    split = "train"
    wid_to_word = {i + 1: w for i, w in enumerate(WORDS)}
    word_to_wid = {w: i + 1 for i, w in enumerate(WORDS)}
    aid_to_ans = ANSWERS
    ans_to_aid = {a: i for i, a in enumerate(ANSWERS)}


class _Engine:
    dataset = {"train": _Split()}


@pytest.fixture
def bootstrap_options(options_file, monkeypatch):
    """bootstrap's Options/Logger singletons, built from the options file as `python -m bootstrap.run -o` does."""
    plugin.INTEGRATION.apply(None, {})          # applies the yaml/collections shims bootstrap's Options needs
    from bootstrap.lib.logger import Logger
    from bootstrap.lib.options import Options

    monkeypatch.setattr(sys, "argv", ["bootstrap.run", "-o", str(options_file)])
    monkeypatch.setattr(Options, "_Options__instance", None)
    monkeypatch.setattr(Logger, "_instance", None)
    Options()
    yield Options()


def _batch(batch_size=4, regions=5, seq=6):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, seq + 1, (batch_size, 1), generator=g)
    question = torch.randint(1, len(WORDS) + 1, (batch_size, seq), generator=g)
    question[torch.arange(seq)[None, :] >= lengths] = 0
    return {"visual": torch.randn(batch_size, regions, DV, generator=g), "question": question, "lengths": lengths,
            "class_id": torch.randint(0, len(ANSWERS), (batch_size, 1), generator=g)}


def test_vqanet_with_deq_fusion_trains_with_jacobian_term(bootstrap_options):
    from block.models.networks.fusions.fusions import Mutan
    from bootstrap import models

    torch.manual_seed(0)
    model = models.factory(_Engine())        # bootstrap's DefaultModel: block's VQANet + block's criterion
    net = model.network
    assert isinstance(net.fusion, plugin.DEQBlockFusion)
    assert isinstance(net.attention.fusion, Mutan)        # other types still go to block's own factory
    assert net.fusion.jac_weight == JAC_WEIGHT and net.fusion.deq.f_max_iter == 15

    model.train()
    batch = _batch()
    out = model(batch)
    assert out["logits"].shape == (4, len(ANSWERS))
    ce = torch.nn.functional.cross_entropy(out["logits"], batch["class_id"].squeeze(1))
    assert out["jac_loss"].item() > 0
    torch.testing.assert_close(out["loss"], ce + out["jac_loss"])       # the criterion added the term
    assert 1 <= out["deq_nstep"].item() <= 15 and out["deq_rel_residual"].item() >= 0

    out["loss"].backward()
    deq_grads = [p.grad for p in net.fusion.deq.parameters()]
    assert all(g is not None for g in deq_grads) and sum(g.abs().sum() for g in deq_grads) > 0
    assert net.attention.fusion.linear0.weight.grad.abs().sum() > 0    # the implicit backward reaches the inputs
    assert net.txt_enc.embedding.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out["jac_loss"].item() == 0.0             # no Jacobian term outside training
    assert "loss" not in out                          # (no eval split here, so no eval criterion)


def test_deq_fusion_defaults_from_the_command_line_and_bad_options():
    plugin.INTEGRATION.apply(None, {"f_max_iter": 7, "jac_weight": 0.25})
    try:
        from block.models.networks.fusions.factory import factory

        fusion = factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2})
        assert fusion.deq.f_max_iter == 7 and fusion.jac_weight == 0.25
        # the plugin's default (ours, plugin.CONVERGENCE): the contractive norm, gains bounded by 0.15
        assert (fusion.deq.norm, fusion.deq.norm_options) == ("contractive", {"max_gain": 0.15})
        off = factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2,
                       "norm": "none", "norm_options": {}})
        assert (off.deq.norm, off.deq.norm_options) == (None, {})     # the options file undoes it
        bare = factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2,
                        "norm": "none"})          # another norm: the default's gain bound goes with it
        assert (bare.deq.norm, bare.deq.norm_options) == (None, {})
        with pytest.raises(ValueError, match="norm_options: given without a norm"):
            factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2,
                     "norm": "none", "norm_options": {"max_gain": 0.2}})    # options of one's own: said, not hidden
        fusion = factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2,
                          "f_max_iter": 3})
        assert fusion.deq.f_max_iter == 3                 # the options file wins over the command line
        assert fusion.deq.jac_weight == 0.0               # weighted by the criterion, never inside DEQFusion too
        mutan_keys = {"rank": 15, "shared": False, "normalize": False, "dropout_pre_lin": 0.1}
        fusion = factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 8, "num_groups": 2,
                          **mutan_keys})                  # a `type: mutan` block switched by its type alone
        assert fusion.output_dim == 3
        with pytest.raises(ValueError, match="fusion 'rnak': unknown"):
            factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "rnak": 15})   # typos still fail
        with pytest.raises(ValueError, match="output_dim"):
            factory({"type": "deq", "input_dims": [8, 12], "output_dim": 0})
        with pytest.raises(ValueError, match="num_groups"):
            factory({"type": "deq", "input_dims": [8, 12], "output_dim": 3, "mm_dim": 10, "num_groups": 4})
    finally:
        plugin.INTEGRATION.apply(None, {})


def test_apply_is_idempotent_and_removable():
    from block.models.criterions import factory as criterions_factory
    from block.models.networks import vqa_net
    from block.models.networks.fusions import factory as fusions_factory

    plugin.INTEGRATION.remove()
    originals = (vqa_net.factory_fusion, vqa_net.VQANet.forward, criterions_factory.factory)
    plugin.INTEGRATION.apply(None, {})
    patched = vqa_net.factory_fusion
    plugin.INTEGRATION.apply(None, {})
    assert vqa_net.factory_fusion is patched is fusions_factory.factory
    assert vqa_net.VQANet.forward is not originals[1] and criterions_factory.factory is not originals[2]
    plugin.INTEGRATION.remove()
    try:
        assert (vqa_net.factory_fusion, vqa_net.VQANet.forward, criterions_factory.factory) == originals
        assert fusions_factory.factory is originals[0]
        with pytest.raises(ValueError):
            vqa_net.factory_fusion({"type": "deq", "input_dims": [8, 8], "output_dim": 3})
    finally:
        plugin.INTEGRATION.apply(None, {})


def test_yaml_shim_is_conditional():
    import yaml as pyyaml

    plugin.INTEGRATION.apply(None, {})
    assert not common.yaml_load.needed()                   # applied (or never needed): no second wrap
    assert pyyaml.load("a: [1, 2]") == {"a": [1, 2]}       # 2018-era call without Loader works


def test_bootstrap_shims_apply_only_where_broken():
    """bootstrap 0.0.13 on today's torch: its accuracy views a non-contiguous tensor, and block logs clip_grad_norm_'s
    tensor where bootstrap's Logger writes JSON. Each shim's condition is that breakage, and it undoes."""
    from deqfusion_compat import vqa
    from deqfusion_core import compat

    names = ["bootstrap.models.metrics.accuracy", "bootstrap.Logger.log_value(tensor)"]
    compat.undo_shims("block", names)                   # in case another test left the integration applied
    shims = {s.name: s for s in compat.shims("block")}
    assert shims[names[0]].needed is vqa.bootstrap_accuracy_fails and shims[names[1]].needed is vqa._norm_is_a_tensor
    assert vqa.bootstrap_accuracy_fails() and vqa._norm_is_a_tensor()           # broken on this stack
    try:
        assert compat.apply_shims("block", only=names) == names
        from bootstrap.lib.logger import Logger
        from bootstrap.models.metrics import accuracy as metrics

        assert not vqa.bootstrap_accuracy_fails()       # fixed: its condition no longer holds
        top1, _ = metrics.accuracy(torch.eye(3, 5), torch.tensor([0, 1, 4]), topk=(1, 2))
        assert float(top1) == pytest.approx(200 / 3)
        logger = Logger.__new__(Logger)
        logger.values = {}
        logger.log_value("train_batch.norm", torch.tensor(2.5))
        assert logger.values["train_batch.norm"] == [2.5] and type(logger.values["train_batch.norm"][0]) is float
    finally:
        compat.undo_shims("block", names)
    assert vqa.bootstrap_accuracy_fails()               # undone
