"""docs/recipes.md: every paper row's command, run with --dry-run (each arm's upstream arguments and effective
configuration built by the upstream's own code, and checked to differ only in the fusion), and a few with --smoke
(trained end to end), on data generated in each upstream's layout where ours is missing. A recipe whose upstream
checkout is not given is skipped with the reason."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import upstreams

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RECIPES = ROOT / "docs" / "recipes.md"
SMOKE = {"BRCA, mRNA + DNA methylation (Table 1's two-view rows; also mR,miR and D,miR)",
         "BRCA ablation (Table 5): the weighted sum x_fuse alone (no f_theta, no f_fuse, no equilibrium)",
         "MM-IMDB, MultiBench's features (Table 2)"}


def recipes() -> list[tuple[str, str]]:
    """(the comment naming the row, the command) for each `deqfusion compare` line in a code block."""
    out, title = [], None
    for line in RECIPES.read_text().splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("deqfusion compare "):
            assert title, f"{line}: no comment names its row"
            out.append((title, line))
            title = None
    return out


def write_brca(folder: Path, rows=(60, 30), dims=(20, 20, 15), classes=5, seed=0) -> Path:
    """A folder in MOGONET's BRCA layout with random values (5 classes): the real BRCA is not here."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for split, n in zip(("tr", "te"), rows):
        labels = np.arange(n) % classes
        np.savetxt(folder / f"labels_{split}.csv", labels, delimiter=",", fmt="%d")
        for v, d in enumerate(dims, 1):
            np.savetxt(folder / f"{v}_{split}.csv", rng.random((n, d)) + labels[:, None] * 0.1, delimiter=",")
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipes")
    found = {"MMDYNAMICS": os.environ.get("DEQFUSION_MMDYNAMICS_ROOT"), "CMBERT": os.environ.get("DEQFUSION_CMBERT_ROOT"),
             "VQA_PYTORCH": os.environ.get("DEQFUSION_VQA_PYTORCH_ROOT"),
             "MULTIBENCH": upstreams.checkout("DEQFUSION_MULTIBENCH_ROOT", "MultiBench"),
             "MCAN": upstreams.checkout("DEQFUSION_MCAN_ROOT", "mcan-vqa"),
             "BRCA": str(write_brca(tmp / "BRCA")), "ROSMAP": str(SHARED / "rosmap"),
             "MOSI_TEXT": str(SHARED / "cmu_mosi_text"), "BERT": str(tmp / "bert"), "MOSI_AUDIO": str(tmp / "audio.pickle"),
             "MMF_DATA": str(tmp / "mmf_data"), "GLOVE": str(tmp / "glove.txt")}
    if found["MULTIBENCH"]:
        found["MULTIBENCH"] = str(upstreams.writable_copy(found["MULTIBENCH"], tmp / "MultiBench"))
        pytest.importorskip("h5py")
        from deqfusion_adapters.multibench import mmimdb

        found["MMIMDB_HDF5"] = str(mmimdb.write_synthetic(tmp / "multimodal_imdb.hdf5", rows_per_split=32))
    if found["VQA_PYTORCH"]:
        found["MUTAN_OPTIONS"] = str(Path(found["VQA_PYTORCH"]) / "options" / "vqa2" / "mutan_att_train.yaml")
    try:
        import test_block_runner
        import yaml

        (tmp / "block").mkdir()
        found["BLOCK_OPTIONS"] = str(tmp / "block" / "mutan.yaml")
        Path(found["BLOCK_OPTIONS"]).write_text(yaml.safe_dump(test_block_runner.options(tmp / "block", "mutan")))
    except pytest.skip.Exception:
        pass
    return found


def command(line: str, paths: dict, out: Path, smoke: bool) -> list[str]:
    missing = sorted({m for m in re.findall(r"\$(\w+)", line) if not paths.get(m)})
    if missing:
        pytest.skip(f"not given here: {', '.join('$' + m for m in missing)}")
    argv = shlex.split(re.sub(r"\$(\w+)", lambda m: paths[m.group(1)], line))[2:]   # after `deqfusion compare`
    argv[argv.index("--seeds") + 1] = "1"
    argv[argv.index("--out") + 1] = str(out)
    cut = argv.index("--")
    return argv[:cut] + (["--smoke"] if smoke else ["--dry-run"]) + argv[cut:]


def test_every_recipe_names_its_row_and_data():
    found = recipes()
    assert len(found) >= 15 and len({t for t, _ in found}) == len(found)
    names = set(re.findall(r"^\| `\$(\w+)`", RECIPES.read_text(), re.M)) | \
        {n for row in re.findall(r"^\| (`\$\w+`(?:, `\$\w+`)*) \|", RECIPES.read_text(), re.M)
         for n in re.findall(r"\$(\w+)", row)}
    used = {m for _, line in found for m in re.findall(r"\$(\w+)", line)}
    assert used <= names, f"placeholders without a row saying where to get them: {sorted(used - names)}"
    assert SMOKE <= {t for t, _ in found}


@pytest.mark.parametrize("title,line", recipes(), ids=[t[:60] for t, _ in recipes()])
def test_recipe(title, line, paths, tmp_path, capsys):
    from deqfusion_core.cli import main

    code = main(["compare", *command(line, paths, tmp_path / "study", smoke=title in SMOKE)])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    assert "configurations checked; the arms differ only in" in out.out
    if title in SMOKE:
        assert len((tmp_path / "study" / "runs.jsonl").read_text().splitlines()) == 2
    else:
        assert "dry run:" in out.out and not (tmp_path / "study" / "runs.jsonl").exists()
