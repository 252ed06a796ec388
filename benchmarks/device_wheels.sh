#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks into .whl/ (git-ignored), once, here.
#
# The lent GPU machine (Python 3.12, torch, numpy, scipy, einops, ... but no package registry)
# has no performer-pytorch; scxtrimo's decoder needs it. benchmarks/device.sh installs these
# wheels there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`, so a
# device call names `.whl` in `carry`. The versions are the ones of this project's virtual
# environment (`pip show performer-pytorch local-attention hyper-connections
# axial-positional-embedding torch-einops-utils`); keep exactly one version of each in .whl/.
#
#     bash benchmarks/device_wheels.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  performer-pytorch==1.1.4
  local-attention==1.11.2
  hyper-connections==0.4.11      # imported by local-attention
  axial-positional-embedding==0.3.12
  torch-einops-utils==0.2.0      # needed by hyper-connections
)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
done
# one version of each package only: two wheels of one name stop the whole install there
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then
  echo "more than one wheel of: $dups (remove the stale ones from .whl/)" >&2
  exit 1
fi
ls -l .whl
