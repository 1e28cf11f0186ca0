#!/usr/bin/env bash
# The checks that need a GPU, as one script (issue 14, item 1): under 8 minutes on one GPU with 16 CPU cores and no
# network. Every figure goes as JSON under $OUT (or the folder given as the first argument).
#
#   benchmarks/device_check.sh [OUT_DIR] [--quick] [--pack]
#
# On the lent GPU machine (no network; it gets this checkout and the paths `carry` names): first, here,
# benchmarks/device_bundle.sh (fills the git-ignored .device/ and prints the carry list), then one device call:
#   run(command='bash benchmarks/device_check.sh "$OUT" --pack', timeout_s=560, carry=[that list])
#
# 1. environment: a Python with torch and deqfusion. Uses .venv if it imports deqfusion_core; else the machine's
#    python3 (DEVICE_PYTHON) as it is, its CUDA torch included, with what it lacks installed into .device-site/ (put
#    first on PYTHONPATH): MMF, TorchDEQ and the rest from .device/wheels without network, and this project (not a
#    venv made from it: on the device python3 is itself a venv, and a venv made from a venv does not see its
#    packages); else ./install.sh test (needs the packages: DEQFUSION_TORCH picks the torch pin).
#    Upstream checkouts: .device/upstreams/ (mcan-vqa, the authors' reference) when there, else ../shared, ../upstream.
# 2. the CUDA tests (tests/test_cuda.py and every test named *cuda*), JUnit XML.
# 3. the core benchmark on CUDA (ours, the authors' reference when DEQFUSION_REFERENCE_ROOT or
#    ../upstream/deqfusion_ref exists, TorchDEQ when installed) at BRCA shapes, then MM-IMDB-like and VQA-like shapes.
# 4. real upstream training on CUDA for both arms: MCAN-small on generated data in its file layout and easy-VQA in
#    MMF, a few hundred steps each (benchmarks/end_to_end.py).
# Without CUDA every CUDA part is skipped and says so (skipped.json); --quick (for a CPU machine: checks this
# script) runs parts 3 and 4 on the CPU at smoke sizes instead. Each part runs under its own time limit; a part that
# fails is recorded (status.json) and the next one still runs; on CUDA the limits add up to 470 s. --pack: the
# device tool brings back at most 8 files from $OUT, so OUT_DIR gets status.json (after every part), env.json,
# skipped.json and device_check.tar.gz (every file written).
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
pack=0
out="${OUT:-benchmarks/results/device_check}"
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    --pack) pack=1 ;;
    *) out="$a" ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
final="$out"
if [ "$pack" = 1 ]; then
  out="$(mktemp -d)/device_check"
  mkdir -p "$out"
fi
start=$(date +%s)
status="$out/status.json"
echo "{}" > "$status"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"   # 8 on the 16-core device
export DEQFUSION_MMDYNAMICS_ROOT="${DEQFUSION_MMDYNAMICS_ROOT:-$(pwd)/../upstream/mmdynamics}"
export DEQFUSION_CMBERT_ROOT="${DEQFUSION_CMBERT_ROOT:-$(pwd)/../upstream/Cross-Modal-BERT}"
[ -d .device/upstreams/mcan-vqa ] && export DEQFUSION_MCAN_ROOT="${DEQFUSION_MCAN_ROOT:-$(pwd)/.device/upstreams/mcan-vqa}"
ref="${DEQFUSION_REFERENCE_ROOT:-$(pwd)/../upstream/deqfusion_ref}"
[ -f .device/upstreams/deqfusion_ref/DEQ_fusion.py ] && [ -z "${DEQFUSION_REFERENCE_ROOT:-}" ] && \
  ref="$(pwd)/.device/upstreams/deqfusion_ref"
[ -f "$ref/DEQ_fusion.py" ] && export DEQFUSION_REFERENCE_ROOT="$ref"

record() {   # record PART STATUS SECONDS [NOTE]
  "$py" - "$status" "$@" <<'EOF'
import json, sys
path, part, state, secs, *note = sys.argv[1:]
d = json.load(open(path))
d[part] = {"status": state, "seconds": int(secs), **({"note": note[0]} if note else {})}
json.dump(d, open(path, "w"), indent=1)
EOF
  [ "$final" = "$out" ] || cp "$status" "$final/"   # --pack: the outcomes so far come back even if the call is cut
}

part() {     # part NAME LIMIT_S COMMAND...: run with a time limit, record the outcome
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local state=ok
  [ $rc -eq 124 ] && state=timeout
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && state="failed (exit $rc)"
  record "$name" "$state" $(( $(date +%s) - t0 )) "log: $name.log"
  tail -3 "$out/$name.log"
}

# -- 1. environment ---------------------------------------------------------------------------------------------------
py="${DEVICE_PYTHON:-python3}"
site="$(pwd)/.device-site"
if .venv/bin/python -c "import deqfusion_core, torch" 2> /dev/null; then
  py=.venv/bin/python
elif "$py" -c "import torch" 2> /dev/null; then
  rm -rf "$site"
  pipi=("$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation --target "$site")
  {
    if [ -d .device/wheels ]; then   # READTHEDOCS: MMF's setup.py then skips its C extension (PHOC, unused here)
      for pkg in mmf demjson3 easy-vqa omegaconf lmdb torchdeq wcwidth; do   # one by one: a miss costs only itself
        READTHEDOCS=1 "${pipi[@]}" --find-links .device/wheels "$pkg" || echo "not installed: $pkg"
      done
    else
      echo "no .device/wheels (benchmarks/device_bundle.sh): MMF and TorchDEQ are not installed"
    fi
    "${pipi[@]}" .
  } > "$out/install.log" 2>&1 || echo "install failed: $out/install.log"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  ./install.sh test > "$out/install.log" 2>&1 || { echo "install failed: $out/install.log"; }
  py=.venv/bin/python
fi
"$py" - "$out/env.json" <<'EOF'
import json, os, sys, torch
import deqfusion_core
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(), "deqfusion_core": deqfusion_core.__file__}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(info)
EOF
cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))")
record environment ok $(( $(date +%s) - start )) "python: $py"

skipped=()
# -- 2. CUDA tests ----------------------------------------------------------------------------------------------------
if [ "$cuda" = 1 ]; then
  part cuda_tests 90 "$py" -m pytest tests/test_cuda.py tests/test_fusion.py -k cuda -q -rs --junitxml "$out/cuda_tests.xml"
else
  skipped+=("cuda_tests: no CUDA device (tests/test_cuda.py skips each test with its reason)")
  part cpu_logic_tests 120 "$py" -m pytest tests/test_cuda.py -q -rs --junitxml "$out/cpu_logic_tests.xml"
fi

# -- 3. core benchmark ------------------------------------------------------------------------------------------------
if [ "$cuda" = 1 ]; then
  part bench_brca 120 "$py" benchmarks/bench_core.py --device cuda --shape brca --repeats 3 --skip warm \
    --out "$out/bench_core_cuda_brca.json"
  for shape in mmimdb vqa; do
    part "bench_$shape" 40 "$py" benchmarks/bench_core.py --device cuda --shape "$shape" --repeats 3 \
      --skip warm memory --out "$out/bench_core_cuda_$shape.json"
  done
elif [ "$quick" = 1 ]; then
  skipped+=("bench on CUDA: no CUDA device (--quick: the CPU smoke run below instead)")
  part bench_quick_cpu 300 "$py" benchmarks/bench_core.py --quick --skip warm memory --out "$out/bench_core_cpu_quick.json"
else
  skipped+=("bench on CUDA: no CUDA device")
fi

# -- 4. upstream training ---------------------------------------------------------------------------------------------
if [ "$cuda" = 1 ]; then
  part train_upstreams 180 "$py" benchmarks/end_to_end.py mcan mmf --steps 300 --threads 8 --out "$out/end_to_end"
elif [ "$quick" = 1 ]; then
  skipped+=("upstream training on CUDA: no CUDA device (--quick: the same upstreams on the CPU, 7 steps, instead)")
  part train_quick_cpu 300 "$py" benchmarks/end_to_end.py mcan mmf --steps 7 --threads 1 --out "$out/end_to_end"
else
  skipped+=("upstream training on CUDA: no CUDA device")
fi

"$py" - "$out/skipped.json" "${skipped[@]+"${skipped[@]}"}" <<'EOF'
import json, sys
json.dump({"skipped": sys.argv[2:]}, open(sys.argv[1], "w"), indent=1)
EOF
for s in "${skipped[@]+"${skipped[@]}"}"; do echo "skipped: $s"; done
record total ok $(( $(date +%s) - start ))
if [ "$pack" = 1 ]; then
  tar czf "$final/device_check.tar.gz" -C "$(dirname "$out")" device_check
  cp "$status" "$out/env.json" "$out/skipped.json" "$final/"
  rm -rf "$(dirname "$out")"
  out="$final"
fi
echo "wrote $out ($(( $(date +%s) - start )) s)"
cat "$out/status.json"
