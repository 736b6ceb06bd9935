"""LibriSpeech-layout corpora, local or on object stores (s3://, gs://, file://) via pyarrow.

Two layouts of one split are read:

* ``librispeech`` — the OpenSLR tree, unchanged::

      <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
      <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("UTT-ID TRANSCRIPT")

* ``hf_parquet`` — parquet shards of the Hugging Face ``librispeech_asr`` schema under
  ``<root>/<split>/`` (any depth): ``audio`` struct {``bytes`` (encoded FLAC/WAV), ``path``},
  ``text``, ``speaker_id``, ``chapter_id``, ``id``.

Listing reads only names, sizes, mtimes and transcripts (never audio), so a cluster can list a
corpus on the driver and let workers stream the audio from the object store.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pinch_ray import storage

logger = logging.getLogger(__name__)

LAYOUTS = ("librispeech", "hf_parquet")
HF_COLUMNS = ["id", "speaker_id", "chapter_id", "text", "audio"]
HF_SCHEMA = pa.schema([
    ("file", pa.string()),
    ("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("text", pa.string()),
    ("speaker_id", pa.int64()),
    ("chapter_id", pa.int64()),
    ("id", pa.string()),
])


# ---------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an encoded audio file (FLAC, WAV, OGG; soundfile) -> (float32 [T, C] in [-1, 1], Hz).

    Raises soundfile.LibsndfileError (a RuntimeError) for unreadable data.
    """
    import soundfile

    audio, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio, int(sample_rate)


@functools.lru_cache(maxsize=8)
def resampler(orig_freq: int, new_freq: int):
    """A ``torchaudio.transforms.Resample`` from ``orig_freq`` to ``new_freq`` Hz, cached per
    process with its sinc kernel: [..., T] float tensor -> [..., T * new_freq / orig_freq]."""
    import torchaudio

    return torchaudio.transforms.Resample(orig_freq, new_freq)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedUtterance:
    """One transcribed recording of the LibriSpeech layout (audio not loaded)."""

    utterance_id: str  # <speaker>-<chapter>-<utt>
    speaker: str
    chapter: str
    split: str
    text: str  # transcript as written in the corpus (LibriSpeech: upper case)
    audio_uri: str  # local path or URI of the FLAC file

    def as_row(self) -> dict:
        return {"id": self.utterance_id, "speaker": self.speaker, "split": self.split,
                "text": self.text, "audio_uri": self.audio_uri}


@dataclass
class SplitListing:
    """What one split holds, from names, sizes and transcripts only.

    ``utterances`` (librispeech layout) pairs every transcript line with its audio file;
    ``parquet_files`` (hf_parquet layout) are the shards; ``problems`` lists transcript lines
    without audio (``missing_audio``) and audio without transcript line (``missing_transcript``)
    as dicts {id, path, kind, reason}; ``fingerprint`` is (path, size, mtime_ns) of every file
    read, for cache keys.
    """

    root: str
    split: str
    layout: str
    utterances: list[ListedUtterance] = field(default_factory=list)
    parquet_files: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)
    fingerprint: list[tuple[str, int, int]] = field(default_factory=list)


def _split_files(root: str, split: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    split_uri = storage.join(root, split)
    filesystem, split_path = storage.filesystem(split_uri)
    if filesystem.get_file_info(split_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(
            f"corpus split {split_uri!r} does not exist or is not a directory; set corpus.root to "
            f"a LibriSpeech-layout corpus holding a {split!r} directory, or generate one with "
            "`pinch-ray corpus synth OUT_DIR`")
    infos = filesystem.get_file_info(pafs.FileSelector(split_path, recursive=True))
    return filesystem, split_uri, [i for i in infos if i.type == pafs.FileType.File]


def detect_layout(root: str, split: str) -> str:
    """"hf_parquet" when the split holds parquet files, "librispeech" when it holds
    FLAC / trans.txt files. Raises FileNotFoundError (missing split) or ValueError (neither)."""
    _, split_uri, infos = _split_files(root, split)
    return _layout_of(split_uri, infos)


def _layout_of(split_uri: str, infos: list[pafs.FileInfo]) -> str:
    names = [i.base_name for i in infos]
    if any(n.endswith(".parquet") for n in names):
        return "hf_parquet"
    if any(n.endswith((".trans.txt", ".flac")) for n in names):
        return "librispeech"
    raise ValueError(f"{split_uri!r} holds neither LibriSpeech files (*.flac, *.trans.txt) nor "
                     "parquet shards; point corpus.root at a corpus")


def _uri_of(split_uri: str, split_path: str, file_path: str) -> str:
    """URI of a listed file, in the same form (local path or scheme://) as the split URI."""
    return storage.join(split_uri, os.path.relpath(file_path, split_path).replace(os.sep, "/"))


def list_split(root: str | os.PathLike, split: str, layout: str = "auto") -> SplitListing:
    """List one split of a corpus (local directory or URI). Reads transcripts, never audio.

    Raises FileNotFoundError when ``<root>/<split>`` does not exist, ValueError when it holds no
    corpus files or ``layout`` is unknown.
    """
    root = os.fspath(root)
    filesystem, split_uri, infos = _split_files(root, split)
    _, split_path = storage.filesystem(split_uri)
    if layout == "auto":
        layout = _layout_of(split_uri, infos)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown corpus layout {layout!r}; use one of {LAYOUTS} or 'auto'")
    listing = SplitListing(root=root, split=split, layout=layout)
    infos = sorted(infos, key=lambda i: i.path)

    if layout == "hf_parquet":
        for info in infos:
            if info.base_name.endswith(".parquet"):
                listing.parquet_files.append(_uri_of(split_uri, split_path, info.path))
                listing.fingerprint.append((info.path, info.size, info.mtime_ns or 0))
        return listing

    audio: dict[str, str] = {}  # utterance id -> uri
    transcripts: dict[str, tuple[str, str]] = {}  # utterance id -> (text, trans.txt uri)
    for info in infos:
        uri = _uri_of(split_uri, split_path, info.path)
        if info.base_name.endswith(".flac"):
            audio[info.base_name[: -len(".flac")]] = uri
        elif info.base_name.endswith(".trans.txt"):
            with filesystem.open_input_stream(info.path) as stream:
                for line in stream.read().decode("utf-8").splitlines():
                    if line.strip():
                        utterance_id, _, text = line.strip().partition(" ")
                        transcripts.setdefault(utterance_id, (text.strip(), uri))
        else:
            continue
        listing.fingerprint.append((info.path, info.size, info.mtime_ns or 0))

    for utterance_id, (text, trans_uri) in transcripts.items():
        if utterance_id not in audio:
            listing.problems.append({"id": utterance_id, "path": trans_uri, "kind": "missing_audio",
                                     "reason": "transcript line without a .flac file"})
        elif not text:
            listing.problems.append({"id": utterance_id, "path": trans_uri, "kind": "missing_transcript",
                                     "reason": "empty transcript line"})
    for utterance_id, uri in audio.items():
        if utterance_id not in transcripts:
            listing.problems.append({"id": utterance_id, "path": uri, "kind": "missing_transcript",
                                     "reason": "audio file without a transcript line"})
        elif transcripts[utterance_id][0]:
            speaker, chapter = (utterance_id.split("-") + ["", ""])[:2]
            listing.utterances.append(ListedUtterance(utterance_id, speaker, chapter, split,
                                                transcripts[utterance_id][0], uri))
    logger.info("listed %s: %d utterances, %d problems", split_uri, len(listing.utterances),
                len(listing.problems))
    return listing


# ---------------------------------------------------------------------------------------------
# Reading (single process; the Ray Data stage in pinch_ray.data.prepare reads the same way in parallel)
# ---------------------------------------------------------------------------------------------


def iter_hf_records(parquet_uri: str, batch_rows: int = 64) -> Iterator[dict]:
    """Rows {id, speaker, split?, text, audio_bytes} of one HF-layout parquet shard, streamed."""
    filesystem, path = storage.filesystem(parquet_uri)
    with filesystem.open_input_file(path) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=HF_COLUMNS):
            yield from hf_rows(batch)


def hf_rows(batch: pa.RecordBatch | pa.Table) -> list[dict]:
    """HF ``librispeech_asr`` rows -> {id, speaker, text, audio_bytes} (None where missing)."""
    audio = batch.column("audio")
    audio_bytes = pc.struct_field(audio, "bytes").to_pylist()
    ids = batch.column("id").to_pylist()
    speakers = batch.column("speaker_id").to_pylist()
    texts = batch.column("text").to_pylist()
    return [{"id": str(i), "speaker": "" if s is None else str(s), "text": t, "audio_bytes": b}
            for i, s, t, b in zip(ids, speakers, texts, audio_bytes)]


def read_utterances(root: str | os.PathLike, split: str,
                    layout: str = "auto") -> Iterator[tuple[dict, np.ndarray | None, int | None]]:
    """Every utterance of a split with its transcript and decoded audio, in listing order.

    Yields (row, audio, sample_rate): row = {id, speaker, split, text}; audio float32 [T, C]
    (None, None when the audio cannot be decoded). Listing problems (missing audio/transcript)
    are logged, not yielded.
    """
    listing = list_split(root, split, layout)
    for problem in listing.problems:
        logger.warning("%s %s: %s", problem["kind"], problem["id"], problem["reason"])
    if listing.layout == "librispeech":
        records = ({**u.as_row(), "audio_bytes": None} for u in listing.utterances)
    else:
        records = (r for uri in listing.parquet_files for r in iter_hf_records(uri))
    for record in records:
        data, uri = record.pop("audio_bytes"), record.pop("audio_uri", None)
        try:
            audio, sample_rate = decode_audio(data if data is not None else storage.read_bytes(uri))
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported, not fatal
            logger.warning("unreadable audio %s: %s", record["id"], error)
            audio, sample_rate = None, None
        yield {**record, "split": split}, audio, sample_rate


def write_hf_parquet(root: str | os.PathLike, split: str, out_dir: str | os.PathLike,
                     rows_per_file: int = 500) -> list[str]:
    """Copy a LibriSpeech-layout split into HF ``librispeech_asr`` parquet shards (FLAC bytes kept
    as they are): ``<out_dir>/<split>/<NNNN>.parquet``. Returns the written paths."""
    listing = list_split(root, split, "librispeech")
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    written = []
    for start in range(0, len(listing.utterances), rows_per_file):
        chunk = listing.utterances[start:start + rows_per_file]
        table = pa.Table.from_pylist([{
            "file": u.audio_uri.rsplit("/", 1)[-1],
            "audio": {"bytes": storage.read_bytes(u.audio_uri), "path": u.audio_uri.rsplit("/", 1)[-1]},
            "text": u.text, "speaker_id": int(u.speaker), "chapter_id": int(u.chapter), "id": u.utterance_id,
        } for u in chunk], schema=HF_SCHEMA)
        path = os.path.join(out_dir, split, f"{start // rows_per_file:04d}.parquet")
        pq.write_table(table, path)
        written.append(path)
    return written
