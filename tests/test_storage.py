import os

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


def test_atomic_write_text_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "summary.md"
    storage.atomic_write_text(path, "first")
    storage.atomic_write_text(path, "second")
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
