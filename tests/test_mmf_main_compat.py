"""Unit tests of deqfusion's own logic for MMF from git main: finding which MMF is installed, copying a checkout,
the shims' conditions and replacements (deqfusion_compat.mmf_main), and the baseline patches' modules. The real
MMF main runs are in integration_tests/test_mmf_main.py (a venv of their own)."""
import importlib
import inspect
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from deqfusion_adapters.mmf import checkout, flavour
from deqfusion_adapters.mmf.baselines import BranchFusion, SplitFusion
from deqfusion_compat import mmf_main


def _package(root, version):
    (root / "mmf").mkdir(parents=True)
    (root / "mmf" / "__init__.py").write_text("")
    (root / "mmf" / "version.py").write_text(f'import sys\n\n__version__ = "{version}"\n')
    return root


@pytest.mark.parametrize("version,expected", [("1.0.0rc10", "rc10"), ("1.0.0rc12", "main")])
def test_detect_tells_rc10_from_main_without_importing(tmp_path, monkeypatch, version, expected):
    root = _package(tmp_path / "src", version)
    spec = importlib.machinery.ModuleSpec("mmf", None, is_package=True)
    spec.submodule_search_locations = [str(root / "mmf")]
    monkeypatch.delitem(sys.modules, "mmf", raising=False)
    monkeypatch.setattr(flavour.importlib.util, "find_spec", lambda name: spec if name == "mmf" else None)
    info = flavour.detect()
    assert (info.flavour, info.version, info.path) == (expected, version, (root / "mmf").resolve())
    assert "mmf" not in sys.modules


def test_use_checkout_names_the_variable_on_a_wrong_path(tmp_path, monkeypatch):
    monkeypatch.setenv(flavour.ROOT_VARIABLE, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DEQFUSION_MMF_ROOT: .* not an MMF checkout"):
        flavour.use_checkout()


def test_copy_checkout_restores_flattened_git_links(tmp_path):
    src = _package(tmp_path / "src", "1.0.0rc12")
    (src / "projects" / "others").mkdir(parents=True)
    (src / "projects" / "others" / "recipe.yaml").write_text("a: 1\n")
    (src / "projects" / "hm").mkdir()
    (src / "projects" / "hm" / "recipe.yaml").write_text("../others/recipe.yaml")   # a link checked out as a file
    (src / "mmf" / "projects").write_text("../projects")
    (src / "mmf" / "empty.py").write_text("")
    (src / "notes.txt").write_text("see docs/index.md")                           # text, not a path that exists
    links = checkout.copy_checkout(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert {p.relative_to(dst).as_posix() for p in links} == {"projects/hm/recipe.yaml", "mmf/projects"}
    assert (dst / "projects" / "hm" / "recipe.yaml").is_symlink()
    assert (dst / "projects" / "hm" / "recipe.yaml").read_text() == "a: 1\n"
    assert (dst / "mmf" / "projects" / "others" / "recipe.yaml").is_file()
    assert not (dst / "mmf" / "empty.py").is_symlink() and not (dst / "notes.txt").is_symlink()


def test_shims_are_registered_with_a_reason_and_switchable(monkeypatch):
    from deqfusion_core.compat import shims

    registered = {s.name: s for s in shims(mmf_main.UPSTREAM)}
    assert {"torchtext", "torchaudio", "torchvision_ops", "torchvision_read_video", "demjson",
            "lightning_callbacks_base", "transformers_lazy_aliases", "lightning_trainer_arguments",
            "lightning_dataloader_idx"} <= set(registered)
    assert all(s.reason and "\n" not in s.reason for s in registered.values())
    monkeypatch.setattr(mmf_main, "missing", lambda module: True)
    assert registered["torchtext"].needed() is True
    monkeypatch.setenv(mmf_main.OFF_VARIABLE, "demjson,torchtext")
    assert registered["torchtext"].needed() is False


def test_stand_ins_have_specs():
    names = ("torchtext", "torchtext.vocab", "torchaudio", "torchaudio.transforms")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    try:
        mmf_main.torchtext.apply()
        mmf_main.torchaudio.apply()
        from torchtext import vocab

        assert vocab.pretrained_aliases == {}
        assert importlib.util.find_spec("torchtext") is not None   # no ValueError (transformers and Lightning ask)
        import torchaudio

        assert getattr(torchaudio.transforms, "GrayScaleTo3Channels", None) is None   # MMF's lookup goes on
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def test_torchvision_condition_is_the_c_ops_failure():
    """In a fresh process (this one may hold rc10's stand-in): the condition is true exactly when `import torchvision`
    dies on its missing C ops, as PyPI's CUDA build beside the CPU torch does (this venv's, see install.sh)."""
    code = ("import importlib, sys\n"
            "try:\n    importlib.import_module('torchvision'); broken = False\n"
            "except RuntimeError as e:\n    broken = 'torchvision::' in str(e)\n"
            "    [sys.modules.pop(m) for m in list(sys.modules) if m.startswith('torchvision')]\n"
            "from deqfusion_compat import mmf_main\n"
            "print(broken, mmf_main._torchvision_c_ops_missing(), 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    broken, condition, imported = (word == "True" for word in out)
    assert condition is broken and imported is not broken


def test_transformers_aliases_resolve_lazily_to_the_same_module():
    pytest.importorskip("transformers")
    import transformers

    finder = mmf_main._TransformersAliases(transformers.models.__path__[0])
    sys.meta_path.append(finder)
    try:
        sys.modules.pop("transformers.configuration_bert", None)
        old = importlib.import_module("transformers.configuration_bert")
        new = importlib.import_module("transformers.models.bert.configuration_bert")
        assert old is new and new.__spec__.name == "transformers.models.bert.configuration_bert"
        assert finder.find_spec("transformers.no_such_module", None) is None
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("transformers.configuration_bert", None)


def test_lightning_trainer_takes_v1_arguments():
    calls = {}

    class Trainer:   # Lightning 2's signature: no resume_from_checkpoint, no gpus
        def __init__(self, callbacks=None, accelerator="auto", devices="auto", max_steps=-1):
            calls["init"] = dict(accelerator=accelerator, devices=devices, max_steps=max_steps)

        def fit(self, model, datamodule=None, ckpt_path=None):
            calls["fit"] = ckpt_path

    V1 = mmf_main._lightning_v1_trainer(Trainer)
    V1(max_steps=4, resume_from_checkpoint="last.ckpt", gpus=0).fit("model")
    assert calls == {"init": {"accelerator": "cpu", "devices": "auto", "max_steps": 4}, "fit": "last.ckpt"}
    V1(gpus=2).fit("model", ckpt_path="given.ckpt")
    assert calls == {"init": {"accelerator": "gpu", "devices": 2, "max_steps": -1}, "fit": "given.ckpt"}
    assert V1.__name__ == "Trainer"


def test_loop_callback_gets_a_default_dataloader_idx():
    seen = []

    class LightningLoopCallback:
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx):
            seen.append(dataloader_idx)

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=3):
            seen.append(dataloader_idx)

    module = types.ModuleType("mmf.trainers.lightning_core.loop_callback")
    module.LightningLoopCallback = LightningLoopCallback
    mmf_main._default_dataloader_idx(module)
    LightningLoopCallback().on_train_batch_end(None, None, None, None, 0)   # Lightning 2's call
    LightningLoopCallback().on_validation_batch_end(None, None, None, None, 0)
    assert seen == [0, 3]   # the hook that had a default keeps its own
    hook = inspect.signature(LightningLoopCallback.on_train_batch_end, follow_wrapped=False)
    assert hook.parameters["dataloader_idx"].default == 0


class Pair(nn.Module):
    """A test double of a fusion: records its inputs, returns their concatenation through a linear map."""

    def __init__(self, dims, out):
        super().__init__()
        self.linear, self.seen = nn.Linear(sum(dims), out), None

    def forward(self, xs):
        self.seen = xs
        return self.linear(torch.cat(xs, -1))


def test_split_fusion_gets_back_what_was_concatenated():
    text, modal = torch.randn(3, 5), torch.randn(3, 7)
    fusion, classifier = Pair([5, 7], 4), nn.Linear(4, 2)
    out = SplitFusion([5, 7], fusion, classifier)(torch.cat([text, modal], -1))
    assert torch.equal(fusion.seen[0], text) and torch.equal(fusion.seen[1], modal)
    assert torch.allclose(out, classifier(fusion([text, modal])))


def test_branch_fusion_replaces_only_the_main_branch():
    class Combine(nn.Module):   # MoViE+MCAN's BranchCombineLayer's interface
        out_dim = 6

        def __init__(self):
            super().__init__()
            self.layer_norm = nn.ModuleList([nn.LayerNorm(6) for _ in range(3)])

        def forward(self, v_cga, v_cbn, q):
            branches = [torch.full((2, 6), float(i)) for i in range(3)]
            return torch.stack(branches, 1) if self.training else branches[0]

    v_cga, v_cbn, q = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3)
    fusion = Pair([4, 4, 3], 6)
    layer = BranchFusion(Combine(), fusion)
    main = layer.combine.layer_norm[0](fusion([v_cga, v_cbn, q]))
    assert torch.allclose(layer.eval()(v_cga, v_cbn, q), main)
    stacked = layer.train()(v_cga, v_cbn, q)
    assert stacked.shape == (2, 3, 6) and torch.allclose(stacked[:, 0], main)
    assert torch.equal(stacked[:, 1:], torch.stack([torch.full((2, 6), 1.0), torch.full((2, 6), 2.0)], 1))
