"""CPU inference speed of a neuron-pruned model against its dense original, side by side.

Prints one JSON object:
    {"dense_s": ..., "neuron_pruned_s": ..., "speedup": ..., "param_reduction": ...,
     "batch_8": {"dense_s": ..., "neuron_pruned_s": ..., "speedup": ...}, ...}

The model is a random wav2vec2-base-sized model (the ``facebook/wav2vec2-base`` architecture,
94.4M parameters). Its neuron gates (``gates.granularity: neuron``, the units in ``--units``) are
calibrated, all thresholds by one common factor, until the whole model loses ``--reduction`` of
its parameters; the model is then exported exactly as the pipeline does (``export.pruned_copy``:
pruned neurons, heads and conv channels physically removed) and timed against the dense model
on 10 s of audio, batch 1 (the headline figures) and batch 8, forward passes interleaved
(dense, pruned, dense, ...) so machine noise hits both alike; medians after a warm-up pass.
A random model has no learned structure, so every layer loses about the same fraction: a trained
model's mix differs, its speed per parameter removed much less so.

    python benchmarks/inference_speed.py                          # ffn + heads + conv, -60%
    python benchmarks/inference_speed.py --units ffn heads        # transformer only
    python benchmarks/inference_speed.py --device cuda            # bf16 on a GPU (gpu_check.sh)

``--trained OUTPUT_DIR`` adds, under ``"trained"``, the same timing for the models a pipeline run
exported (e.g. ``runs/synthetic-benchmark``): each of its ``sspg-neuron`` trials against the dense
reference it was scored against (with ``sweep.seeds``, the one of its seed), loaded from their
``model/`` directories as a user loads them, with each trial's WER per split and parameter
reduction from its ``metrics.json`` (accuracy beside speed).
``--trained-only`` skips the base-size model.

    python benchmarks/inference_speed.py --trained runs/synthetic-benchmark
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.core import export, gates, pruned_modeling
from pinch_ray.config import GateConfig
from pinch_ray.core.models import CHAR_VOCAB, count_parameters, load_model


def build_pruned(reduction: float, units: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(dense model, exported neuron-pruned copy, facts about the pruning)."""
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), pad_token_id=0, layerdrop=0.0)
    dense = AutoModelForCTC.from_config(config).eval()
    gated = AutoModelForCTC.from_config(config).eval()
    gated.load_state_dict(dense.state_dict())
    found = gates.attach_gates(gated, GateConfig(granularity="neuron", neuron_units=units))
    with torch.no_grad():  # one common threshold for all (training starts each under its layer's lowest unit)
        for gate in found.values():
            gate.threshold.fill_(0.5)
    counts = count_parameters(gated)
    target = reduction * counts.total / counts.gated  # whole-model reduction -> fraction of the gated units
    if target > 0.99:
        raise SystemExit(f"--reduction {reduction}: the units {units} hold only {counts.gated / counts.total:.0%} "
                         "of the parameters; add units or lower --reduction")
    gates.calibrate_thresholds(gated, target)
    pruned = export.pruned_copy(gated)
    after = count_parameters(pruned)
    facts = {"params_dense": counts.total, "params_pruned": sum(p.numel() for p in pruned.parameters()),
             "param_reduction": after.reduction, "gated_unit_sparsity": gates.achieved_sparsity(gated),
             "units": units, "layer_shapes": pruned_modeling.layer_shapes(pruned),
             "conv_dim": list(pruned.config.conv_dim)}
    return dense, pruned, facts


def interleaved(models: dict[str, torch.nn.Module], audio: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, passes interleaved, after warm-up passes."""
    times = {name: [] for name in models}
    sync = torch.cuda.synchronize if audio.is_cuda else (lambda: None)
    warmup = 3 if audio.is_cuda else 1
    with torch.inference_mode():
        for i in range(repeats + warmup):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(audio)
                sync()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def timed_pair(dense: torch.nn.Module, pruned: torch.nn.Module, seconds: float, repeats: int,
               batch8_repeats: int, device: str, extra_batch: int = 0) -> dict:
    """Seconds per forward pass of both models at batch 1 and 8 (and ``extra_batch``), interleaved."""
    generator = torch.Generator().manual_seed(0)
    samples = int(seconds * 16_000)
    with torch.inference_mode():  # same output shape: the pruned model is a drop-in replacement
        probe = torch.randn(1, samples, generator=generator)
        assert dense(probe).logits.shape == pruned(probe).logits.shape
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    models = {"dense": dense.to(device, dtype), "pruned": pruned.to(device, dtype)}
    out = {}
    for batch, count in [(1, repeats), (8, batch8_repeats)] + [(extra_batch, batch8_repeats)] * bool(extra_batch):
        times = interleaved(models, torch.randn(batch, samples, generator=generator).to(device, dtype), count)
        out[f"batch_{batch}"] = {"dense_s": round(times["dense"], 4), "neuron_pruned_s": round(times["pruned"], 4),
                                 "speedup": round(times["dense"] / times["pruned"], 3)}
    return out


def trained_pairs(output_dir: str, seconds: float, repeats: int, batch8_repeats: int, device: str) -> dict:
    """Each sspg-neuron trial of a pipeline run against the dense reference finalize compared it
    with (its ``metrics.json``'s ``dense_reference``: ``dense``, or ``dense-seed<k>`` with
    ``sweep.seeds``), both exported models loaded as a user loads them."""
    root = Path(output_dir)
    finished = {path.parent.name: json.loads(path.read_text()) for path in sorted(root.glob("*/metrics.json"))}
    trials = {name: metrics for name, metrics in finished.items() if metrics.get("method") == "sspg-neuron"}
    reference_of = {name: metrics.get("dense_reference") or "dense" for name, metrics in trials.items()}
    missing = sorted(set(reference_of.values()) - {name for name in finished if (root / name / "model").is_dir()})
    if not trials or missing:
        raise SystemExit(f"--trained {output_dir}: needs a finished pipeline run with at least one sspg-neuron "
                         f"trial and the dense reference of each (missing: {', '.join(missing) or 'sspg-neuron'}); "
                         "run e.g. pinch-ray run pipelines/synthetic_benchmark.yaml first")
    out = {"output_dir": str(root), "references": {}}
    dense_models = {}  # each reference loaded once, however many trials it scored
    for name, metrics in trials.items():
        reference = reference_of[name]
        if reference not in dense_models:
            dense_models[reference] = load_model(str(root / reference / "model"))[0].eval()  # timed_pair moves it
            out["references"][reference] = {"params": finished[reference]["params_total"],
                                            "wer": finished[reference]["wer"]}
        dense = dense_models[reference]
        pruned = load_model(str(root / name / "model"))[0].eval()
        out[name] = {
            "dense_reference": reference,
            "params": sum(p.numel() for p in pruned.parameters()),
            "param_reduction": round(metrics["param_reduction"], 4),
            "wer": metrics["wer"],
            "layer_shapes": pruned_modeling.layer_shapes(pruned), "conv_dim": list(pruned.config.conv_dim),
            **timed_pair(dense, pruned, seconds, repeats, batch8_repeats, device)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reduction", type=float, default=0.60, help="whole-model parameter reduction")
    parser.add_argument("--units", nargs="+", default=["ffn", "heads", "conv"], choices=["ffn", "heads", "conv"])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per utterance")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per model and batch size")
    parser.add_argument("--batch8-repeats", type=int, default=3, help="timed passes at batch 8")
    parser.add_argument("--device", default="cpu", help="cpu (the issue's figure), or cuda (bf16 weights)")
    parser.add_argument("--extra-batch", type=int, default=0,
                        help="also time this batch size (reported as batch_N; e.g. 64 on a GPU)")
    parser.add_argument("--trained", metavar="OUTPUT_DIR",
                        help="also time a pipeline run's exported dense and sspg-neuron models")
    parser.add_argument("--trained-only", action="store_true", help="only --trained (no base-size model)")
    args = parser.parse_args()
    if args.trained_only and not args.trained:
        parser.error("--trained-only needs --trained OUTPUT_DIR")

    result = {}
    if not args.trained_only:
        dense, pruned, facts = build_pruned(args.reduction, args.units)
        pair = timed_pair(dense, pruned, args.seconds, args.repeats, args.batch8_repeats, args.device,
                          args.extra_batch)
        one = pair.pop("batch_1")
        result = {**one, "param_reduction": round(facts["param_reduction"], 4), **pair,
                  **{k: v for k, v in facts.items() if k != "param_reduction"}}
    if args.trained:
        result["trained"] = trained_pairs(args.trained, args.seconds, args.repeats, args.batch8_repeats, args.device)
    print(json.dumps({
        **result, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "audio_s": args.seconds, "threads": torch.get_num_threads(), "repeats": [args.repeats, args.batch8_repeats]}))


if __name__ == "__main__":
    main()
