"""Does Ray Train add per-step cost? Steps/second of dense and sspg, in and out of Ray, one run.

Prints one JSON object:
    {"model": "tiny", "steps": N, "plain_dense_steps_per_s": ..., "plain_sspg_steps_per_s": ...,
     "ray_dense_steps_per_s": ..., "ray_sspg_steps_per_s": ..., "sspg_vs_dense_ray": ...,
     "ray_vs_plain_dense": ..., "ray_vs_plain_sspg": ...}

"plain" runs ``Compressor.step`` in this process over the prepared shards (read with pyarrow)
with one torch thread, as Ray gives a 1-CPU worker;
"ray" runs the same steps in a 1-worker ``TorchTrainer`` (data streamed by Ray Data) and takes
the rate between the first and the last metric report, so start-up is excluded. Ratios near 1.0
mean Ray adds nothing per step.

    python benchmarks/ray_train_overhead.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray
import torch

from pinch_ray.config import DataConfig, GateConfig, ResourcesConfig, TrainConfig
from pinch_ray.data.synth import generate_corpus
from pinch_ray.data.batches import batches_per_epoch, iter_train_batches, read_prepared_rows
from pinch_ray.data.prepare import prepare_split
from pinch_ray.core.models import CHAR_VOCAB, load_model
from pinch_ray.core.compressor import Compressor
from pinch_ray.pipeline.worker import metrics_log_callback, run_training, worker_config

BATCH = 8


def plain_rate(method: str, target: float, path: str, train_cfg: TrainConfig, steps: int) -> float:
    torch.set_num_threads(1)  # what Ray gives a worker with cpus_per_worker=1 (OMP_NUM_THREADS=1)
    run = Compressor.create(load_model("tiny")[0], method, target, train_cfg, GateConfig())
    batches = iter_train_batches(read_prepared_rows(path), BATCH, seed=0)
    run.step([next(batches)])  # warm-up
    started = time.perf_counter()
    for batch in islice(batches, steps):
        run.step([batch])
    return steps / (time.perf_counter() - started)


def ray_rate(method: str, target: float, prepared, train_cfg: TrainConfig, work: Path) -> float:
    log_path = work / f"{method}.jsonl"
    config = worker_config("tiny", method, target, train_cfg, GateConfig(), train_rows=prepared.num_utterances)
    run_training(config, prepared.dataset(), ResourcesConfig(num_workers=1, cpus_per_worker=1), name=method,
                 storage_path=str(work / "runs"), callbacks=[metrics_log_callback(log_path)])
    reports = [json.loads(line) for line in log_path.read_text().splitlines()]
    first, last = reports[0], reports[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method and setting (x10)")
    parser.add_argument("--utterances", type=int, default=800, help="synthetic corpus size")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_corpus(work / "corpus", args.utterances, seed=0, progress=False)
        prepared = prepare_split(work / "corpus", "train", CHAR_VOCAB, DataConfig(), cache_dir=work / "cache")
        if batches_per_epoch(prepared.num_utterances, 1, BATCH) < args.steps + 10:
            raise SystemExit(f"--utterances {args.utterances} gives fewer than {args.steps + 10} batches")
        # reports every 10 steps (the default), the first after 10 warm-up steps; no checkpoint in
        # between and no dev evaluation: the timed span is args.steps training steps and their reports
        train_cfg = TrainConfig(max_steps=args.steps + 10, batch_size=BATCH, warmup_steps=5, report_every=10,
                                checkpoint_every=10**6, eval_every=10**6)
        rates = {}
        for method, target in (("dense", 0.0), ("sspg", 0.65)):
            rates[f"plain_{method}"] = plain_rate(method, target, prepared.path, train_cfg, args.steps)
            rates[f"ray_{method}"] = ray_rate(method, target, prepared, train_cfg, work)
    print(json.dumps({
        "model": "tiny", "steps": args.steps, "batch": BATCH,
        **{f"{k}_steps_per_s": round(v, 3) for k, v in rates.items()},
        "sspg_vs_dense_ray": round(rates["ray_sspg"] / rates["ray_dense"], 3),
        "ray_vs_plain_dense": round(rates["ray_dense"] / rates["plain_dense"], 3),
        "ray_vs_plain_sspg": round(rates["ray_sspg"] / rates["plain_sspg"], 3),
    }))


if __name__ == "__main__":
    main()
