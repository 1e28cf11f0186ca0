#!/usr/bin/env bash
# What benchmarks/device_check.sh needs on the lent GPU machine and cannot get there: that machine reaches no network,
# its image has torch, pytest, transformers and the scientific stack but not MMF and what MMF imports beyond them,
# nor TorchDEQ, and it receives only this checkout and the paths a `run` call names in `carry` (not ../shared, not
# ../upstream). Run this here first; it fills .device/ (git-ignored, never committed):
#
#   .device/wheels/                    the missing packages, pinned, for the device's Python (DEVICE_PYTHON_VERSION,
#                                      default 3.12, the image's); MMF rc10 and demjson3 as their source archives
#                                      (no wheels on PyPI), built there without network (setuptools is in the image)
#   .device/upstreams/mcan-vqa         a copy of ../shared/upstreams/mcan-vqa (Apache-2.0; MCAN's training run)
#   .device/upstreams/deqfusion_ref    a link to the authors' reference checkout (DEQFUSION_REFERENCE_ROOT or
#                                      ../upstream/deqfusion_ref: it publishes no licence, so no copy is made here;
#                                      `carry` names the three files read through the link)
#
# then, with the device tool (one call; device_check.sh picks all of it up from .device/):
#
#   run(command='bash benchmarks/device_check.sh "$OUT" --pack', timeout_s=560, carry=[CARRY below])
#
# It prints that carry list. Everything is pinned to the versions the test suite runs here (constraints.txt / .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
pyv="${DEVICE_PYTHON_VERSION:-3.12}"
abi="cp${pyv/./}"
dst=.device
py=.venv/bin/python
[ -x "$py" ] || py=python3
pip=("$py" -m pip download -q --no-deps --disable-pip-version-check -d "$dst/wheels")
rm -rf "$dst/wheels" "$dst/upstreams"
mkdir -p "$dst/wheels" "$dst/upstreams"
# wheels for the device's interpreter (lmdb has a compiled part), pure-Python ones for any
"${pip[@]}" --only-binary=:all: --python-version "$pyv" --implementation cp --abi "$abi" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  easy-vqa==1.0 omegaconf==2.4.0 lmdb==3.0.0 torchdeq==0.1.0 wcwidth==0.9.4 2> >(grep -v '^WARNING' >&2)
"${pip[@]}" --no-binary=:all: mmf==1.0.0rc10 demjson3==3.0.6 2> >(grep -v '^WARNING' >&2)
mcan=../shared/upstreams/mcan-vqa
[ -d "$mcan" ] && cp -r "$mcan" "$dst/upstreams/mcan-vqa" && rm -rf "$dst/upstreams/mcan-vqa/.git"
ref="${DEQFUSION_REFERENCE_ROOT:-../upstream/deqfusion_ref}"
carry=("$dst/wheels" "$dst/upstreams/mcan-vqa")
if [ -f "$ref/DEQ_fusion.py" ]; then
  ln -sfn "$(cd "$ref" && pwd)" "$dst/upstreams/deqfusion_ref"
  for f in DEQ_fusion.py solver.py jacobian.py; do carry+=("$dst/upstreams/deqfusion_ref/$f"); done
else
  echo "no reference checkout at $ref (DEQFUSION_REFERENCE_ROOT): the GPU benchmark will run without it" >&2
fi
du -sh "$dst/wheels" "$dst/upstreams/mcan-vqa" | sed 's/^/  /'
printf 'carry=['; printf '"%s", ' "${carry[@]}" | sed 's/, $//'; printf ']\n'
