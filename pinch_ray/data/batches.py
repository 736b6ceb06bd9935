"""Batches for training and evaluation, from prepared shards (:mod:`pinch_ray.data.features`):
length-bucketed, shuffled training batches and ordered evaluation batches, padded for the model.
Pure functions over rows, parquet files or a Ray Dataset shard (anything with ``iter_batches``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pinch_ray import storage
from pinch_ray.data.features import SHARD_SCHEMA, shard_files

LABEL_PAD = -100  # padded label positions (ignored by the HF CTC loss)


def batches_per_epoch(num_rows: int, world_size: int, batch_size: int) -> int:
    """Full batches every rank gets from ``streaming_split(world_size, equal=True)``."""
    return (num_rows // world_size) // batch_size


def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows (``audio`` [T_i] float32, ``labels`` [L_i] int) -> a padded batch:

    ``input_values`` [B, T] float32 (zero-padded), ``attention_mask`` [B, T] int64 (1 = real
    sample), ``labels`` [B, L] int64 (padded with -100), ``ids`` list[str], ``texts`` list[str].
    """
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
    """Rows of a prepared split (a local path or a URI) read with pyarrow in one process (no Ray),
    shard by shard."""
    for file in shard_files(path):
        fs, inner = storage.filesystem(file)
        with fs.open_input_file(inner) as stream:
            for batch in pq.ParquetFile(stream).iter_batches(batch_size=256):
                yield from _table_rows(pa.Table.from_batches([batch]))
