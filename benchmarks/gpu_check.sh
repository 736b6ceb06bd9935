#!/usr/bin/env bash
# Gate overhead on a CUDA GPU: the same benchmark as benchmarks/gate_overhead.py, bf16 autocast,
# torch + transformers only (no Ray needed). Prints one JSON line per model, with the GPU's name.
#   bash benchmarks/gpu_check.sh            # run from anywhere; needs torch with CUDA + transformers
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" >&2
python3 benchmarks/gate_overhead.py --device cuda --steps 30 --warmup 5 \
    --models tiny wav2vec2-base-size wav2vec2-base-size-32x16s "$@"
