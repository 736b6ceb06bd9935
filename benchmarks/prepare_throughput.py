"""Prepare-stage throughput: a plain single-process loop vs the Ray Data stage, same corpus.

Generates a synthetic corpus (espeak-ng, LibriSpeech layout; reports the generator's speed),
then featurizes its train split twice, into fresh output directories: once with a plain loop in
this process (the same featurize code, pyarrow writes) and once with ``prepare_split`` on a
local Ray cluster of all cores (started before the clock, as in the pipeline; its dev split is
prepared first, so worker processes are up, and that first job's time is reported as well).
Prints one JSON object; run it on an otherwise idle machine. Usage (about 1 minute on 2 cores)::

    python benchmarks/prepare_throughput.py --utterances 2500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pinch_ray.config import DataConfig
from pinch_ray.corpus.librispeech import list_split
from pinch_ray.corpus.synth import generate_corpus
from pinch_ray.data import PrepareSettings, featurize_records, prepare_split

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "'": 5,
         **{chr(ord("A") + i): 6 + i for i in range(26)}}


def single_process_prepare(root: str, split: str, out_dir: Path, cfg: DataConfig) -> int:
    """The baseline: list, featurize ``prepare_batch_size`` utterances at a time, write a
    parquet file every ``rows_per_shard`` utterances. Returns the rows written."""
    listing = list_split(root, split)
    settings = PrepareSettings.from_config(cfg)
    out_dir.mkdir(parents=True)
    rows = [u.as_row() for u in listing.utterances]
    written = 0
    for shard_index, start in enumerate(range(0, len(rows), cfg.rows_per_shard)):
        shard = rows[start:start + cfg.rows_per_shard]
        tables = [featurize_records(shard[i:i + cfg.prepare_batch_size], VOCAB, settings)[0]
                  for i in range(0, len(shard), cfg.prepare_batch_size)]
        with pq.ParquetWriter(out_dir / f"{shard_index:05d}.parquet", tables[0].schema) as writer:
            for table in tables:
                writer.write_table(table)
                written += table.num_rows
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=2500, help="corpus size (80%% are the train split)")
    parser.add_argument("--work-dir", default=None, help="keep the corpus and outputs here (default: temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        corpus = work / f"synth-{args.utterances}"
        synth = generate_corpus(corpus, args.utterances, seed=0, progress=False)
        cfg = DataConfig()

        started = time.perf_counter()
        single_rows = single_process_prepare(str(corpus), "train", work / f"single-{time.time_ns()}", cfg)
        single_s = time.perf_counter() - started

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        # The pipeline prepares several splits on one cluster; the first job also starts the
        # worker processes. Prepare the dev split first (timed separately), then time train.
        started = time.perf_counter()
        prepare_split(str(corpus), "dev", VOCAB, cfg, cache_dir=work / f"warmup-{time.time_ns()}")
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        prepared = prepare_split(str(corpus), "train", VOCAB, cfg, cache_dir=work / f"cache-{time.time_ns()}")
        ray_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = prepare_split(str(corpus), "train", VOCAB, cfg, cache_dir=Path(prepared.path).parent)
        cached_s = time.perf_counter() - started
        ray.shutdown()

    assert prepared.num_utterances == single_rows and cached.from_cache
    print(json.dumps({
        "utterances": single_rows,
        "single_process_s": round(single_s, 2),
        "ray_data_s": round(ray_s, 2),
        "speedup": round(single_s / ray_s, 2),
        "cpus": os.cpu_count(),
        "ray_first_job_dev_split_s": round(warmup_s, 2),
        "cache_hit_s": round(cached_s, 3),
        "synth_utterances": args.utterances,
        "synth_utterances_per_s": synth["utterances_per_second"],
        "synth_mean_duration_s": synth["mean_duration_s"],
    }))


if __name__ == "__main__":
    main()
