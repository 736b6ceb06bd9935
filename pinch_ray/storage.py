"""Paths, URIs and atomic writes: the one place that knows how pinch_ray reads and writes files.

**URIs.** A corpus, the run storage (``storage_path``) and a model to start from may each be a
local (or shared, e.g. NFS) path or a URI that pyarrow's filesystems resolve (``s3://bucket/x``,
``gs://``, ``hdfs://``, ``file:///abs/path``, optionally with ``?query`` options such as
``region=``). Local paths go through the same code (pyarrow's ``LocalFileSystem``), so tests with
``file://`` URIs exercise the object-store path. Filesystems are cached per bucket (resolving
every file of a corpus stays cheap).

**Atomic writes.** Every artifact is written under a temporary sibling name and renamed into place
(:func:`atomic_path`), so a crash leaves the earlier version or nothing, never half a file; a hard
kill may leave a ``<name>.tmp-<hex>`` sibling, which :func:`remove_stale_tmp` clears.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # what pyarrow.fs resolves
TMP_TAG = ".tmp-"  # in the name of every temporary sibling (never in a final name)


# ----------------------------------------------------------------------------------------------
# Local paths and URIs
# ----------------------------------------------------------------------------------------------


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def scheme_problem(key: str, path: str) -> str | None:
    """A problem line if ``path`` is a URI with a scheme pyarrow cannot open, else None."""
    scheme = path.split("://", 1)[0].lower()
    if is_uri(path) and scheme not in SCHEMES:
        schemes = ", ".join(s + "://" for s in SCHEMES)
        return f"{key}: {path!r} has scheme {scheme!r}; use a local path or one of {schemes}"
    return None


def local_path(path: str) -> str | None:
    """The local filesystem path of ``path`` (a path or a file:// URI); None for object stores."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_uri(path) else path


def absolute(path: str) -> str:
    """A local path made absolute against the working directory (``~`` expanded); URIs unchanged."""
    return path if not path or is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts...`` for a URI (keeping its scheme and query) or a local path."""
    base = os.fspath(base)
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, _, query = base.partition("?")
    joined = posixpath.join(head, *parts)
    return f"{joined}?{query}" if query else joined


def parent(path: str | os.PathLike) -> str:
    """The directory holding ``path`` (a local path or a URI, keeping its scheme and query)."""
    path = os.fspath(path).rstrip("/")
    if not is_uri(path):
        return os.path.dirname(path)
    head, _, query = path.partition("?")
    scheme, _, inner = head.partition("://")
    up = f"{scheme}://{posixpath.dirname(inner)}"
    return f"{up}?{query}" if query else up


@functools.lru_cache(maxsize=32)
def _bucket(scheme: str, authority: str, query: str):
    """The filesystem of one bucket / host and the path its root has inside it."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{authority}/" + (f"?{query}" if query else ""))


def filesystem(path: str | os.PathLike):
    """``(pyarrow FileSystem, path inside it)`` for a local path or a URI."""
    import pyarrow.fs as pafs

    text = os.fspath(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), parsed.path or "/"
    fs, root = _bucket(parsed.scheme, parsed.netloc, parsed.query)
    inner = root.rstrip("/") + "/" + parsed.path.strip("/")
    return fs, inner.strip("/") if not root.startswith("/") else inner.rstrip("/") or "/"


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a local path or a URI) is an existing file."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's contents, from a local path or a URI."""
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def read_text(path: str | os.PathLike) -> str:
    """A (small) text file's contents, from a local path or a URI."""
    return read_bytes(path).decode("utf-8")


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


# ----------------------------------------------------------------------------------------------
# Atomic writes (local paths)
# ----------------------------------------------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, directory: bool = False, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final`` to write a file (or, with ``directory``, a
    directory, created here) at; when the block succeeds it replaces ``final`` by renaming.

    On an exception the temporary is removed and ``final`` is untouched; a file the block did not
    create replaces nothing. An existing directory ``final`` is moved aside, then deleted. A file's
    temporary is hidden, ``.<name>.tmp-<hex>`` (so a glob for ``*.parquet`` never sees one), plus
    ``final``'s suffix with ``keep_suffix`` (for writers that choose a format by it); a directory's
    is ``<name>.tmp-<hex>``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{TMP_TAG}{uuid.uuid4().hex}"
    suffix = final.suffix if keep_suffix else ""
    tmp = final.with_name(f"{final.name}{tag}" if directory else f".{final.name}{tag}{suffix}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        return
    old = None
    if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty directory
        old = final.with_name(f"{final.name}{TMP_TAG}{uuid.uuid4().hex}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_dir(final: str | os.PathLike):
    """:func:`atomic_path` for a directory: build it under a temporary name, rename it into place."""
    return atomic_path(final, directory=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_tmp(final: str | os.PathLike) -> None:
    """Delete temporary siblings of ``final`` left by an :func:`atomic_path` that was killed."""
    final = Path(final)
    for pattern in (f"{final.name}{TMP_TAG}*", f".{final.name}{TMP_TAG}*"):
        for stale in final.parent.glob(pattern):
            _remove(stale)
