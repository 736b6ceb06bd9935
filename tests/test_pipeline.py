"""The pipeline runner end to end on a tiny corpus: every artifact, skipped reruns, a resumed sweep.

One module-scoped run serves every test: the sweep's ump trial is made to crash (fault injection,
max_failures=0), so the first ``stages.run`` fails in the compress stage with sspg finished; the
second run must reuse sspg untouched and resume ump from its last checkpoint. The runs' storage
(``storage_path``) is a ``file://`` URI, so Ray Train, Tune and pinch_ray go through pyarrow's
filesystem layer as they do for ``s3://`` / ``gs://`` (the job-submission test covers local storage).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pinch_ray.pipeline import stages
from pinch_ray.core import pruned_modeling
from pinch_ray.config import GateConfig, ResourcesConfig, load_pipeline
from pinch_ray.core.models import load_model
from pinch_ray.pipeline.report import METRICS_FILE
from pinch_ray.config import RUNS_DIR
from pinch_ray.pipeline.runs import (CHECKPOINT_SETTINGS, checkpoint_name, final_result_dir, read_checkpoint_settings,
                                     save_checkpoint)
from pinch_ray.pipeline.sweep import SETTINGS_ADDED, SettingsChangedError, max_concurrent_trials, reusable_result_dir

from conftest import benchmark, mtimes

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny-pipeline",
    "corpus": {"synth_utterances": 60, "eval_splits": ["dev"]},
    "training": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "report_every": 2, "checkpoint_every": 2,
                 "eval_every": 100, "distill_logits": 0.5},
    "baseline_training": {"max_steps": 6, "torch_threads": 1},
    "sweep": {"methods": ["sspg", "sspg-neuron", "ump"], "target_sparsities": [0.5]},
    "resources": {"cpus_per_worker": 0.5, "max_failures": 0},
    "evaluation": {"batch_size": 8},
}
TRIALS = ("foundation", "dense", "sspg-0.5", "sspg-neuron-0.5", "ump-0.5")


def local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory, faults_file):
    root = tmp_path_factory.mktemp("pipeline")
    spec = {**TINY, "output_dir": str(root / "out"),
            "data": {"cache_dir": str(root / "cache"), "bucket_window_batches": 3},
            "corpus": {**TINY["corpus"], "root": str(root / "corpus")}, "storage_path": f"file://{root / 'store'}"}
    (root / "tiny.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_pipeline(root / "tiny.yaml")
    out = Path(cfg.output_dir)
    faults_file.write_text(json.dumps([{"trial": "ump-0.5", "step": 3, "rank": 0, "action": "exit",
                                        "marker": str(root / "ump-crashed")}]))
    try:
        with pytest.raises(RuntimeError, match="ump-0.5"):
            stages.run(cfg)
    finally:
        faults_file.write_text("[]")
    assert (root / "ump-crashed").exists(), "the fault was not injected"
    store = local(cfg.run_storage())
    interrupted = {"sspg_run": mtimes(local(final_result_dir(cfg.run_storage(), "sspg-0.5"))),
                   "dense_run": mtimes(store / "foundation"),
                   "markers": sorted(p.name for p in (out / stages.STAGES_DIR).iterdir()),
                   "ump_final": final_result_dir(cfg.run_storage(), "ump-0.5")}
    outputs = stages.run(cfg)
    return {"cfg": cfg, "out": out, "store": store, "outputs": outputs, "interrupted": interrupted}


def result(finished, trial: str) -> dict:
    return json.loads((local(final_result_dir(finished["cfg"].run_storage(), trial)) / "train_result.json").read_text())


def test_interrupted_sweep_keeps_finished_trials_and_resumes_the_rest(finished):
    store, interrupted = finished["store"], finished["interrupted"]
    assert interrupted["markers"] == ["baseline.done", "prepare.done"]  # compress never marked done
    assert interrupted["ump_final"] is None
    # finished runs were reused, not retrained: every file keeps its modification time
    assert mtimes(local(final_result_dir(finished["cfg"].run_storage(), "sspg-0.5"))) == interrupted["sspg_run"]
    assert mtimes(store / "foundation") == interrupted["dense_run"]
    # the crashed trial resumed from its checkpoint at step 2 and finished
    ump = result(finished, "ump-0.5")
    assert ump["steps"] == 4 and ump["resumed_at"] == [2]
    # every checkpoint records the settings it trained with (what a resume is checked against)
    assert read_checkpoint_settings(store / "ump-0.5" / checkpoint_name(2)) == ump["settings"]


def test_an_unfinished_run_resumes_only_under_its_own_settings(tmp_path):
    job = SimpleNamespace(storage_path=str(tmp_path))
    checkpoint = tmp_path / "ump-0.5" / checkpoint_name(2)
    checkpoint.mkdir(parents=True)
    save_checkpoint(checkpoint, {}, {"epoch": 0}, {"training": {"lr": 0.001}})
    assert reusable_result_dir(job, "ump-0.5", {"settings": {"training": {"lr": 0.001}}}) is None  # resumes
    with pytest.raises(SettingsChangedError, match=r"ump-0\.5: an unfinished run \(checkpoint step-0000002\) "
                                                   r"with other settings .*training\.lr: 0\.001 -> 0\.002"):
        reusable_result_dir(job, "ump-0.5", {"settings": {"training": {"lr": 0.002}}})
    (checkpoint / CHECKPOINT_SETTINGS).unlink()  # a checkpoint of an older pinch_ray: resumed as before
    assert reusable_result_dir(job, "ump-0.5", {"settings": {"training": {"lr": 0.002}}}) is None


def test_a_setting_added_later_keeps_earlier_runs_at_its_older_value(tmp_path):
    """Runs recorded before gates.regrow existed trained without regrowth: they resume (or are
    reused) while it is off, and a run asking for it is told what changed."""
    job = SimpleNamespace(storage_path=str(tmp_path))
    checkpoint = tmp_path / "sspg-0.5" / checkpoint_name(2)
    checkpoint.mkdir(parents=True)
    save_checkpoint(checkpoint, {}, {"epoch": 0}, {"gates": {"tau_end": 0.005}})
    assert "gates.regrow" in SETTINGS_ADDED and not GateConfig().regrow
    assert reusable_result_dir(job, "sspg-0.5", {"settings": {"gates": {"tau_end": 0.005, "regrow": False}}}) is None
    with pytest.raises(SettingsChangedError, match=r"gates\.regrow: False -> True"):
        reusable_result_dir(job, "sspg-0.5", {"settings": {"gates": {"tau_end": 0.005, "regrow": True}}})
    with pytest.raises(SettingsChangedError, match=r"gates\.tau_end: 0\.005 -> None"):  # others stay strict
        reusable_result_dir(job, "sspg-0.5", {"settings": {"gates": {"regrow": False}}})


def test_a_gate_setting_a_method_does_not_read_leaves_its_runs_reusable(tmp_path):
    """gmp ignores the masked update and the temperature: a finished gmp run is reused when they
    change (a new default included); sspg's is not, and gmp's own settings stay strict."""
    job = SimpleNamespace(storage_path=str(tmp_path))
    recorded = {"gates": {"masked_update": False, "tau_start": 0.01, "mask_update_every": 10,
                          "gate_feature_encoder": True}}
    for method in ("gmp", "sspg"):
        checkpoint = tmp_path / f"{method}-0.5" / checkpoint_name(2)
        checkpoint.mkdir(parents=True)
        save_checkpoint(checkpoint, {}, {"epoch": 0}, {"method": method, **recorded})
    changed = {"masked_update": True, "tau_start": 0.05, "mask_update_every": 10, "gate_feature_encoder": False}
    assert reusable_result_dir(job, "gmp-0.5", {"settings": {"method": "gmp", "gates": changed}}) is None  # resumes
    with pytest.raises(SettingsChangedError, match=r"gates\.mask_update_every: 10 -> 20"):
        reusable_result_dir(job, "gmp-0.5", {"settings": {"method": "gmp", "gates": {**changed, "mask_update_every": 20}}})
    with pytest.raises(SettingsChangedError, match=r"gates\.gate_feature_encoder: True -> False; gates\.masked_update: "
                                                   r"False -> True; gates\.tau_start: 0\.01 -> 0\.05"):
        reusable_result_dir(job, "sspg-0.5", {"settings": {"method": "sspg", "gates": changed}})


def test_every_artifact_is_written(finished):
    out, cfg = finished["out"], finished["cfg"]
    for name in ("summary.json", "summary.md", "wer_vs_params.png", "pipeline.yaml"):
        assert (out / name).is_file(), name
    assert load_pipeline(out / "pipeline.yaml") == cfg
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(t["trial"] for t in summary["trials"]) == sorted(TRIALS)
    for trial in TRIALS:
        metrics = json.loads((out / trial / METRICS_FILE).read_text())
        assert (out / trial / "model" / "config.json").is_file()
        assert (out / trial / "compact" / "manifest.json").is_file()
        assert (out / trial / "hypotheses" / "dev.txt").is_file()
        assert metrics["trial"] == trial and set(metrics["wer"]) == {"dev"}
        assert (metrics["p_value_vs_dense"]["dev"] is None) == (trial == "dense")
    for stage in stages.STAGES:
        assert stages.marker_path(out, stage).is_file()
    # the dense reference and the compression trials started from the baseline ("foundation", its own
    # budget) and got the same number of steps
    assert finished["outputs"]["compress"].keys() == {"dense", "sspg-0.5", "sspg-neuron-0.5", "ump-0.5"}
    start = result(finished, "foundation")
    assert start["steps"] == 6 and start["init_from"] == "tiny"
    for trial in ("dense", "sspg-0.5", "sspg-neuron-0.5", "ump-0.5"):  # loaded from the store, by URI
        assert result(finished, trial)["steps"] == 4
        assert result(finished, trial)["init_from"] == final_result_dir(cfg.run_storage(), "foundation") + "/model"
    assert not (out / RUNS_DIR).exists()  # every run and checkpoint went to storage_path
    assert [t["trial"] for t in summary["trials"]][:2] == ["foundation", "dense"]
    # every compressed trial at its target, of ALL parameters (calibrated after 4 steps; ump exact),
    # measured on the exported model: weight level within half a point; whole units (heads beside
    # neurons and conv channels, calibrated after 4 steps) within 1.5 points
    for trial, tolerance in (("sspg-0.5", 0.005), ("sspg-neuron-0.5", 0.015), ("ump-0.5", 0.005)):
        metrics = json.loads((out / trial / METRICS_FILE).read_text())
        assert metrics["target_basis"] == "params" and abs(metrics["achieved_sparsity"] - 0.5) <= tolerance, metrics
        assert metrics["param_reduction"] == pytest.approx(metrics["achieved_sparsity"], abs=1e-4)
        assert metrics["gated_sparsity"] > 0.5  # the gated layers are not the whole model
    # the neuron-pruned trial: physically smaller, with its loader, at its target (+-1 pt)
    neuron = out / "sspg-neuron-0.5"
    assert (neuron / "model" / pruned_modeling.MODULE_FILE).is_file()
    metrics = json.loads((neuron / METRICS_FILE).read_text())
    model, _ = load_model(str(neuron / "model"))
    assert sum(p.numel() for p in model.parameters()) == metrics["params_nonzero"] < metrics["params_total"]
    # benchmarks/inference_speed.py --trained: the exported models timed side by side, with their WER
    speed = benchmark("inference_speed").trained_pairs(str(out), seconds=0.25, repeats=1, batch8_repeats=1,
                                                       device="cpu")
    assert speed["references"] == {"dense": {"params": metrics["params_total"],
                                             "wer": json.loads((out / "dense" / METRICS_FILE).read_text())["wer"]}}
    timed = speed["sspg-neuron-0.5"]
    assert timed["dense_reference"] == metrics["dense_reference"] == "dense"
    assert timed["params"] == metrics["params_nonzero"] and timed["wer"] == metrics["wer"]
    for batch in (1, 8):  # the speedup is the two times' ratio (each rounded to 0.1 ms), not any positive number
        pair = timed[f"batch_{batch}"]
        dense_s, pruned_s, half = pair["dense_s"], pair["neuron_pruned_s"], 5e-5
        assert pair.keys() == {"dense_s", "neuron_pruned_s", "speedup"} and pruned_s > half
        assert (dense_s - half) / (pruned_s + half) - 5e-4 <= pair["speedup"] <= (dense_s + half) / (pruned_s - half) + 5e-4


def test_every_run_logs_its_curves_for_tensorboard_and_tune(finished):
    out, store = finished["out"], finished["store"]
    for trial in TRIALS:  # rank 0's metrics of every report: JSON lines and TensorBoard events
        logged = [json.loads(line) for line in (out / "logs" / f"{trial}.jsonl").read_text().splitlines()]
        assert logged[-1]["step"] == (6 if trial == "foundation" else 4) and "ctc_loss" in logged[-1]
        # the compression trials learn from the model they started from too; the dense runs never
        assert ("distill_logits" in logged[-1]) == (trial not in ("foundation", "dense")), trial
        assert list((out / "logs" / trial).glob("events.out.tfevents.*")), trial
    # the sweep's trials report every report's metrics to Tune too, not only where they ended (a
    # trial reused by the rerun reports only its result; ump resumed there after its crash)
    curves = {}
    for path in (store / "sweep").glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [row["step"] for row in rows if "ctc_loss" in row]
        if rows and "result_dir" in rows[-1] and steps:
            curves[rows[-1]["trial"]] = steps
    assert curves.keys() == {"dense", "sspg-0.5", "sspg-neuron-0.5", "ump-0.5"}
    assert all(steps[-1] == 4 for steps in curves.values()), curves


def test_rerun_skips_every_stage_and_touches_nothing(finished, caplog):
    out, store = finished["out"], finished["store"]
    before = {**mtimes(out), **{f"store/{path}": mtime for path, mtime in mtimes(store).items()}}
    with caplog.at_level("INFO", logger="pinch_ray.pipeline.stages"):
        stages.run(finished["cfg"])
    assert caplog.text.count("already done") == len(stages.STAGES)
    after = {**mtimes(out), **{f"store/{path}": mtime for path, mtime in mtimes(store).items()}}
    changed = [path for path, mtime in before.items() if after.get(path) != mtime and path != "pipeline.yaml"]
    assert changed == []


def test_only_and_from_stage_through_the_command_line(finished, monkeypatch, caplog):
    """``pinch-ray run --only`` / ``--from-stage`` as users type them: the stage named (and, from it,
    the later ones) runs again, the others are skipped, finished training runs are reused."""
    from pinch_ray import cli

    monkeypatch.setattr(cli, "_init_ray", lambda verbose: None)  # the session's cluster
    out, store, yaml_path = finished["out"], finished["store"], Path(finished["cfg"].output_dir).parent / "tiny.yaml"
    runs_before, trials_before = mtimes(store), {trial: mtimes(out / trial) for trial in TRIALS}
    markers = {stage: stages.marker_path(out, stage).stat().st_mtime_ns for stage in stages.STAGES}

    with caplog.at_level("INFO", logger="pinch_ray.pipeline.stages"):
        assert cli.main(["run", str(yaml_path), "--only", "baseline"]) == cli.EXIT_OK
    assert "[stage 1/4] prepare ... already done" in caplog.text and "[stage 2/4] baseline ... done in" in caplog.text
    assert "[stage 3/4]" not in caplog.text  # --only: nothing after it
    assert stages.marker_path(out, "baseline").stat().st_mtime_ns != markers["baseline"]
    assert mtimes(store) == runs_before  # the finished foundation run was reused, not retrained

    caplog.clear()
    with caplog.at_level("INFO", logger="pinch_ray.pipeline.stages"):
        assert cli.main(["run", str(yaml_path), "--from-stage", "finalize"]) == cli.EXIT_OK
    assert caplog.text.count("already done") == 3 and "[stage 4/4] finalize ... done in" in caplog.text
    assert mtimes(store) == runs_before
    for trial in TRIALS:  # every trial directory written again, each file of it
        rewritten = mtimes(out / trial)
        assert rewritten.keys() == trials_before[trial].keys() and not set(rewritten.items()) & set(
            trials_before[trial].items()), trial


def test_evaluate_scores_an_exported_model_as_finalize_did(finished, capsys, monkeypatch):
    """``pinch-ray evaluate``'s success path: the trial's exported model on the dev split, through
    the prepared cache the run left, gives the WER and CER finalize recorded."""
    from pinch_ray import cli

    monkeypatch.setattr(cli, "_init_ray", lambda verbose: None)  # the session's cluster
    cfg, out = finished["cfg"], finished["out"]
    metrics = json.loads((out / "sspg-0.5" / METRICS_FILE).read_text())
    code = cli.main(["evaluate", str(out / "sspg-0.5" / "model"), "--corpus", cfg.corpus.root, "--split", "dev",
                     "--batch-size", str(cfg.evaluation.batch_size), "--cache-dir", cfg.data.cache_dir])
    assert code == cli.EXIT_OK
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["num_utterances"] == finished["outputs"]["prepare"]["dev"]["num_utterances"]
    assert (printed["wer"], printed["cer"]) == (metrics["wer"]["dev"], metrics["cer"]["dev"])


def test_batched_evaluation_of_a_model_without_attention_mask_stays_near_one_utterance_at_a_time(finished):
    """wav2vec2-base's processor says return_attention_mask=False (group norm over time in its
    first conv layer): a batch is zero-padded into the model, which changes the logits of every
    utterance shorter than the longest; decoding one utterance at a time has no padding.

    Allowed: 3 points of WER. Measured 1.4 (4 words of 289; 7 of 48 hypotheses changed) with the
    shipped synth-tiny foundation, a group-norm model trained with attention masks (so never on
    padding: the worst case; wav2vec2-base fine-tuned without masks trains on such padding), in
    batches of 16 length-sorted utterances (5-20% padding). More would mean batches that mix very
    different lengths (the bucketing broke) or padding reaching the decoder (frame lengths lost)."""
    from pinch_ray.core.scoring import score, transcribe_rows
    from pinch_ray.data.batches import read_prepared_rows

    model, processor = load_model("synth-tiny")
    processor.feature_extractor.return_attention_mask = False
    rows = list(read_prepared_rows(finished["outputs"]["prepare"]["train"]["path"]))  # 48 utterances
    one_at_a_time = score(transcribe_rows(model, processor, rows, batch_size=1))
    batched = score(transcribe_rows(model, processor, rows, batch_size=16))
    assert one_at_a_time.num_words == batched.num_words > 200
    assert one_at_a_time.wer < 0.2  # a model that transcribes: differences in its words mean something
    assert abs(batched.wer - one_at_a_time.wer) <= 0.03, (batched, one_at_a_time)


def test_finished_trials_are_reused_only_under_their_own_settings(finished):
    cfg, store = finished["cfg"], finished["store"]
    foundation, sspg = result(finished, "foundation")["settings"], result(finished, "sspg-0.5")["settings"]
    assert "gates" not in foundation and sspg["gates"]["tau_end"] == cfg.gates.tau_end
    assert sspg["init_from"] == {"run_settings": foundation}  # what it started from, not where
    assert "report_every" not in sspg["training"] and sspg["training"]["lr"] == cfg.training.lr
    assert sspg["bucket_window_batches"] == cfg.data.bucket_window_batches == 3  # reaches the workers' batches
    # A new output_dir on the same run storage, with one gate setting changed: the foundation and
    # the dense reference (checked first; gates do not concern them) are reused; the sspg trials,
    # trained with the old value, stop the run before anything trains, saying what changed; a
    # changed report interval changes no weights and is no reason to retrain; nothing is touched.
    before = mtimes(store)
    changed = load_pipeline(finished["cfg"].output_dir + "/pipeline.yaml",
                            overrides=[f"output_dir={Path(cfg.output_dir).parent / 'changed'}",
                                       "gates.tau_end=0.004", "training.report_every=1"])
    with pytest.raises(SettingsChangedError, match=r"sspg-0\.5: .*gates\.tau_end: 0\.005 -> 0\.004"):
        stages.run(changed)
    assert mtimes(store) == before
    assert stages.marker_path(changed.output_dir, "baseline").is_file()  # the foundation was reused
    assert not stages.marker_path(changed.output_dir, "compress").exists()


def test_stage_selection():
    assert stages.stages_to_run() == set()
    assert stages.stages_to_run(from_stage="compress") == {"compress", "finalize"}
    assert stages.stages_to_run(only="baseline") == {"baseline"}
    with pytest.raises(ValueError, match="unknown stage"):
        stages.stages_to_run(only="train")
    with pytest.raises(ValueError, match="not both"):
        stages.stages_to_run(from_stage="prepare", only="finalize")


def test_sweep_concurrency_fits_the_cluster_and_queues_the_rest():
    cpu = ResourcesConfig(cpus_per_worker=0.5)
    assert max_concurrent_trials(cpu, 3, {"CPU": 2}) == 2  # one CPU left for Ray Data
    assert max_concurrent_trials(cpu, 8, {"CPU": 1}) == 1  # too small a cluster: one at a time, the rest queue
    assert max_concurrent_trials(cpu, 3, {"CPU": 64}) == 3
    assert max_concurrent_trials(cpu, 3, {"CPU": 64}, requested=1) == 1
    gpu = ResourcesConfig(cpus_per_worker=1, use_gpu=True, gpus_per_worker=0.25)
    assert max_concurrent_trials(gpu, 8, {"CPU": 16, "GPU": 1}) == 4  # four small trials share one GPU


def test_evaluation_asks_for_gpus_the_cluster_has_or_can_grow_to():
    def gpus(cluster, *overrides):
        cfg = load_pipeline(None, list(overrides))
        return stages.evaluation_settings(cfg, cluster).gpus_per_actor

    assert gpus({"CPU": 8}) == 0.0
    assert gpus({"CPU": 8, "GPU": 2}) == 1.0
    # an autoscaling cluster whose GPU nodes are not up yet when finalize starts
    assert gpus({"CPU": 8}, "resources.cluster_max={GPU: 16}") == 1.0
    assert gpus({"CPU": 8, "GPU": 2}, "evaluation.gpus_per_actor=0") == 0.0  # set: kept as it is
    assert gpus({"CPU": 8}, "evaluation.gpus_per_actor=0.5") == 0.5


def test_seeds_and_the_two_stage_baseline_from_a_pretrained_start(ray_cluster, tmp_path):
    """From a "pre-trained" model (init_from_dense: false, the paper pipelines' shape) over seeds:
    the sweep trains a dense reference per seed (the baseline stage none), every (method, target)
    runs once per seed, two-stage prunes the finished dense run of its seed (second wave) and its
    time includes it; summary.md pools each group's seeds against their own references. (sspg from
    a pre-trained start runs in test_real_size; one method here keeps this run to four trials.)
    Then an ablation reuses those dense references (sweep.dense_from) for sspg beside a peer."""
    no_foundation = {key: value for key, value in TINY.items() if key != "baseline_training"}  # nothing uses it
    spec = {**no_foundation, "output_dir": str(tmp_path / "out"), "data": {"cache_dir": str(tmp_path / "cache")},
            "corpus": {**TINY["corpus"], "root": str(tmp_path / "corpus")},
            "training": {**TINY["training"], "max_steps": 2},
            "sweep": {"methods": ["two-stage"], "target_sparsities": [0.5], "seeds": [0, 1],
                      "init_from_dense": False},
            "evaluation": {**TINY["evaluation"], "num_actors": 0}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_pipeline(tmp_path / "p.yaml")
    outputs = stages.run(cfg)
    out = Path(cfg.output_dir)
    outputs_first = outputs["compress"]
    assert outputs["baseline"] == {}
    assert sorted(outputs["compress"]) == ["dense-seed0", "dense-seed1", "two-stage-0.5-seed0", "two-stage-0.5-seed1"]
    runs = {name: json.loads((Path(path) / "train_result.json").read_text())
            for name, path in {**outputs["baseline"], **outputs["compress"]}.items()}
    assert [runs[f"two-stage-0.5-seed{k}"]["seed"] for k in (0, 1)] == [0, 1]
    assert runs["two-stage-0.5-seed1"]["settings"]["training"]["seed"] == 1
    assert [runs[f"dense-seed{k}"]["settings"]["training"]["seed"] for k in (0, 1)] == [0, 1]
    for k in (0, 1):  # two-stage: the finished dense run of its seed, pruned by magnitude and fine-tuned
        assert runs[f"two-stage-0.5-seed{k}"]["init_from"] == outputs["compress"][f"dense-seed{k}"] + "/model"
        metrics = json.loads((out / f"two-stage-0.5-seed{k}" / METRICS_FILE).read_text())
        assert metrics["dense_reference"] == f"dense-seed{k}"
        assert metrics["compression_seconds"] == pytest.approx(
            runs[f"dense-seed{k}"]["compression_seconds"] + runs[f"two-stage-0.5-seed{k}"]["compression_seconds"])
        assert metrics["training_seconds"] == pytest.approx(runs[f"two-stage-0.5-seed{k}"]["compression_seconds"])
        assert abs(metrics["achieved_sparsity"] - 0.5) <= 0.01
    summary = json.loads((out / "summary.json").read_text())
    groups = {g["trial"]: g for g in summary["over_seeds"]}
    assert set(groups) == {"dense", "two-stage-0.5"}
    assert groups.pop("dense")["p_value_pooled_vs_dense"] == {}  # the references themselves
    for group in groups.values():
        assert group["seeds"] == [0, 1] and set(group["p_value_pooled_vs_dense"]) == {"dev"}
        wers = [json.loads((out / f"{group['trial']}-seed{k}" / METRICS_FILE).read_text())["wer"]["dev"] for k in (0, 1)]
        assert group["wer_mean"]["dev"] == pytest.approx(sum(wers) / 2)
    assert "## Over seeds" in (out / "summary.md").read_text()

    # An ablation beside it reuses its dense reference (sweep.dense_from): sspg and a peer (movement)
    # at the same target, compared with each other; no dense run is trained here (one seed: two trials).
    ablation = {**spec, "name": "ablation", "output_dir": str(tmp_path / "ablation"),
                "sweep": {**spec["sweep"], "methods": ["sspg", "movement"], "seeds": [1], "dense_from": str(out)}}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(ablation))
    outputs = stages.run(load_pipeline(tmp_path / "ablation.yaml"))
    assert outputs["compress"]["dense-seed1"] == outputs_first["dense-seed1"]  # the earlier run's
    assert sorted(outputs["compress"]) == ["dense-seed1", "movement-0.5-seed1", "sspg-0.5-seed1"]
    assert not (tmp_path / "ablation" / RUNS_DIR / "dense-seed1").exists()
    summary = json.loads((tmp_path / "ablation" / "summary.json").read_text())
    assert [(e["method"], e["seeds"]) for e in summary["peers"]] == [("sspg", [1]), ("movement", [1])]
    assert set(summary["peers"][1]["p_value_pooled_vs_sspg"]) == {"dev"}
    movement = json.loads((tmp_path / "ablation" / "movement-0.5-seed1" / METRICS_FILE).read_text())
    assert movement["dense_reference"] == "dense-seed1" and abs(movement["achieved_sparsity"] - 0.5) < 1e-5
    # a reference trained with other settings there is refused before anything trains
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump({**ablation, "output_dir": str(tmp_path / "changed"),
                                                          "training": {**spec["training"], "lr": 0.01}}))
    with pytest.raises(SettingsChangedError, match=r"sweep\.dense_from: trial dense-seed1: a finished run .*lr"):
        stages.run(load_pipeline(tmp_path / "changed.yaml"))
    assert not (tmp_path / "changed" / RUNS_DIR).exists()
