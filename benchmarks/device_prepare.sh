#!/usr/bin/env bash
# Everything a device call carries that git does not hold, rebuilt here in one command.
#
# `runs/` and `.whl/` are git-ignored, so a new checkout of the repository has none of them:
# every session that is lent a GPU starts by running this (about 10 minutes on two cores, all
# of it off the device's clock), then makes the calls of benchmarks/README.md.
#
#     bash benchmarks/device_prepare.sh          # from the repository root, in the project's venv
#
# It makes only what is missing (delete a file to rebuild it), in this order:
#   .whl/                 performer-pytorch and its pure-Python dependencies (device_wheels.sh)
#   runs/corpus.xtc       every broad-coverage shared set packed for pretraining (`scxtrimo corpus`)
#   runs/eval_sets.npz    the embedding benchmark's cells as corpus rows (device_eval.py pack)
#   runs/init-10m         xtrimo-10m with depth tokens and the co-expression gene embedding
#                         (train_device.py init: the SVD is kept off the device's clock)
# and prints the size of what travels (the device takes at most 64 MiB with the working tree).
# SCXTRIMO_SHARED_DATA points at the shared data sets (default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DATA=${SCXTRIMO_SHARED_DATA:-../shared/data}
mkdir -p runs
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }

if ! compgen -G ".whl/performer_pytorch-*.whl" >/dev/null; then
  stamp "wheels -> .whl/"
  bash benchmarks/device_wheels.sh
fi
if [ ! -s runs/corpus.xtc ]; then
  stamp "corpus -> runs/corpus.xtc"
  # the two CRISPR panels are too narrow for pretraining (DESIGN.md, the corpus)
  scxtrimo corpus runs/corpus.xtc "$DATA"/*/*.h5ad --exclude gasperini papalexi
fi
if [ ! -s runs/eval_sets.npz ]; then
  stamp "benchmark cells -> runs/eval_sets.npz"
  "$PY" benchmarks/device_eval.py pack --out runs/eval_sets.npz --corpus runs/corpus.xtc
fi
if [ ! -s runs/init-10m/config.json ]; then
  stamp "xtrimo-10m start -> runs/init-10m"
  "$PY" scripts/train_device.py init --corpus runs/corpus.xtc --config xtrimo-10m --depth-tokens \
    --out runs/init-10m
fi
stamp "ready; what the training call carries (with the working tree, at most 64 MiB):"
du -ch .whl runs/corpus.xtc runs/eval_sets.npz runs/init-10m | tail -n 5
