"""Per-step cost of self-pinching gates: sspg vs dense training steps, side by side.

Prints one JSON line per model:
    {"model": ..., "device": ..., "dense_step_s": ..., "sspg_step_s": ..., "ratio": ...,
     "late_dense_step_s": ..., "late_sspg_step_s": ..., "late_ratio": ...}

Each step is forward + backward + optimizer step (the same ``Compressor.step`` training uses), on
random audio with random transcripts. Steps alternate between the dense and the gated model
(interleaved, so machine noise hits both alike); the figures are medians after warm-up steps.
``ratio`` is measured at the start of training; ``late_ratio`` with the gates as they are at its
end (temperature ``tau_end``, every threshold above 65% of its matrix: near-hard masks).

    python benchmarks/gate_overhead.py                      # tiny + wav2vec2-base size, CPU
    python benchmarks/gate_overhead.py --models tiny --steps 20
    python benchmarks/gate_overhead.py --device cuda --models tiny wav2vec2-base-size-32x16s   # bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.core import gates
from pinch_ray.core.masks import unmasked_weight
from pinch_ray.config import GateConfig, TrainConfig
from pinch_ray.core.models import CHAR_VOCAB, load_model
from pinch_ray.core.compressor import Compressor

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
    early = interleaved_medians(runs, batch, steps, warmup, device)
    # Late in training: the temperature at its end value and every threshold where 65% of its
    # matrix lies below it, so the soft masks are near-hard (the regime where mask values and
    # gradients used to underflow into denormal floats).
    gate_cfg = runs["sspg"].gate_cfg
    runs["sspg"].step_count = train_cfg.max_steps  # the schedules give tau_end
    with torch.no_grad():
        for module, gate in gates.gated_modules(runs["sspg"].unwrapped).values():
            w2 = unmasked_weight(module).float().pow(2).flatten()
            sample = w2[torch.randperm(w2.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            gate.threshold.fill_(float((sample.quantile(0.65) / w2.mean()).sqrt()))
    late = interleaved_medians(runs, batch, max(steps // 2, 5), warmup, device, after_each=lambda: setattr(
        runs["sspg"], "step_count", train_cfg.max_steps))
    assert all(math.isclose(float(g.tau), gate_cfg.tau_end, rel_tol=1e-6) for g in gates.gates_of(runs["sspg"].unwrapped))
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    return {"model": name, "device": device_name, "steps": steps, "batch": f"{batch_size}x{seconds}s",
            "dense_step_s": round(early["dense"], 5), "sspg_step_s": round(early["sspg"], 5),
            "ratio": round(early["sspg"] / early["dense"], 4),
            "late_dense_step_s": round(late["dense"], 5), "late_sspg_step_s": round(late["sspg"], 5),
            "late_ratio": round(late["sspg"] / late["dense"], 4)}


def interleaved_medians(runs: dict, batch: dict, steps: int, warmup: int, device: str, after_each=None) -> dict:
    """Median seconds of a training step per method, steps alternating between the methods."""
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
            if after_each:
                after_each()
    return {method: statistics.median(t) for method, t in times.items()}


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
