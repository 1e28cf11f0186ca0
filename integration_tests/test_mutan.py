"""Mutan (Cadene/vqa.pytorch) with DEQ fusion: MutanAtt, built by its own model factory with the patch, trains a
few steps through its own engine (vqa/lib/engine.train) on generated features.

Checkout-gated: set DEQFUSION_VQA_PYTORCH_ROOT to a checkout of Cadene/vqa.pytorch. Skip-thoughts weights are
not downloadable here: small random files in the layout PyPI's `skipthoughts` reads are written instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from deqfusion_compat import vqa
from deqfusion_patches.mutan import plugin

ROOT = os.environ.get("DEQFUSION_VQA_PYTORCH_ROOT")

TRAIN = r"""
import sys, json, torch
from pathlib import Path
from deqfusion_core import Upstream
from deqfusion_core import compat
from deqfusion_patches.mutan import plugin
plugin.INTEGRATION.apply(Upstream("mutan", True, Path(sys.argv[1])), {"jac_weight": 0.5, "f_max_iter": 10})
import vqa.lib.engine as engine
import vqa.lib.logger as logger
import vqa.lib.criterions as criterions
import vqa.models as models
words = ["what", "color", "is", "the", "cat", "how", "many"]
answers = ["red", "blue", "two", "yes", "no", "three"]
opt = {"arch": "MutanAtt", "dim_v": 32, "dim_q": 2400,
       "seq2vec": {"arch": "skipthoughts", "dir_st": sys.argv[2], "type": "BayesianUniSkip", "dropout": 0.25,
                   "fixed_emb": False},
       "attention": {"nb_glimpses": 2, "dim_hv": 20, "dim_hq": 20, "dim_mm": 20, "R": 2, "dropout_v": 0.5,
                     "dropout_q": 0.5, "dropout_mm": 0.5, "activation_v": "tanh", "activation_q": "tanh",
                     "dropout_hv": 0, "dropout_hq": 0},
       "fusion": {"dim_hv": 40, "dim_hq": 20, "dim_mm": 30, "R": 2, "dropout_v": 0.5, "dropout_q": 0.5,
                  "activation_v": "tanh", "activation_q": "tanh", "dropout_hv": 0, "dropout_hq": 0},
       "classif": {"dropout": 0.5}}
torch.manual_seed(0)
model = models.factory(opt, words, answers, cuda=torch.cuda.is_available(), data_parallel=False)
assert isinstance(model.fusion_classif, plugin.DEQMutanFusion), type(model.fusion_classif)
g = torch.Generator().manual_seed(0)
loader = [{"visual": torch.rand(4, 32, 3, 3, generator=g),
           "question": torch.randint(1, len(words) + 1, (4, 5), generator=g),
           "answer": torch.randint(0, len(answers), (4,), generator=g)} for _ in range(3)]
exp = logger.Experiment("deq", opt)
exp.add_meters("train", {name: logger.AvgMeter() for name in ("loss", "acc1", "acc5", "batch_time", "data_time")})
criterion = criterions.factory(opt, cuda=torch.cuda.is_available())
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
before = {k: v.clone() for k, v in model.fusion_classif.state_dict().items()}
engine.train(loader, model, criterion, optimizer, exp, epoch=0, print_freq=1)
changed = [k for k, v in model.fusion_classif.state_dict().items() if not torch.equal(v, before[k])]
print("CHANGED", len(changed), "OF", len(before))
print("NSTEP", model.fusion_classif.last_stats.nstep)
print("NORM", model.fusion_classif.deq.norm)
print("SHIMS", sorted(s.name for s in compat.applied("mutan")))
from vqa.models import att, noatt
plugin.INTEGRATION.remove()
print("REMOVED", att.MutanAtt.__init__.__module__, noatt.MutanNoAtt.__init__.__module__, "vqa.lib.engine" in sys.modules)
"""


@pytest.fixture(scope="module")
def skipthoughts_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("skipthoughts")
    (d / "dictionary.txt").write_text("UNK\nwhat\ncolor\nis\nthe\ncat\n")
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    np.save(d / "utable.npy", rand(6, 620))
    np.savez(d / "uni_skip.npz", encoder_W=rand(620, 4800), encoder_b=rand(4800), encoder_U=rand(2400, 4800),
             encoder_Wx=rand(620, 2400), encoder_bx=rand(2400), encoder_Ux=rand(2400, 2400))
    return d


@pytest.mark.skipif(not ROOT, reason="DEQFUSION_VQA_PYTORCH_ROOT is not set (a Cadene/vqa.pytorch checkout)")
def test_mutan_att_trains_through_its_engine(tmp_path, skipthoughts_dir):
    script = tmp_path / "train_mutan.py"
    script.write_text(TRAIN)
    out = subprocess.run([sys.executable, str(script), ROOT, str(skipthoughts_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert log.count("Epoch: [0]") == 3                       # the engine's own loop printed every step
    changed, total = map(int, log.split("CHANGED", 1)[1].split()[0:3:2])
    assert changed == total                                   # every DEQ fusion parameter was updated
    assert "NORM contractive" in log                          # the plugin's default (ours), options not naming it
    assert "vqa.lib.engine" in log.split("SHIMS", 1)[1]       # the engine needed its in-memory source rewrite
    assert "REMOVED vqa.models.att vqa.models.noatt False" in log   # remove(): the upstream's own objects again


def test_contractive_norm_by_default_which_options_override():
    """The fusion the patched MutanAtt builds takes the plugin's resolved options: the contractive norm (ours,
    plugin.CONVERGENCE) unless `-o norm=none` (DEQFusion's default) or another norm is given; the backward cap 40."""
    assert plugin.CONVERGENCE == {"norm": "contractive", "b_max_iter": 40}
    build = lambda options: plugin.DEQMutanFusion(8, 6, 10, plugin.INTEGRATION.fusion_options(options)).deq
    assert build({}).norm == "contractive" and build({"jac_weight": 0.1}).norm == "contractive"
    assert build({"norm": "none"}).norm is None and build({"norm": "spectral"}).norm == "spectral"
    assert build({}).b_max_iter == 40 and build({"b_max_iter": 10}).b_max_iter == 10   # the backward's cap, likewise


def test_groups_divide_mutan_widths():
    assert plugin.default_groups(510) == 5 and plugin.default_groups(512) == 4 and plugin.default_groups(7) == 1


def test_source_rewrite_loads_a_module_that_does_not_compile(tmp_path):
    bad = tmp_path / "old_engine.py"
    bad.write_text("def f(x):\n    return x.cuda(async=True)\n")
    assert not vqa.compiles(bad)
    module = vqa.load_rewritten("deqfusion_test_old_engine", bad, vqa.ENGINE_REWRITES)
    try:
        class Tensor:
            def cuda(self, **kwargs):
                return kwargs

        assert module.f(Tensor()) == {"non_blocking": True}
        assert module.f.__code__.co_filename == str(bad)              # tracebacks still name the real file
        assert bad.read_text().count("async=True") == 1              # the file itself is untouched
    finally:
        vqa.unload_rewritten("deqfusion_test_old_engine")
    assert "deqfusion_test_old_engine" not in sys.modules


@pytest.mark.skipif(not ROOT, reason="DEQFUSION_VQA_PYTORCH_ROOT is not set (a Cadene/vqa.pytorch checkout)")
def test_pinning_shim_only_without_an_accelerator():
    """vqa.pytorch's DataLoader pins every batch; today's torch refuses without an accelerator. The shim's
    condition is that refusal; it leaves batches unpinned and undoes."""
    from pathlib import Path

    from deqfusion_core import compat

    shim = {s.name: s for s in compat.shims("mutan")}["vqa.lib.dataloader.pin_memory"]
    assert shim.needed is vqa._pinning_fails
    if not vqa._pinning_fails():
        pytest.skip("pinning works here (an accelerator is present): the shim does not apply")
    root = Path(ROOT)
    dataloader = vqa._dataloader_module(root)
    original = dataloader.pin_memory_batch
    try:
        assert compat.apply_shims("mutan", ["vqa.lib.dataloader.pin_memory"], root=root) == ["vqa.lib.dataloader.pin_memory"]
        batch = {"visual": np.zeros(2)}
        assert dataloader.pin_memory_batch(batch) is batch
    finally:
        compat.undo_shims("mutan", ["vqa.lib.dataloader.pin_memory"])
    assert dataloader.pin_memory_batch is original
