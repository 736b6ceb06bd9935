"""Download LibriSpeech subsets from OpenSLR (resource 12) into the layout the pipelines read.

    pinch-ray corpus fetch /data/LibriSpeech                      # the paper's four subsets, ~7 GB
    pinch-ray corpus fetch /data/LibriSpeech dev-clean test-clean  # only these
    pinch-ray corpus fetch /data/LibriSpeech --mirror https://openslr.elda.org/resources/12

Result, per subset (``corpus.root: /data/LibriSpeech``, ``corpus.layout: librispeech``)::

    <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac, <speaker>-<chapter>.trans.txt
    <root>/<subset>/_FETCHED.json        where it came from and its md5 (in the renamed directory)
    <root>/README.TXT, LICENSE.TXT, ...  the corpus's own notes (CC BY 4.0: attribution)

Each archive is downloaded to ``<root>/.downloads/<subset>.tar.gz.part``; an interrupted download
(a dropped connection, or a killed command run again) resumes where it stopped (HTTP Range). The
archive's md5 is checked against the value OpenSLR publishes (:data:`PUBLISHED_MD5`); a mismatch
deletes the download and raises :class:`ChecksumError`. The archive is extracted into a hidden
temporary directory beside the subset and renamed into place, marker included, so a half-extracted
subset never appears; a subset already fetched is skipped. Two fetches of one subset take turns
(a lock on ``<root>/.downloads/<subset>.lock``).

Elsewhere the same data comes as Hugging Face parquet: the ``librispeech_asr`` dataset
(``openslr/librispeech_asr`` on the Hub), one directory of parquet files per split under the root
(``<root>/<split>/**/*.parquet``, read by ``corpus.layout: hf_parquet``; the YAML's split names are
the directories' names, e.g. the Hub's ``train.clean.100``). Or ``corpus.root`` names an existing
LibriSpeech tree (e.g. a cluster's shared copy), local or ``s3://`` / ``gs://``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from pinch_ray import storage

logger = logging.getLogger(__name__)

OPENSLR_URL = "https://www.openslr.org/resources/12"  # OpenSLR SLR12; mirrors: see openslr.org/12
# md5 of each archive as OpenSLR publishes it in https://www.openslr.org/resources/12/md5sum.txt
PUBLISHED_MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}
SUBSETS = tuple(PUBLISHED_MD5)
PAPER_SUBSETS = ("train-clean-100", "dev-clean", "test-clean", "test-other")  # what the paper pipelines read
FETCHED_MARKER = "_FETCHED.json"  # in <root>/<subset>/: present only once the subset is complete
DOWNLOADS_DIR = ".downloads"  # under <root>: partial and kept archives, and the per-subset locks
RETRIES = 5  # reconnections (each resuming with HTTP Range) after a dropped connection, per archive
TIMEOUT_S = 60.0  # seconds without a byte before a connection counts as dropped
CHUNK_BYTES = 1 << 20  # read / hash / write unit


class FetchError(RuntimeError):
    """A subset could not be fetched (network, mirror, archive); the message says what to do."""


class ChecksumError(FetchError):
    """A downloaded archive's md5 differs from the published one (the download was deleted)."""


def archive_url(subset: str, mirror: str = OPENSLR_URL) -> str:
    return f"{mirror.rstrip('/')}/{subset}.tar.gz"


def fetch_librispeech(root: str | os.PathLike, subsets: Sequence[str] = PAPER_SUBSETS, *,
                      mirror: str = OPENSLR_URL, keep_archives: bool = False, progress: bool = True) -> list[dict]:
    """Fetch each of ``subsets`` into ``<root>/<subset>/`` (see the module docstring); returns one
    summary per subset: {subset, path, status ("fetched", "present", or "present, not fetched here"
    for a directory this command did not write: kept as is), md5, utterances}.

    Raises ValueError for an unknown subset or a URI root (before any download), ChecksumError for a
    corrupt download (deleted), FetchError for a download or extraction that failed (what was
    downloaded is kept and the next call resumes it).
    """
    unknown = [s for s in subsets if s not in PUBLISHED_MD5]
    if unknown:
        raise ValueError(f"unknown LibriSpeech subset(s) {unknown}; choose from {', '.join(SUBSETS)}")
    if storage.is_uri(root):
        raise ValueError(f"{root}: corpus fetch writes a local (or NFS) directory; fetch there, then copy it to "
                         "the object store (e.g. `aws s3 sync ROOT s3://bucket/LibriSpeech`)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} is a file; give a directory for the corpus")
    return [fetch_subset(root, subset, mirror=mirror, keep_archive=keep_archives, progress=progress)
            for subset in dict.fromkeys(subsets)]


def fetch_subset(root: Path, subset: str, *, mirror: str = OPENSLR_URL, keep_archive: bool = False,
                 progress: bool = True) -> dict:
    """Download, verify and extract one subset into ``<root>/<subset>/`` unless it is there."""
    final = root / subset
    downloads = root / DOWNLOADS_DIR
    with storage.exclusive(downloads / subset, f"LibriSpeech {subset}"):
        if (final / FETCHED_MARKER).is_file():
            logger.info("%s: already fetched; skipped", final)
            return {"subset": subset, "path": str(final), "status": "present",
                    **json.loads((final / FETCHED_MARKER).read_text())}
        if final.exists():
            logger.warning("%s exists but was not written by `pinch-ray corpus fetch` (no %s); kept as is. "
                           "Delete it and run again to fetch it", final, FETCHED_MARKER)
            return {"subset": subset, "path": str(final), "status": "present, not fetched here"}
        archive = downloads / f"{subset}.tar.gz"
        if not archive.is_file():
            _download(archive_url(subset, mirror), archive, PUBLISHED_MD5[subset], progress)
        marker = {"url": archive_url(subset, mirror), "md5": PUBLISHED_MD5[subset]}
        utterances = _extract(archive, root, subset, marker, progress)
        if not keep_archive:
            archive.unlink()
        logger.info("%s: %d utterances fetched", final, utterances)
        return {"subset": subset, "path": str(final), "status": "fetched", **marker, "utterances": utterances}


# ---------------------------------------------------------------------------------------------
# Download (resumed with HTTP Range) and verification
# ---------------------------------------------------------------------------------------------


def _download(url: str, archive: Path, expected_md5: str, progress: bool) -> None:
    """Download ``url`` to ``archive`` (via ``<archive>.part``), verified against ``expected_md5``.

    A dropped connection is resumed from the bytes already written, up to RETRIES times in a row
    without progress; the ``.part`` file stays for the next call when they run out.
    """
    import tqdm

    part = archive.with_name(archive.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    if part.exists():  # a resumed download: hash what is there, then append to it
        with open(part, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        logger.info("%s: resuming at %d bytes", part, part.stat().st_size)
    failures = 0
    with tqdm.tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=archive.name, disable=not progress) as bar:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                total = _download_from(url, part, offset, digest, bar)
            except _StartOver:
                part.unlink()
                digest = hashlib.md5()
                continue
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the mirror has no such file: retrying will not help
                    raise FetchError(f"{url}: HTTP {error.code} {error.reason}; check the subset name and "
                                     "--mirror (it must hold <subset>.tar.gz)") from None
                failures = _retry_or_raise(url, part, offset, failures, error)
                continue
            except (OSError, http.client.HTTPException) as error:  # dropped, reset, timed out, refused
                failures = _retry_or_raise(url, part, offset, failures, error)
                continue
            if total is None or part.stat().st_size >= total:
                break
    if digest.hexdigest() != expected_md5:
        got = digest.hexdigest()
        part.unlink()
        raise ChecksumError(f"{url}: md5 {got} differs from the published {expected_md5}; the download was "
                            f"corrupted or the mirror serves another file. It was deleted: run the same command "
                            f"again to download it afresh, or give another --mirror")
    os.replace(part, archive)


class _StartOver(Exception):
    """The server sent the whole file to a request for its rest: the download restarts from 0."""


def _retry_or_raise(url: str, part: Path, offset: int, failures: int, error: Exception) -> int:
    """After a failed request that started at ``offset``: the count of failures in a row without a
    byte of progress, once waited for; raises FetchError when that exceeds RETRIES."""
    now = part.stat().st_size if part.exists() else 0
    failures = 0 if now > offset else failures + 1
    if failures > RETRIES:
        raise FetchError(f"downloading {url} failed {failures} times in a row ({error}); {now} bytes are "
                         f"kept in {part}: run the same command again to resume, or give another --mirror")
    logger.warning("%s: download interrupted at %d bytes (%s); resuming", url, now, error)
    time.sleep(min(2 ** failures, 30) if failures else 0)
    return failures


def _download_from(url: str, part: Path, offset: int, digest, bar) -> int | None:
    """Append ``url``'s bytes from ``offset`` on to ``part`` (updating ``digest``); returns the
    archive's total size (None when the server does not say). Raises _StartOver when the server
    ignores the Range, ConnectionError when the connection closes early."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing past the end: the part is whole (checked by md5)
            return offset
        raise
    with response:
        status = getattr(response, "status", 200)
        if offset and status != 206:
            logger.warning("%s: the server does not resume downloads (HTTP %s); starting over", url, status)
            raise _StartOver
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar.reset(total=total)
        bar.update(offset)
        with open(part, "ab" if offset else "wb") as handle:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
    return total


# ---------------------------------------------------------------------------------------------
# Extraction (a temporary directory, renamed into place)
# ---------------------------------------------------------------------------------------------


class _CountingReader:
    """A binary file that reports the bytes read to a progress bar."""

    def __init__(self, handle, bar):
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.bar.update(len(data))
        return data


def _extract(archive: Path, root: Path, subset: str, marker: dict, progress: bool) -> int:
    """Extract ``LibriSpeech/<subset>/`` of ``archive`` into ``<root>/<subset>/`` (the corpus notes
    beside it), with ``marker`` plus the utterance count written into it before the rename.
    Returns the number of utterances (FLAC files). Raises FetchError for a broken archive."""
    import tqdm

    storage.remove_stale_tmp(root / subset)  # what a killed extraction left
    tmp = Path(tempfile.mkdtemp(prefix=f".{subset}{storage.TMP_TAG}", dir=root))
    try:
        with open(archive, "rb") as handle, tqdm.tqdm(total=archive.stat().st_size, unit="B", unit_scale=True,
                                                    unit_divisor=1024, desc=f"extract {subset}",
                                                    disable=not progress) as bar:
            try:
                with tarfile.open(fileobj=_CountingReader(handle, bar), mode="r|gz") as tar:
                    tar.extractall(tmp, filter="data")  # no absolute paths, links out or device files
            except (tarfile.TarError, EOFError, zlib.error) as error:
                archive.unlink()  # verified yet unreadable: damaged since, on disk
                raise FetchError(f"{archive} could not be extracted ({error}); it was deleted: run the same "
                                 "command again to download it afresh") from None
            except OSError as error:  # e.g. the disk is full: the archive is fine
                raise FetchError(f"extracting {archive} into {root} failed ({error}); the archive is kept: "
                                 "make room (train-clean-100 needs ~6.5 GB extracted) and run the same "
                                 "command again") from None
        extracted = tmp / "LibriSpeech" / subset
        if not extracted.is_dir():
            raise FetchError(f"{archive} holds no LibriSpeech/{subset}/ directory; is --mirror a LibriSpeech "
                             "(OpenSLR resource 12) mirror?")
        utterances = sum(1 for _ in extracted.rglob("*.flac"))
        (extracted / FETCHED_MARKER).write_text(json.dumps({**marker, "utterances": utterances}, indent=2) + "\n")
        for note in (tmp / "LibriSpeech").iterdir():  # README.TXT, LICENSE.TXT, SPEAKERS.TXT, ...
            if note.is_file() and not (root / note.name).exists():
                os.replace(note, root / note.name)
        os.replace(extracted, root / subset)  # the subset appears whole, marker included
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return utterances
