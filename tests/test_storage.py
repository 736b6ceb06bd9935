import os
import subprocess
import sys
import time

import pytest

from pinch_ray import storage


def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "trial"
    final.mkdir()
    (final / "stale.txt").write_text("half-written")
    with storage.atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "metrics.json").write_text("{}")
    assert sorted(os.listdir(final)) == ["metrics.json"]
    assert os.listdir(tmp_path) == ["trial"]

    with pytest.raises(RuntimeError), storage.atomic_dir(final) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed")
    assert sorted(os.listdir(final)) == ["metrics.json"] and os.listdir(tmp_path) == ["trial"]

    (tmp_path / "trial.tmp-abc").mkdir()  # what a hard kill leaves
    storage.remove_stale_tmp(final)
    assert os.listdir(tmp_path) == ["trial"]


def test_write_text_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "summary.md"
    storage.write_text(path, "first")
    storage.write_text(path, "second")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["summary.md"]
    with pytest.raises(RuntimeError), storage.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["summary.md"]


def test_atomic_path_of_a_file_the_block_never_wrote_replaces_nothing(tmp_path):
    with storage.atomic_path(tmp_path / "shard.parquet") as tmp:
        assert tmp.name.startswith(".shard.parquet.tmp-") and not tmp.name.endswith(".parquet")  # no glob sees it
    assert os.listdir(tmp_path) == []
    with storage.atomic_path(tmp_path / "plot.png", keep_suffix=True) as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert os.listdir(tmp_path) == ["plot.png"]


def test_uris_and_local_paths_read_alike(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello")
    uri = f"file://{tmp_path}"
    for base in (str(tmp_path), uri):
        assert storage.read_text(storage.join(base, "a", "x.txt")) == "hello"
        assert storage.is_file(storage.join(base, "a", "x.txt")) and not storage.is_file(storage.join(base, "a"))
    assert storage.filesystem(uri + "/a")[1] == f"{tmp_path}/a"
    assert storage.join("s3://bucket/runs?region=eu-west-1", "sspg", "model") == "s3://bucket/runs/sspg/model?region=eu-west-1"
    assert storage.parent("s3://bucket/runs/sspg?region=eu-west-1") == "s3://bucket/runs?region=eu-west-1"
    assert storage.local_path(uri) == str(tmp_path) and storage.local_path("gs://b/x") is None
    assert storage.absolute("rel") == os.path.abspath("rel") and storage.absolute("s3://b/x") == "s3://b/x"
    with storage.local_dir(uri + "/a") as local:
        assert (local / "x.txt").read_text() == "hello"


def test_atomic_output_at_a_uri_shows_a_file_whole_or_not_at_all(tmp_path):
    uri = f"file://{tmp_path}/deep/dir/x.bin"
    with pytest.raises(RuntimeError), storage.atomic_output(uri) as (fs, target):
        with fs.open_output_stream(target) as stream:
            stream.write(b"half")
        assert not (tmp_path / "deep" / "dir" / "x.bin").exists()  # not there while it is written
        raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path / "deep" / "dir") == []  # no file, no temporary
    storage.write_text(uri, "whole")
    assert storage.read_text(uri) == "whole" and os.listdir(tmp_path / "deep" / "dir") == ["x.bin"]
    with storage.atomic_output(uri):
        pass  # a block that writes nothing replaces nothing
    assert storage.read_text(uri) == "whole"
    storage.remove_tree(f"file://{tmp_path}/deep")
    assert not storage.exists(f"file://{tmp_path}/deep") and os.listdir(tmp_path) == []


def test_remote_output_uploads_markers_last_and_never_claims_a_changing_trial_finished(tmp_path, monkeypatch):
    remote_dir = tmp_path / "store"
    (remote_dir / "runs" / "sspg").mkdir(parents=True)
    (remote_dir / "runs" / "sspg" / "ckpt.pt").write_text("big")
    (remote_dir / "dense" / "model").mkdir(parents=True)
    (remote_dir / "dense" / "model" / "model.safetensors").write_text("big")
    (remote_dir / "dense" / "metrics.json").write_text("{}")
    (remote_dir / "runs-notes.txt").write_text("a file beside runs/, not in it")
    output = storage.RemoteOutput(f"file://{remote_dir}", staging=tmp_path / "staging")
    with pytest.raises(RuntimeError, match=r"outside `with output.locked\(\):`"):
        output.pull()
    monkeypatch.setattr(output, "_locked", True)  # what `with output.locked():` sets (tested below)
    local = output.pull()
    pulled = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert pulled == ["dense/metrics.json", "runs-notes.txt"]  # runs and models stay in the store
    assert output.publish() == 0  # nothing changed

    events = []
    upload = storage.upload
    monkeypatch.setattr(storage, "upload", lambda local, path: (events.append(("put", path)), upload(local, path)))
    (local / ".stages").mkdir()
    (local / ".stages" / "finalize.done").write_text("{}")
    (local / "sspg" / "model").mkdir(parents=True)
    (local / "sspg" / "model" / "model.safetensors").write_text("weights")
    (local / "sspg" / "metrics.json").write_text("{}")
    (local / "sspg" / f"half{storage.TMP_TAG}0123").write_text("a temporary")
    (local / "summary.md").write_text("| trial |")
    (local / "dense" / "metrics.json").write_text('{"wer": 0.1}')  # a trial finalized again
    (local / "runs-notes.txt").unlink()
    assert output.publish() == 6
    uploaded = [path.removeprefix(f"file://{remote_dir}/") for _, path in events]
    assert uploaded == ["sspg/model/model.safetensors", "summary.md", "dense/metrics.json", "sspg/metrics.json",
                        ".stages/finalize.done"]  # trial markers after every other file, stage markers last
    assert (remote_dir / "dense" / "model" / "model.safetensors").read_text() == "big"  # never pulled, kept
    assert not (remote_dir / "runs-notes.txt").exists() and (remote_dir / "runs" / "sspg" / "ckpt.pt").exists()
    assert not list(remote_dir.rglob(f"*{storage.TMP_TAG}*"))

    # a marker about to change is deleted before anything else is uploaded
    (local / "dense" / "metrics.json").write_text('{"wer": 0.2}')
    (local / "dense" / "hypotheses.txt").write_text("new")
    seen = []
    monkeypatch.setattr(storage, "upload", lambda local, path: (
        seen.append((path.rsplit("/", 1)[-1], (remote_dir / "dense" / "metrics.json").exists())), upload(local, path)))
    assert output.publish() == 2
    assert seen == [("hypotheses.txt", False), ("metrics.json", False)]
    assert (remote_dir / "dense" / "metrics.json").read_text() == '{"wer": 0.2}'


# One run of an output URI (a child process): takes the staging lock, pulls, stages a file of its
# own, says so (a "<name>.holding" file), waits for "<name>.release", then publishes.
RUN = """
import sys, time
from pathlib import Path
from pinch_ray import storage
uri, staging, name, wait = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "wait"
signals = Path(staging).parent
output = storage.RemoteOutput(uri, staging=staging)
with output.locked(wait=wait) as local:
    pulled = sorted(p.name for p in output.pull().iterdir())
    (local / f"{name}.txt").write_text(",".join(pulled))
    (signals / f"{name}.holding").write_text("")
    while not (signals / f"{name}.release").exists():
        time.sleep(0.05)
    output.publish()
"""


def _wait_for(path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_two_runs_of_one_output_uri_on_one_machine_take_turns_with_the_staging_copy(tmp_path):
    """Two processes of one output URI on one machine share a staging directory by its name: the
    second's pull would clear the first one's staged files mid-run, and either publish would upload
    the other's. With the lock, a second run is refused (wait=False, what `pinch-ray run` does) or
    waits (wait=True) until the first has published, then pulls what it published."""
    uri, staging = f"file://{tmp_path / 'store'}", tmp_path / "staging"
    (tmp_path / "store").mkdir()

    def start(name: str, wait: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", RUN, uri, str(staging), name, "wait" if wait else "refuse"],
                                stderr=subprocess.PIPE, text=True)

    first = start("first", wait=False)
    _wait_for(tmp_path / "first.holding")
    output = storage.RemoteOutput(uri, staging=staging)
    with pytest.raises(storage.Busy, match=f"another process is writing {uri}"):
        with output.locked(wait=False):
            pass
    refused = start("refused", wait=False)
    assert refused.wait(60) != 0 and "Busy" in refused.stderr.read()
    second = start("second", wait=True)
    time.sleep(1.0)
    assert not (tmp_path / "second.holding").exists() and second.poll() is None  # waits its turn
    assert (output.local / "first.txt").exists()  # the first one's staged file, untouched

    (tmp_path / "first.release").write_text("")
    assert first.wait(60) == 0, first.stderr.read()
    _wait_for(tmp_path / "second.holding")
    (tmp_path / "second.release").write_text("")
    assert second.wait(60) == 0, second.stderr.read()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["first.txt", "second.txt"]
    assert (tmp_path / "store" / "second.txt").read_text() == "first.txt"  # it pulled what the first published
