#!/usr/bin/env bash
# The one prepared GPU run (../shared/docs/gpu.md). On the lent machine (Python 3.12, torch 2.11,
# numpy, safetensors present; pydantic and platformdirs not), from the repository root:
#
#   here, once:   mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/
#                 echo /.whl/ >> .git/info/exclude; benchmarks/gpu.sh --download-wheels
#   device run:   carry [".data", ".whl"], command: bash benchmarks/gpu.sh
#
# It prints JSON and writes $OUT/gpu.json and $OUT/mesa_speed.json (commit them under
# benchmarks/results/ with the device named).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--download-wheels" ]; then
  for pkg in pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 \
             typing-extensions==4.15.0 platformdirs==4.5.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg"
  done
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD MESA_HOME=/tmp/mesa-home PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_bench.py --archive .data/cifar10-jpeg.tar.gz --out "$OUT/gpu.json"
if [ -f benchmarks/mesa_speed.py ]; then
  python3 benchmarks/mesa_speed.py --device cuda > "$OUT/mesa_speed.json" || true
  cat "$OUT/mesa_speed.json"
fi
