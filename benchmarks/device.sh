#!/usr/bin/env bash
# Issue 16: every GPU figure and CUDA check in one device call (about 4 minutes on an H200).
#
# From a session with a lent GPU, after `bash benchmarks/device_wheels.sh` here (once) and with
# the packed corpus at runs/corpus.xtc:
#
#   run(command="bash benchmarks/device.sh", carry=[".whl", "runs/corpus.xtc"], timeout_s=480)
#
# The pretraining run of scripts/train_device.py with the same set-up (first in a device session;
# the whole argument list is in docs/benchmarks.md, "The next training call"):
#
#   run(command="bash benchmarks/device.sh train --minutes 6.5 --init runs/init-10m ...",
#       carry=[".whl", "runs/corpus.xtc", "runs/init-10m", "runs/eval_sets.npz"], timeout_s=600)
#
# `bash benchmarks/device_prepare.sh` builds everything in that carry that is missing here
# (runs/ and .whl/ are git-ignored: a new checkout has none of them; about 9 minutes).
# (runs/init-10m: `python scripts/train_device.py init --corpus runs/corpus.xtc --config xtrimo-10m
# --depth-tokens --out runs/init-10m`: the co-expression gene embedding, off the device clock;
# runs/eval_sets.npz: `python benchmarks/device_eval.py pack`, the embedding benchmark's cells as rows
# of the corpus. With it the call also scores the trained checkpoint there (benchmarks/device_eval.py:
# held-out masked recovery and the benchmark embeddings, fp32 and bf16, in eq_embeddings-1/2.npz and
# result.json; about a minute), and here `python benchmarks/device_eval.py unpack` puts the embeddings
# into embedding_quality.py's cache.) Files back (8, the most that come back): config.json,
# model-1/2.safetensors, history.csv, result.json, train.out, eq_embeddings-1/2.npz (log.txt is
# removed: train.out holds its lines).
# `SMOKE=1 OUT=/tmp/t bash benchmarks/device.sh train --device cpu --minutes 0.2 ...` runs it all here.
#
# and at once after it (a session has 900 device seconds, start-up included) the figures call
# with what is left, timeout_s=300 (its last step, DDP, only runs on several GPUs; each step
# writes its files as it goes, so a call cut short still returns the figures it made).
#
# CPU smoke check of every code path at tiny sizes (any machine, a few minutes on 2 cores):
#
#   SMOKE=1 bash benchmarks/device.sh          # or: bash benchmarks/device.sh --smoke
#
# Steps, each under its own time limit (240 + 150 + 90 s, and 120 s for DDP on several GPUs) so
# that the call always ends with its files, in about 8 minutes at worst (about 4.5 expected):
#   figures    benchmarks/device_figures.py: embedding cells/s and speed-up over the authors' path
#              (xtrimo-10m, xtrimo-100m), peak GPU memory of xtrimo-100m at 2,000 genes, MFU of
#              full-length-decoder training steps (xtrimo-10m, xtrimo-100m), profiles of misses
#   attention  benchmarks/attention_packing.py: length bucketing vs nested jagged SDPA vs
#              FlexAttention packing on all pbmc3k cells
#   tests      python -m pytest -m cuda --noconftest tests/test_cuda.py
#   ddp        benchmarks/device_ddp.py under torchrun (nccl) when the machine has >1 GPU
#   summary    benchmarks/device_summary.py: summary.json and the table printed last
#
# Files in $OUT (default runs/device_smoke), 7 at most: device.log, figures.json,
# attention.json, pytest.xml, ddp.json, summary.json, and profiles.txt when a figure misses.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
for a in "$@"; do [ "$a" = "--smoke" ] && SMOKE=1; done
[ "$SMOKE" = 0 ] || SMOKE=1
OUT=${OUT:-runs/device_smoke}
CORPUS=${CORPUS:-runs/corpus.xtc}
EVAL_SETS=${EVAL_SETS:-runs/eval_sets.npz}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

STEPS=()
FAILED=0
step() {  # step NAME LIMIT_S CMD...: run under a time limit, record its exit status and seconds
  local name=$1 limit=$2
  shift 2
  local t=$SECONDS
  echo "==== [$(date +%T)] $name (limit ${limit} s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "==== [$(date +%T)] $name: exit $rc after $((SECONDS - t)) s"
  STEPS+=(--step "$name=$rc:$((SECONDS - t))")
  [ "$rc" = 0 ] || FAILED=1
}

setup() {
  # performer-pytorch (the decoder) and its pure-Python dependencies travel as wheels (.whl/,
  # written by benchmarks/device_wheels.sh); the GPU machine has no package registry
  if ! "$PY" -c "import performer_pytorch" >/dev/null 2>&1; then
    if compgen -G ".whl/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "pip could not install .whl/*.whl"
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "performer-pytorch is not installed and .whl/ holds no wheels"
    fi
  fi
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src
  local err
  if ! err=$("$PY" -c "import performer_pytorch" 2>&1) && grep -q distutils <<<"$err"; then
    # performer-pytorch 1.1.4 imports distutils.version.LooseVersion; Python 3.12 has no
    # distutils unless setuptools' shim is active. A stand-in for its one version comparison:
    echo "distutils is missing ($(tail -n1 <<<"$err")); using a LooseVersion stand-in"
    mkdir -p /tmp/distutils_shim/distutils
    : >/tmp/distutils_shim/distutils/__init__.py
    cat >/tmp/distutils_shim/distutils/version.py <<'PYEOF'
"""Stand-in for distutils.version (gone in Python 3.12): numeric release comparison only."""
import functools
import re


@functools.total_ordering
class LooseVersion:
    def __init__(self, vstring):
        self.vstring = str(vstring)
        self.version = tuple(int(x) for x in re.findall(r"\d+", self.vstring.split("+")[0])[:4])

    def __eq__(self, other):
        return self.version == LooseVersion(other).version

    def __lt__(self, other):
        return self.version < LooseVersion(other).version

    def __str__(self):
        return self.vstring
PYEOF
    export PYTHONPATH=$PYTHONPATH:/tmp/distutils_shim
  fi
  if ! err=$("$PY" -c "import performer_pytorch, scxtrimo.models" 2>&1); then
    echo "FATAL: scxtrimo's decoder needs performer-pytorch, which does not import here:"
    echo "$err" | tail -n 5
    echo "Carry its wheels: run 'bash benchmarks/device_wheels.sh' on the development machine, then"
    echo "run(command=\"bash benchmarks/device.sh\", carry=[\".whl\", \"runs/corpus.xtc\"], ...)."
    return 2
  fi
  if [ ! -f "$CORPUS" ]; then
    echo "FATAL: no packed corpus at $CORPUS: carry runs/corpus.xtc (built with"
    echo "'scxtrimo corpus runs/corpus.xtc ../shared/data/*/*.h5ad --exclude gasperini papalexi')."
    return 2
  fi
}

main() {
  echo "==== [$(date +%T)] issue 16 device figures: SMOKE=$SMOKE OUT=$OUT CORPUS=$CORPUS $(uname -srm)"
  setup || { "$PY" benchmarks/device_summary.py "$OUT" --step setup=2:0 $([ "$SMOKE" = 1 ] && echo --smoke); return 2; }
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "(no nvidia-smi)"
  local ngpu
  ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  "$PY" -c "import sys, torch, performer_pytorch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], \
'performer', performer_pytorch.__file__)"
  local tests_limit=90
  if [ "$SMOKE" = 1 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} SCXTRIMO_CUDA_TESTS_ON_CPU=1
    tests_limit=300
    step figures 300 "$PY" benchmarks/device_figures.py --smoke --device cpu --corpus "$CORPUS" --out "$OUT"
    step attention 300 "$PY" benchmarks/attention_packing.py --device cpu --cells 8 --repeats 1 --pack 4096 \
      --budgets 4096 --no-compile --corpus "$CORPUS" --json "$OUT/attention.json"
  else
    if [ "$ngpu" = 0 ]; then
      echo "FATAL: torch sees no CUDA device (SMOKE=1 runs the CPU check)"
      "$PY" benchmarks/device_summary.py "$OUT" --step setup=3:0
      return 3
    fi
    step figures 240 "$PY" benchmarks/device_figures.py --device cuda --corpus "$CORPUS" --out "$OUT"
    step attention 150 "$PY" benchmarks/attention_packing.py --device cuda --cells 2637 --repeats 3 --per-cell-repeats 1 \
      --per-cell-cells 100 --budgets 16384 65536 151552 --no-compile \
      --corpus "$CORPUS" --json "$OUT/attention.json"
  fi
  step tests "$tests_limit" "$PY" -m pytest -p no:cacheprovider --noconftest -m cuda -q -rA tests/test_cuda.py \
    --junitxml="$OUT/pytest.xml"
  if [ "$ngpu" -ge 2 ]; then
    step ddp 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node="$((ngpu < 8 ? ngpu : 8))" \
      benchmarks/device_ddp.py --out "$OUT/ddp.json"
  elif [ "$SMOKE" = 1 ]; then  # the same code with gloo on two CPU processes
    step ddp 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/device_ddp.py \
      --device cpu --out "$OUT/ddp.json"
  else
    echo "{\"ran\": false, \"gpus\": $ngpu, \"note\": \"the machine had one GPU: DDP/FSDP with nccl not run\"}" \
      >"$OUT/ddp.json"
    echo "==== one GPU: DDP/FSDP with nccl not run"
  fi
  "$PY" benchmarks/device_summary.py "$OUT" "${STEPS[@]}" $([ "$SMOKE" = 1 ] && echo --smoke)
  echo "==== [$(date +%T)] done in $SECONDS s"
  return "$FAILED"
}

train() {  # the pretraining run (scripts/train_device.py) with the same set-up: wheels, distutils, corpus
  echo "==== [$(date +%T)] pretraining run: OUT=$OUT CORPUS=$CORPUS EVAL_SETS=$EVAL_SETS $(uname -srm)"
  setup || return 2
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
  "$PY" scripts/train_device.py train --corpus "$CORPUS" --out "$OUT" "$@" || return $?
  if [ -f "$EVAL_SETS" ]; then
    # issue 14's scores on the device: the checkpoint as it will be merged here, its held-out
    # masked recovery and every benchmark embedding (benchmarks/device_eval.py)
    local t=$SECONDS limit=150
    [ "$SMOKE" = 1 ] && limit=900  # xtrimo-10m's full-length decoder on a CPU: minutes for 8 cells
    echo "==== [$(date +%T)] device_eval (limit $limit s)"
    rm -rf /tmp/merged
    timeout --signal=INT --kill-after=15 "$limit" bash -c '"$0" scripts/train_device.py merge "$1" /tmp/merged &&
      "$0" benchmarks/device_eval.py run --model /tmp/merged --sets "$2" --corpus "$3" --out "$1" $4' \
      "$PY" "$OUT" "$EVAL_SETS" "$CORPUS" "$([ "$SMOKE" = 1 ] && echo --smoke)"
    echo "==== [$(date +%T)] device_eval: exit $? after $((SECONDS - t)) s"
  else
    echo "no $EVAL_SETS: the benchmark embeddings are left to the CPU (python benchmarks/device_eval.py pack first)"
  fi
  rm -f "$OUT/log.txt"  # the same lines are in train.out; at most 8 files come back
}

if [ "${1:-}" = train ]; then
  shift
  train "$@" 2>&1 | tee -a "$OUT/train.out" | tail -n 200
  exit "${PIPESTATUS[0]}"
fi
main 2>&1 | tee "$OUT/device.log"
exit "${PIPESTATUS[0]}"
