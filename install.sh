#!/usr/bin/env bash
# Set up .venv with deqfusion and the upstreams its integrations need.
#   ./install.sh            core + MMF (the main job)
#   ./install.sh test       everything the test suite runs against
# torch is pinned by constraints.txt to the 2.13.0 CPU build (a bare `torch` pulls a multi-GB CUDA build);
# set DEQFUSION_TORCH to another pin (e.g. a CUDA build you already have) to change that.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-main}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
case "$what" in
  main) extras="mmf,plot" ;;
  test) extras="dev,plot,mmf,multibench,vqa,bert,bench" ;;
  *)    extras="$what" ;;
esac
"${pip[@]}" "${DEQFUSION_TORCH:-torch==2.13.0}"
"${pip[@]}" -e ".[${extras}]"
# MMF's only PyPI release (1.0.0rc10) pins torch 1.5 and transformers 2.3: install it without its pins;
# the `mmf` extra above brings current versions of what it imports, deqfusion_compat.mmf_rc10 shims the rest.
case ",$extras," in *,mmf,*) "${pip[@]}" --no-deps "mmf==1.0.0rc10" ;; esac
