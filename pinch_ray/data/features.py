"""Per-utterance features, the shard format and the shard writer: pure functions, no Ray
(:mod:`pinch_ray.data.prepare` runs them in Ray Data tasks).

Shard rows (:data:`SHARD_SCHEMA`): ``id`` str, ``speaker`` str, ``split`` str, ``audio``
list<float32> (16 kHz mono, zero mean / unit variance), ``num_samples`` int64, ``labels``
list<int32> (character ids), ``text`` str (normalised transcript).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pinch_ray import storage
from pinch_ray.config import DataConfig
from pinch_ray.data.librispeech import decode_audio, resampler

FORMAT_VERSION = 2  # bump when the shard contents change for the same settings (2: utterances shuffled across shards)
REPORT_FILE = "prepare_report.json"  # in a prepared split's directory: counts, skips and the shard files
COMPLETE_MARKER = "_COMPLETE"  # written last: the directory is complete
SKIP_KINDS = ("unreadable_audio", "missing_audio", "missing_transcript", "empty_audio",
              "out_of_vocabulary", "too_short", "too_long")
CONVERSION_KINDS = ("converted_channels", "resampled")  # counted, the utterance is kept
WORD_DELIMITER = "|"  # a space in the transcript, as in HF wav2vec2 CTC vocabularies

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
            data = data if data is not None else storage.read_bytes(record["audio_uri"])
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
    write the kept rows to the parquet file ``path`` (a local path or a URI; SHARD_SCHEMA, one row
    group per featurized group, so at most one group of features is in memory). The file appears
    only complete (:func:`pinch_ray.storage.atomic_output`), and none is written when nothing is kept.

    Returns {"file": file name or None, "kept", "num_samples", "skipped": [{id, path, kind,
    reason}], "conversions": {kind: count}}.
    """
    summary = {"file": None, "kept": 0, "num_samples": 0, "skipped": [], "conversions": Counter()}
    writer = None
    with storage.atomic_output(path) as (fs, target):  # no file when nothing is kept
        try:
            for start in range(0, len(records), rows_per_group):
                table, skipped, conversions = featurize_records(records[start:start + rows_per_group], vocab, settings)
                summary["skipped"] += skipped
                summary["conversions"].update(conversions)
                if table.num_rows:
                    writer = writer or pq.ParquetWriter(target, SHARD_SCHEMA, filesystem=fs, **PARQUET_WRITE_OPTIONS)
                    writer.write_table(table)
                    summary["kept"] += table.num_rows
                    summary["num_samples"] += int(pc.sum(table["num_samples"]).as_py())
        finally:
            if writer is not None:
                writer.close()
    if writer is not None:
        summary["file"] = posixpath.basename(os.fspath(path).split("?")[0])
    summary["conversions"] = dict(summary["conversions"])
    return summary


def read_report(directory: str | os.PathLike) -> dict:
    """The :data:`REPORT_FILE` of a prepared split's directory (a local path or a URI)."""
    return json.loads(storage.read_text(storage.join(directory, REPORT_FILE)))


def shard_files(directory: str | os.PathLike, report: dict | None = None) -> list[str]:
    """The parquet shards of a prepared split's directory (a local path or a URI), as its report
    (read here unless given) lists them: files an unfinished attempt may have left beside them are
    not part of the split."""
    report = read_report(directory) if report is None else report
    return [storage.join(directory, name) for name in report["files"]]
