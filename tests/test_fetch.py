"""`pinch-ray corpus fetch` against an HTTP server on the loopback (with Range support, and a
connection it can drop mid-file) serving a small archive in LibriSpeech's format."""

import hashlib
import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pinch_ray.cli import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, main
from pinch_ray.data import fetch
from pinch_ray.data.librispeech import list_split, read_utterances

SUBSET = "dev-clean"
SPEAKERS = {"84": "121123", "174": "50561"}  # speaker -> chapter
UTTERANCES_PER_CHAPTER = 3


def _utterances() -> dict[str, tuple[np.ndarray, str]]:
    """utterance id -> (16 kHz int16 audio [T], transcript): noise, which FLAC cannot shrink (the
    archive spans several reads)."""
    rng = np.random.default_rng(0)
    words = ["THE", "CAT", "SAT", "ON", "A", "MAT", "IN", "MY", "HAT"]
    return {f"{speaker}-{chapter}-{number:04d}": (rng.integers(-8000, 8000, 16000 + 800 * number, dtype=np.int16),
                                                  " ".join(rng.choice(words, 4)))
            for speaker, chapter in SPEAKERS.items() for number in range(UTTERANCES_PER_CHAPTER)}


def _librispeech_archive(utterances: dict) -> bytes:
    """A .tar.gz laid out as OpenSLR's: LibriSpeech/<subset>/<speaker>/<chapter>/ plus the notes."""
    buffer = io.BytesIO()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(f"LibriSpeech/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        add(tar, "README.TXT", b"LibriSpeech ASR corpus\n")
        add(tar, "LICENSE.TXT", b"CC BY 4.0\n")
        for speaker, chapter in SPEAKERS.items():
            lines = []
            for utterance_id, (audio, text) in utterances.items():
                if utterance_id.startswith(f"{speaker}-{chapter}-"):
                    flac = io.BytesIO()
                    soundfile.write(flac, audio, 16000, format="FLAC", subtype="PCM_16")
                    add(tar, f"{SUBSET}/{speaker}/{chapter}/{utterance_id}.flac", flac.getvalue())
                    lines.append(f"{utterance_id} {text}")
            add(tar, f"{SUBSET}/{speaker}/{chapter}/{speaker}-{chapter}.trans.txt", ("\n".join(lines) + "\n").encode())
    return buffer.getvalue()


class RangeHandler(BaseHTTPRequestHandler):
    """GET of the server's ``files`` with ``Range: bytes=N-``; drops the connection once at
    ``server.drop_at`` bytes when that is set."""

    def do_GET(self):
        server = self.server
        data = server.files.get(self.path)
        byte_range = self.headers.get("Range")
        server.requests.append((self.path, byte_range))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if byte_range:
            start = int(byte_range.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data)
        if server.drop_at is not None and start < server.drop_at < end:
            end, server.drop_at = server.drop_at, None
        self.wfile.write(data[start:end])
        server.sent += end - start
        if end < len(data):  # the connection drops mid-file
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def utterances():
    return _utterances()


@pytest.fixture(scope="module")
def archive(utterances) -> bytes:
    return _librispeech_archive(utterances)


@pytest.fixture
def server(archive, monkeypatch):
    """A mirror on 127.0.0.1 serving /dev-clean.tar.gz, whose md5 stands in for the published one."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.drop_at, httpd.sent = {f"/{SUBSET}.tar.gz": archive}, [], None, 0
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setitem(fetch.PUBLISHED_MD5, SUBSET, hashlib.md5(archive).hexdigest())
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _leftovers(root: Path) -> list[str]:
    """Temporary directories and downloads in ``root`` (lock files are no leftovers)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if "tmp-" in p.name or p.name.endswith((".part", ".tar.gz")))


def test_fetch_resumes_a_dropped_download_and_extracts_what_the_reader_reads(server, archive, utterances, tmp_path):
    root = tmp_path / "LibriSpeech"
    server.drop_at = len(archive) // 2
    [summary] = fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False)
    assert summary["status"] == "fetched" and summary["utterances"] == len(utterances)
    # one request from the start, dropped halfway; one for the rest: nothing downloaded twice
    assert server.requests == [(f"/{SUBSET}.tar.gz", None), (f"/{SUBSET}.tar.gz", f"bytes={len(archive) // 2}-")]
    assert server.sent == len(archive)

    listing = list_split(root, SUBSET)  # the pipeline's reader, layout detected
    assert listing.layout == "librispeech" and not listing.problems
    assert {u.utterance_id: u.text for u in listing.utterances} == {k: text for k, (_, text) in utterances.items()}
    for row, audio, rate in read_utterances(root, SUBSET):
        assert rate == 16000
        np.testing.assert_array_equal(np.round(audio[:, 0] * 32768).astype(np.int16), utterances[row["id"]][0])
    marker = json.loads((root / SUBSET / fetch.FETCHED_MARKER).read_text())
    assert marker["md5"] == hashlib.md5(archive).hexdigest() and marker["url"] == f"{server.url}/{SUBSET}.tar.gz"
    assert (root / "README.TXT").is_file() and (root / "LICENSE.TXT").is_file()
    assert _leftovers(root) == []  # the archive is deleted once extracted, no temporary is left

    # present: skipped, without a request
    assert main(["corpus", "fetch", str(root), SUBSET, "--mirror", server.url, "--quiet"]) == EXIT_OK
    assert len(server.requests) == 2


def test_a_killed_download_resumes_from_its_part_file(server, archive, tmp_path):
    root = tmp_path / "LibriSpeech"
    part = root / fetch.DOWNLOADS_DIR / f"{SUBSET}.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive[:len(archive) // 3])  # what a killed `corpus fetch` left
    [summary] = fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False, keep_archives=True)
    assert summary["status"] == "fetched"
    assert server.requests == [(f"/{SUBSET}.tar.gz", f"bytes={len(archive) // 3}-")]
    assert (root / fetch.DOWNLOADS_DIR / f"{SUBSET}.tar.gz").read_bytes() == archive  # kept, as asked
    assert len(list_split(root, SUBSET).utterances) == len(SPEAKERS) * UTTERANCES_PER_CHAPTER


def test_a_wrong_checksum_is_refused_and_nothing_looks_finished(server, archive, tmp_path, monkeypatch, caplog):
    root = tmp_path / "LibriSpeech"
    monkeypatch.setitem(fetch.PUBLISHED_MD5, SUBSET, "0" * 32)
    assert main(["corpus", "fetch", str(root), SUBSET, "--mirror", server.url, "--quiet"]) == EXIT_FAILURE
    message = caplog.records[-1].getMessage()
    assert f"{SUBSET}.tar.gz: md5 {hashlib.md5(archive).hexdigest()} differs from the published {'0' * 32}" in message
    assert "run the same command again" in message and "--mirror" in message
    assert not (root / SUBSET).exists() and _leftovers(root) == []  # the bad download is deleted, not resumed
    with pytest.raises(fetch.ChecksumError):
        fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False)
    assert len(server.requests) == 2  # downloaded afresh each time


def test_extraction_is_atomic(server, archive, tmp_path, monkeypatch):
    root = tmp_path / "LibriSpeech"
    broken = archive[:len(archive) * 2 // 3]  # verifies (its md5 is the "published" one) but ends mid-archive
    server.files[f"/{SUBSET}.tar.gz"] = broken
    monkeypatch.setitem(fetch.PUBLISHED_MD5, SUBSET, hashlib.md5(broken).hexdigest())
    with pytest.raises(fetch.FetchError, match="could not be extracted.*run the same command again"):
        fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False)
    assert not (root / SUBSET).exists() and _leftovers(root) == []  # half an extraction is never the subset

    # what a killed extraction left is cleared; the subset appears whole
    stale = root / f".{SUBSET}.tmp-killed" / "LibriSpeech" / SUBSET / "84"
    stale.mkdir(parents=True)
    server.files[f"/{SUBSET}.tar.gz"] = archive
    monkeypatch.setitem(fetch.PUBLISHED_MD5, SUBSET, hashlib.md5(archive).hexdigest())
    assert fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False)[0]["status"] == "fetched"
    assert _leftovers(root) == [] and (root / SUBSET / fetch.FETCHED_MARKER).is_file()


def test_what_is_there_is_kept_and_bad_names_are_refused_before_any_download(server, tmp_path, caplog):
    root = tmp_path / "LibriSpeech"
    (root / SUBSET / "84").mkdir(parents=True)  # a copy made by hand: not ours to replace
    [summary] = fetch.fetch_librispeech(root, [SUBSET], mirror=server.url, progress=False)
    assert summary["status"] == "present, not fetched here" and server.requests == []

    assert main(["corpus", "fetch", str(root), "dev-clean", "train-clean-101", "--mirror", server.url]) == EXIT_BAD_INPUT
    assert "train-clean-101" in caplog.records[-1].getMessage() and server.requests == []
    assert main(["corpus", "fetch", "s3://bucket/LibriSpeech", SUBSET, "--mirror", server.url]) == EXIT_BAD_INPUT
    assert "local (or NFS) directory" in caplog.records[-1].getMessage() and server.requests == []
    assert main(["corpus", "fetch", str(tmp_path / "other"), "test-other", "--mirror", server.url,
                 "--quiet"]) == EXIT_FAILURE  # the mirror has no such file
    assert "HTTP 404" in caplog.records[-1].getMessage() and "--mirror" in caplog.records[-1].getMessage()
