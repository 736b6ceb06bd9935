"""2:4 semi-structured inference on a CUDA GPU: dense vs sparse tensor cores, side by side.

Prints one JSON object:
    {"device": ..., "dense_s": ..., "semi_structured_s": ..., "speedup": ..., "max_abs_diff": ...,
     "layers_converted": ..., ...}

A random wav2vec2-base-sized model gets the 2:4 pattern in its gated Linear layers
(``sparse24.prune_2to4``); one copy keeps those weights dense (zeros stored), the other runs them
through ``sparse24.to_semi_structured``. Both run bf16 forward passes on ``--batch`` x ``--seconds``
of audio, interleaved; medians after warm-up. ``max_abs_diff`` compares their logits (the same
math, different kernels). On a machine without a suitable GPU it prints the reason and exits 0.

    python benchmarks/gpu_2to4.py                 # needs torch with CUDA + transformers
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.core import sparse24
from pinch_ray.config import DEFAULT_GATE_PATTERNS
from pinch_ray.core.models import CHAR_VOCAB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    try:
        sparse24.check_available("cuda")
    except sparse24.Semi24Unavailable as reason:
        print(json.dumps({"skipped": str(reason)}))
        return

    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), pad_token_id=0, layerdrop=0.0)
    dense = AutoModelForCTC.from_config(config).eval()
    report = sparse24.prune_2to4(dense, DEFAULT_GATE_PATTERNS)
    dense = dense.to("cuda", torch.bfloat16)
    sparse = copy.deepcopy(dense)
    converted = sparse24.to_semi_structured(sparse, DEFAULT_GATE_PATTERNS)
    audio = torch.randn(args.batch, int(args.seconds * 16_000), device="cuda", dtype=torch.bfloat16)
    times = {"dense": [], "sparse": []}
    with torch.inference_mode():
        logits = {name: model(audio).logits.float() for name, model in (("dense", dense), ("sparse", sparse))}
        for i in range(args.repeats + 3):
            for name, model in (("dense", dense), ("sparse", sparse)):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(audio)
                torch.cuda.synchronize()
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
    dense_s, sparse_s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    print(json.dumps({
        "device": torch.cuda.get_device_name(), "batch": args.batch, "audio_s": args.seconds,
        "dense_s": round(dense_s, 5), "semi_structured_s": round(sparse_s, 5), "speedup": round(dense_s / sparse_s, 3),
        "max_abs_diff": float((logits["dense"] - logits["sparse"]).abs().max()),
        "logit_scale": float(logits["dense"].abs().max()),
        "layers_converted": len(converted), "layers_2to4": len(report),
    }))


if __name__ == "__main__":
    main()
