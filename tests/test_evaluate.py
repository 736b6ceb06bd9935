"""Greedy CTC decoding, WER/CER, the MAPSSWE significance test, in-process and Ray Data inference."""

import random

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pinch_ray.core import scoring
from pinch_ray.data.features import SHARD_SCHEMA
from pinch_ray.core.models import CHAR_VOCAB, load_model, make_processor
from pinch_ray.pipeline.transcribe import transcribe_dataset

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)
WORDS = "THE CAT SAT ON A MAT WITH ITS HAT AND DID NOT SEE THAT DOG".split()


def write_shards(directory, num_rows=6, num_shards=2, seconds=None, seed=0):
    """Parquet shards in the prepared-data schema; random audio, lengths 0.6-1.2 s unless ``seconds``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_rows):
        samples = int((seconds or rng.uniform(0.6, 1.2)) * 16_000)
        text = " ".join(rng.choice(WORDS, size=3))
        rows.append({"id": f"spk-{i:03d}", "speaker": "spk", "split": "test",
                     "audio": rng.standard_normal(samples).astype(np.float32), "num_samples": samples,
                     "labels": [CHAR_VOCAB[c] for c in text.replace(" ", "|")], "text": text})
    for shard in range(num_shards):
        part = rows[shard::num_shards]
        table = pa.table({name: [r[name] for r in part] for name in SHARD_SCHEMA.names}, schema=SHARD_SCHEMA)
        pq.write_table(table, directory / f"shard-{shard}.parquet")
    return rows


def test_greedy_decode_collapses_repeats_drops_blank_and_specials():
    processor = make_processor()
    v = CHAR_VOCAB
    frames = ["A", "A", "<pad>", "A", "B", "|", "|", "<s>", "C", "</s>", "C", "|", "D"]
    logits = torch.full((2, len(frames), len(v)), -5.0)
    for t, token in enumerate(frames):
        logits[:, t, v[token]] = 5.0
    # second utterance: only the first 5 frames are real (the rest is padding)
    texts = scoring.greedy_decode(logits, torch.tensor([len(frames), 5]), processor.tokenizer)
    assert texts == ["AAB CC D", "AAB"]


def test_score_matches_jiwer_and_word_errors_add_up():
    references = ["THE CAT SAT", "ON A MAT", "WITH ITS HAT ON"]
    hypotheses = ["THE CAT SAT", "ON THE MAT TODAY", "WITH HAT"]
    utterances = [scoring.Utterance(str(i), r, h) for i, (r, h) in enumerate(zip(references, hypotheses))]
    scores = scoring.score(utterances)
    assert scores.wer == pytest.approx(jiwer.wer(references, hypotheses))
    assert scores.cer == pytest.approx(jiwer.cer(references, hypotheses))
    assert (scores.num_utterances, scores.num_words) == (3, 10)
    errors = scoring.word_errors(references, hypotheses)
    assert errors.tolist() == [0, 2, 2]
    assert errors.sum() / scores.num_words == pytest.approx(scores.wer)


def synthetic_systems(num_utterances=200, seed=0):
    """References, a decent system (~1 error in 4 utterances) and its copy with extra errors."""
    rng = random.Random(seed)
    references = [" ".join(rng.choices(WORDS, k=rng.randint(5, 12))) for _ in range(num_utterances)]
    good = []
    for ref in references:
        words = ref.split()
        if rng.random() < 0.25:
            words[rng.randrange(len(words))] = "ERR"
        good.append(" ".join(words))
    return references, good


def test_mapsswe_identical_systems_give_p_one():
    references, good = synthetic_systems()
    result = scoring.mapsswe(references, good, list(good))
    assert result.p_value == 1.0 and result.mean_difference == 0.0 and result.num_segments == 200


def test_mapsswe_detects_a_clearly_worse_system_and_not_a_tiny_difference():
    references, good = synthetic_systems()
    rng = random.Random(1)
    worse = [h if rng.random() < 0.6 else h + " UH UM" for h in good]  # ~40% of utterances +2 insertions
    result = scoring.mapsswe(references, worse, good)
    assert result.p_value < 0.05 and result.z > 0 and result.mean_difference > 0
    flipped = scoring.mapsswe(references, good, worse)
    assert flipped.p_value == pytest.approx(result.p_value) and flipped.z == pytest.approx(-result.z)

    barely = list(good)
    barely[0] += " UH"  # one extra error in 200 utterances: no evidence of a difference
    assert scoring.mapsswe(references, barely, good).p_value > 0.3


def test_mapsswe_known_answer_computed_by_hand():
    """Four segments; word errors a = [1 substitution, 2 deletions, 0, 1 insertion], b = [0, 0, 0, 1
    deletion]; differences [1, 2, 0, 0]: mean 0.75, sample variance 2.75 / 3, standard error
    sqrt(2.75 / 3) / 2 = 0.478714, z = 1.566699, two-sided p = 2 (1 - Phi(z)) = 0.117185."""
    references = ["THE CAT SAT", "A DOG RAN HOME", "HELLO", "GOOD DAY"]
    a = ["THE BAT SAT", "A DOG", "HELLO", "GOOD DAY SIR"]
    b = ["THE CAT SAT", "A DOG RAN HOME", "HELLO", "GOOD"]
    assert scoring.word_errors(references, a).tolist() == [1, 2, 0, 1]
    assert scoring.word_errors(references, b).tolist() == [0, 0, 0, 1]
    result = scoring.mapsswe(references, a, b)
    assert result.num_segments == 4 and result.mean_difference == 0.75
    assert result.z == pytest.approx(1.566699, abs=1e-6)
    assert result.p_value == pytest.approx(0.117185, abs=1e-6)


def test_compare_matches_by_id_and_rejects_different_utterances():
    references, good = synthetic_systems(num_utterances=50)
    system = [scoring.Utterance(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, good))]
    shuffled = list(reversed(system))
    assert scoring.compare(system, shuffled).p_value == 1.0
    with pytest.raises(ValueError, match="same utterances"):
        scoring.compare(system, system[:-1])
    with pytest.raises(ValueError, match="equally long"):
        scoring.mapsswe(references, good[:-1], good)


def test_pooled_comparison_is_mapsswe_over_every_seeds_segments():
    """Seeds pooled: each seed's system against its own baseline, matched by id within the pair; the
    same utterance ids in two pairs are two segments. Known answer by hand: differences per segment
    (system - baseline word errors) 1, 0 (seed 0) and 1, 2 (seed 1): mean 1, sample std sqrt(2/3),
    z = 1 / (sqrt(2/3) / 2) = 2.449, p = erfc(z / sqrt(2)) = 0.0143."""
    U = scoring.Utterance
    seed0 = ([U("a", "THE CAT", "THE BAT"), U("b", "A MAT", "A MAT")],
             [U("b", "A MAT", "A MAT"), U("a", "THE CAT", "THE CAT")])
    seed1 = ([U("a", "THE CAT", "THE BAT"), U("b", "A MAT", "THE HAT")],
             [U("a", "THE CAT", "THE CAT"), U("b", "A MAT", "A MAT")])
    pooled = scoring.compare_pooled([seed0, seed1])
    assert pooled.num_segments == 4 and pooled.mean_difference == 1.0
    assert pooled.z == pytest.approx(2.449490, abs=1e-6) and pooled.p_value == pytest.approx(0.014306, abs=1e-6)
    assert scoring.compare(*seed0).mean_difference == 0.5  # one seed alone
    with pytest.raises(ValueError, match="no .system, baseline. pairs"):
        scoring.compare_pooled([])


def test_hypotheses_file_round_trip(tmp_path):
    utterances = [scoring.Utterance("a-1", "THE CAT", "THE CAT"), scoring.Utterance("a-2", "ON A MAT", "")]
    scoring.write_hypotheses(tmp_path / "test.txt", utterances)
    assert scoring.read_hypotheses(tmp_path / "test.txt") == utterances
    (tmp_path / "bad.txt").write_text("not a header\n")
    with pytest.raises(ValueError, match="header"):
        scoring.read_hypotheses(tmp_path / "bad.txt")


class RecordingModel(torch.nn.Module):
    """Delegates to an HF model and records the keyword arguments of each call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **inputs):
        self.calls.append(sorted(inputs))
        return self.model(**inputs)

    def _get_feat_extract_output_lengths(self, lengths):
        return self.model._get_feat_extract_output_lengths(lengths)


@pytest.mark.parametrize("return_attention_mask", [True, False])
def test_transcribe_rows_decodes_each_utterance_like_a_direct_call(tmp_path, return_attention_mask):
    model, processor = load_model("tiny", **NO_RANDOMNESS)
    processor.feature_extractor.return_attention_mask = return_attention_mask
    rows = write_shards(tmp_path / "shards", num_rows=4)
    recording = RecordingModel(model)
    utterances = scoring.transcribe_rows(recording, processor, rows, batch_size=1)
    expected_inputs = ["attention_mask", "input_values"] if return_attention_mask else ["input_values"]
    assert recording.calls == [expected_inputs] * 4
    model.eval()
    for row, utterance in zip(sorted(rows, key=lambda r: r["id"]), utterances):
        with torch.no_grad():
            logits = model(torch.from_numpy(row["audio"])[None]).logits
        assert utterance.hypothesis == scoring.greedy_decode(logits, None, processor.tokenizer)[0]
        assert (utterance.id, utterance.reference) == (row["id"], row["text"])


def test_ray_data_actor_pool_equals_in_process(tmp_path, ray_cluster):
    model, processor = load_model("tiny", **NO_RANDOMNESS)
    # Equal lengths: no padding, so any batching gives the same logits on both paths.
    rows = write_shards(tmp_path / "shards", num_rows=6, seconds=0.8)
    local = scoring.transcribe_rows(model, processor, rows, batch_size=4)
    dataset = ray_cluster.data.read_parquet(str(tmp_path / "shards"))
    distributed = transcribe_dataset(dataset, model, processor, batch_size=2, num_actors=1)
    assert [u.id for u in local] == sorted(r["id"] for r in rows)
    assert distributed == local
    assert all(u.hypothesis for u in local)  # the random model does emit text
    assert {u.id: u.reference for u in local} == {r["id"]: r["text"] for r in rows}
