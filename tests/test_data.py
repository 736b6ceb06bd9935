"""The Ray Data prepare stage (bad input, cache, HF parquet) and training / evaluation batches."""

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import torchaudio

from pinch_ray.config import DataConfig
from pinch_ray.data.librispeech import write_hf_parquet
from pinch_ray.data.synth import generate_corpus
from pinch_ray.data.librispeech import list_split
from pinch_ray.data.batches import (
    batches_per_epoch,
    collate,
    iter_eval_batches,
    iter_train_batches,
    read_prepared_rows,
)
from pinch_ray.data.features import SKIP_KINDS, PrepareSettings, tokenize, write_shard
from pinch_ray.data.prepare import (COMPLETE_MARKER, REPORT_FILE, PrepareError, PreparedSplit, num_blocks,
                                    prepare_shards, prepare_split, read_shards, shard_order)

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "'": 5,
         **{chr(ord("A") + i): 6 + i for i in range(26)}}
ID_TO_CHAR = {i: c for c, i in VOCAB.items()}
NUM_TRAIN = 48  # of 60 utterances


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_corpus") / "synth"
    generate_corpus(root, 60, seed=1, num_workers=2, progress=False)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def prepared_train(ray_cluster, corpus, cache_dir):
    return prepare_split(corpus, "train", VOCAB, DataConfig(), cache_dir=cache_dir)


def _rows_by_id(path) -> dict:
    return {row["id"]: row for row in read_prepared_rows(path)}


def _files_under(path) -> list[str]:
    """Every file under a prepared split's directory (a path or a file:// URI), relative to it."""
    root = Path(str(path).removeprefix("file://"))
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _decode(labels) -> str:
    return "".join(ID_TO_CHAR[int(i)] for i in labels if i >= 0).replace("|", " ")


def test_tokenize_uses_the_word_delimiter_and_flags_unknown_characters():
    ids, missing = tokenize("IT'S A DOG", VOCAB)
    assert _decode(ids) == "IT'S A DOG" and not missing and ids[4] == VOCAB["|"]
    assert tokenize("ROOM 101", VOCAB)[1] == {"1", "0"}


def test_collate_pads_audio_masks_and_labels():
    rows = [{"id": "a", "text": "AB", "audio": np.ones(5, np.float32), "labels": [6, 7]},
            {"id": "b", "text": "A", "audio": np.full(3, 2.0, np.float32), "labels": [6]}]
    batch = collate(rows)
    assert batch["input_values"].dtype == torch.float32 and batch["attention_mask"].dtype == torch.int64
    assert batch["input_values"].tolist() == [[1.0] * 5, [2.0, 2.0, 2.0, 0.0, 0.0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7], [6, -100]] and batch["ids"] == ["a", "b"]


def test_prepare_writes_normalised_features_for_every_utterance(prepared_train, corpus):
    report = prepared_train.report
    assert prepared_train.num_utterances == report["kept"] == NUM_TRAIN
    assert sum(report["skipped_by_kind"].values()) == 0 and not report["skipped"]
    assert report["hours"] == pytest.approx(NUM_TRAIN * 1.9 / 3600, rel=0.4)
    assert (Path(prepared_train.path) / COMPLETE_MARKER).exists()
    schema = pq.read_schema(prepared_train.files[0])
    assert str(schema.field("audio").type) == "list<element: float>"
    assert str(schema.field("labels").type) == "list<element: int32>"
    transcripts = {line.split(" ", 1)[0]: line.split(" ", 1)[1]
                   for t in corpus.glob("train/*/*/*.trans.txt") for line in t.read_text().splitlines()}
    rows = _rows_by_id(prepared_train.path)
    assert rows.keys() == transcripts.keys()
    for utterance_id, row in rows.items():
        assert row["text"] == transcripts[utterance_id] == _decode(row["labels"])
        assert abs(float(row["audio"].mean())) < 1e-4 and float(row["audio"].std()) == pytest.approx(1.0, abs=1e-3)
        flac = next(corpus.glob(f"train/*/*/{utterance_id}.flac"))
        assert len(row["audio"]) == soundfile.info(flac).frames


def test_prepare_skips_and_counts_bad_input(ray_cluster, corpus, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(corpus / "dev", root / "dev")
    flacs = sorted((root / "dev").rglob("*.flac"))  # 6 utterances
    assert len(flacs) == 6
    chapter = flacs[0].parent
    speaker, chapter_id = chapter.parent.name, chapter.name
    trans = chapter / f"{speaker}-{chapter_id}.trans.txt"
    lines = trans.read_text().splitlines()
    prefix = f"{speaker}-{chapter_id}"

    flacs[1].write_bytes(b"this is not a flac file" * 50)  # unreadable_audio
    audio, rate = soundfile.read(flacs[2], dtype="float32")
    # stereo, the second channel independent of the first: averaging and taking one channel differ
    other = np.random.default_rng(1).normal(0, 0.05, size=audio.shape).astype(np.float32)
    soundfile.write(flacs[2], np.stack([audio, other], axis=1), rate, format="FLAC")
    resampled = torchaudio.functional.resample(torch.from_numpy(audio), 16000, 22050).numpy()
    soundfile.write(flacs[3], resampled, 22050, format="FLAC")  # 22.05 kHz mono

    def plant(number: str, text: str, samples: np.ndarray | None = None, rate: int = 16000, raw: bytes | None = None):
        path = chapter / f"{prefix}-{number}.flac"
        if raw is not None:
            path.write_bytes(raw)
        elif samples is not None:
            soundfile.write(path, samples, rate, format="FLAC")
        if text:
            lines.append(f"{prefix}-{number} {text}")

    noise = np.random.default_rng(0).normal(0, 0.1, size=(16000 * 21,)).astype(np.float32)
    plant("9001", "NO AUDIO FOR THIS LINE")  # missing_audio
    plant("9002", "", samples=noise[:32000])  # missing_transcript (audio without a line)
    plant("9003", "AN EMPTY FILE", raw=b"")  # empty_audio (0 bytes)
    plant("9004", "ROOM 101 IS OPEN", samples=noise[:32000])  # out_of_vocabulary
    plant("9005", "MUCH TOO SHORT", samples=noise[:3200])  # too_short (0.2 s)
    plant("9006", "MUCH TOO LONG", samples=noise)  # too_long (21 s)
    plant("9007", "stereo at forty four kHz", samples=np.stack([noise[:44100], noise[:44100]], 1), rate=44100)
    trans.write_text("\n".join(lines) + "\n")

    prepared = prepare_split(root, "dev", VOCAB, DataConfig(), cache_dir=tmp_path / "cache")
    report = json.loads((Path(prepared.path) / REPORT_FILE).read_text())
    assert report["skipped_by_kind"] == {"unreadable_audio": 1, "missing_audio": 1, "missing_transcript": 1,
                                         "empty_audio": 1, "out_of_vocabulary": 1, "too_short": 1, "too_long": 1}
    assert report["converted_by_kind"] == {"converted_channels": 2, "resampled": 2}
    assert {(item["id"], item["kind"]) for item in report["skipped"]} == {
        (flacs[1].stem, "unreadable_audio"), (f"{prefix}-9001", "missing_audio"),
        (f"{prefix}-9002", "missing_transcript"), (f"{prefix}-9003", "empty_audio"),
        (f"{prefix}-9004", "out_of_vocabulary"), (f"{prefix}-9005", "too_short"), (f"{prefix}-9006", "too_long")}
    assert all(item["reason"] and item["path"] for item in report["skipped"])
    rows = _rows_by_id(prepared.path)
    kept = {f.stem for f in flacs} - {flacs[1].stem} | {f"{prefix}-9007"}
    assert rows.keys() == kept and report["kept"] == len(kept) == 6
    assert rows[f"{prefix}-9007"]["text"] == "STEREO AT FORTY FOUR KHZ"  # upper-cased, not out of vocabulary
    assert len(rows[f"{prefix}-9007"]["audio"]) == 16000
    assert abs(len(rows[flacs[3].stem]["audio"]) - len(audio)) <= 1  # 22.05 kHz -> 16 kHz
    stereo, _ = soundfile.read(flacs[2], dtype="float32")  # as stored (FLAC quantises to 16 bits)
    mixed = stereo.mean(axis=1)
    expected = (mixed - mixed.mean()) / np.sqrt(mixed.var() + 1e-7)  # the mean of the channels, normalised
    np.testing.assert_allclose(rows[flacs[2].stem]["audio"], expected, atol=1e-4)
    first = (stereo[:, 0] - stereo[:, 0].mean()) / np.sqrt(stereo[:, 0].var() + 1e-7)
    assert np.abs(np.asarray(rows[flacs[2].stem]["audio"]) - first).max() > 0.1  # not channel 0 alone


def test_prepare_fails_clearly_without_usable_utterances(ray_cluster, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_split(tmp_path / "missing", "dev", VOCAB, DataConfig(), cache_dir=tmp_path / "cache")
    shutil.copytree(corpus / "test", tmp_path / "c" / "test")
    for flac in (tmp_path / "c" / "test").rglob("*.flac"):
        flac.write_bytes(b"garbage")
    with pytest.raises(PrepareError, match="no usable utterance.*unreadable_audio=6"):
        prepare_split(tmp_path / "c", "test", VOCAB, DataConfig(), cache_dir=tmp_path / "cache")
    # no half-written output left behind (a lock file is no output: see test_two_runs_preparing_...)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]


def test_second_prepare_reuses_the_cache(prepared_train, corpus, cache_dir):
    # (how fast a cache hit is: benchmarks/prepare_throughput.py's cache_hit_s; a clock here fails
    # in a slow hour on a shared machine)
    shard_mtimes = {f: os.stat(f).st_mtime_ns for f in prepared_train.files}
    again = prepare_split(corpus, "train", VOCAB, DataConfig(), cache_dir=cache_dir)
    assert again.from_cache and not prepared_train.from_cache and again.path == prepared_train.path
    assert {f: os.stat(f).st_mtime_ns for f in again.files} == shard_mtimes  # nothing rewritten
    assert again.report == prepared_train.report  # its own report, read back: no second preparation
    # other settings -> another key, a fresh run
    other = prepare_split(corpus, "train", VOCAB, DataConfig(max_duration_s=2.0), cache_dir=cache_dir)
    assert not other.from_cache and other.path != prepared_train.path
    assert other.report["skipped_by_kind"]["too_long"] == NUM_TRAIN - other.num_utterances > 0


def test_two_runs_preparing_the_same_split_take_turns(ray_cluster, corpus, tmp_path):
    """Two pipelines preparing one split into one local cache at once (two `pinch-ray run`s sharing
    data.cache_dir): one builds it, the other waits and reuses it, and the shards are whole. Without
    the lock the second cleared the first one's half-written shards as an unfinished attempt."""
    results, errors = [None, None], []

    def prepare(slot):
        try:
            results[slot] = prepare_split(corpus, "dev", VOCAB, DataConfig(), cache_dir=tmp_path / "cache")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=prepare, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert sorted(r.from_cache for r in results) == [False, True] and results[0].path == results[1].path
    rows = _rows_by_id(results[0].path)
    assert len(rows) == results[0].num_utterances == len(list_split(corpus, "dev").utterances)


def test_two_runs_preparing_one_split_in_an_object_store_keep_each_others_shards(ray_cluster, corpus, tmp_path,
                                                                                 monkeypatch):
    """Two drivers preparing one split into an object-store cache at once (two runs on a cluster
    sharing data.cache_dir; no lock there): the second starts while the first writes. Each writes
    its own attempt directory: the first publishes whole shards, and the second, finding the split
    finished, discards its own and reads the first one's. Before, the second cleared the first
    one's shards as an unfinished attempt's leftovers, under the first one's report."""
    import pinch_ray.data.prepare as prepare_module

    cache = f"file://{tmp_path}/store"
    featurize = prepare_module._featurize_to_parquet
    first_wrote, second_started, first_read = threading.Event(), threading.Event(), threading.Event()

    def interleaved(listing, out_dir, *args):  # runs the real job, with the two drivers interleaved
        if threading.current_thread().name == "first":
            summaries = featurize(listing, out_dir, *args)
            first_wrote.set()
            second_started.wait(120)  # the second has cleared what it would clear, and starts writing
            return summaries
        second_started.set()
        first_read.wait(120)
        return featurize(listing, out_dir, *args)

    monkeypatch.setattr(prepare_module, "_featurize_to_parquet", interleaved)
    results, errors = {}, []

    def prepare(name):
        try:
            results[name] = prepare_split(corpus, "dev", VOCAB, DataConfig(), cache_dir=cache)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append((name, error))

    first = threading.Thread(target=prepare, args=("first",), name="first")
    first.start()
    assert first_wrote.wait(300)
    # beside the first one's shards, a killed attempt's, two days old: the next attempt clears them
    [prepared_dir] = (tmp_path / "store").iterdir()
    stale = prepared_dir / "attempt-killed" / "shard-0.parquet"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    second = threading.Thread(target=prepare, args=("second",), name="second")
    second.start()
    first.join(300)
    assert not errors, errors
    rows = _rows_by_id(results["first"].path)  # published while the second prepares: whole
    assert len(rows) == results["first"].num_utterances == len(list_split(corpus, "dev").utterances)
    first_read.set()
    second.join(300)
    assert not errors, errors
    assert not results["first"].from_cache and results["second"].from_cache
    assert results["second"].files == results["first"].files and _rows_by_id(results["second"].path).keys() == rows.keys()
    # what is left: the first one's attempt; the second's discarded, the killed one's cleared
    assert _files_under(results["first"].path) == sorted([COMPLETE_MARKER, REPORT_FILE,
                                                          *results["first"].report["files"]])


def test_hf_parquet_layout_prepares_identical_features(prepared_train, corpus, tmp_path):
    write_hf_parquet(corpus, "train", tmp_path / "hf", rows_per_file=20)
    from_hf = prepare_split(f"file://{tmp_path / 'hf'}", "train", VOCAB, DataConfig(), cache_dir=tmp_path / "cache")
    assert from_hf.report["layout"] == "hf_parquet" and from_hf.num_utterances == NUM_TRAIN
    flac_rows, hf_rows = _rows_by_id(prepared_train.path), _rows_by_id(from_hf.path)
    assert flac_rows.keys() == hf_rows.keys()
    for utterance_id, row in flac_rows.items():
        other = hf_rows[utterance_id]
        assert (row["text"], row["speaker"], row["split"]) == (other["text"], other["speaker"], other["split"])
        np.testing.assert_array_equal(row["audio"], other["audio"])
        np.testing.assert_array_equal(row["labels"], other["labels"])


def test_write_shard_writes_kept_rows_in_row_groups_or_no_file(corpus, tmp_path):
    rows = [u.as_row() for u in list_split(corpus, "dev").utterances]  # 6 utterances
    rows[1] = {**rows[1], "text": "ROOM 101"}  # out_of_vocabulary
    settings = PrepareSettings.from_config(DataConfig())
    summary = write_shard(rows, tmp_path / "a.parquet", VOCAB, settings, rows_per_group=2)
    assert summary["file"] == "a.parquet" and summary["kept"] == 5 and summary["conversions"] == {}
    assert [(item["id"], item["kind"]) for item in summary["skipped"]] == [(rows[1]["id"], "out_of_vocabulary")]
    metadata = pq.ParquetFile(tmp_path / "a.parquet").metadata
    assert metadata.num_rows == 5 and metadata.num_row_groups == 3  # groups of 2 utterances, one skipped
    table = pq.read_table(tmp_path / "a.parquet")
    assert summary["num_samples"] == sum(table.column("num_samples").to_pylist()) == sum(map(len, table["audio"].to_numpy()))
    nothing = write_shard(rows[1:2], tmp_path / "b.parquet", VOCAB, settings, rows_per_group=2)
    assert nothing["file"] is None and nothing["kept"] == 0 and len(nothing["skipped"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]  # no empty file, no temporary left


def test_prepare_shards_names_files_by_content_so_a_retry_overwrites(corpus, tmp_path):
    batch = pa.Table.from_pylist([u.as_row() for u in list_split(corpus, "train").utterances[:10]])
    kwargs = {"out_dir": str(tmp_path), "vocab": VOCAB, "settings": PrepareSettings.from_config(DataConfig()),
              "split": "train", "rows_per_shard": 4, "rows_per_group": 3}
    first = prepare_shards(batch, **kwargs)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert first.column("kept").to_pylist() == [3, 3, 4] and len(files) == 3  # fewest shards of <= 4, even
    assert sorted(files) == sorted(first.column("file").to_pylist())
    again = prepare_shards(batch, **kwargs)  # a retried task
    assert again.equals(first) and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_prepare_bounds_shards_and_row_groups_and_leaves_the_data_context_alone(ray_cluster, corpus, tmp_path):
    import ray.data

    prepared = prepare_split(corpus, "train", VOCAB, DataConfig(rows_per_shard=5, prepare_batch_size=2),
                             cache_dir=tmp_path)
    metadata = [pq.ParquetFile(f).metadata for f in prepared.files]
    assert sum(m.num_rows for m in metadata) == NUM_TRAIN and max(m.num_rows for m in metadata) <= 5
    assert all(m.num_row_groups == -(-m.num_rows // 2) for m in metadata)
    assert _files_under(prepared.path) == sorted([COMPLETE_MARKER, REPORT_FILE, *prepared.report["files"]])
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled  # set per job only


def test_prepare_spreads_its_tasks_over_the_cpus_the_cluster_can_grow_to(tmp_path, monkeypatch):
    import ray

    from pinch_ray.config import load_pipeline
    from pinch_ray.pipeline import stages

    assert num_blocks(100, 2, rows_per_shard=64) == 4  # two tasks per CPU
    assert num_blocks(100, 16, rows_per_shard=64) == 32
    assert num_blocks(10, 16, rows_per_shard=64) == 10  # never more blocks than rows
    assert num_blocks(100_000, 2, rows_per_shard=64) == 391  # at most 4 shards a task
    # the pipeline sizes the job by what an autoscaling cluster can grow to, not by what is up
    (tmp_path / "corpus").mkdir()
    asked = []

    def fake_prepare(corpus, split, vocab, data_cfg, num_cpus=None):
        asked.append(num_cpus)
        return PreparedSplit(str(tmp_path / split), {"kept": 1}, from_cache=True)

    monkeypatch.setattr(stages, "prepare_split", fake_prepare)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    for cluster_max, expected in (("{}", 2.0), ("{CPU: 64}", 64.0)):
        asked.clear()
        overrides = [f"corpus.root={tmp_path / 'corpus'}", f"resources.cluster_max={cluster_max}"]
        cfg = load_pipeline(Path(__file__).parent.parent / "pipelines" / "demo.yaml", overrides, check_paths=False)
        stages.stage_prepare(cfg, {})
        assert asked == [expected] * len(cfg.corpus.splits())


def test_two_ranks_get_equal_batch_counts_with_correct_padding(prepared_train):
    batch_size = 5
    dataset = prepared_train.dataset()
    num_batches = batches_per_epoch(dataset.count(), 2, batch_size)
    assert num_batches == 4  # 24 rows per rank -> 4 full batches
    shards = dataset.streaming_split(2, equal=True)
    results: dict[int, list] = {}

    def consume(rank: int) -> None:
        results[rank] = [batch for epoch in range(2) for batch in iter_train_batches(
            shards[rank], batch_size, num_batches=num_batches, seed=0, epoch=epoch, bucket_window_batches=2)]

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a rank hung"
    assert len(results[0]) == len(results[1]) == 2 * num_batches

    rows = _rows_by_id(prepared_train.path)
    for epoch in range(2):
        ids = [i for rank in (0, 1) for b in results[rank][epoch * num_batches:(epoch + 1) * num_batches]
               for i in b["ids"]]
        assert len(ids) == len(set(ids)) == 2 * num_batches * batch_size
    for batch in results[0] + results[1]:
        assert batch["input_values"].shape[0] == batch_size
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        assert max(lengths) == batch["input_values"].shape[1]
        for i, utterance_id in enumerate(batch["ids"]):
            row, n = rows[utterance_id], lengths[i]
            assert n == len(row["audio"])
            assert torch.equal(batch["input_values"][i, :n], torch.tensor(row["audio"]))
            assert not batch["input_values"][i, n:].any() and not batch["attention_mask"][i, n:].any()
            label_length = len(row["labels"])
            assert batch["labels"][i, :label_length].tolist() == row["labels"].tolist()
            assert (batch["labels"][i, label_length:] == -100).all()


def test_train_batches_fail_loudly_when_a_rank_runs_short():
    rows = [{"id": str(i), "text": "A", "audio": np.ones(10 + i, np.float32), "labels": [6]} for i in range(7)]
    assert len(list(iter_train_batches(rows, 3, num_batches=2))) == 2
    with pytest.raises(RuntimeError, match="fewer than num_batches=3"):
        list(iter_train_batches(rows, 3, num_batches=3))


def test_train_batches_from_uneven_windows_still_give_every_full_batch():
    """Ray may hand a rank windows of any size (it did: 374 of 375 batches from 6,000 rows): a
    window's remainder joins the next one, so rows // batch_size batches always come out."""
    import pyarrow as pa

    rows = [{"id": str(i), "text": "A", "audio": np.ones(10 + i % 7, np.float32), "labels": [6]} for i in range(96)]

    class UnevenWindows:  # the DataIterator interface iter_train_batches uses
        def iter_batches(self, **kwargs):
            start = 0
            for size in (13, 27, 5, 40, 11):
                yield pa.Table.from_pylist(rows[start:start + size])
                start += size

    batches = list(iter_train_batches(UnevenWindows(), 16, num_batches=96 // 16))
    assert len(batches) == 6 and all(len(b["ids"]) == 16 for b in batches)
    assert len({i for b in batches for i in b["ids"]}) == 96


def test_eval_batches_cover_every_utterance_once(prepared_train):
    batches = list(iter_eval_batches(prepared_train.dataset(), 5, bucket_window_batches=3))
    ids = [i for batch in batches for i in batch["ids"]]
    assert sorted(ids) == sorted(_rows_by_id(prepared_train.path)) and len(ids) == NUM_TRAIN
    assert [len(b["ids"]) for b in batches].count(5) >= NUM_TRAIN // 5 - 1  # partial only at window ends
    assert all(b["texts"][0] for b in batches)


def test_skip_kinds_are_the_documented_names():
    assert SKIP_KINDS == ("unreadable_audio", "missing_audio", "missing_transcript", "empty_audio",
                          "out_of_vocabulary", "too_short", "too_long")


def test_prepare_writes_to_an_object_store_uri_in_shards_that_mix_speakers(ray_cluster, corpus, prepared_train, tmp_path):
    uri = f"file://{tmp_path}/store"
    prepared = prepare_split(corpus, "train", VOCAB, DataConfig(), cache_dir=uri)
    assert not prepared.from_cache and prepared.path.startswith(uri) and all(f.startswith(uri) for f in prepared.files)
    local = Path(prepared.path.removeprefix("file://"))
    names = [Path(f).name for f in prepared.files]
    assert names == [Path(f).name for f in prepared_train.files]  # the same shards as in a local cache
    assert _files_under(local) == sorted([COMPLETE_MARKER, REPORT_FILE, *prepared.report["files"]])
    assert _rows_by_id(prepared.path).keys() == _rows_by_id(prepared_train.path).keys()
    assert prepare_split(corpus, "train", VOCAB, DataConfig(), cache_dir=uri).from_cache

    # each shard mixes speakers (the listing keeps a speaker's utterances together)
    speakers = {u.speaker for u in list_split(corpus, "train").utterances}
    per_shard = [{row["speaker"] for row in read_prepared_rows_of(file)} for file in prepared.files]
    assert len(speakers) > 4 and all(len(shard) >= 3 for shard in per_shard), per_shard

    # training reads the shards in an order of its seed: the same for a seed, another for another
    files = prepared.files
    assert shard_order(files, None) == files and sorted(shard_order(files, 3)) == sorted(files)
    assert shard_order(files, 3) == shard_order(files, 3) != shard_order(files, 4)
    assert read_shards(files, seed=3).count() == prepared.num_utterances


def read_prepared_rows_of(file: str) -> list[dict]:
    return pq.read_table(file.removeprefix("file://")).select(["id", "speaker"]).to_pylist()
