#!/usr/bin/env bash
# The check for the first GPU within reach: benchmarks/gpu_check.py, the core path without Ray, one
# JSON object on stdout (bf16 step times of wav2vec2-base size, dense vs sspg and the peers; the gate
# kernels' compiled graphs and any fallback; calibration, fold, export, stock load and logits equal
# to the hard-masked model; evaluation throughput; 2:4 and neuron-pruned inference speed). Bounded
# to 8 minutes on one H100; exit 1 when a correctness check fails.
#   bash benchmarks/gpu_check.sh              # needs torch with CUDA + transformers
#   bash benchmarks/gpu_check.sh --dry-run    # the same script at tiny size on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout 480 python3 benchmarks/gpu_check.py "$@"
