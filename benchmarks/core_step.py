"""The core step on one device, end to end, without Ray: gates, a few training steps, calibration
(forced: a few steps leave the hard sparsity far from the target), fold, export, compact storage,
and stock loading of the export.

Prints one JSON line per (model, method): the device, the sparsity before and after calibration
(fractions of all parameters), the exported model's parameter reduction, whether the reloaded
export gives the hard-masked model's logits, and the seconds of each phase. It is the GPU check
of the calibration path (``torch.searchsorted`` on the weights' device) and of fold/export after it.

    python benchmarks/core_step.py --device cpu --models tiny            # here, a few seconds
    python benchmarks/core_step.py --device cuda                         # gpu_check.sh: base size, bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.core import export
from pinch_ray.config import GateConfig, TrainConfig
from pinch_ray.core.models import CHAR_VOCAB, count_parameters, load_model, make_processor
from pinch_ray.core.compressor import Compressor

SHAPES = {"tiny": (4, 2.0, 24), "wav2vec2-base-size": (4, 4.0, 60)}  # batch, seconds, label length


def build(name: str):
    if name == "tiny":
        return load_model("tiny")[0]
    torch.manual_seed(0)
    return AutoModelForCTC.from_config(Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), layerdrop=0.0))


def check(name: str, method: str, device: str, steps: int, target: float) -> dict:
    seconds = {}
    started = time.perf_counter()
    train_cfg = TrainConfig(max_steps=100 * steps, warmup_steps=1, lr=1e-4)  # a long run's first steps
    run = Compressor.create(build(name), method, target, train_cfg, GateConfig(calibrate=True), device=device)
    batch_size, audio_s, label_len = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    batch = {"input_values": torch.randn(batch_size, int(audio_s * 16_000), generator=generator),
             "labels": torch.randint(5, len(CHAR_VOCAB), (batch_size, label_len), generator=generator)}
    for _ in range(steps):
        loss = run.step([batch])["ctc_loss"]
    seconds["train"] = time.perf_counter() - started

    started = time.perf_counter()
    result = run.finish()  # calibrates on the device the weights are on
    seconds["calibrate"] = time.perf_counter() - started

    started = time.perf_counter()
    probe = batch["input_values"][:1].to(run.device)
    with torch.no_grad():
        hard = run.unwrapped.eval()(probe).logits.float().cpu()
    plain = export.pruned_copy(run.unwrapped)
    with tempfile.TemporaryDirectory() as directory:
        model_dir = Path(directory) / "model"
        export.export_model(plain, make_processor(), model_dir)
        export.save_compact(model_dir, Path(directory) / "compact")
        compact_bytes = export.dir_bytes(Path(directory) / "compact")
        # neuron-pruned exports ship their loader (auto_map): what a user loads them with
        reloaded = AutoModelForCTC.from_pretrained(model_dir, trust_remote_code=method == "sspg-neuron").eval()
        model_bytes = (model_dir / "model.safetensors").stat().st_size
    with torch.no_grad():
        exported = reloaded(probe.cpu()).logits
    seconds["fold_export_compact_reload"] = time.perf_counter() - started
    counts = count_parameters(reloaded)
    return {"model": name, "method": method, "device": str(run.device),
            "device_name": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
            "steps": steps, "ctc_loss_finite": bool(torch.isfinite(torch.tensor(loss))),
            "target": target, "sparsity_trained": round(result["achieved_sparsity_trained"], 4),
            "sparsity_calibrated": round(result["achieved_sparsity"], 4), "calibrated": result["calibrated"],
            "param_reduction_exported": round(counts.reduction, 4),
            "export_equals_hard_masked": bool(torch.allclose(exported, hard, atol=1e-3, rtol=1e-3)),
            "compact_ratio": round(compact_bytes / model_bytes, 4),
            "seconds": {key: round(value, 2) for key, value in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["tiny", "wav2vec2-base-size"], choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["sspg", "sspg-neuron"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.65, help="fraction of all parameters")
    args = parser.parse_args()
    failed = False
    for name in args.models:
        for method in args.methods:
            line = check(name, method, args.device, args.steps, args.target)
            print(json.dumps(line), flush=True)
            failed |= not (line["calibrated"] and line["export_equals_hard_masked"]
                           and abs(line["param_reduction_exported"] - args.target) <= 0.01)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
