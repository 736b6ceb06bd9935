"""Per-step cost of self-pinching gates: sspg vs dense training steps, side by side.

Prints one JSON line per model:
    {"model": ..., "device": ..., "dense_step_s": ..., "sspg_step_s": ..., "ratio": ...}

Each step is forward + backward + optimizer step (the same ``Compressor.step`` training uses), on
random audio with random transcripts. Steps alternate between the dense and the gated model
(interleaved, so machine noise hits both alike); the figures are medians after warm-up steps.

    python benchmarks/gate_overhead.py                      # tiny + wav2vec2-base size, CPU
    python benchmarks/gate_overhead.py --models tiny --steps 20
    python benchmarks/gate_overhead.py --device cuda --models tiny wav2vec2-base-size-32x16s   # bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.config import GateConfig, TrainConfig
from pinch_ray.models import CHAR_VOCAB, load_model
from pinch_ray.train import Compressor

SHAPES = {  # model name -> (batch size, seconds of audio per utterance, label length)
    "tiny": (16, 2.0, 24),
    "wav2vec2-base-size": (2, 4.0, 60),
    "wav2vec2-base-size-32x16s": (32, 16.0, 240),  # a GPU-sized batch (gpu_check.sh)
}
CPU_DEFAULT = ["tiny", "wav2vec2-base-size"]


def build(name: str) -> torch.nn.Module:
    if name == "tiny":
        return load_model("tiny")[0]
    # facebook/wav2vec2-base architecture (Wav2Vec2Config defaults), random weights.
    config = Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), pad_token_id=0, ctc_loss_reduction="mean",
                            ctc_zero_infinity=True, layerdrop=0.0)
    return AutoModelForCTC.from_config(config)


def measure(name: str, steps: int, warmup: int, device: str) -> dict:
    batch_size, seconds, label_len = SHAPES[name]
    train_cfg = TrainConfig(max_steps=10_000, warmup_steps=0, batch_size=batch_size)
    runs = {}
    for method, target in (("dense", 0.0), ("sspg", 0.65)):
        torch.manual_seed(0)
        runs[method] = Compressor.create(build(name), method, target, train_cfg, GateConfig(), device=device)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_values": torch.randn(batch_size, int(seconds * 16_000), generator=generator),
             "labels": torch.randint(5, len(CHAR_VOCAB), (batch_size, label_len), generator=generator)}
    times = {method: [] for method in runs}
    for i in range(warmup + steps):
        for method, run in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run.step([batch])
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[method].append(time.perf_counter() - started)
    dense, sspg = statistics.median(times["dense"]), statistics.median(times["sspg"])
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    return {"model": name, "device": device_name, "steps": steps, "batch": f"{batch_size}x{seconds}s",
            "dense_step_s": round(dense, 5), "sspg_step_s": round(sspg, 5), "ratio": round(sspg / dense, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=CPU_DEFAULT, choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    for name in args.models:
        print(json.dumps(measure(name, args.steps, args.warmup, args.device)), flush=True)


if __name__ == "__main__":
    main()
