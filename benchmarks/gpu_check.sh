#!/usr/bin/env bash
# The GPU checks, torch + transformers only (no Ray needed), one JSON line each, with the GPU's name:
#   gate overhead (benchmarks/gate_overhead.py, bf16 autocast), one line per model;
#   2:4 semi-structured inference, dense vs sparse tensor cores (benchmarks/gpu_2to4.py);
#   neuron-pruned (-60% parameters) vs dense inference, bf16 (benchmarks/inference_speed.py);
#   the core step on CUDA: a few steps, calibration forced, fold, export, compact, stock reload
#   (benchmarks/core_step.py; fails if calibration or the export is wrong).
#   bash benchmarks/gpu_check.sh            # run from anywhere; needs torch with CUDA + transformers
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" >&2
failed=()  # every check runs; the exit status says whether one failed
python3 benchmarks/core_step.py --device cuda || failed+=(core_step)
python3 benchmarks/gate_overhead.py --device cuda --steps 30 --warmup 5 \
    --models tiny wav2vec2-base-size wav2vec2-base-size-32x16s "$@" || failed+=(gate_overhead)
python3 benchmarks/gpu_2to4.py || failed+=(gpu_2to4)
python3 benchmarks/inference_speed.py --device cuda --repeats 20 --batch8-repeats 20 --extra-batch 64 || failed+=(inference_speed)
if ((${#failed[@]})); then echo "failed: ${failed[*]}" >&2; exit 1; fi
