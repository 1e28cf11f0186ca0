"""Plugin manager and command line, end to end, with a plugin declared by the test itself."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN = textwrap.dedent('''
    import json, os
    from pathlib import Path
    from deqfusion_core import Integration, hookimpl, run_path_as_main

    class Toy(Integration):
        name = "toy"
        summary = "a test integration"
        env_var = "DEQFUSION_TOY_ROOT"
        marker = "train.py"
        repository = "example/toy"
        compat = ("toyshims",)

        def apply(self, upstream, options=None):
            from deqfusion_core.compat import apply_shims
            import toyshims

            apply_shims("toy")
            os.environ["TOY_APPLIED"] = json.dumps(options or {})

        def launch(self, upstream, argv):
            return run_path_as_main(upstream.root / "train.py", argv, cwd=upstream.root)

    @hookimpl
    def deqfusion_integration():
        return Toy()

    @hookimpl
    def deqfusion_add_commands(subparsers):
        p = subparsers.add_parser("toy-hello")
        p.set_defaults(func=lambda args: print("hello from toy") or 0)
''')

BROKEN = "raise ImportError('toy dependency missing')\n"

SHIMS = textwrap.dedent('''
    from deqfusion_core.compat import shim

    @shim("toy", "the toy upstream needs a flag", needed=lambda: True, name="flag")
    def flag():
        pass

    @shim("toy", "never broken here", needed=lambda: False, name="fine")
    def fine():
        pass
''')

UPSTREAM_SCRIPT = textwrap.dedent('''
    import json, os, sys
    from pathlib import Path
    Path("ran.json").write_text(json.dumps({"argv": sys.argv[1:], "name": __name__,
                                            "applied": json.loads(os.environ["TOY_APPLIED"])}))
    sys.exit(3 if "--fail" in sys.argv else 0)
''')


@pytest.fixture
def plugin_env(tmp_path):
    site = tmp_path / "site"
    dist = site / "toyplugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deqfusion.integrations]\ntoy = toyplugin\nbroken = brokenplugin\n")
    (site / "toyplugin.py").write_text(PLUGIN)
    (site / "brokenplugin.py").write_text(BROKEN)
    (site / "toyshims.py").write_text(SHIMS)
    upstream = tmp_path / "toy_upstream"
    upstream.mkdir()
    (upstream / "train.py").write_text(UPSTREAM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    env.pop("DEQFUSION_TOY_ROOT", None)
    return env, upstream


def deqfusion(env, *args):
    return subprocess.run([sys.executable, "-m", "deqfusion_core", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_list_shows_found_missing_and_broken_plugins(plugin_env):
    env, upstream = plugin_env
    out = deqfusion(env, "list")
    assert out.returncode == 0, out.stderr
    toy = next(line for line in out.stdout.splitlines() if line.startswith("toy "))
    assert "not found" in toy and "DEQFUSION_TOY_ROOT" in toy
    broken = next(line for line in out.stdout.splitlines() if line.startswith("broken"))
    assert "broken" in broken and "toy dependency missing" in broken
    out = deqfusion(dict(env, DEQFUSION_TOY_ROOT=str(upstream)), "list")
    toy = next(line for line in out.stdout.splitlines() if line.startswith("toy "))
    assert "found" in toy and "not found" not in toy and str(upstream) in toy


def test_run_applies_then_runs_upstream_script_as_main(plugin_env):
    env, upstream = plugin_env
    out = deqfusion(env, "run", "toy", "--upstream", str(upstream), "--solver", "broyden", "--f-tol", "1e-4",
                    "-o", "gating=False", "--", "--epochs", "2", "--lr=0.1")
    assert out.returncode == 0, out.stderr
    ran = json.loads((upstream / "ran.json").read_text())
    assert ran["name"] == "__main__"
    assert ran["argv"] == ["--epochs", "2", "--lr=0.1"]
    assert ran["applied"] == {"solver": "broyden", "f_tol": 1e-4, "gating": False}


def test_verbose_list_and_run_show_the_shims(plugin_env):
    env, upstream = plugin_env
    out = deqfusion(env, "list", "-v")
    assert out.returncode == 0, out.stderr
    assert "    flag: needed here -- the toy upstream needs a flag" in out.stdout
    assert "    fine: not needed here -- never broken here" in out.stdout
    out = deqfusion(env, "run", "-v", "toy", "--upstream", str(upstream), "--", "--epochs", "1")
    assert out.returncode == 0 and "deqfusion run toy: shims applied: flag" in out.stderr


def test_run_propagates_exit_code_and_env_var_locates(plugin_env):
    env, upstream = plugin_env
    out = deqfusion(dict(env, DEQFUSION_TOY_ROOT=str(upstream)), "run", "toy", "--", "--fail")
    assert out.returncode == 3


def test_run_errors_name_the_problem(plugin_env, tmp_path):
    env, upstream = plugin_env
    out = deqfusion(env, "run", "nope", "--", "x")
    assert out.returncode == 2 and "unknown integration 'nope'" in out.stderr and "toy" in out.stderr
    out = deqfusion(env, "run", "toy", "--", "x")
    assert out.returncode == 2 and "--upstream" in out.stderr and "DEQFUSION_TOY_ROOT" in out.stderr
    out = deqfusion(env, "run", "toy", "--upstream", str(tmp_path), "--", "x")
    assert out.returncode == 2 and "no train.py" in out.stderr
    out = deqfusion(env, "run", "broken", "--", "x")
    assert out.returncode == 2 and "failed to load" in out.stderr


def test_plugins_add_commands(plugin_env):
    env, _ = plugin_env
    out = deqfusion(env, "toy-hello")
    assert out.returncode == 0 and "hello from toy" in out.stdout


def test_fusion_option_parsing():
    from deqfusion_core.cli import parse_fusion_option

    assert parse_fusion_option("f_tol=1e-4") == ("f_tol", 1e-4)
    assert parse_fusion_option("solver=broyden") == ("solver", "broyden")
    assert parse_fusion_option("solver-options={'m': 6}") == ("solver_options", {"m": 6})
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_fusion_option("gating")


def test_import_is_light():
    out = subprocess.run([sys.executable, "-c", "import sys, deqfusion_core; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_demo_runs_and_writes_plots(tmp_path):
    out = subprocess.run([sys.executable, "-m", "deqfusion_core", "demo", "--steps", "32", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "val acc" in out.stdout and "rel residual" in out.stdout
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert (tmp_path / "gates.png").stat().st_size > 1000


def test_bench_prints_steps_and_times_per_tolerance_of_converged_solves():
    """At 3 x 64, batch 64, ten Jacobian-regularised steps leave f non-contractive at some rows (forward solves
    ran 105/105 steps unconverged before the warm-up checked convergence); every solve now converges."""
    out = subprocess.run([sys.executable, "-m", "deqfusion_core", "bench", "--batch", "64", "--dims", "64", "64", "64",
                          "--dim", "64", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"after \d+ Jacobian-regularised steps\n", out.stdout), out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("f_tol")]
    assert [line.split(":")[0] for line in lines] == ["f_tol 0.001 b_tol 0.001", "f_tol 0.0001 b_tol 0.0001",
                                                      "f_tol 1e-06 b_tol 0.0003"]
    assert all("train step" in line and "steps" in line for line in lines)
    assert all(line.count(", converged (tol") == 2 and "NOT converged" not in line for line in lines), lines


def test_bench_times_the_f_of_the_options_given(tmp_path):
    """`-o` picks the f to time (a recipe's: the contractive norm, no gate); the options the bench sets itself are
    refused with an error naming them."""
    out = subprocess.run([sys.executable, "-m", "deqfusion_core", "bench", "--batch", "16", "--dims", "8", "8",
                          "--dim", "8", "--repeats", "1", "-o", "norm=contractive", "-o", "gating=False", "--json",
                          str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["fusion_options"] == {"norm": "contractive", "gating": False}
    assert "fusion options: {'norm': 'contractive', 'gating': False}" in out.stdout
    assert report["cost"]["small"]["vjp"] == "hand-derived"
    bad = subprocess.run([sys.executable, "-m", "deqfusion_core", "bench", "-o", "f_tol=1e-3"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "deqfusion bench: -o f_tol: the bench sets" in bad.stderr


def test_bench_problem_and_cost_build_the_f_of_the_options():
    from deqfusion_core.bench import contractive_problem, f_cost

    p = contractive_problem(8, (8, 8), 8, warmup_steps=1, max_warmup_steps=1, gating=False, norm="contractive")
    assert p.fusion.fusion.gate is None and p.fusion.norm == "contractive" and p.fusion.num_groups == 4
    assert contractive_problem(8, (8, 8), 8, warmup_steps=0, max_warmup_steps=0, num_groups=2).fusion.num_groups == 2
    for fn in (lambda: contractive_problem(8, (8, 8), 8, b_tol=1e-3), lambda: f_cost(8, 2, 8, jac_weight=1.0)):
        with pytest.raises(ValueError, match="^-o (b_tol|jac_weight): the bench sets"):
            fn()


def test_bench_says_when_its_problem_does_not_converge():
    """Width 8 in 4 groups (norms over 2 entries): no warm-up makes every row's forward solve converge; bench says so."""
    out = subprocess.run([sys.executable, "-m", "deqfusion_core", "bench", "--batch", "16", "--dims", "8", "12",
                          "--dim", "8", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "after 100 Jacobian-regularised steps (its forward solve still does not reach 1e-06" in out.stdout
    assert "NOT converged" in out.stdout


def test_bench_machine_names_the_commit():
    """Every timing file records the commit it ran at (from the checkout the package is imported from)."""
    from deqfusion_core.bench import machine

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: machine() reports commit None")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert machine()["commit"].split("+")[0] == head


@pytest.mark.parametrize("argv, message", [
    (["bench", "--batch", "0"], "argument --batch: expected an int >= 1, got '0'"),
    (["bench", "--dims", "8", "x"], "argument --dims: expected an int >= 1, got 'x'"),
    (["bench", "--dim", "-3"], "argument --dim: expected an int >= 1, got '-3'"),
    (["demo", "--steps", "-1"], "argument --steps: expected an int >= 1, got '-1'"),
    (["bench", "-o", "nope=1"], "deqfusion bench: -o 'nope': unknown; DEQFusion takes "),
])
def test_bench_and_demo_name_the_bad_argument(argv, message):
    """A non-positive size or an unknown -o key is a one-line error naming it (before: a reshape RuntimeError, a
    TypeError from DEQFusion, or for demo --steps -1 a run that trained nothing)."""
    out = subprocess.run([sys.executable, "-m", "deqfusion_core", *argv], capture_output=True, text=True, timeout=300)
    assert out.returncode in (1, 2) and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
