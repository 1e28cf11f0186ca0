#!/usr/bin/env bash
# Set up .venv with deqfusion and the upstreams its integrations need.
#   ./install.sh                  core + MMF 1.0.0rc10 from PyPI (the main job)
#   ./install.sh test             everything the test suite runs against (+ .venv-mmf-main, see below)
#   ./install.sh mmf-main PATH    core + MMF from git main, installed from the checkout PATH (instead of rc10)
# torch is pinned by constraints.txt to the 2.13.0 CPU build (a bare `torch` pulls a multi-GB CUDA build);
# set DEQFUSION_TORCH to another pin (e.g. a CUDA build you already have) to change that. DEQFUSION_VENV names
# another venv folder than .venv.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-main}"
venv="${DEQFUSION_VENV:-.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
case "$what" in
  main) extras="mmf,plot" ;;
  test) extras="dev,plot,mmf,multibench,vqa,bert,bench" ;;
  mmf-main) extras="mmf-main,plot" ;;
  *)    extras="$what" ;;
esac
"${pip[@]}" "${DEQFUSION_TORCH:-torch==2.13.0}"
"${pip[@]}" -e ".[${extras}]"
# MMF's only PyPI release (1.0.0rc10) pins torch 1.5 and transformers 2.3: install it without its pins;
# the `mmf` extra above brings current versions of what it imports, deqfusion_compat.mmf_rc10 shims the rest.
case ",$extras," in *,mmf,*) "${pip[@]}" --no-deps "mmf==1.0.0rc10" ;; esac
if [ "$what" = mmf-main ]; then
  # MMF main pins torch 1.11 (no build for Python 3.11), transformers <= 4.10, pytorch-lightning 1.6, torchtext:
  # `pip install PATH` cannot resolve. Install it the way its docs say (editable) but --no-deps; the `mmf-main`
  # extra brings current versions of what it imports, deqfusion_compat.mmf_main shims the rest. A git clone is
  # installed in place (the build writes mmf.egg-info and a C extension into it); anything else (an export, the
  # read-only ../shared/upstreams/mmf) is copied to $venv/src/mmf first, its flattened git symlinks restored.
  src="${2:?usage: ./install.sh mmf-main PATH (a checkout of facebookresearch/mmf)}"
  if [ ! -e "$src/.git" ] || [ -n "${DEQFUSION_MMF_COPY:-}" ]; then
    "$venv/bin/python" -m deqfusion_adapters.mmf.checkout "$src" "$venv/src/mmf" > /dev/null
    src="$venv/src/mmf"
  fi
  "$venv/bin/python" -m pip uninstall -q -y mmf 2> /dev/null || true
  "${pip[@]}" --no-deps -e "$src"
fi
# The test suite also runs MMF main (integration_tests/test_mmf_main.py) from the snapshot beside the project, in a
# venv of its own: rc10 and main are both `mmf`, so one venv holds one of them.
if [ "$what" = test ] && [ -d ../shared/upstreams/mmf ]; then
  DEQFUSION_VENV=.venv-mmf-main "$0" mmf-main ../shared/upstreams/mmf
fi
