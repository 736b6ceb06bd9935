"""The synthetic corpus generator, the LibriSpeech-layout reader (FLAC and HF parquet), the CLI."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pinch_ray.cli import main
from pinch_ray.data.librispeech import list_split, read_utterances, write_hf_parquet
from pinch_ray.data.synth import generate_corpus
from pinch_ray.data import synth

NUM_UTTERANCES = 60
SPLITS = ("train", "dev", "test")
UTTERANCE_ID = re.compile(r"^(\d+)-(\d+)-(\d{4})$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "synth"
    generate_corpus(root, NUM_UTTERANCES, seed=0, num_workers=2, progress=False)
    return root


def _transcripts(root: Path) -> dict[str, tuple[str, str]]:
    """utterance id -> (split, transcript), from every trans.txt file."""
    out = {}
    for trans in root.glob("*/*/*/*.trans.txt"):
        for line in trans.read_text().splitlines():
            utterance_id, text = line.split(" ", 1)
            out[utterance_id] = (trans.relative_to(root).parts[0], text)
    return out


def test_generator_writes_a_librispeech_layout(corpus):
    transcripts = _transcripts(corpus)
    flacs = sorted(corpus.glob("*/*/*/*.flac"))
    assert len(transcripts) == len(flacs) == NUM_UTTERANCES
    assert {split: sum(s == split for s, _ in transcripts.values()) for split in SPLITS} == \
        {"train": 48, "dev": 6, "test": 6}
    durations = []
    for flac in flacs:
        split, speaker, chapter, name = flac.relative_to(corpus).parts
        match = UTTERANCE_ID.match(flac.stem)
        assert match and match.group(1) == speaker and match.group(2) == chapter, flac
        assert (flac.parent / f"{speaker}-{chapter}.trans.txt").exists()
        assert transcripts[flac.stem][0] == split
        info = soundfile.info(flac)
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        durations.append(info.duration)
    assert 1.5 <= np.mean(durations) <= 2.5
    for _, text in transcripts.values():
        assert re.fullmatch(r"[A-Z']+( [A-Z']+)+", text), text
    assert any("'" in text for _, text in transcripts.values())
    speakers = {utterance_id.split("-")[0] for utterance_id in transcripts}
    assert len(speakers) >= 8
    assert len({(s.voice, s.rate, s.pitch) for s in synth.SPEAKERS}) == len(synth.SPEAKERS) >= 8


def test_grammar_vocabulary_and_disjoint_splits(corpus):
    vocabulary = synth.vocabulary()
    assert len(vocabulary) >= 300
    plan = synth.plan_corpus(6000, seed=3)
    sentences = {split: {u.text for u in plan if u.split == split} for split in SPLITS}
    assert sum(len(s) for s in sentences.values()) == 6000  # unique, hence disjoint
    assert {w.lower() for u in plan for w in u.text.split()} <= vocabulary
    on_disk = {split: {t for s, t in _transcripts(corpus).values() if s == split} for split in SPLITS}
    assert not on_disk["train"] & on_disk["dev"] and not on_disk["train"] & on_disk["test"]
    assert not on_disk["dev"] & on_disk["test"]


def test_generator_is_deterministic_for_any_number_of_workers(tmp_path):
    count = 2 * synth.MIN_CHUNK_UTTERANCES + 12  # three chunks: several processes take part
    one = generate_corpus(tmp_path / "one", count, seed=5, num_workers=1, progress=False)
    two = generate_corpus(tmp_path / "two", count, seed=5, num_workers=2, progress=False)
    assert one["settings"] == two["settings"]
    files_one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert files_one == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*"))
    for relative in files_one:
        if relative.suffix in (".flac", ".txt"):
            assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes(), relative
    other = synth.plan_corpus(count, seed=6)
    assert [u.text for u in other] != [u.text for u in synth.plan_corpus(count, seed=5)]
    # an existing corpus with the same settings is kept; other settings are refused
    assert generate_corpus(tmp_path / "one", count, seed=5, progress=False) == one
    with pytest.raises(FileExistsError):
        generate_corpus(tmp_path / "one", count, seed=6, progress=False)


def test_reader_returns_every_utterance_with_its_transcript(corpus):
    transcripts = _transcripts(corpus)
    seen = {}
    for split in SPLITS:
        listing = list_split(corpus, split)
        assert listing.layout == "librispeech" and not listing.problems
        for row, audio, sample_rate in read_utterances(corpus, split):
            assert sample_rate == 16000 and audio.ndim == 2 and audio.shape[1] == 1 and len(audio) > 8000
            assert row["speaker"] == row["id"].split("-")[0] and row["split"] == split
            seen[row["id"]] = (split, row["text"])
    assert seen == transcripts


def test_reader_reads_hf_parquet_and_uris(corpus, tmp_path):
    written = write_hf_parquet(corpus, "dev", tmp_path / "hf", rows_per_file=4)
    assert len(written) == 2  # 6 utterances, 4 per file
    flac_rows = {row["id"]: (row, audio) for row, audio, _ in read_utterances(corpus, "dev")}
    for root in (tmp_path / "hf", f"file://{tmp_path / 'hf'}"):
        listing = list_split(root, "dev")
        assert listing.layout == "hf_parquet" and len(listing.parquet_files) == 2
        rows = {row["id"]: (row, audio) for row, audio, _ in read_utterances(root, "dev")}
        assert rows.keys() == flac_rows.keys()
        for utterance_id, (row, audio) in rows.items():
            assert row["text"] == flac_rows[utterance_id][0]["text"]
            assert row["speaker"] == flac_rows[utterance_id][0]["speaker"]
            np.testing.assert_array_equal(audio, flac_rows[utterance_id][1])
    uri_listing = list_split(f"file://{corpus}", "test")
    assert len(uri_listing.utterances) == 6 and uri_listing.utterances[0].audio_uri.startswith("file://")


def test_listing_reports_missing_audio_and_transcripts(corpus, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(corpus / "test", root / "test")
    flacs = sorted((root / "test").rglob("*.flac"))
    flacs[0].unlink()  # transcript line without audio
    orphan = flacs[1].with_name(flacs[1].stem[:-4] + "9999.flac")
    shutil.copy(flacs[1], orphan)  # audio without transcript line
    listing = list_split(root, "test")
    assert {(p["id"], p["kind"]) for p in listing.problems} == {
        (flacs[0].stem, "missing_audio"), (orphan.stem, "missing_transcript")}
    assert len(listing.utterances) == 5


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*corpus.root"):
        list_split(tmp_path / "nowhere", "train")


def test_cli_corpus_synth(tmp_path, capsys):
    out = tmp_path / "cli_corpus"
    assert main(["corpus", "synth", str(out), "--utterances", "12", "--seed", "1", "--quiet"]) == 0
    assert '"utterances": {"train": 10, "dev": 1, "test": 1}' in capsys.readouterr().out
    assert len(list(out.rglob("*.flac"))) == 12 and (out / synth.MARKER).exists()
    assert main(["corpus", "synth", str(out), "--utterances", "13", "--quiet"]) == 2  # exists, other settings
    assert main(["corpus", "synth", str(tmp_path / "x"), "--utterances", "0", "--quiet"]) == 2
    assert main(["corpus", "nonsense"]) == 2
