"""finalize_trial (artifact directory, metrics, reports, resumability) and the pipeline summary."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCTC, AutoProcessor

from pinch_ray.core import compact_format, scoring, gates
from pinch_ray.pipeline import report
from pinch_ray.config import DataConfig, EvalConfig, GateConfig
from pinch_ray.data.features import SHARD_SCHEMA
from pinch_ray.core.models import CHAR_VOCAB, count_parameters, load_model
from pinch_ray.core.compressor import prepare_method

NO_RANDOMNESS = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     feat_proj_dropout=0.0, final_dropout=0.0, mask_time_prob=0.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = "THE CAT SAT ON A MAT WITH ITS HAT".split()


def eval_rows(split, num_rows=5, seed=0):
    """Shard rows of one split: random audio of 0.5-1 s, three-word references."""
    rng = np.random.default_rng([seed, len(split)])
    rows = []
    for i in range(num_rows):
        text = " ".join(rng.choice(WORDS, size=3))
        samples = int(rng.uniform(0.5, 1.0) * 16_000)
        rows.append({"id": f"{split}-{i:02d}", "speaker": "s", "split": split, "num_samples": samples,
                     "audio": rng.standard_normal(samples).astype(np.float32), "text": text,
                     "labels": np.array([CHAR_VOCAB[c] for c in text.replace(" ", "|")], dtype=np.int32)})
    return rows


def ump_trial():
    """A tiny ump model at 65% of all parameters and its TrialInfo (what the pipeline hands to finalize)."""
    model, processor = load_model("tiny", **NO_RANDOMNESS)
    prepare_method(model, "ump", 0.65, GateConfig(), target_basis="params")
    info = report.TrialInfo(trial="ump-0.65", method="ump", target_sparsity=0.65, compression_seconds=12.5,
                            achieved_sparsity_trained=0.65, calibrated=False)
    return model, processor, info


def finalize_ump(output_dir):
    """The finalize run the kill test interrupts (also run by a subprocess, hence a function)."""
    model, processor, info = ump_trial()
    splits = {"dev": eval_rows("dev"), "test": eval_rows("test")}
    return report.finalize_trial(model, processor, info, output_dir, splits, eval_cfg=EvalConfig(batch_size=2))


def test_finalize_writes_a_complete_self_describing_trial(tmp_path):
    model, processor, info = ump_trial()
    layers = gates.layer_sparsity(model)
    counts = count_parameters(model)
    dense = {split: [scoring.Utterance(r["id"], r["text"], r["text"]) for r in eval_rows(split)]
             for split in ("dev", "test")}  # a perfect "dense" system
    metrics = report.finalize_trial(model, processor, info, tmp_path,
                                    {"dev": eval_rows("dev"), "test": eval_rows("test")},
                                    dense_hypotheses=dense, eval_cfg=EvalConfig(batch_size=2))
    trial = tmp_path / "ump-0.65"
    assert sorted(os.listdir(trial)) == ["compact", "hypotheses", "metrics.json", "model",
                                         "per_layer_sparsity.csv", "per_layer_sparsity.png"]
    assert json.loads((trial / "metrics.json").read_text()) == metrics
    loaded = AutoModelForCTC.from_pretrained(trial / "model").eval()
    x = torch.from_numpy(eval_rows("test")[0]["audio"])[None]
    with torch.no_grad():  # the export is the hard-masked model
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, atol=1e-5, rtol=0)

    assert metrics["method"] == "ump" and metrics["target_sparsity"] == 0.65 and metrics["target_basis"] == "params"
    # 65% of all parameters: measured on the export, within one weight per gated matrix
    assert metrics["achieved_sparsity"] == pytest.approx(0.65, abs=19 / counts.total)
    assert metrics["gated_sparsity"] == pytest.approx(gates.achieved_sparsity(model))
    assert metrics["gated_sparsity"] == pytest.approx(0.65 * counts.total / counts.gated, abs=1e-4)
    assert (metrics["params_total"], metrics["params_nonzero"]) == (counts.total, counts.nonzero)
    assert metrics["param_reduction"] == pytest.approx(counts.reduction)
    assert metrics["param_reduction"] == pytest.approx(metrics["achieved_sparsity"])  # no other zeros
    assert metrics["layer_sparsity_std"] < 1e-3  # ump: every matrix at the same fraction
    assert metrics["compression_ratio"] == pytest.approx(counts.total / counts.nonzero)
    assert metrics["compression_seconds"] == 12.5 and metrics["calibrated"] is False
    assert metrics["artifact_bytes"]["compact"] < 0.21 * metrics["artifact_bytes"]["model"]
    assert set(metrics["versions"]) == {"pinch_ray", "torch", "transformers", "ray"}
    assert all(metrics["versions"].values())

    for split in ("dev", "test"):  # reported numbers = jiwer on the saved hypotheses
        saved = scoring.read_hypotheses(trial / "hypotheses" / f"{split}.txt")
        references, hypotheses = [u.reference for u in saved], [u.hypothesis for u in saved]
        assert [u.reference for u in saved] == [r["text"] for r in sorted(eval_rows(split), key=lambda r: r["id"])]
        assert metrics["wer"][split] == pytest.approx(jiwer.wer(references, hypotheses))
        assert metrics["cer"][split] == pytest.approx(jiwer.cer(references, hypotheses))
        assert metrics["per_split"][split]["num_utterances"] == 5
        assert metrics["p_value_vs_dense"][split] == pytest.approx(scoring.compare(saved, dense[split]).p_value)

    with open(trial / "per_layer_sparsity.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], int(r["numel"]), int(r["pruned"])) for r in rows] == \
        [(layer.name, layer.numel, layer.pruned) for layer in layers]
    assert (trial / "per_layer_sparsity.png").read_bytes()[:8] == PNG_MAGIC

    # complete: a rerun keeps it as it is
    mtime = (trial / "metrics.json").stat().st_mtime_ns
    assert report.finalize_trial(model, processor, info, tmp_path, {}) == metrics
    assert (trial / "metrics.json").stat().st_mtime_ns == mtime


def test_model_card_and_feature_extractor_describe_the_trained_model(tmp_path):
    model, processor, info = ump_trial()
    assert processor.feature_extractor.do_normalize  # the preset's processor normalises
    info = dataclasses.replace(info, base_model="facebook/wav2vec2-base", corpus="/data/LibriSpeech/")
    data = DataConfig(normalize=False)  # what the model was trained on: raw audio
    metrics = report.finalize_trial(model, processor, info, tmp_path, {"test": eval_rows("test")},
                                    eval_cfg=EvalConfig(batch_size=2), data_cfg=data)
    exported = AutoProcessor.from_pretrained(tmp_path / "ump-0.65" / "model").feature_extractor
    assert exported.do_normalize is False and exported.sampling_rate == data.sample_rate
    assert processor.feature_extractor.do_normalize  # the caller's processor is untouched

    card = (tmp_path / "ump-0.65" / "model" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "automatic-speech-recognition" and front["base_model"] == "facebook/wav2vec2-base"
    (result,) = front["model-index"][0]["results"]
    assert result["dataset"] == {"name": "LibriSpeech", "type": "LibriSpeech", "split": "test"}
    assert [m["value"] for m in result["metrics"]] == [round(100 * metrics["wer"]["test"], 2),
                                                      round(100 * metrics["cer"]["test"], 2)]
    assert "`ump` at 0.65 of all parameters" in card and "AutoModelForCTC.from_pretrained(path)" in card
    assert f"{100 * metrics['param_reduction']:.1f}% of its {metrics['params_total']:,} parameters" in card
    assert metrics["artifact_bytes"]["model"] == sum(f.stat().st_size for f in (tmp_path / "ump-0.65" / "model").iterdir())
    # the compact store unpacks into the whole model directory: card, processor, normalisation and all
    unpacked = compact_format.unpack(tmp_path / "ump-0.65" / "compact", tmp_path / "unpacked")
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in (tmp_path / "ump-0.65" / "model").iterdir())
    assert (unpacked / "README.md").read_text() == card
    assert AutoProcessor.from_pretrained(unpacked).feature_extractor.do_normalize is False


def test_finalize_killed_mid_write_leaves_nothing_complete_and_a_rerun_finishes(tmp_path):
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_report
from pinch_ray.core import scoring
write = scoring.write_hypotheses
def write_then_die(path, utterances):
    write(path, utterances)
    os._exit(9)  # a hard kill: no cleanup code runs
scoring.write_hypotheses = write_then_die
test_report.finalize_ump({str(tmp_path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 9, result.stderr[-3000:]
    leftovers = os.listdir(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith("ump-0.65.tmp-")  # killed after model/, compact/
    assert (tmp_path / leftovers[0] / "model" / "model.safetensors").is_file()
    assert not report.is_complete(tmp_path / leftovers[0])
    assert report.collect_trials(tmp_path) == []

    metrics = finalize_ump(tmp_path)
    assert os.listdir(tmp_path) == ["ump-0.65"]
    assert report.is_complete(tmp_path / "ump-0.65")
    assert set(metrics["wer"]) == {"dev", "test"} and metrics["p_value_vs_dense"] == {"dev": None, "test": None}
    exported = count_parameters(AutoModelForCTC.from_pretrained(tmp_path / "ump-0.65" / "model"))
    assert (exported.total, exported.nonzero) == (metrics["params_total"], metrics["params_nonzero"])


def test_finalize_replaces_an_incomplete_trial_directory(tmp_path):
    (tmp_path / "ump-0.65").mkdir()
    (tmp_path / "ump-0.65" / "junk.txt").write_text("from an older, broken run")
    finalize_ump(tmp_path)
    assert "junk.txt" not in os.listdir(tmp_path / "ump-0.65")
    assert report.is_complete(tmp_path / "ump-0.65")


def test_finalize_dense_on_ray_data(tmp_path, ray_cluster):
    model, processor = load_model("tiny", **NO_RANDOMNESS)
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = eval_rows("test")
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), shards / "part-0.parquet")
    info = report.TrialInfo(trial="dense", method="dense", target_sparsity=0.0)
    splits = {"test": ray_cluster.data.read_parquet(str(shards))}
    metrics = report.finalize_trial(model, processor, info, tmp_path / "out", splits, eval_cfg=EvalConfig(batch_size=2))
    assert metrics["achieved_sparsity"] == 0.0 and metrics["p_value_vs_dense"] == {"test": None}
    saved = report.read_trial_hypotheses(tmp_path / "out" / "dense")
    assert sorted(u.id for u in saved["test"]) == [r["id"] for r in rows]
    assert metrics["wer"]["test"] == pytest.approx(scoring.score(saved["test"]).wer)
    with open(tmp_path / "out" / "dense" / "per_layer_sparsity.csv") as f:
        layers = list(csv.DictReader(f))
    assert len(layers) == 3 * 6 + 1 and all(int(r["pruned"]) == 0 for r in layers)  # default patterns


def fake_metrics(trial, method, target, nonzero, wer_test, p, basis="params"):
    return {"trial": trial, "method": method, "target_sparsity": target, "target_basis": basis,
            "achieved_sparsity": target, "params_total": 1_000_000, "params_nonzero": nonzero,
            "param_reduction": 1 - nonzero / 1_000_000, "compression_ratio": 1_000_000 / nonzero,
            "wer": {"dev": wer_test - 0.01, "test": wer_test},
            "p_value_vs_dense": {"dev": p, "test": p}, "compression_seconds": 60.0}


def test_summary_lists_complete_trials_in_one_table_and_plots(tmp_path):
    trials = [fake_metrics("sspg-0.65", "sspg", 0.65, 400_000, 0.081, 0.21),
              fake_metrics("dense", "dense", 0.0, 1_000_000, 0.078, None),
              fake_metrics("ump-0.65", "ump", 0.65, 400_000, 0.095, 0.001),
              fake_metrics("sspg-0.5", "sspg", 0.5, 550_000, 0.079, 0.6, basis="gated")]
    for m in trials:
        (tmp_path / m["trial"]).mkdir()
        (tmp_path / m["trial"] / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "sspg-0.8").mkdir()  # incomplete: no metrics.json
    (tmp_path / "sspg-0.9.tmp-0123").mkdir()  # killed mid-write
    (tmp_path / "sspg-0.9.tmp-0123" / "metrics.json").write_text(json.dumps(trials[0]))

    summary = report.write_summary(tmp_path)
    assert [m["trial"] for m in summary["trials"]] == ["dense", "ump-0.65", "sspg-0.5", "sspg-0.65"]
    assert summary["plot_split"] == "test"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    text = (tmp_path / "summary.md").read_text()
    table = [line for line in text.split("\n## ")[0].splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4  # header, separator, one row per complete trial
    assert "## Peers" in text  # sspg and ump at 0.65 (one run each) side by side
    assert "WER test (%)" in table[0] and "p vs dense test" in table[0]
    assert "| sspg-0.65 | sspg | 0.65 | 0.650 | 60.0 | 2.50x | 0.400 / 1.000 | 7.10 | 8.10 | 0.21 | 0.21 | 60 |" in table
    assert "| sspg-0.5 | sspg | 0.5 (gated) | 0.500 | 45.0 | 1.82x |" in table[4]  # an older run's basis
    assert (tmp_path / "wer_vs_params.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left


def write_scored_trials(root, references, hypotheses, extra):
    """A finished trial directory per ``{trial: hypotheses}`` (``<method>-<target>[-seed<k>]`` or
    ``dense[-seed<k>]``): metrics scored against ``references`` plus ``extra(trial, method)``, and the
    same hypotheses on dev and test."""
    U = scoring.Utterance
    for trial, texts in hypotheses.items():
        parts = trial.split("-")
        method, target = ("dense", 0.0) if parts[0] == "dense" else (parts[0], float(parts[1]))
        seed = int(parts[-1][len("seed"):]) if parts[-1].startswith("seed") else None
        metrics = {**fake_metrics(trial, method, target, 400_000, jiwer.wer(references, texts), None),
                   "seed": seed, **extra(trial, method)}
        (root / trial / "hypotheses").mkdir(parents=True)
        (root / trial / "metrics.json").write_text(json.dumps(metrics))
        for split in ("dev", "test"):
            scoring.write_hypotheses(root / trial / "hypotheses" / f"{split}.txt",
                                      [U(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, texts))])


def test_summary_pools_trials_repeated_over_seeds(tmp_path):
    """sspg-0.65-seed<k> against dense-seed<k>: mean +- std per group, MAPSSWE pooled over the seeds."""
    U = scoring.Utterance
    references = ["THE CAT SAT", "ON A MAT", "WITH ITS HAT"]
    hypotheses = {"dense-seed0": ["THE CAT SAT", "ON A MAT", "WITH ITS HAT"],
                  "dense-seed1": ["THE CAT SAT", "ON A BAT", "WITH ITS HAT"],
                  "sspg-0.65-seed0": ["THE CAT SAT", "ON A BAT", "WITH ITS HAT"],
                  "sspg-0.65-seed1": ["THE BAT SAT", "ON A BAT", "WITH A HAT"]}
    write_scored_trials(tmp_path, references, hypotheses,
                        lambda trial, method: {"dense_reference": None if method == "dense" else f"dense-seed{trial[-1]}"})
    summary = report.write_summary(tmp_path)
    groups = {g["trial"]: g for g in summary["over_seeds"]}
    assert set(groups) == {"dense", "sspg-0.65"}
    sspg = groups["sspg-0.65"]
    assert sspg["seeds"] == [0, 1] and sspg["wer_mean"]["test"] == pytest.approx((1 / 9 + 3 / 9) / 2)
    assert sspg["wer_std"]["test"] == pytest.approx(np.std([1 / 9, 3 / 9], ddof=1))
    pairs = [([U(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, hypotheses[f"sspg-0.65-seed{k}"]))],
              [U(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, hypotheses[f"dense-seed{k}"]))])
             for k in (0, 1)]
    assert sspg["p_value_pooled_vs_dense"]["test"] == pytest.approx(scoring.compare_pooled(pairs).p_value)
    assert groups["dense"]["p_value_pooled_vs_dense"] == {}  # the reference is not tested against itself
    text = (tmp_path / "summary.md").read_text()
    assert "## Over seeds" in text and "| sspg-0.65 | sspg | 0.65 | 0, 1 | 60.0 | 21.22 ± 15.71 | 22.22 ± 15.71 |" in text


def test_summary_without_trials_says_so(tmp_path):
    with pytest.raises(ValueError, match="no complete trial"):
        report.write_summary(tmp_path)


def test_summary_compares_every_method_with_sspg_at_its_target_over_the_seeds_both_ran(tmp_path):
    """The peers table: gmp against sspg seed by seed (MAPSSWE pooled), time per method; a method at
    a target sspg did not run (ump-0.5) has nothing to be compared with."""
    U = scoring.Utterance
    references = ["THE CAT SAT", "ON A MAT", "WITH ITS HAT"]
    hypotheses = {"dense-seed0": references, "dense-seed1": references,
                  "sspg-0.65-seed0": ["THE CAT SAT", "ON A BAT", "WITH ITS HAT"],
                  "sspg-0.65-seed1": ["THE BAT SAT", "ON A MAT", "WITH ITS HAT"],
                  "gmp-0.65-seed0": ["THE BAT SAT", "ON A BAT", "WITH A HAT"],
                  "gmp-0.65-seed1": ["THE BAT SAT", "ON A BAT", "WITH ITS HAT"],
                  "parp-0.65-seed1": ["THE CAT SAT", "ON A BAT", "WITH ITS HAT"],
                  "ump-0.5": ["THE CAT SAT", "ON A MAT", "WITH ITS HAT"]}
    write_scored_trials(tmp_path, references, hypotheses,
                        lambda trial, method: {"compression_seconds": 100.0 if method == "gmp" else 60.0})
    summary = report.write_summary(tmp_path)
    entries = {entry["method"]: entry for entry in summary["peers"]}
    assert [entry["method"] for entry in summary["peers"]] == ["sspg", "gmp", "parp"]  # sspg first; ump-0.5 alone
    gmp = entries["gmp"]
    assert gmp["seeds"] == [0, 1] and gmp["wer_mean"]["test"] == pytest.approx((3 / 9 + 2 / 9) / 2)
    pairs = [([U(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, hypotheses[f"gmp-0.65-seed{k}"]))],
              [U(f"u{i}", r, h) for i, (r, h) in enumerate(zip(references, hypotheses[f"sspg-0.65-seed{k}"]))])
             for k in (0, 1)]
    assert gmp["p_value_pooled_vs_sspg"]["test"] == pytest.approx(scoring.compare_pooled(pairs).p_value)
    assert entries["sspg"]["p_value_pooled_vs_sspg"] == {} and gmp["compression_seconds_mean"] == 100.0
    text = (tmp_path / "summary.md").read_text()
    assert "## Peers" in text and "| 0.65 | sspg | 0, 1 | 60.0 | 10.11 ± 0.00 | 11.11 ± 0.00 | (reference) | (reference) | 60 |" in text
    assert "| 0.65 | gmp | 0, 1 | 60.0 | 26.78 ± 7.86 | 27.78 ± 7.86 |" in text
    assert "| 0.65 | parp | 1 | 60.0 | 10.11 | 11.11 |" in text  # one seed: no spread to show
    assert entries["parp"]["wer_std"] == {"dev": None, "test": None}  # in summary.json too
