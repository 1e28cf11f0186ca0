"""The integration kit: FusionOptions, the shim machinery, Integration (apply, remove), FusionAdapter (Jacobian
policy, statistics, non-convergence report), the process helpers, and the docs' example integration run as a
plugin against a toy upstream."""
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch

from deqfusion_core import compat
from deqfusion_core.integration import FusionAdapter, Integration, Patches, Upstream
from deqfusion_core.options import FusionOptions, OptionError
from deqfusion_core.process import run_main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"


# -- FusionOptions ---------------------------------------------------------------------------------------------
def test_options_check_names_and_keep_defaults_apart():
    options = FusionOptions({"f_max_iter": 7, "glove": "g.txt", "f_tol": None}, defaults={"glove": None, "jac_weight": 20.0},
                            where="mine option")
    assert dict(options) == {"glove": "g.txt", "jac_weight": 20.0, "f_max_iter": 7}   # None: not given
    assert options.given() == {"f_max_iter": 7, "glove": "g.txt"} and options.jac_weight == 20.0
    assert options.fusion_kwargs() == {"f_max_iter": 7}       # neither its own keys nor the Jacobian weight
    assert options.updated({"f_max_iter": 3})["f_max_iter"] == 3 and options["f_max_iter"] == 7
    with pytest.raises(OptionError, match="mine option 'f_max_ter': unknown; DEQFusion takes .*f_max_iter.*also "
                                          "takes glove"):
        FusionOptions({"f_max_ter": 7}, defaults={"glove": None}, where="mine option")
    with pytest.raises(OptionError, match="fusion.params 'jac_weight': must be a number >= 0, got -1"):
        FusionOptions({"jac_weight": -1}, where="fusion.params")
    with pytest.raises(OptionError, match="deq 'solvr'"):
        options.updated({"solvr": "anderson"}, where="deq")


def test_options_build_deqfusion_and_it_checks_the_values():
    fusion = FusionOptions({"f_max_iter": 5, "jac_weight": 3.0}).build([4, 6], 8, num_groups=2)
    assert fusion.f_max_iter == 5 and fusion.num_groups == 2 and fusion.jac_weight == 0.0   # the adapter's
    assert FusionOptions({"num_groups": 1}).build([4, 6], 8, num_groups=2).num_groups == 1  # given options win
    with pytest.raises(ValueError, match="num_groups"):
        FusionOptions({"num_groups": 3}).build([4, 6], 8)


# -- shims -----------------------------------------------------------------------------------------------------
@pytest.fixture
def toy_shims():
    state = {"broken": True, "applied": 0, "undone": 0}
    fix = compat.shim("toy", "the toy is broken", needed=lambda: state["broken"],
                      undo=lambda: state.__setitem__("undone", state["undone"] + 1), name="fix")(
        lambda: state.update(broken=False, applied=state["applied"] + 1))
    ctx = compat.shim("toy", "needs a root", needed=lambda root: True, name="ctx")(lambda root: state.update(root=root))
    yield state, fix, ctx
    compat.unregister(fix)
    compat.unregister(ctx)


def test_shims_apply_when_needed_once_and_are_recorded(toy_shims):
    state, fix, ctx = toy_shims
    assert compat.apply_shims("toy", ["fix"]) == ["fix"] and state["applied"] == 1
    assert compat.apply_shims("toy", ["fix"]) == [] and state["applied"] == 1     # in place: not again
    assert fix in compat.applied("toy") and ctx not in compat.applied("toy")
    with pytest.raises(TypeError, match="shim toy:ctx needs root"):
        compat.apply_shims("toy", ["ctx"])
    assert compat.apply_shims("toy", ["ctx"], root="/r") == ["ctx"] and state["root"] == "/r"
    assert compat.undo_shims("toy") == ["fix"] and state["undone"] == 1           # ctx has no undo: it stays
    state["broken"] = False
    assert compat.apply_shims("toy", ["fix"]) == []                               # not needed: not applied
    with pytest.raises(KeyError, match="no shim 'nope'"):
        compat.apply_shims("toy", ["nope"])


def test_module_shims_apply_when_the_module_is_imported(tmp_path, monkeypatch):
    (tmp_path / "deqfusion_toy_upstream.py").write_text("def broken():\n    return 'upstream'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    after = compat.shim("toyimport", "its broken() is broken", needed=lambda module: module.broken() == "upstream",
                        undo=lambda module: compat.restore(module, "broken"), module="deqfusion_toy_upstream",
                        name="after")(lambda module: compat.swap(module, "broken", lambda: "fixed"))
    try:
        compat.watch_imports("toyimport")
        import deqfusion_toy_upstream

        assert deqfusion_toy_upstream.broken() == "fixed" and after in compat.applied("toyimport")
        compat.undo_shims("toyimport")
        assert deqfusion_toy_upstream.broken() == "upstream"
        assert compat.watch_imports("toyimport") == ["after"]          # already imported: applied at once
    finally:
        compat.unwatch_imports("toyimport")
        compat.unregister(after)
        sys.modules.pop("deqfusion_toy_upstream", None)


# -- Integration -----------------------------------------------------------------------------------------------
class Target:
    def method(self):
        return "original"


class ToyIntegration(Integration):
    name = "toy-kit"
    option_defaults = {"flavour": "deq"}

    def install(self, upstream, options):
        self.installs = getattr(self, "installs", 0) + 1
        if options["flavour"] == "broken":
            self.patches.set(Target, "method", lambda self: "half-patched")
            raise RuntimeError("install failed")
        self.patches.set(Target, "method", lambda self: options["flavour"])


def test_apply_is_idempotent_reapplies_other_options_and_remove_restores():
    integ, original = ToyIntegration(), vars(Target)["method"]
    integ.apply(None, {"flavour": "a"})
    integ.apply(None, {"flavour": "a"})
    assert integ.installs == 1 and Target().method() == "a"
    integ.apply(None, {"flavour": "b"})
    assert integ.installs == 2 and Target().method() == "b"
    integ.remove()
    assert vars(Target)["method"] is original and not integ.applied
    with pytest.raises(RuntimeError, match="install failed"):
        integ.apply(None, {"flavour": "broken"})
    assert vars(Target)["method"] is original and not integ.applied               # a failed install is undone
    with pytest.raises(OptionError, match="toy-kit option 'flavor'"):
        integ.apply(None, {"flavor": "a"})


def test_patches_restore_attributes_and_registry_items():
    owner, registry = types.SimpleNamespace(a=1), {"x": 1}
    with Patches() as patches:
        assert patches.set(owner, "a", 2) == 1
        patches.set(owner, "b", 3)
        patches.item(registry, "x", 2)
        patches.item(registry, "y", 3)
        assert (owner.a, owner.b, registry) == (2, 3, {"x": 2, "y": 3})
    assert vars(owner) == {"a": 1} and registry == {"x": 1}


# -- FusionAdapter ---------------------------------------------------------------------------------------------
class Pair(FusionAdapter):
    label = "Toy"

    def forward(self, a, b):
        return self.fuse([a, b])


def _fusion_grads(jacobian: str, jac_weight: float):
    torch.manual_seed(0)
    adapter = Pair([4, 4], 8, {"jac_weight": jac_weight, "f_max_iter": 40, "num_groups": 2}).train()
    adapter.jacobian = jacobian
    torch.manual_seed(1)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    adapter(a, b).sum().backward()
    return adapter, [p.grad.clone() for p in adapter.parameters()]


def test_jacobian_policy_attach_adds_the_weighted_term_report_leaves_it():
    plain, none = _fusion_grads("attach", 0.0)
    attached, with_term = _fusion_grads("attach", 2.0)
    reported, report = _fusion_grads("report", 2.0)
    assert attached.last_jac_loss.item() > 0 and attached.last_stats.nstep >= 1
    assert all(torch.equal(g, r) for g, r in zip(none, report))                    # report: the loss adds it
    assert any(not torch.allclose(g, w) for g, w in zip(none, with_term))          # attach: the gradient has it
    # attach == (sum + 2 * jac).backward(), with the same Hutchinson probe
    torch.manual_seed(0)
    explicit = Pair([4, 4], 8, {"f_max_iter": 40, "num_groups": 2}).train()
    explicit.jacobian = "report"
    torch.manual_seed(1)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    (explicit(a, b).sum() + 2.0 * explicit.last_jac_loss).backward()
    for g, e in zip(with_term, (p.grad for p in explicit.parameters())):
        torch.testing.assert_close(g, e)


def test_nonconvergence_is_reported_the_first_time_and_then_every_n():
    adapter = Pair([4, 4], 8, {"f_max_iter": 1, "num_groups": 2})
    adapter.nonconvergence.every = 3
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match=r"Toy DEQ fusion did not converge \(1 forwards so far\)"):
        adapter(x, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            adapter(x, x)
    assert [str(w.message).split("(")[1].split(" ")[0] for w in caught] == ["4"]
    assert not adapter.last_stats.converged


@pytest.mark.parametrize("b_max_iter", [1, 60])
def test_a_backward_that_did_not_converge_is_reported_when_it_runs(b_max_iter):
    """Every implicit backward solve is checked as it ends: the last step's too, and each of two forwards whose
    loss is one backward (gradient accumulation). Checked at the next forward before, only the latest forward's
    backward was seen: the last step's never, and one of two accumulated ones."""
    from conftest import make_contractive

    torch.manual_seed(0)
    adapter = Pair([4, 4], 8, {"f_max_iter": 100, "f_tol": 1e-6, "num_groups": 2, "b_max_iter": b_max_iter,
                               "b_tol": 1e-6}).train()
    make_contractive(adapter.deq)
    x, w = torch.randn(3, 4), torch.randn(3, 8)   # (a plain sum has no gradient through f's last GroupNorm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            (adapter(x, x) * w).sum().backward()
        after_steps = adapter.nonconvergence.backward_count
        ((adapter(x, x) + adapter(x, 2 * x)) * w).sum().backward()
    backward = [str(w.message) for w in caught if "implicit backward" in str(w.message)]
    assert adapter.last_stats.converged and all("DEQ fusion did not converge" not in str(w.message) for w in caught)
    if b_max_iter == 60:      # converged: nothing to report
        assert backward == [] and adapter.nonconvergence.backward_count == 0
    else:                     # five non-converged backward solves, the first of them warned
        assert (after_steps, adapter.nonconvergence.backward_count) == (3, 5)
        assert len(backward) == 1 and backward[0].startswith("Toy DEQ fusion's implicit backward did not converge "
                                                             "(1 backward solves so far)") and "after 1/1 steps" in backward[0]


# -- process ---------------------------------------------------------------------------------------------------
def test_run_main_swaps_argv_and_turns_systemexit_into_the_exit_code(tmp_path, capsys):
    seen = []
    argv, cwd = sys.argv[:], os.getcwd()
    assert run_main(lambda: seen.append((sys.argv[:], os.getcwd())), ["--x", "1"], prog="up.py", cwd=tmp_path) == 0
    assert seen == [(["up.py", "--x", "1"], str(tmp_path))] and sys.argv == argv and os.getcwd() == cwd
    assert run_main(lambda: sys.exit(3), []) == 3 and run_main(lambda: sys.exit(None), []) == 0
    assert run_main(lambda: sys.exit("bad input"), []) == 1 and "bad input" in capsys.readouterr().err


# -- the docs' example: an eighth integration in one module ----------------------------------------------------
UPSTREAM_MODEL = '''
import torch

class Fusion(torch.nn.Module):          # the upstream's concatenation
    def __init__(self, d1, d2):
        super().__init__()

    def forward(self, a, b):
        return torch.cat([a, b], 1)
'''
UPSTREAM_TRAIN = '''
import sys, torch
from model import Fusion
torch.manual_seed(0)
fusion = Fusion(4, 4)
head = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(list(fusion.parameters()) + list(head.parameters()), lr=0.1)
for step in range(int(sys.argv[sys.argv.index("--epochs") + 1])):
    loss = torch.nn.functional.cross_entropy(head(fusion(torch.randn(6, 4), torch.randn(6, 4))), torch.arange(6) % 2)
    opt.zero_grad()
    loss.backward()
    opt.step()
print("FUSION", type(fusion).__name__, "STEPS", fusion.last_stats.nstep if hasattr(fusion, "last_stats") else None)
'''


@pytest.fixture
def docs_plugin(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    site, upstream = tmp_path / "site", tmp_path / "myframework"
    dist = site / "mine-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deqfusion.integrations]\nmine = deqfusion_mine\n")
    (site / "deqfusion_mine.py").write_text(code)
    upstream.mkdir()
    (upstream / "model.py").write_text(textwrap.dedent(UPSTREAM_MODEL))
    (upstream / "train.py").write_text(textwrap.dedent(UPSTREAM_TRAIN))
    return site, upstream


def test_the_docs_example_integration_runs_its_upstream(docs_plugin):
    site, upstream = docs_plugin
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "deqfusion_core", "run", "mine", "--upstream", str(upstream),
                          "--f-max-iter", "50", "--jac-weight", "0.1", "-o", "num_groups=2", "--", "--epochs", "3"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"FUSION MyFusion STEPS \d+", run.stdout)


def test_the_docs_example_integration_applies_and_removes(docs_plugin, monkeypatch):
    site, upstream = docs_plugin
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    import deqfusion_mine

    integ = deqfusion_mine.INTEGRATION
    integ.apply(Upstream("mine", True, upstream), {"num_groups": 2, "jac_weight": 0.1})
    try:
        model = sys.modules["model"]
        fusion = model.Fusion(4, 4)
        assert isinstance(fusion, deqfusion_mine.MyFusion) and fusion.jac_weight == 0.1
        assert fusion(torch.randn(3, 4), torch.randn(3, 4)).shape == (3, 8)
    finally:
        integ.remove()
        sys.modules.pop("deqfusion_mine", None)
    assert model.Fusion.__module__ == "model" and vars(model)["Fusion"].forward.__qualname__ == "Fusion.forward"
    sys.modules.pop("model", None)


def test_a_stand_in_does_not_count_as_importable(monkeypatch):
    from deqfusion_compat import common

    monkeypatch.setitem(sys.modules, "deqfusion_fake_vision", common.Unavailable("deqfusion_fake_vision", "broken", "x"))
    assert common.import_error("deqfusion_fake_vision").startswith("a stand-in")
    assert common.import_error("json") is None
