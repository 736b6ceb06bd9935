"""Run storage: where Ray Train / Tune keep checkpoints, on a local path or an object store.

``PipelineConfig.storage_path`` is either a local (or shared, e.g. NFS) directory or a URI that
pyarrow's filesystems resolve (``s3://bucket/runs``, ``gs://bucket/runs``, ``hdfs://...``,
``file:///abs/path``). Ray Train writes checkpoints there itself; this module is what pinch_ray
needs besides: find a run's final checkpoint, read a small file from it, and give a model
directory a local copy to load from (a worker on another node, or the finalize stage).
Local paths go through the same code (pyarrow's ``LocalFileSystem``), so tests with ``file://``
URIs exercise the object-store path.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # what pyarrow.fs resolves


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def scheme_problem(key: str, path: str) -> str | None:
    """A problem line if ``path`` is a URI with a scheme pyarrow cannot open, else None."""
    scheme = path.split("://", 1)[0].lower()
    if is_uri(path) and scheme not in SCHEMES:
        schemes = ", ".join(s + "://" for s in SCHEMES)
        return f"{key}: {path!r} has scheme {scheme!r}; use a local path or one of {schemes}"
    return None


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts...`` for a URI (keeping its scheme and query) or a local path."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, _, query = base.partition("?")
    joined = posixpath.join(head, *parts)
    return f"{joined}?{query}" if query else joined


def filesystem(path: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)``; a local path gets the ``LocalFileSystem``."""
    import pyarrow.fs as pafs

    path = os.fspath(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def final_checkpoint(run_dir: str | os.PathLike, marker: str, model_dir: str) -> str | None:
    """The last checkpoint directory under ``run_dir`` (one Ray Train run) that holds both the
    file ``marker`` and the directory ``model_dir``, as a path / URI like ``run_dir``; None when
    the run has not finished (or never started)."""
    import pyarrow.fs as pafs

    fs, base = filesystem(run_dir)
    children = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    finished = []
    for child in children:
        if child.type != pafs.FileType.Directory:
            continue
        has_marker, has_model = fs.get_file_info([posixpath.join(child.path, marker),
                                                  posixpath.join(child.path, model_dir)])
        if has_marker.type == pafs.FileType.File and has_model.type == pafs.FileType.Directory:
            finished.append(child.base_name)
    # checkpoint directories are named step-NNNNNNN: the last sorts last
    return join(run_dir, max(finished)) if finished else None


def parent(path: str | os.PathLike) -> str:
    """The directory holding ``path`` (a local path or a URI, keeping its scheme and query)."""
    path = os.fspath(path).rstrip("/")
    if not is_uri(path):
        return os.path.dirname(path)
    head, _, query = path.partition("?")
    scheme, _, inner = head.partition("://")
    up = f"{scheme}://{posixpath.dirname(inner)}"
    return f"{up}?{query}" if query else up


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a local path or a URI) is an existing file."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_text(path: str | os.PathLike) -> str:
    """A (small) text file's contents, from a local path or a URI."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8")


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A local directory with the contents of ``path``: ``path`` itself when it is local, else a
    temporary copy (removed on exit)."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{path}: no such directory")
    tmp = tempfile.mkdtemp(prefix="pinch-ray-")
    try:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
