#!/usr/bin/env bash
# The one prepared GPU run (../shared/docs/gpu.md, issue 30): benchmarks/gpu_bench.py's stages in
# one call, its JSON rewritten whole after every stage and every trigger:
#   epoch       one ResNet-18 epoch at batch 128 and 512 (the engine's GPU defaults), then at 512
#               one epoch each without bf16, without channels_last, without cuDNN's autotuner, and
#               compiled (torch.compile: its cost and whether it pays within the clean recipe);
#               the data path alone, resident on the device or copied from the host
#   clean       the clean-cifar10 recipe to the end (30 epochs): clean accuracy per epoch, time
#   paper       the paper protocol's ResNet-18 variant from that model, trigger after trigger
#               (attack with 1 % poisoning, 3-beta search, repairs mesa, point x 3, ideal and
#               finetune at rate 0.01; schema-1 records as the CPU study's) until --budget-s
#   mesa_speed  MESA search throughput (benchmarks/mesa_speed.py)
# The lent machine has Python 3.12 and torch but neither pip's registry nor pydantic: the wheels
# travel with the call. SQLAlchemy, textual and alembic are never imported on this path.
#
# Once, here, in the repository root (.data and .whl are ignored by .gitignore):
#   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#   bash benchmarks/gpu.sh --download-wheels       # pydantic and its needs, for CPython 3.12
#
# The device call (about 6 minutes; the budget stops starting and cuts triggers 40 s before it,
# which leaves the MESA stage its time; the copy there has no .git, so name the commit):
#   run  command: MESA_TUI_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu.sh --budget-s 320
#        carry:   [".data", ".whl"]
#        timeout_s: 360
#
# What comes back under $OUT (2 files): gpu.json (everything; after a timeout, every stage and
# trigger that finished before it) and gpu.log (all that was printed, heartbeat lines included).
# Commit gpu.json as benchmarks/results/<device>/gpu.json, name the device in the message, and read
# it beside the CPU study:
#   mesa-tui report docs/results/paper-small --gpu-results benchmarks/results/<device>/gpu.json
#
# Arguments go to gpu_bench.py (--budget-s, --triggers, --stages, --tiny, ...). PYTHON names the
# interpreter (python3 by default; the CPU test runs this file with its own and --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--download-wheels" ]; then
  for pkg in pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
             typing-extensions==4.15.0 platformdirs==4.5.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg"
  done
  exit 0
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PYTHON" -c "import pydantic" 2> /dev/null; then  # the lent machine: from the carried wheels
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export MESA_TUI_HOME=${MESA_TUI_HOME:-/tmp/mesa-home} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
archive=()
if [ -f .data/cifar10-jpeg.tar.gz ]; then archive=(--archive .data/cifar10-jpeg.tar.gz); fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PYTHON" benchmarks/gpu_bench.py "${archive[@]}" --out "$OUT/gpu.json" "$@"
} 2>&1 | tee "$OUT/gpu.log"
