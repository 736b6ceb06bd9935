"""The check for the first GPU within reach: the core path (torch + transformers, no Ray) in one
process, printed as ONE JSON object. Run it through gpu_check.sh (≤ 8 minutes on one H100):

- ``step_time``: wav2vec2-base-size training steps (forward, backward, optimizer) in bf16 autocast,
  as a GPU worker runs them, on ``--batch`` x ``--seconds`` of audio: dense, sspg, and the peers
  gmp / movement where this code has them; interleaved medians after warm-up steps, and each
  method's ratio to dense (goal: sspg <= 1.10).
- ``compile``: the gate kernels' compiled graphs (:func:`pinch_ray.core.masks.compile_report`) and
  whether any compiler failure sent them back to eager (``fallback``: null when none did).
- ``core_step``: a few steps, calibration forced, fold, export, compact storage, stock
  ``AutoModelForCTC`` loading, and whether the export's logits equal the hard-masked model's
  (benchmarks/core_step.py), for sspg and sspg-neuron.
- ``evaluation``: batched greedy decoding of the exported sspg model on ``--eval-utterances``
  utterances of 4-16 s (length-sorted batches of ``--eval-batch``, as finalize reads them), in
  fp32 (the finalize stage's actors) and under bf16 autocast (the dev evaluation during training):
  utterances and seconds of audio per second.
- ``inference_speed`` / ``sparse_2to4``: benchmarks/inference_speed.py and gpu_2to4.py, nested.

Exit status 1 when a correctness check fails (a fallback, calibration missing its target, an
export whose logits differ); the speed goals are reported, not enforced.

    bash benchmarks/gpu_check.sh                          # on the GPU machine
    python benchmarks/gpu_check.py --dry-run              # the same code at tiny size on a CPU (~1-2 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCTC, Wav2Vec2Config

from pinch_ray.config import METHODS, GateConfig, TrainConfig
from pinch_ray.core import export, masks
from pinch_ray.core.compressor import Compressor
from pinch_ray.core.models import CHAR_VOCAB, load_model, make_processor
from pinch_ray.core.scoring import transcribe_rows

HERE = Path(__file__).resolve().parent
PEERS = ("gmp", "movement")  # the strong simple peers, measured where METHODS has them
TARGET = 0.65  # fraction of all parameters


def _benchmark(name: str):
    """``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(size: str) -> torch.nn.Module:
    """wav2vec2-base's architecture (Wav2Vec2Config defaults, 94.4M parameters) or the tiny preset,
    random weights, the same for every method."""
    torch.manual_seed(0)
    if size == "tiny":
        return load_model("tiny")[0]
    return AutoModelForCTC.from_config(Wav2Vec2Config(vocab_size=len(CHAR_VOCAB), pad_token_id=0, layerdrop=0.0,
                                                      ctc_loss_reduction="mean", ctc_zero_infinity=True))


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_time(size: str, device: str, batch_size: int, seconds: float, steps: int, warmup: int) -> dict:
    """Median seconds per training step of each method, steps interleaved across the methods."""
    train_cfg = TrainConfig(max_steps=10_000, warmup_steps=0, batch_size=batch_size)
    runs, errors = {}, {}
    for method in ("dense", "sspg") + tuple(m for m in PEERS if m in METHODS):
        try:
            runs[method] = Compressor.create(build(size), method, 0.0 if method == "dense" else TARGET, train_cfg,
                                             GateConfig(), device=device)
        except Exception as error:  # noqa: BLE001 - a peer this code cannot build yet: said, not fatal
            errors[method] = f"{type(error).__name__}: {error}"
    generator = torch.Generator().manual_seed(0)
    batch = {"input_values": torch.randn(batch_size, int(seconds * 16_000), generator=generator),
             "labels": torch.randint(5, len(CHAR_VOCAB), (batch_size, int(seconds * 15)), generator=generator)}
    times = {method: [] for method in runs}
    for i in range(warmup + steps):
        for method, run in runs.items():
            _synchronize(device)
            started = time.perf_counter()
            run.step([batch])
            _synchronize(device)
            if i >= warmup:
                times[method].append(time.perf_counter() - started)
    medians = {method: statistics.median(values) for method, values in times.items()}
    result = {"model": size, "batch": f"{batch_size}x{seconds:g}s", "steps": steps, "warmup": warmup,
              "autocast": str(runs["dense"].autocast_dtype).removeprefix("torch.") if runs["dense"].autocast_dtype
              else "off (CPU)",
              **{f"{method}_step_s": round(value, 4) for method, value in medians.items()},
              **{f"{method}_over_dense": round(value / medians["dense"], 4) for method, value in medians.items()
                 if method != "dense"}}
    result["sspg_goal_met"] = result["sspg_over_dense"] <= 1.10
    if errors:
        result["not_measured"] = errors
    return result, runs.get("sspg")


def evaluation(model: torch.nn.Module, device: str, utterances: int, batch_size: int) -> dict:
    """Throughput of batched greedy decoding (the finalize stage's path: ``transcribe_rows``)."""
    generator = torch.Generator().manual_seed(1)
    lengths = (torch.rand(utterances, generator=generator) * 12 + 4) * 16_000  # 4-16 s
    rows = [{"id": f"utt-{i:04d}", "audio": torch.randn(int(n), generator=generator).numpy(), "labels": [5],
             "text": "A"} for i, n in enumerate(lengths.tolist())]
    audio_s = float(lengths.sum()) / 16_000
    model = model.to(device).eval()
    processor = make_processor()
    out = {"utterances": utterances, "audio_s": round(audio_s, 1), "batch": batch_size}
    for name, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        if dtype is not None and device != "cuda":
            continue
        with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            transcribe_rows(model, processor, rows[:batch_size], batch_size)  # warm-up
            _synchronize(device)
            started = time.perf_counter()
            transcribe_rows(model, processor, rows, batch_size)
            _synchronize(device)
            elapsed = time.perf_counter() - started
        out[name] = {"utterances_per_s": round(utterances / elapsed, 2), "audio_s_per_s": round(audio_s / elapsed, 1)}
    return out


def nested(command: list[str], timeout_s: int) -> dict:
    """The JSON a benchmark script prints (its last line), or why there is none."""
    try:
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr.strip()[-500:]}
    except json.JSONDecodeError:
        return {"error": lines[-1][:500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny model, few steps, on the CPU: checks the script, measures nothing")
    parser.add_argument("--batch", type=int, default=16, help="utterances per training step")
    parser.add_argument("--seconds", type=float, default=16.0, help="audio per utterance (s)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per method, after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-utterances", type=int, default=256)
    parser.add_argument("--eval-batch", type=int, default=16)
    args = parser.parse_args()
    if args.dry_run:
        device, size = "cpu", "tiny"
        args.batch, args.seconds, args.steps, args.warmup, args.eval_utterances = 2, 1.0, 2, 1, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
        device, size = "cuda", "wav2vec2-base-size"
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "transformers": transformers.__version__, "dry_run": args.dry_run}
    report["step_time"], sspg = step_time(size, device, args.batch, args.seconds, args.steps, args.warmup)

    core_step = _benchmark("core_step")
    core_size = "tiny" if args.dry_run else "wav2vec2-base-size"
    report["core_step"] = [core_step.check(core_size, method, device, steps=3, target=TARGET)
                           for method in ("sspg", "sspg-neuron")]
    report["compile"] = masks.compile_report()  # every graph this process compiled, by then
    report["evaluation"] = evaluation(export.pruned_copy(sspg.unwrapped), device, args.eval_utterances,
                                      args.eval_batch)
    if args.dry_run:
        report["inference_speed"] = report["sparse_2to4"] = "skipped (dry run)"
    else:
        report["inference_speed"] = nested([str(HERE / "inference_speed.py"), "--device", "cuda", "--repeats", "20",
                                            "--batch8-repeats", "20", "--extra-batch", "64"], timeout_s=120)
        report["sparse_2to4"] = nested([str(HERE / "gpu_2to4.py")], timeout_s=90)
    problems = [f"gate kernels fell back to eager: {report['compile']['fallback']}"] if report["compile"]["fallback"] else []
    for line in report["core_step"]:
        if not (line["calibrated"] and line["export_equals_hard_masked"]
                and abs(line["param_reduction_exported"] - TARGET) <= 0.01):
            problems.append(f"core_step {line['method']}: calibration, export or reduction wrong")
    report["problems"] = problems
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report), flush=True)
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
