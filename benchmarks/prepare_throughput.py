"""Prepare-stage throughput: a plain single-process loop vs the Ray Data stage, same corpus.

Generates a synthetic corpus (espeak-ng, LibriSpeech layout; reports the generator's speed),
then featurizes its train split (80% of the utterances) into fresh output directories, in turns,
``--repeats`` times each: with a plain loop in this process (list, then :func:`write_shard` per
shard: the same featurize and parquet-write code as the stage), with ``prepare_split`` on a
local Ray cluster of all cores, and -- the reference for what this machine allows -- with a
hand-written pool of one process per core (``concurrent.futures``, one shard per job, handed out
as workers free up). The cluster is started before the clock, as in the pipeline, and
its dev split is prepared first (that first job starts the worker processes and Ray Data's
actors; its time is reported as well). ``speedup`` is median single-process seconds / median
Ray Data seconds, ``process_pool_speedup`` the same for the pool; every run is listed. Prints one
JSON object; run it on an otherwise idle machine. Usage (about 3 minutes on 2 cores, 30-45 s of
it generating the corpus)::

    python benchmarks/prepare_throughput.py --utterances 7500
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pinch_ray.config import DataConfig
from pinch_ray.data.librispeech import list_split
from pinch_ray.data.synth import generate_corpus
from pinch_ray.data.features import PrepareSettings, write_shard
from pinch_ray.data.prepare import prepare_split

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "'": 5,
         **{chr(ord("A") + i): 6 + i for i in range(26)}}


def shard_jobs(root: str, split: str, out_dir: Path, cfg: DataConfig) -> list[tuple]:
    """List the split and cut it into ``rows_per_shard`` utterances per parquet file (the unit of
    work of both hand-written baselines): ``(rows, path, cfg)`` per shard."""
    listing = list_split(root, split)
    out_dir.mkdir(parents=True)
    rows = [u.as_row() for u in listing.utterances]
    return [(rows[start:start + cfg.rows_per_shard], out_dir / f"{start:08d}.parquet", cfg)
            for start in range(0, len(rows), cfg.rows_per_shard)]


def write_job(job: tuple) -> int:
    """Featurize and write one shard (``prepare_batch_size`` per row group); returns the rows kept."""
    rows, path, cfg = job
    return write_shard(rows, path, VOCAB, PrepareSettings.from_config(cfg), cfg.prepare_batch_size)["kept"]


def single_process_prepare(root: str, split: str, out_dir: Path, cfg: DataConfig) -> int:
    """The baseline: list, then featurize and write one shard at a time. Returns the rows written."""
    return sum(map(write_job, shard_jobs(root, split, out_dir, cfg)))


def process_pool_prepare(root: str, split: str, out_dir: Path, cfg: DataConfig,
                         pool: concurrent.futures.Executor) -> int:
    """The hand-written parallel reference: the same shards as :func:`single_process_prepare`,
    one job each, on a pool of one process per core (already started)."""
    return sum(pool.map(write_job, shard_jobs(root, split, out_dir, cfg)))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # as in a Ray worker (OMP_NUM_THREADS=1 for a 1-CPU task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=7500, help="corpus size (80%% are the train split)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (alternating)")
    parser.add_argument("--work-dir", default=None, help="keep the corpus and outputs here (default: temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        corpus = work / f"synth-{args.utterances}"
        synth = generate_corpus(corpus, args.utterances, seed=0, progress=False)
        cfg = DataConfig()

        # Ray starts its workers at niceness 15, the baseline runs here at 0: on a machine where
        # anything else runs, the workers would yield to it and the baseline would not. Same priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # The pipeline prepares several splits on one cluster; the first job also starts the
        # worker processes and Ray Data's actors. Prepare the dev split first (timed separately).
        started = time.perf_counter()
        prepare_split(str(corpus), "dev", VOCAB, cfg, cache_dir=work / f"warmup-{time.time_ns()}")
        warmup_s = time.perf_counter() - started

        pool = concurrent.futures.ProcessPoolExecutor(os.cpu_count(), multiprocessing.get_context("spawn"),
                                                      initializer=_one_thread)
        process_pool_prepare(str(corpus), "dev", work / f"pool-warmup-{time.time_ns()}", cfg, pool)

        single_s, ray_s, pool_s = [], [], []
        for _ in range(args.repeats):  # in turns, so all see the same machine load
            for earlier in work.glob("*-[0-9]*"):  # the last run's outputs (~1.5 GB at 6,000 utterances)
                if not earlier.name.startswith("synth-"):
                    shutil.rmtree(earlier)
            started = time.perf_counter()
            single_rows = single_process_prepare(str(corpus), "train", work / f"single-{time.time_ns()}", cfg)
            single_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            prepared = prepare_split(str(corpus), "train", VOCAB, cfg, cache_dir=work / f"cache-{time.time_ns()}")
            ray_s.append(time.perf_counter() - started)
            assert prepared.num_utterances == single_rows and not prepared.from_cache
            started = time.perf_counter()
            assert process_pool_prepare(str(corpus), "train", work / f"pool-{time.time_ns()}", cfg, pool) == single_rows
            pool_s.append(time.perf_counter() - started)
        pool.shutdown()
        started = time.perf_counter()
        cached = prepare_split(str(corpus), "train", VOCAB, cfg, cache_dir=Path(prepared.path).parent)
        cached_s = time.perf_counter() - started
        ray.shutdown()

    assert cached.from_cache
    print(json.dumps({
        "utterances": single_rows,
        "single_process_s": round(statistics.median(single_s), 2),
        "ray_data_s": round(statistics.median(ray_s), 2),
        "speedup": round(statistics.median(single_s) / statistics.median(ray_s), 2),
        "process_pool_s": round(statistics.median(pool_s), 2),
        "process_pool_speedup": round(statistics.median(single_s) / statistics.median(pool_s), 2),
        "single_process_runs_s": [round(s, 2) for s in single_s],
        "ray_data_runs_s": [round(s, 2) for s in ray_s],
        "process_pool_runs_s": [round(s, 2) for s in pool_s],
        "cpus": os.cpu_count(),
        "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]),
        "ray_first_job_dev_split_s": round(warmup_s, 2),
        "cache_hit_s": round(cached_s, 3),
        "synth_utterances": args.utterances,
        "synth_utterances_per_s": synth["utterances_per_second"],
        "synth_mean_duration_s": synth["mean_duration_s"],
    }))


if __name__ == "__main__":
    main()
