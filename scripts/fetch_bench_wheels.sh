#!/usr/bin/env bash
# Download the wheels that bench/bench_e2e.py's optional baselines need on the GPU machine (which has no network)
# into the git-ignored folder .whl/ at the repository root. Carry `.whl` to the device and install there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# torchao 0.18.0 ships as a cp310-abi3 manylinux wheel (~3.4 MB) and needs nothing beyond the torch already installed
# there (it was checked to install with --no-deps and quantize on the H200 machine's torch 2.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=("torchao==0.18.0")
mkdir -p .whl .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
for w in .whl/torchao-*.whl; do
  size=$(stat -c %s "$w")
  # the 0.18.0 wheel is about 3.4 MB; a much smaller file is a failed or truncated download
  if [ "$size" -lt 1000000 ]; then echo "$w: only $size bytes, expected about 3.4 MB" >&2; exit 1; fi
  "$PY" -m zipfile -l "$w" > /dev/null || { echo "$w: not a valid zip" >&2; exit 1; }
  echo "$w $size bytes"
done
