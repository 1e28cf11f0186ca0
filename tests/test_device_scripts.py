"""benchmarks/device_bundle.sh and device_check.sh agree: every package the check installs on the lent machine
(offline, from .device/wheels) is one the bundle downloads here, pinned; both scripts parse; the check reads the
upstream checkouts from where the bundle puts them. (The scripts themselves ran end to end on the CPU against a
stand-in for the device's Python: docs/speed.md.)"""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE, CHECK = ROOT / "benchmarks" / "device_bundle.sh", ROOT / "benchmarks" / "device_check.sh"


def test_both_scripts_parse():
    for script in (BUNDLE, CHECK):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, (script.name, done.stderr)


def test_the_check_installs_only_what_the_bundle_brings_pinned():
    bundle = BUNDLE.read_text()
    pinned = dict(re.findall(r"\b([a-z][a-z0-9-]+)==([0-9][\w.]*)", bundle))
    line = next(line for line in CHECK.read_text().splitlines() if "for pkg in" in line)
    wanted = line.split("for pkg in", 1)[1].split(";")[0].split()
    assert wanted and set(wanted) <= set(pinned), (wanted, pinned)
    assert {"mmf", "torchdeq", "omegaconf", "easy-vqa"} <= set(wanted)
    assert pinned["mmf"] == "1.0.0rc10" and pinned["torchdeq"] == "0.1.0"


def test_the_check_reads_the_bundled_upstreams():
    check = CHECK.read_text()
    for path in (".device/upstreams/mcan-vqa", ".device/upstreams/deqfusion_ref"):
        assert path in BUNDLE.read_text() and path in check, path
