"""The shipped foundation (``model.init_from: synth-tiny``): it loads, it matches the code that
reads it (and says how to rebuild it when it does not), the demo never evaluates on a sentence it
trained on, and ``pinch-ray foundation ship`` writes one that loads."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from pinch_ray.cli import EXIT_BAD_INPUT, main
from pinch_ray.config import FOUNDATION_TRIAL, dump_pipeline, load_pipeline
from pinch_ray.core import models
from pinch_ray.data import synth
from pinch_ray.pipeline import stages
from pinch_ray.pipeline.foundation import ship
from pinch_ray.pipeline.report import METRICS_FILE

REPO = Path(__file__).resolve().parent.parent
SHIPPED = "synth-tiny"


def test_the_shipped_foundation_loads_with_its_trained_head_and_its_record():
    assert SHIPPED in models.foundation_names()
    record = models.foundation_record(SHIPPED)
    assert record["rebuild"] == models.REBUILD_FOUNDATION
    assert record["model"]["preset"] in models.TINY_PRESETS
    assert record["training"]["max_steps"] > 0 and record["code_version"] and record["run_versions"]["torch"]
    assert 0 < record["results"]["wer"]["test"] <= 0.10  # a converged model, not random weights
    model, processor = models.load_model(SHIPPED)
    assert models.has_trained_head(SHIPPED)
    assert sum(p.numel() for p in model.parameters()) == record["results"]["params_total"]
    assert processor.tokenizer.get_vocab() == models.CHAR_VOCAB
    skeleton = models.model_skeleton(SHIPPED)
    assert [p.shape for p in skeleton.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("name", models.foundation_names())
def test_every_shipped_foundation_names_the_pipeline_that_rebuilds_it(name):
    """The rebuild command in foundation.json (what a drift error prints) runs a pipeline in this
    repository that builds the same thing: its preset, overrides and corpus give the recorded
    fingerprint, and its training settings are the recorded ones."""
    record = models.foundation_record(name)
    pipeline, ship_command = record["rebuild"].split(" && ")
    assert pipeline.startswith("pinch-ray run pipelines/") and ship_command.startswith("pinch-ray foundation ship ")
    cfg = load_pipeline(REPO / pipeline.removeprefix("pinch-ray run "), check_paths=False)
    assert record["rebuild"] == models.rebuild_command(cfg.name, name)
    corpus = {"synth_utterances": cfg.corpus.synth_utterances, "synth_seed": cfg.corpus.synth_seed}
    assert models.foundation_fingerprint(cfg.model.init_from, dict(cfg.model.overrides), corpus) == record["fingerprint"]
    built = cfg.baseline_train_config()
    assert {key: getattr(built, key) for key in ("max_steps", "lr", "batch_size", "seed")} == {
        key: record["training"][key] for key in ("max_steps", "lr", "batch_size", "seed")}
    # ... and a commit whose checkout rebuilds it: the one it was shipped from when that was clean,
    # else one shown to train it alike (benchmarks/foundation_steps.py; docs/architecture.md)
    assert re.fullmatch(r"[0-9a-f]{40}", record.get("rebuild_commit") or ""), record.get("rebuild_commit")
    if record["code_version"].endswith("-dirty"):
        assert record["rebuild_commit"][:7] in record["rebuild_commit_evidence"]


@pytest.mark.parametrize("change", ["preset", "vocabulary", "corpus"])
def test_a_foundation_that_drifted_from_the_code_is_refused_with_the_command_that_rebuilds_it(
        change, monkeypatch, tmp_path):
    if change == "preset":
        monkeypatch.setitem(models.TINY_CONFIG, "intermediate_size", 512)
    elif change == "vocabulary":
        monkeypatch.setattr(models, "CHAR_VOCAB", {**models.CHAR_VOCAB, "-": len(models.CHAR_VOCAB)})
    else:  # the corpus generator: one more noun changes which sentences are drawn
        monkeypatch.setattr(synth, "_NOUNS", synth._NOUNS + ["umbrella"])
    with pytest.raises(models.FoundationDrift, match=rf"different {change} .*{models.REBUILD_FOUNDATION}"):
        models.load_model(SHIPPED)
    # the CLI stops before anything is written: exit 2, naming the rebuild
    cfg = load_pipeline(REPO / "pipelines" / "demo.yaml", [f"output_dir={tmp_path / 'out'}"], check_paths=False)
    assert any(models.REBUILD_FOUNDATION in problem for problem in stages.model_problems(cfg))
    assert main(["run", str(REPO / "pipelines" / "demo.yaml"), f"output_dir={tmp_path / 'out'}",
                 f"corpus.root={tmp_path / 'corpus'}", f"data.cache_dir={tmp_path / 'cache'}"]) == EXIT_BAD_INPUT
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("pipeline", ["demo.yaml", "synthetic_benchmark.yaml"])
def test_no_sentence_a_pipeline_evaluates_on_was_in_the_foundations_training_split(pipeline):
    cfg = load_pipeline(REPO / "pipelines" / pipeline, check_paths=False)
    record = models.foundation_record(cfg.model.init_from)
    assert record is not None, f"{pipeline} does not start from a shipped foundation"
    foundation_plan = synth.plan_corpus(record["corpus"]["synth_utterances"], record["corpus"]["synth_seed"])
    trained_on = {u.text for u in foundation_plan if u.split == record["corpus"]["train_split"]}
    plan = synth.plan_corpus(cfg.corpus.synth_utterances, cfg.corpus.synth_seed)
    for split in cfg.corpus.eval_splits:
        evaluated = {u.text for u in plan if u.split == split}
        assert len(evaluated) >= 500, split
        assert not evaluated & trained_on, split


def _finished_foundation_run(root: Path) -> Path:
    """What ``pinch-ray run pipelines/foundation.yaml`` leaves, in small: the resolved config and
    a finished trial ``foundation``."""
    out = root / "out"
    cfg = load_pipeline(REPO / "pipelines" / "foundation.yaml", [f"output_dir={out}", "corpus.synth_utterances=200",
                                                                 "training.max_steps=3"], check_paths=False)
    out.mkdir(parents=True)
    (out / stages.CONFIG_FILE).write_text(dump_pipeline(cfg))
    model, processor = models.load_model("tiny", seed=5, **cfg.model.overrides)
    model.save_pretrained(out / FOUNDATION_TRIAL / "model")
    processor.save_pretrained(out / FOUNDATION_TRIAL / "model")
    metrics = {"wer": {"dev": 0.5, "test": 0.6}, "cer": {"dev": 0.2, "test": 0.3}, "training_seconds": 1.0,
               "params_total": sum(p.numel() for p in model.parameters()), "versions": {"torch": torch.__version__}}
    (out / FOUNDATION_TRIAL / METRICS_FILE).write_text(json.dumps(metrics))
    return out


def test_ship_writes_a_foundation_that_loads_by_name_and_a_failed_ship_keeps_the_old_one(tmp_path, monkeypatch):
    out = _finished_foundation_run(tmp_path)
    dest = tmp_path / "foundations"
    assert main(["foundation", "ship", str(out), "--name", "mine", "--dest", str(dest)]) == 0
    record = json.loads((dest / "mine" / models.FOUNDATION_FILE).read_text())
    assert record["corpus"] == {"synth_utterances": 200, "synth_seed": 0, "train_split": "train",
                                "eval_splits": ["dev", "test"]}
    assert record["training"]["max_steps"] == 3 and record["results"]["wer"]["test"] == 0.6
    # the commit that rebuilds it: this checkout's, unless files it tracks have uncommitted changes
    if "+g" in record["code_version"]:  # shipped from a git checkout
        assert (record["rebuild_commit"] is None) == ("uncommitted" in record) == record["code_version"].endswith("-dirty")
    assert record["fingerprint"] == models.foundation_fingerprint("tiny", {"do_stable_layer_norm": True},
                                                                  {"synth_utterances": 200, "synth_seed": 0})
    monkeypatch.setattr(models, "FOUNDATIONS_DIR", dest)
    assert models.foundation_names() == ["mine"]
    loaded, _ = models.load_model("mine")
    shipped, _ = models.load_model(str(out / FOUNDATION_TRIAL / "model"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), shipped.state_dict().values()))

    # a run whose output_dir was an object store: ship reads it at its URI
    assert main(["foundation", "ship", f"file://{out}", "--name", "from-uri", "--dest", str(dest)]) == 0
    assert json.loads((dest / "from-uri" / models.FOUNDATION_FILE).read_text())["fingerprint"] == record["fingerprint"]
    shutil.rmtree(dest / "from-uri")

    before = sorted(p.name for p in (dest / "mine").iterdir())
    (out / FOUNDATION_TRIAL / METRICS_FILE).unlink()  # an unfinished run: refused, the old one kept
    assert main(["foundation", "ship", str(out), "--name", "mine", "--dest", str(dest)]) == EXIT_BAD_INPUT
    assert sorted(p.name for p in (dest / "mine").iterdir()) == before
    assert sorted(p.name for p in dest.iterdir()) == ["mine"]  # no temporary left behind
    assert main(["foundation", "ship", str(tmp_path / "nothing"), "--dest", str(dest)]) == EXIT_BAD_INPUT
    # another foundation pipeline's run must be named: it would otherwise replace synth-tiny
    cfg = load_pipeline(out / stages.CONFIG_FILE, ["name=foundation-small"], check_paths=False)
    (out / stages.CONFIG_FILE).write_text(dump_pipeline(cfg))
    (out / FOUNDATION_TRIAL / METRICS_FILE).write_text(json.dumps({"wer": {"test": 0.5}}))
    with pytest.raises(ValueError, match="--name"):
        ship(out, None, dest)
    record = json.loads((ship(out, "synth-small", dest) / models.FOUNDATION_FILE).read_text())
    assert record["rebuild"] == ("pinch-ray run pipelines/foundation_small.yaml && "
                                 "pinch-ray foundation ship runs/foundation-small --name synth-small")


def test_ship_refuses_a_run_that_did_not_start_from_a_preset(tmp_path):
    out = _finished_foundation_run(tmp_path)
    cfg = load_pipeline(out / stages.CONFIG_FILE, ["model.init_from=facebook/wav2vec2-base"], check_paths=False)
    (out / stages.CONFIG_FILE).write_text(dump_pipeline(cfg))
    with pytest.raises(ValueError, match="a foundation starts from a tiny preset"):
        ship(out, "x", tmp_path / "dest")
    assert not (tmp_path / "dest" / "x").exists()
