"""The prepare stage (corpus -> parquet shards on Ray Data) and batches for training / evaluation.

Prepare, per split::

    list utterances (driver: names, sizes, transcripts)  ->  Ray Data, streaming, one task per
    shard: decode (soundfile) -> downmix -> resample to 16 kHz (torchaudio) -> normalise
    -> tokenise characters -> filter by duration -> write the parquet shard (pyarrow)
    ->  the driver collects one small summary row per shard (counts, skips) for the report

Shard rows: ``id`` str, ``speaker`` str, ``split`` str, ``audio`` list<float32> (16 kHz mono,
zero mean / unit variance), ``num_samples`` int64, ``labels`` list<int32> (character ids),
``text`` str (normalised transcript).

Output: ``<cache_dir>/<split>-<key>/`` with ``*.parquet``, ``prepare_report.json`` and the
completion marker ``_COMPLETE`` (written last, then the directory is renamed into place); a shard
file appears only complete (written under a temporary name, then renamed). The key
hashes the corpus URI, the split, every listed file's size and mtime, the settings and the vocab,
so a rerun with the same inputs reuses the shards. Bad input is skipped and counted by kind
(:data:`SKIP_KINDS`), never fatal, unless no usable utterance is left.

Example (Ray already initialised by the caller)::

    prepared = prepare_split("data/synth_corpus", "train", vocab, DataConfig())
    ds = prepared.dataset()   # ray.data.Dataset of the shards
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pinch_ray.config import CorpusConfig, DataConfig, raise_if_problems
from pinch_ray.corpus.librispeech import (
    HF_COLUMNS,
    SplitListing,
    decode_audio,
    hf_rows,
    list_split,
    read_bytes,
    resampler,
    resolve_filesystem,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the shard contents change for the same settings
SKIP_KINDS = ("unreadable_audio", "missing_audio", "missing_transcript", "empty_audio",
              "out_of_vocabulary", "too_short", "too_long")
CONVERSION_KINDS = ("converted_channels", "resampled")  # counted, the utterance is kept
REPORT_FILE = "prepare_report.json"
COMPLETE_MARKER = "_COMPLETE"
WORD_DELIMITER = "|"  # a space in the transcript, as in HF wav2vec2 CTC vocabularies
LABEL_PAD = -100  # padded label positions (ignored by the HF CTC loss)

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("speaker", pa.string()),
    ("split", pa.string()),
    ("audio", pa.list_(pa.float32())),
    ("num_samples", pa.int64()),
    ("labels", pa.list_(pa.int32())),
    ("text", pa.string()),
])


# Dictionary encoding for every column but ``audio``: float samples hardly repeat, so trying a
# dictionary on them only costs time (~30% of a shard's write time).
PARQUET_WRITE_OPTIONS = {"use_dictionary": ["id", "speaker", "split", "labels.list.element", "text"]}
SHARDS_PER_TASK = 4  # LibriSpeech layout: most shards one prepare task writes, one after another
TASKS_PER_CPU = 2  # LibriSpeech layout: fewest prepare tasks per cluster CPU
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


# ---------------------------------------------------------------------------------------------
# Per-utterance features (pure functions: no Ray)
# ---------------------------------------------------------------------------------------------


def normalize_transcript(text: str) -> str:
    """Upper case, single spaces, no surrounding whitespace (LibriSpeech style)."""
    return " ".join(text.upper().split())


def tokenize(text: str, vocab: Mapping[str, int]) -> tuple[list[int], set[str]]:
    """Character ids of a normalised transcript; spaces become the word delimiter ``|``.

    Returns (ids, characters missing from ``vocab``); ids are only valid when the set is empty.
    """
    chars = [WORD_DELIMITER if c == " " else c for c in text]
    missing = {c for c in chars if c not in vocab}
    return ([] if missing else [vocab[c] for c in chars]), missing


def to_model_audio(audio: np.ndarray, sample_rate: int, target_rate: int = 16000,
                   normalize: bool = True) -> tuple[np.ndarray, list[str]]:
    """[T, C] float audio at ``sample_rate`` Hz -> ([T'] float32 mono at ``target_rate`` Hz,
    conversions applied: "converted_channels" and/or "resampled").

    Normalisation is zero mean / unit variance, as the wav2vec2 feature extractor's
    ``do_normalize=True``: (x - mean) / sqrt(var + 1e-7).
    """
    conversions = []
    if audio.ndim == 2 and audio.shape[1] > 1:
        audio = audio.mean(axis=1)
        conversions.append("converted_channels")
    audio = np.ascontiguousarray(audio.reshape(-1), dtype=np.float32)
    if sample_rate != target_rate:
        import torch  # only here: importing torch costs a worker ~2 s

        with torch.no_grad():
            audio = resampler(sample_rate, target_rate)(torch.from_numpy(audio)).numpy()
        conversions.append("resampled")
    if normalize:
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    return audio.astype(np.float32, copy=False), conversions


@dataclass(frozen=True)
class PrepareSettings:
    """Everything that changes the features (part of the cache key)."""

    sample_rate: int
    min_duration_s: float
    max_duration_s: float
    normalize: bool

    @classmethod
    def from_config(cls, cfg: DataConfig) -> PrepareSettings:
        return cls(cfg.sample_rate, cfg.min_duration_s, cfg.max_duration_s, cfg.normalize)


def featurize_records(records: Sequence[dict], vocab: Mapping[str, int], settings: PrepareSettings,
                      ) -> tuple[pa.Table, list[dict], Counter]:
    """Featurize utterance records -> (rows of SHARD_SCHEMA, skipped items, conversion counts).

    A record is {id, speaker, split, text} plus the audio as ``audio_bytes`` (encoded file) or
    ``audio_uri`` (local path or URI). Skipped items are {id, path, kind, reason} with kind in
    SKIP_KINDS; conversions are counted for kept utterances only.
    """
    kept: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    skipped: list[dict] = []
    conversions: Counter = Counter()
    min_samples = settings.min_duration_s * settings.sample_rate
    max_samples = settings.max_duration_s * settings.sample_rate
    for record in records:
        where = record.get("audio_uri") or record["id"]

        def skip(kind: str, reason: str) -> None:
            skipped.append({"id": record["id"], "path": where, "kind": kind, "reason": reason})

        if record.get("text") is None:
            skip("missing_transcript", "no transcript")
            continue
        text = normalize_transcript(record["text"])
        labels, missing = tokenize(text, vocab)
        if not text:
            skip("missing_transcript", "empty transcript")
            continue
        if missing:
            skip("out_of_vocabulary", f"characters outside the vocabulary: {''.join(sorted(missing))!r}")
            continue
        try:
            data = record.get("audio_bytes")
            if data is None and record.get("audio_uri") is None:
                skip("missing_audio", "no audio in the record")
                continue
            data = data if data is not None else read_bytes(record["audio_uri"])
            if len(data) == 0:
                skip("empty_audio", "0-byte audio file")
                continue
            audio, sample_rate = decode_audio(data)
        except Exception as error:  # noqa: BLE001 - any decoding failure is a skip, never fatal
            skip("unreadable_audio", f"{type(error).__name__}: {error}".strip()[:300])
            continue
        if audio.size == 0:
            skip("empty_audio", "the file holds no samples")
            continue
        audio, applied = to_model_audio(audio, sample_rate, settings.sample_rate, settings.normalize)
        seconds = len(audio) / settings.sample_rate
        if len(audio) < min_samples:
            skip("too_short", f"{seconds:.2f} s < min_duration_s={settings.min_duration_s}")
            continue
        if len(audio) > max_samples:
            skip("too_long", f"{seconds:.2f} s > max_duration_s={settings.max_duration_s}")
            continue
        conversions.update(applied)
        for name, value in (("id", record["id"]), ("speaker", record.get("speaker", "")),
                            ("split", record.get("split", "")), ("audio", audio),
                            ("num_samples", len(audio)), ("labels", labels), ("text", text)):
            kept[name].append(value)
    return _shard_table(kept), skipped, conversions


def _shard_table(kept: dict[str, list]) -> pa.Table:
    audio = kept["audio"]
    offsets = np.zeros(len(audio) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in audio], out=offsets[1:])
    values = np.concatenate(audio) if audio else np.zeros(0, np.float32)
    columns = {**kept, "audio": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))}
    return pa.table({name: pa.array(columns[name], type=SHARD_SCHEMA.field(name).type)
                     if name != "audio" else columns[name] for name in SHARD_SCHEMA.names},
                    schema=SHARD_SCHEMA)


def write_shard(records: Sequence[dict], path: str | os.PathLike, vocab: Mapping[str, int],
                settings: PrepareSettings, rows_per_group: int) -> dict:
    """Featurize ``records`` (see :func:`featurize_records`) ``rows_per_group`` at a time and
    write the kept rows to the parquet file ``path`` (SHARD_SCHEMA, one row group per
    featurized group, so at most one group of features is in memory). The file is written under
    a temporary name and renamed: it exists only complete, and none is written when nothing is kept.

    Returns {"file": file name or None, "kept", "num_samples", "skipped": [{id, path, kind,
    reason}], "conversions": {kind: count}}.
    """
    path = Path(path)
    tmp_path = path.with_name(path.name + ".tmp")
    summary = {"file": None, "kept": 0, "num_samples": 0, "skipped": [], "conversions": Counter()}
    writer = None
    try:
        for start in range(0, len(records), rows_per_group):
            table, skipped, conversions = featurize_records(records[start:start + rows_per_group], vocab, settings)
            summary["skipped"] += skipped
            summary["conversions"].update(conversions)
            if table.num_rows:
                writer = writer or pq.ParquetWriter(tmp_path, SHARD_SCHEMA, **PARQUET_WRITE_OPTIONS)
                writer.write_table(table)
                summary["kept"] += table.num_rows
                summary["num_samples"] += int(pc.sum(table["num_samples"]).as_py())
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        os.replace(tmp_path, path)
        summary["file"] = path.name
    summary["conversions"] = dict(summary["conversions"])
    return summary


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
        summary = write_shard(shard, Path(out_dir, f"shard-{name}.parquet"), vocab, settings, rows_per_group)
        summaries.append({**summary, "skipped": json.dumps(summary["skipped"]),
                          "conversions": json.dumps(summary["conversions"])})
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedSplit:
    """A prepared split: ``path`` holds the parquet shards and ``prepare_report.json``."""

    path: str
    report: dict
    from_cache: bool

    @property
    def num_utterances(self) -> int:
        return int(self.report["kept"])

    @property
    def files(self) -> list[str]:
        return sorted(str(p) for p in Path(self.path).glob("*.parquet"))

    def dataset(self):
        """The shards as a ``ray.data.Dataset`` (streamed, not loaded)."""
        import ray.data

        return ray.data.read_parquet(self.files)


def cache_key(listing: SplitListing, settings: PrepareSettings, vocab: Mapping[str, int]) -> str:
    """Hex digest of what determines the shards: corpus URI, split, layout, files (size, mtime),
    settings, vocabulary and the shard format version."""
    payload = json.dumps({"root": listing.root, "split": listing.split, "layout": listing.layout,
                          "files": listing.fingerprint, "settings": asdict(settings),
                          "vocab": sorted(vocab.items()), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def prepare_split(corpus: CorpusConfig | str | os.PathLike, split: str, vocab: Mapping[str, int],
                  data_cfg: DataConfig | None = None, cache_dir: str | os.PathLike | None = None,
                  ) -> PreparedSplit:
    """Featurize one split of a corpus into parquet shards with Ray Data (streaming), or reuse
    the cached shards of an identical earlier run.

    ``corpus``: a CorpusConfig, or the corpus root (local path or s3:// / gs:// / file:// URI;
    layout detected). ``vocab``: character -> id (HF ``Wav2Vec2CTCTokenizer.get_vocab()``;
    ``|`` is the word delimiter). ``cache_dir`` defaults to ``data_cfg.cache_dir``; on a cluster of
    several nodes it must be a directory every node shares (NFS): the workers write the shards
    and their skip lists there. Ray must already be initialised by the caller.

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
    cache_root = Path(cache_dir or data_cfg.cache_dir)
    final_dir = cache_root / f"{split.replace('/', '_')}-{key[:16]}"
    if (final_dir / COMPLETE_MARKER).exists():
        report = json.loads((final_dir / REPORT_FILE).read_text())
        logger.info("prepare %s/%s: cache hit %s (%d utterances)", corpus_cfg.root, split, final_dir, report["kept"])
        return PreparedSplit(str(final_dir), report, from_cache=True)

    tmp_dir = cache_root / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir(parents=True)
    try:
        summaries = _featurize_to_parquet(listing, tmp_dir, vocab, settings, data_cfg)
        report = _build_report(listing, summaries, tmp_dir, key, settings, data_cfg, time.perf_counter() - started)
        if report["kept"] == 0:
            counts = ", ".join(f"{k}={v}" for k, v in report["skipped_by_kind"].items() if v) or "no utterances listed"
            examples = "; ".join(f"{item['id']}: {item['reason']}" for item in report["skipped"][:3])
            raise PrepareError(f"no usable utterance in {corpus_cfg.root}/{split} ({counts}); e.g. {examples}. "
                               "Check the corpus files and data.min_duration_s / max_duration_s")
        (tmp_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp_dir / COMPLETE_MARKER).write_text(json.dumps({"key": key}) + "\n")
        if final_dir.exists():  # an earlier, unfinished attempt (no marker)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if report["skipped"]:
        logger.warning("prepare %s/%s skipped %d utterances: %s (listed in %s)", corpus_cfg.root, split,
                       len(report["skipped"]), {k: v for k, v in report["skipped_by_kind"].items() if v},
                       final_dir / REPORT_FILE)
    logger.info("prepare %s/%s: %d kept, %d skipped, %.2f h -> %s (%.1f s)", corpus_cfg.root, split,
                report["kept"], len(report["skipped"]), report["hours"], final_dir, report["seconds"])
    return PreparedSplit(str(final_dir), report, from_cache=False)


def _featurize_to_parquet(listing: SplitListing, out_dir: Path, vocab: Mapping[str, int],
                          settings: PrepareSettings, data_cfg: DataConfig) -> list[dict]:
    """The Ray Data job: listing rows (or HF shards) -> prepare_shards tasks, which featurize and
    write the parquet shards into out_dir -> their summaries (small rows, streamed to the driver)."""
    import ray.data

    fn_kwargs = {"out_dir": str(out_dir), "vocab": dict(vocab), "settings": settings, "split": listing.split,
                 "rows_per_shard": data_cfg.rows_per_shard, "rows_per_group": data_cfg.prepare_batch_size}
    if listing.layout == "librispeech":
        if not listing.utterances:
            return []
        items = [u.as_row() for u in listing.utterances]
        # One task per block; a task writes up to SHARDS_PER_TASK shards (fewer tasks: less
        # scheduling work on the driver), and every CPU gets TASKS_PER_CPU tasks (balance).
        num_blocks = max(TASKS_PER_CPU * _num_cpus(), -(-len(items) // (SHARDS_PER_TASK * data_cfg.rows_per_shard)))
        dataset = ray.data.from_items(items, override_num_blocks=min(num_blocks, len(items)))
        dataset = dataset.map_batches(prepare_shards, batch_format="pyarrow", batch_size=None, fn_kwargs=fn_kwargs)
        # The job is one fused operator whose inputs (listing rows) and outputs (summaries) are
        # tiny, so Ray Data's per-operator resource reservation has nothing to protect; it only
        # throttles: each job starts with no known cluster CPUs and runs a single task until
        # they arrive (~1 s in Ray 2.60), then leaves ~0.1 s idle between tasks. Off for this job.
        dataset.context.op_resource_reservation_enabled = False
    else:
        if not listing.parquet_files:
            return []
        filesystem, _ = resolve_filesystem(listing.parquet_files[0])
        paths = [resolve_filesystem(uri)[1] for uri in listing.parquet_files]
        dataset = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(HF_COLUMNS)
        # Reservation stays on: it keeps the read tasks from filling the object store with audio.
        dataset = dataset.map_batches(prepare_shards, batch_format="pyarrow", batch_size=data_cfg.rows_per_shard,
                                      fn_kwargs=fn_kwargs)
    return [row for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()]


def _num_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _build_report(listing: SplitListing, summaries: list[dict], out_dir: Path, key: str,
                  settings: PrepareSettings, data_cfg: DataConfig, seconds: float) -> dict:
    skipped = list(listing.problems)
    conversions: Counter = Counter()
    kept = num_samples = 0
    for summary in summaries:
        kept += summary["kept"]
        num_samples += summary["num_samples"]
        skipped += json.loads(summary["skipped"])
        conversions.update(json.loads(summary["conversions"]))
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in out_dir.glob("*.parquet"))
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
        "seconds": round(seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# Batches for training and evaluation
# ---------------------------------------------------------------------------------------------


def batches_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank gets from ``streaming_split(world_size, equal=True)``."""
    return (num_rows // world_size) // batch_size


def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows (``audio`` [T_i] float32, ``labels`` [L_i] int) -> a padded batch:

    ``input_values`` [B, T] float32 (zero-padded), ``attention_mask`` [B, T] int64 (1 = real
    sample), ``labels`` [B, L] int64 (padded with -100), ``ids`` list[str], ``texts`` list[str].
    """
    import torch

    lengths = [len(row["audio"]) for row in rows]
    label_lengths = [len(row["labels"]) for row in rows]
    input_values = np.zeros((len(rows), max(lengths)), dtype=np.float32)
    attention_mask = np.zeros((len(rows), max(lengths)), dtype=np.int64)
    labels = np.full((len(rows), max(label_lengths)), LABEL_PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        input_values[i, : lengths[i]] = row["audio"]
        attention_mask[i, : lengths[i]] = 1
        labels[i, : label_lengths[i]] = row["labels"]
    input_values, attention_mask, labels = map(torch.from_numpy, (input_values, attention_mask, labels))
    return {"input_values": input_values, "attention_mask": attention_mask, "labels": labels,
            "ids": [str(row["id"]) for row in rows], "texts": [str(row.get("text", "")) for row in rows]}


def _table_rows(table: pa.Table) -> list[dict]:
    """Shard rows of a pyarrow table with numpy views of ``audio`` / ``labels`` (no copies)."""
    table = table.combine_chunks()
    columns = {}
    for name in ("audio", "labels"):
        array = table.column(name).chunk(0) if table.num_rows else pa.array([], SHARD_SCHEMA.field(name).type)
        offsets, values = array.offsets.to_numpy(), array.values.to_numpy()
        columns[name] = [values[offsets[i]:offsets[i + 1]] for i in range(table.num_rows)]
    for name in table.column_names:
        if name not in columns:
            columns[name] = table.column(name).to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def _iter_windows(source: Any, window_rows: int, shuffle_seed: int | None) -> Iterator[list[dict]]:
    """Windows of ``window_rows`` rows (the last may be shorter) from a Ray DataIterator /
    Dataset (streamed as pyarrow batches; locally shuffled when ``shuffle_seed`` is set) or from
    a plain iterable of row dicts."""
    if hasattr(source, "iter_batches"):
        shuffle = {"local_shuffle_buffer_size": window_rows, "local_shuffle_seed": shuffle_seed} \
            if shuffle_seed is not None else {}
        for table in source.iter_batches(batch_size=window_rows, batch_format="pyarrow", **shuffle):
            yield _table_rows(table)
        return
    window: list[dict] = []
    for row in source:
        window.append(row)
        if len(window) == window_rows:
            yield window
            window = []
    if window:
        yield window


def _length_buckets(window: list[dict], batch_size: int, drop_last: bool) -> list[list[dict]]:
    ordered = sorted(window, key=lambda row: len(row["audio"]))  # stable: ties keep their order
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def iter_train_batches(source: Any, batch_size: int, *, num_batches: int | None = None, seed: int = 0,
                       epoch: int = 0, bucket_window_batches: int = 20) -> Iterator[dict[str, Any]]:
    """Length-bucketed, padded training batches (see :func:`collate`) from one rank's shard.

    ``source``: ``ray.train.get_dataset_shard(...)`` (a DataIterator), a Ray Dataset, or an
    iterable of shard rows. Rows are shuffled locally (seed + epoch), sorted by length within
    windows of ``bucket_window_batches`` batches, cut into full batches (a window's remainder joins
    the next window; only the epoch's last partial batch is dropped) and yielded in a shuffled
    order. With ``num_batches`` (e.g. :func:`batches_per_epoch`), every rank stops after exactly
    that many batches and the rest of its shard is drained, so all DDP ranks run the same number
    of steps; RuntimeError when the shard holds fewer.
    """
    rng = np.random.default_rng([seed, epoch])
    produced, leftover = 0, []
    windows = _iter_windows(source, batch_size * bucket_window_batches, shuffle_seed=seed * 100_003 + epoch)
    for window in windows:
        # Rows that do not fill a batch move on to the next window (Ray may hand over windows of
        # any size), so only the epoch's last partial batch is dropped: (rows // batch_size) batches.
        batches = _length_buckets(leftover + window, batch_size, drop_last=False)
        leftover = batches.pop() if batches and len(batches[-1]) < batch_size else []
        for index in rng.permutation(len(batches)):
            if num_batches is not None and produced == num_batches:
                break
            yield collate(batches[index])
            produced += 1
        if num_batches is not None and produced == num_batches:
            for _ in windows:  # drain: the streaming split expects each epoch to be consumed
                pass
            return
    if num_batches is not None and produced < num_batches:
        raise RuntimeError(f"this rank's shard gave {produced} batches of {batch_size}, fewer than "
                           f"num_batches={num_batches}; shard with streaming_split(n, equal=True) and "
                           "compute num_batches with batches_per_epoch()")


def iter_eval_batches(source: Any, batch_size: int, *,
                      bucket_window_batches: int = 20) -> Iterator[dict[str, Any]]:
    """Padded evaluation batches (see :func:`collate`): every row exactly once, no shuffling, no
    dropping; rows are sorted by length within windows (less padding) and the batches carry
    ``ids`` / ``texts`` to match hypotheses to references. Meant for a single worker."""
    for window in _iter_windows(source, batch_size * bucket_window_batches, shuffle_seed=None):
        for batch in _length_buckets(window, batch_size, drop_last=False):
            yield collate(batch)


def read_prepared_rows(path: str | os.PathLike) -> Iterable[dict]:
    """Rows of a prepared split read with pyarrow in one process (no Ray), shard by shard."""
    for file in sorted(Path(path).glob("*.parquet")):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            yield from _table_rows(pa.Table.from_batches([batch]))
