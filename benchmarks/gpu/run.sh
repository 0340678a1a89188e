#!/usr/bin/env bash
# The GPU check (benchmarks/gpu/check.py): ViT-B/16 bf16 step rate of cl vs a plain loop, data-loader throughput
# against it, and one experience of SLCA, LAE and SEMA on generated 224 px images. One table; < 8 minutes on one GPU.
# Run from a checkout on the GPU machine:   bash benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import cl" 2>/dev/null || python -m pip install -q -e .
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
mkdir -p "${OUT:-benchmarks/gpu}"
timeout 480 python benchmarks/gpu/check.py --json "${OUT:-benchmarks/gpu}/gpu_check.json" "$@"
