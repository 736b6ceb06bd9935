"""The prepare stage: a corpus split -> parquet shards, on Ray Data.

Prepare, per split::

    list utterances (driver: names, sizes, transcripts)  ->  Ray Data, streaming, one task per
    shard: decode (soundfile) -> downmix -> resample to 16 kHz (torchaudio) -> normalise
    -> tokenise characters -> filter by duration -> write the parquet shard (pyarrow)
    ->  the driver collects one small summary row per shard (counts, skips) for the report

Shard rows: :data:`pinch_ray.data.features.SHARD_SCHEMA`.

Output: ``<cache_dir>/<split>-<key>/`` (``cache_dir`` a directory or an object-store URI) with
``prepare_report.json``, the completion marker ``_COMPLETE`` (written last), and the shards in a
directory of the attempt that wrote them, ``attempt-<hex>/*.parquet``, which the report lists:
readers read the files the report names (:func:`pinch_ray.data.features.shard_files`), never a
listing. A shard file appears only complete (:func:`pinch_ray.storage.atomic_output`). The key
hashes the corpus URI, the split, every listed file's size and mtime, the settings and the vocab,
so a rerun with the same inputs reuses the shards. Bad input is skipped and counted by kind
(:data:`SKIP_KINDS`), never fatal, unless no usable utterance is left.

Two drivers preparing one split into one cache at once (two runs sharing ``data.cache_dir``): in a
local (or NFS) cache they take turns (a lock); the second reuses the first one's shards. An object
store has no lock, so each attempt writes only its own directory: the first to finish publishes
its report, a later finisher finds the marker and discards its own shards, and neither clears the
other's. What a killed attempt left is cleared by the next attempt: under the lock, all of it; on an
object store, attempt directories with no file written for :data:`STALE_ATTEMPT_S`.

Shards mix speakers: the utterances of a LibriSpeech-layout corpus are shuffled (a fixed seed,
:data:`SHARD_ORDER_SEED`) before they are cut into shards, where the listing keeps each speaker's
chapters together; and training reads the shards in an order of its own seed
(:func:`read_shards`). (An HF-parquet corpus keeps its files' order within a shard.)

Example (Ray already initialised by the caller)::

    prepared = prepare_split("data/synth_corpus", "train", vocab, DataConfig())
    ds = prepared.dataset()   # ray.data.Dataset of the shards
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from pinch_ray import storage
from pinch_ray.config import CorpusConfig, DataConfig, raise_if_problems
from pinch_ray.data.features import (COMPLETE_MARKER, CONVERSION_KINDS, FORMAT_VERSION, REPORT_FILE, SKIP_KINDS,
                                     WORD_DELIMITER, PrepareSettings, read_report, shard_files, write_shard)
from pinch_ray.data.librispeech import HF_COLUMNS, SplitListing, hf_rows, list_split

logger = logging.getLogger(__name__)

SHARD_ORDER_SEED = 0  # the utterance order prepare cuts into shards (part of the shard format)
SHARDS_PER_TASK = 4  # LibriSpeech layout: most shards one prepare task writes, one after another
TASKS_PER_CPU = 2  # LibriSpeech layout: fewest prepare tasks per cluster CPU
ATTEMPT_PREFIX = "attempt-"  # <prepared dir>/attempt-<hex>/: the shards of one attempt at preparing it
STALE_ATTEMPT_S = 24 * 3600  # object store: an unlisted attempt with no file written for this long is a killed one's
# What a prepare task returns per written shard (the driver builds the report from these rows).
SUMMARY_SCHEMA = pa.schema([
    ("file", pa.string()),  # shard file name, null when nothing was kept
    ("kept", pa.int64()),
    ("num_samples", pa.int64()),
    ("skipped", pa.string()),  # JSON list of {id, path, kind, reason}
    ("conversions", pa.string()),  # JSON {kind: count}
])


class PrepareError(RuntimeError):
    """The prepare stage produced no usable utterance (the message lists the skips by kind)."""


def _records_of(batch: pa.Table, split: str) -> list[dict]:
    if "audio" in batch.column_names:  # HF parquet layout
        return [{**row, "split": split} for row in hf_rows(batch)]
    return batch.to_pylist()


def prepare_shards(batch: pa.Table, *, out_dir: str, vocab: Mapping[str, int], settings: PrepareSettings,
                   split: str, rows_per_shard: int, rows_per_group: int) -> pa.Table:
    """Ray Data UDF: a pyarrow batch of listing rows (LibriSpeech layout) or HF-layout rows ->
    parquet shards in ``out_dir`` (:func:`write_shard`; the batch is cut into the fewest shards
    of at most ``rows_per_shard`` utterances, of nearly equal sizes) -> one SUMMARY_SCHEMA row per
    shard. A shard is named after its utterance ids, so a retried task overwrites its files
    rather than duplicating them."""
    records = _records_of(batch, split)
    num_shards = -(-len(records) // rows_per_shard)
    bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
    summaries = []
    for start, end in zip(bounds, bounds[1:]):
        shard = records[start:end]
        name = hashlib.sha1("\n".join(r["id"] for r in shard).encode()).hexdigest()[:20]
        summary = write_shard(shard, storage.join(out_dir, f"shard-{name}.parquet"), vocab, settings, rows_per_group)
        summaries.append({**summary, "skipped": json.dumps(summary["skipped"]),
                          "conversions": json.dumps(summary["conversions"])})
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedSplit:
    """A prepared split: ``path`` holds ``prepare_report.json`` and the parquet shards it lists."""

    path: str
    report: dict
    from_cache: bool

    @property
    def num_utterances(self) -> int:
        return int(self.report["kept"])

    @property
    def files(self) -> list[str]:
        """The shard files (local paths or URIs, like ``path``), as the report lists them."""
        return shard_files(self.path, self.report)

    def dataset(self, seed: int | None = None):
        """The shards as a ``ray.data.Dataset`` (streamed, not loaded); see :func:`read_shards`."""
        return read_shards(self.files, seed)


def shard_order(files: Sequence[str], seed: int | None) -> list[str]:
    """``files`` in the order ``seed`` draws (as given for None)."""
    files = list(files)
    if seed is not None:
        random.Random(seed).shuffle(files)
    return files


def read_shards(files: Sequence[str], seed: int | None = None):
    """A ``ray.data.Dataset`` of parquet shards (local paths or URIs of one filesystem), read in the
    order given, or with ``seed`` in an order drawn from it: the same for the same seed, every epoch
    and every resume (Ray Data's own file shuffle reseeds per execution, which restarts on resume)."""
    files = shard_order(files, seed)
    filesystem, _ = storage.filesystem(files[0])
    return ray.data.read_parquet([storage.filesystem(file)[1] for file in files], filesystem=filesystem)


def cache_key(listing: SplitListing, settings: PrepareSettings, vocab: Mapping[str, int]) -> str:
    """Hex digest of what determines the shards: corpus URI, split, layout, files (size, mtime),
    settings, vocabulary and the shard format version."""
    payload = json.dumps({"root": listing.root, "split": listing.split, "layout": listing.layout,
                          "files": listing.fingerprint, "settings": asdict(settings),
                          "vocab": sorted(vocab.items()), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def prepare_split(corpus: CorpusConfig | str | os.PathLike, split: str, vocab: Mapping[str, int],
                  data_cfg: DataConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  num_cpus: float | None = None) -> PreparedSplit:
    """Featurize one split of a corpus into parquet shards with Ray Data (streaming), or reuse
    the cached shards of an identical earlier run.

    ``corpus``: a CorpusConfig, or the corpus root (local path or s3:// / gs:// / file:// URI;
    layout detected). ``vocab``: character -> id (HF ``Wav2Vec2CTCTokenizer.get_vocab()``;
    ``|`` is the word delimiter). ``cache_dir`` defaults to ``data_cfg.cache_dir``; on a cluster of
    several nodes, a directory every node shares (NFS) or an object-store URI: the workers write
    the shards there. ``num_cpus``: the CPUs the job spreads its tasks over (default: what Ray has
    up; on an autoscaling cluster the pipeline passes what it can grow to, so the job has tasks
    left for the nodes that join while it runs). Ray must already be initialised by the caller.

    Raises FileNotFoundError (corpus or split missing), ConfigError (invalid settings),
    PrepareError (no usable utterance; the message lists the skips by kind).
    """
    data_cfg = data_cfg or DataConfig()
    corpus_cfg = corpus if isinstance(corpus, CorpusConfig) else CorpusConfig(root=os.fspath(corpus))
    raise_if_problems(corpus_cfg.problems() + data_cfg.problems(), "prepare settings")
    if WORD_DELIMITER not in vocab:
        raise ValueError(f"vocab has no word delimiter {WORD_DELIMITER!r}; use the model's CTC vocabulary")
    settings = PrepareSettings.from_config(data_cfg)
    started = time.perf_counter()

    listing = list_split(corpus_cfg.root, split, corpus_cfg.layout)
    key = cache_key(listing, settings, vocab)
    final_dir = storage.join(cache_dir or data_cfg.cache_dir, f"{split.replace('/', '_')}-{key[:16]}")
    # Two runs preparing the same split into one local cache take turns: the second waits, then
    # reuses the first one's shards. An object store has no lock: there each attempt writes a
    # directory of its own (see the module docstring).
    locked = not storage.is_uri(final_dir)
    with storage.exclusive(final_dir, f"the prepared {split} split"):
        if storage.is_file(storage.join(final_dir, COMPLETE_MARKER)):
            return _cached(final_dir, corpus_cfg.root, split)

        if locked:
            storage.remove_tree(final_dir)  # what an earlier, unfinished attempt (no marker) left
        else:
            _remove_stale_attempts(final_dir)
        attempt = f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:12]}"
        attempt_dir = storage.join(final_dir, attempt)
        try:
            cpus = num_cpus if num_cpus is not None else ray.cluster_resources().get("CPU", 1)
            summaries = _featurize_to_parquet(listing, attempt_dir, vocab, settings, data_cfg, cpus)
            report = _build_report(listing, summaries, final_dir, attempt, key, settings, data_cfg,
                                   time.perf_counter() - started)
            if report["kept"] == 0:
                counts = (", ".join(f"{k}={v}" for k, v in report["skipped_by_kind"].items() if v)
                          or "no utterances listed")
                examples = "; ".join(f"{item['id']}: {item['reason']}" for item in report["skipped"][:3])
                raise PrepareError(f"no usable utterance in {corpus_cfg.root}/{split} ({counts}); e.g. {examples}. "
                                   "Check the corpus files and data.min_duration_s / max_duration_s")
        except Exception:
            # nothing half-written is left (a hard kill's leftovers: cleared by the next attempt)
            storage.remove_tree(final_dir if locked else attempt_dir)
            raise
        if storage.is_file(storage.join(final_dir, COMPLETE_MARKER)):  # another driver finished first
            storage.remove_tree(attempt_dir)
            return _cached(final_dir, corpus_cfg.root, split)
        storage.write_text(storage.join(final_dir, REPORT_FILE), json.dumps(report, indent=2) + "\n")
        storage.write_text(storage.join(final_dir, COMPLETE_MARKER), json.dumps({"key": key}) + "\n")  # last
        if report["skipped"]:
            logger.warning("prepare %s/%s skipped %d utterances: %s (listed in %s)", corpus_cfg.root, split,
                           len(report["skipped"]), {k: v for k, v in report["skipped_by_kind"].items() if v},
                           storage.join(final_dir, REPORT_FILE))
        logger.info("prepare %s/%s: %d kept, %d skipped, %.2f h -> %s (%.1f s)", corpus_cfg.root, split,
                    report["kept"], len(report["skipped"]), report["hours"], attempt_dir, report["seconds"])
        return PreparedSplit(str(final_dir), report, from_cache=False)


def _cached(final_dir: str, root: str, split: str) -> PreparedSplit:
    report = read_report(final_dir)
    logger.info("prepare %s/%s: cache hit %s (%d utterances)", root, split, final_dir, report["kept"])
    return PreparedSplit(final_dir, report, from_cache=True)


def _remove_stale_attempts(final_dir: str) -> None:
    """Delete the attempt directories under ``final_dir`` (an object store's, where no lock tells a
    live attempt from a killed one) with no file written for STALE_ATTEMPT_S: a prepare task
    writes a shard every few seconds to minutes, so a live attempt's newest file is recent."""
    fs, base = storage.filesystem(final_dir)
    newest: dict[str, float] = {}  # attempt -> newest file's mtime (seconds); none known: kept
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        attempt = posixpath.relpath(info.path, base).split("/")[0]
        if attempt.startswith(ATTEMPT_PREFIX) and info.type == pafs.FileType.File:
            mtime = info.mtime.timestamp() if info.mtime is not None else float("inf")
            newest[attempt] = max(newest.get(attempt, 0.0), mtime)
    for attempt, mtime in newest.items():
        if time.time() - mtime > STALE_ATTEMPT_S:
            logger.info("prepare: removing %s, a killed attempt's (no file written for %.0f h)",
                        storage.join(final_dir, attempt), (time.time() - mtime) / 3600)
            storage.remove_tree(storage.join(final_dir, attempt))


def _featurize_to_parquet(listing: SplitListing, out_dir: str, vocab: Mapping[str, int],
                          settings: PrepareSettings, data_cfg: DataConfig, num_cpus: float) -> list[dict]:
    """The Ray Data job: listing rows (or HF shards) -> prepare_shards tasks, which featurize and
    write the parquet shards into out_dir -> their summaries (small rows, streamed to the driver)."""
    fn_kwargs = {"out_dir": out_dir, "vocab": dict(vocab), "settings": settings, "split": listing.split,
                 "rows_per_shard": data_cfg.rows_per_shard, "rows_per_group": data_cfg.prepare_batch_size}
    if listing.layout == "librispeech":
        if not listing.utterances:
            return []
        items = [u.as_row() for u in listing.utterances]
        random.Random(SHARD_ORDER_SEED).shuffle(items)  # shards mix speakers (the listing groups them)
        dataset = ray.data.from_items(items, override_num_blocks=num_blocks(len(items), num_cpus,
                                                                           data_cfg.rows_per_shard))
        dataset = dataset.map_batches(prepare_shards, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
        # The job is one fused operator whose inputs (listing rows) and outputs (summaries) are
        # tiny, so Ray Data's per-operator resource reservation has nothing to protect; it only
        # throttles: each job starts with no known cluster CPUs and runs a single task until
        # they arrive (~1 s in Ray 2.60), then leaves ~0.1 s idle between tasks. Off for this job.
        dataset.context.op_resource_reservation_enabled = False
    else:
        if not listing.parquet_files:
            return []
        filesystem, _ = storage.filesystem(listing.parquet_files[0])
        paths = [storage.filesystem(uri)[1] for uri in listing.parquet_files]
        dataset = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(HF_COLUMNS)
        # Reservation stays on: it keeps the read tasks from filling the object store with audio.
        dataset = dataset.map_batches(prepare_shards, batch_format="pyarrow", batch_size=data_cfg.rows_per_shard,
                                      fn_kwargs=fn_kwargs)
    return [row for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()]


def num_blocks(num_items: int, num_cpus: float, rows_per_shard: int) -> int:
    """Blocks (one prepare task each) for ``num_items`` listing rows: a task writes up to
    SHARDS_PER_TASK shards (fewer tasks: less scheduling work on the driver), and every CPU gets
    TASKS_PER_CPU tasks (balance); never more blocks than rows."""
    wanted = max(TASKS_PER_CPU * max(1, int(num_cpus)), -(-num_items // (SHARDS_PER_TASK * rows_per_shard)))
    return max(1, min(wanted, num_items))


def _build_report(listing: SplitListing, summaries: list[dict], out_dir: str, attempt: str, key: str,
                  settings: PrepareSettings, data_cfg: DataConfig, seconds: float) -> dict:
    """The report of ``out_dir``; its ``files`` are the shards ``attempt`` wrote, relative to ``out_dir``."""
    skipped = list(listing.problems)
    conversions: Counter = Counter()
    kept = num_samples = 0
    for summary in summaries:
        kept += summary["kept"]
        num_samples += summary["num_samples"]
        skipped += json.loads(summary["skipped"])
        conversions.update(json.loads(summary["conversions"]))
    files = sorted(f"{attempt}/{summary['file']}" for summary in summaries if summary["file"])
    filesystem, base = storage.filesystem(out_dir)
    written = sum(pq.read_metadata(posixpath.join(base, name), filesystem=filesystem).num_rows for name in files)
    if written != kept:
        raise RuntimeError(f"prepare wrote {written} rows but its report counts {kept}; rerun the stage")
    by_kind = Counter(item["kind"] for item in skipped)
    for item in skipped:
        logger.debug("skipped %s (%s): %s", item["id"], item["kind"], item["reason"])
    return {
        "corpus": listing.root, "split": listing.split, "layout": listing.layout, "cache_key": key,
        "settings": asdict(settings), "rows_per_shard": data_cfg.rows_per_shard,
        "kept": kept, "hours": round(num_samples / settings.sample_rate / 3600, 6),
        "skipped_by_kind": {kind: by_kind.get(kind, 0) for kind in SKIP_KINDS},
        "converted_by_kind": {kind: conversions.get(kind, 0) for kind in CONVERSION_KINDS},
        "skipped": sorted(skipped, key=lambda item: (item["kind"], item["id"])),
        "files": files,
        "seconds": round(seconds, 2),
    }


