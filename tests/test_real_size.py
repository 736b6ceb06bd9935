"""The paper's wav2vec2-base pipeline rehearsed at full size: the shipped YAML, a stand-in for
``facebook/wav2vec2-base`` laid out as on the hub, and a tiny synthetic corpus.

The stand-in is the real architecture at full size with random weights: ``Wav2Vec2ForPreTraining``
with the default config (94.4M parameters once a CTC head is added), its feature extractor, no CTC
head and no tokenizer, saved with ``save_pretrained``. Only the corpus, the step counts, the
resources and the methods are overridden; every target is a fraction of all parameters, as the paper
counts. The run trains sspg and the two-stage baseline (which needs the dense trial); ump, which
applies two-stage's magnitude masks to the checkpoint instead of the dense trial, is checked up to
its reachable targets (it trains at tiny size in test_pipeline).
"""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCTC, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

from pinch_ray.pipeline import stages
from pinch_ray.config import load_pipeline
from pinch_ray.pipeline.report import METRICS_FILE

pytestmark = pytest.mark.slow

PIPELINE = Path(__file__).parents[1] / "pipelines" / "wav2vec2_base_ls100.yaml"


def hub_stand_in(directory: Path) -> Path:
    """``facebook/wav2vec2-base`` as the hub lays it out, with random weights (no CTC head, no tokenizer)."""
    Wav2Vec2ForPreTraining(Wav2Vec2Config()).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(directory)
    return directory


def test_wav2vec2_base_pipeline_runs_end_to_end_at_full_size(ray_cluster, tmp_path, monkeypatch):
    # every path relative, as a user types them: the checkpoint's even looks like a hub id, and the
    # Ray workers that load it do not run in this working directory
    monkeypatch.chdir(tmp_path)
    hub_stand_in(tmp_path / "checkpoints" / "wav2vec2-base")
    overrides = ["model.init_from=checkpoints/wav2vec2-base",
                 "corpus.root=corpus", "corpus.synth_utterances=40", "corpus.layout=auto",
                 "corpus.train_split=train", "corpus.eval_splits=[test]",
                 "data.cache_dir=cache", "output_dir=out",
                 "training.max_steps=3", "training.batch_size=2", "training.warmup_steps=1",
                 "training.report_every=1", "training.checkpoint_every=3", "training.eval_every=0",
                 "training.torch_threads=1", "resources.num_workers=1", "resources.use_gpu=false",
                 "resources.cpus_per_worker=0.5", "sweep.target_sparsities=[0.65]", "evaluation.batch_size=4",
                 # six test utterances, transcribed in the driver: an evaluation actor would need each
                 # trial's 360 MB model shipped through the 300 MB test object store (it spilled)
                 "evaluation.num_actors=0"]
    cfg = load_pipeline(PIPELINE, overrides)
    assert stages.model_problems(cfg) == []
    # sspg gates the linear layers and the positional conv (the YAML leaves the frozen conv feature
    # encoder out), ump and two-stage the linear layers alone
    unreachable = "target_sparsity: 0.95 of all 94,396,320 parameters cannot be removed: the gated layers hold "
    assert stages.model_problems(load_pipeline(PIPELINE, [*overrides, "sweep.target_sparsities=[0.95]",
                                                          "sweep.method_targets={}"])) == [
        f"sweep (sspg-0.95): {unreachable}90,046,464 (95.4%), so at most 0.944 is reachable; lower the target, "
        "or gate more layers (gates.patterns; gates.gate_feature_encoder and gate_pos_conv, if off)",
        *(f"sweep ({method}-0.95): {unreachable}85,327,872 (90.4%), so at most 0.895 is reachable; lower the "
          f"target, or give it more layers (gates.patterns: {method} prunes those alone, no conv layer)"
          for method in ("ump", "two-stage"))]

    trained = load_pipeline(PIPELINE, [*overrides, "sweep.methods=[sspg,two-stage]",
                                       "sweep.method_targets={two-stage: [0.65]}"])
    stages.run(trained)
    out = Path(trained.output_dir)
    summary = json.loads((out / "summary.json").read_text())
    trials = ["dense", "sspg-0.65", "two-stage-0.65"]
    assert sorted(t["trial"] for t in summary["trials"]) == trials
    for trial in trials:
        metrics = json.loads((out / trial / METRICS_FILE).read_text())
        model = AutoModelForCTC.from_pretrained(out / trial / "model")  # stock transformers, no pinch_ray
        assert type(model).__name__ == "Wav2Vec2ForCTC" and model.config.vocab_size == 32
        assert metrics["params_total"] == sum(p.numel() for p in model.parameters()) == 94_396_320
        target = 0.0 if trial == "dense" else 0.65
        # the paper's accounting: 65% of ALL parameters removed, measured on the exported model
        assert metrics["param_reduction"] == pytest.approx(target, abs=0.005), (trial, metrics["param_reduction"])
        assert metrics["compression_ratio"] == pytest.approx(1 / (1 - metrics["param_reduction"]))
        assert metrics["compact_ratio"] <= 0.21 or trial == "dense"
        assert (out / trial / "compact" / "manifest.json").is_file()
        assert (out / trial / "hypotheses" / "test.txt").is_file()
        # finalize's time, by part (the goal, 20 s besides evaluation at base size, is measured by
        # benchmarks/real_size.py: a clock here fails in a slow hour on a shared machine)
        assert "evaluation" in metrics["finalize_seconds"] and min(metrics["finalize_seconds"].values()) >= 0
    table = (out / "summary.md").read_text()
    assert "| sspg-0.65 | sspg | 0.65 | 0.65" in table and "2.86x" in table
