"""Paths, URIs and atomic writes: the one place that knows how pinch_ray reads and writes files.

**URIs.** A corpus, the run storage (``storage_path``) and a model to start from may each be a
local (or shared, e.g. NFS) path or a URI that pyarrow's filesystems resolve (``s3://bucket/x``,
``gs://``, ``hdfs://``, ``file:///abs/path``, optionally with ``?query`` options such as
``region=``). Local paths go through the same code (pyarrow's ``LocalFileSystem``), so tests with
``file://`` URIs exercise the object-store path. Filesystems are cached per bucket (resolving
every file of a corpus stays cheap).

**Atomic writes.** Every artifact is written under a temporary sibling name and renamed into place
(:func:`atomic_path`), so a crash leaves the earlier version or nothing, never half a file; a hard
kill may leave a ``<name>.tmp-<hex>`` sibling, which :func:`remove_stale_tmp` clears. A file at a URI
(:func:`atomic_output`, :func:`write_bytes`) is renamed into place on a local filesystem
(``file://``) and written in place on an object store, whose upload shows an object only once it is
complete. A directory at a URI cannot be renamed into place: it is complete once its marker file,
written last, is there.

**An output directory in an object store** (:class:`RemoteOutput`): the pipeline writes a local
staging copy as it would any output directory, and uploads what changed after each step of work,
every marker file last (a trial's ``metrics.json``, a stage's ``.stages/<stage>.done``), so the
store never shows work as finished before all of it is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

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


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a local path or a URI) is an existing file or directory."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the directory ``path`` (a local path or a URI) and everything in it, if it exists."""
    fs, inner = filesystem(path)
    if exists(path):
        fs.delete_dir(inner)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[tuple[Any, str]]:
    """Yield ``(pyarrow filesystem, path inside it)`` to write the file ``path`` (a local path or a
    URI) at; the file appears whole or not at all.

    On a local filesystem (a local path, ``file://``) that is a hidden temporary sibling, renamed
    into place when the block succeeds; on an object store, ``path`` itself (an upload shows the
    object only once complete). A block that writes nothing replaces nothing.
    """
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    local = isinstance(fs, pafs.LocalFileSystem)
    target = inner
    if local:
        head, name = posixpath.split(inner)
        fs.create_dir(head, recursive=True)
        target = posixpath.join(head, f".{name}{TMP_TAG}{uuid.uuid4().hex}")
    try:
        yield fs, target
    except BaseException:
        if local and fs.get_file_info(target).type == pafs.FileType.File:
            fs.delete_file(target)
        raise
    if local and fs.get_file_info(target).type == pafs.FileType.File:
        fs.move(target, inner)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file at a local path or a URI, whole or not at all (:func:`atomic_output`)."""
    with atomic_output(path) as (fs, target), fs.open_output_stream(target) as stream:
        stream.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def upload(local: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy the local file ``local`` to ``path`` (a local path or a URI), streamed, whole or not at all."""
    with atomic_output(path) as (fs, target), fs.open_output_stream(target) as stream, open(local, "rb") as source:
        shutil.copyfileobj(source, stream, 8 * 1024 * 1024)


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


LOCK_SUFFIX = ".lock"


class Busy(RuntimeError):
    """Another process holds the lock :func:`exclusive` was told not to wait for."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str = "", wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a local path) across processes while the block runs, so two
    runs that would build the same ``path`` take turns: the second waits (logged once), then finds
    the first one's result; with ``wait=False`` it raises :class:`Busy` instead. The lock is
    ``<path>.lock`` (``flock``: released by the OS when its holder dies, so a killed run never leaves
    a lock behind; the small file stays). A URI gets no lock: an object store has none to offer, so
    there one writer at a time is the caller's to arrange."""
    if is_uri(path):
        yield
        return
    lock = Path(path).with_name(Path(path).name + LOCK_SUFFIX)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Busy(f"another process is writing {what or path} (it holds {lock})") from None
            log.info("waiting for another run that is building %s (%s holds its lock)", what or path, lock)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_tmp(final: str | os.PathLike) -> None:
    """Delete temporary siblings of ``final`` left by an :func:`atomic_path` that was killed."""
    final = Path(final)
    for pattern in (f"{final.name}{TMP_TAG}*", f".{final.name}{TMP_TAG}*"):
        for stale in final.parent.glob(pattern):
            _remove(stale)


# ----------------------------------------------------------------------------------------------
# An output directory in an object store
# ----------------------------------------------------------------------------------------------


STAGING_ENV = "PINCH_RAY_STAGING"  # where RemoteOutput keeps its local copies (default ~/.cache/pinch_ray/staging)


def is_marker(relative: str) -> int:
    """0 for an ordinary file of an output directory; 1 for a trial's completion marker
    (``<trial>/metrics.json``), 2 for a stage's (``.stages/<stage>.done``): uploaded in that order."""
    parts = relative.split("/")
    if len(parts) == 2 and parts[0] == ".stages" and parts[1].endswith(".done"):
        return 2
    return 1 if len(parts) == 2 and parts[1] == "metrics.json" else 0


class RemoteOutput:
    """An output directory at a URI (``s3://bucket/runs/demo``, ``file:///...``) and the local staging
    directory the pipeline writes instead; :meth:`publish` uploads what changed.

    Both run inside ``with output.locked():``, which holds a lock on the staging directory
    (``<staging>/<hash>.lock``): two runs of one URI on one machine would share it (the second's
    pull clears the first one's files mid-run, and each publishes the other's work as its own), so
    the second waits, or is refused with :class:`Busy`.

    :meth:`pull` starts the staging copy afresh from what the store holds, except what no later
    step reads (``skip``: the runs, and every trial's ``model/`` and ``compact/``), so a rerun on
    another machine sees the finished stages and trials. The files are read whole into memory
    (markers, reports, hypotheses, logs: small). The store is then only added to:
    :meth:`publish` deletes a marker that is about to change or has gone first, uploads the other
    new or changed files (and deletes the ones known to have gone), and the markers last.
    """

    def __init__(self, uri: str, staging: str | os.PathLike | None = None,
                 skip: tuple[str, ...] = ("runs/", "*/model/", "*/compact/")):
        self.uri = uri.rstrip("/")
        root = Path(staging or os.environ.get(STAGING_ENV) or Path.home() / ".cache" / "pinch_ray" / "staging")
        self.local = root / hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.skip = skip
        self._known: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) the store has
        self._locked = False  # inside locked(): this object holds the staging directory's lock

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[Path]:
        """Hold the staging directory's lock across processes while the block runs (yields the
        directory's path); a second holder waits, or with ``wait=False`` gets :class:`Busy`."""
        with exclusive(self.local, self.uri, wait=wait):
            self._locked = True
            try:
                yield self.local
            finally:
                self._locked = False

    def _require_lock(self, action: str) -> None:
        if not self._locked:
            raise RuntimeError(f"RemoteOutput.{action}() outside `with output.locked():` (another run of "
                               f"{self.uri} on this machine could share the staging directory {self.local})")

    def _skipped(self, relative: str) -> bool:
        parts = relative.split("/")
        for pattern in self.skip:
            head = pattern.rstrip("/").split("/")
            if len(parts) > len(head) and all(h in ("*", p) for h, p in zip(head, parts)):
                return True
        return False

    def _local_files(self) -> dict[str, tuple[int, int]]:
        """Every file of the staging directory but temporaries: relative path -> (size, mtime_ns)."""
        files = {}
        for path in self.local.rglob("*"):
            relative = path.relative_to(self.local).as_posix()
            if path.is_file() and TMP_TAG not in relative:
                stat = path.stat()
                files[relative] = (stat.st_size, stat.st_mtime_ns)
        return files

    def pull(self) -> Path:
        """A fresh staging directory holding the store's files (but ``skip``); returns it."""
        import pyarrow.fs as pafs

        self._require_lock("pull")
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        fs, base = filesystem(self.uri)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        for info in infos:
            relative = posixpath.relpath(info.path, base)
            if info.type != pafs.FileType.File or self._skipped(relative):
                continue
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as stream:
                target.write_bytes(stream.read())
        self._known = self._local_files()
        log.info("output %s: staged at %s (%d files pulled)", self.uri, self.local, len(self._known))
        return self.local

    def publish(self) -> int:
        """Upload what changed in the staging directory since the last pull or publish; returns the
        number of files uploaded or deleted."""
        self._require_lock("publish")
        fs, base = filesystem(self.uri)
        now = self._local_files()
        changed = sorted((rel for rel, stamp in now.items() if self._known.get(rel) != stamp),
                         key=lambda rel: (is_marker(rel), rel))
        gone = sorted(rel for rel in self._known if rel not in now)

        def delete(relative: str) -> None:
            if self._known.pop(relative, None) is not None:
                with contextlib.suppress(FileNotFoundError):
                    fs.delete_file(posixpath.join(base, relative))

        for relative in changed + gone:
            if is_marker(relative):
                delete(relative)  # the store stops claiming "finished" before anything under it changes
        for relative in changed:
            upload(self.local / relative, join(self.uri, relative))
            self._known[relative] = now[relative]
        for relative in gone:
            delete(relative)
        if changed or gone:
            log.info("output %s: %d files uploaded, %d deleted", self.uri, len(changed), len(gone))
        return len(changed) + len(gone)
