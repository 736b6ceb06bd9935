"""One-pass compression on Ray Train: DDP workers, checkpoints, fault tolerance (CPU).

A failed run that is run again under its name resumes at its last checkpoint on exactly the batches
it had not trained: test_killed_driver proves it through the pipeline, test_multinode after a lost node."""

import json
import time
from pathlib import Path

import pytest
import torch

from pinch_ray.core import gates
from pinch_ray.config import ConfigError, DataConfig, GateConfig, ResourcesConfig, TrainConfig
from pinch_ray.data.synth import generate_corpus
from pinch_ray.data.prepare import prepare_split
from pinch_ray.core.models import CHAR_VOCAB, count_parameters, load_model, make_processor
from pinch_ray.core.scoring import score, transcribe_rows
from pinch_ray.data.batches import read_prepared_rows
from pinch_ray.core.compressor import Compressor
from pinch_ray.pipeline.runs import CHECKPOINT_MODEL, TRAIN_RESULT, load_checkpoint_state
from pinch_ray.pipeline.worker import MetricsLog, run_training, worker_config

from conftest import tensorboard_events

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_train_corpus") / "synth"
    generate_corpus(root, 60, seed=3, num_workers=2, progress=False)  # 48 train utterances
    cache = tmp_path_factory.mktemp("ray_train_prepared")
    # several shards per split: blocks that Ray may stream in any order unless told to keep it
    return {split: prepare_split(root, split, CHAR_VOCAB, DataConfig(rows_per_shard=16), cache_dir=cache)
            for split in ("train", "dev")}


def run(prepared, tmp_path, name, method="sspg", target=0.5, steps=12, workers=1, max_failures=0,
        checkpoint_every=4):
    train_cfg = TrainConfig(max_steps=steps, batch_size=4, warmup_steps=2, report_every=2,
                            checkpoint_every=checkpoint_every, eval_every=1000)
    config = worker_config("tiny", method, target, train_cfg, GateConfig(calibrate=False),
                           train_rows=prepared["train"].num_utterances, dev_path=prepared["dev"].path)
    resources = ResourcesConfig(num_workers=workers, cpus_per_worker=0.5, max_failures=max_failures)
    (tmp_path / name).mkdir(exist_ok=True)
    log = MetricsLog(tmp_path / name / "metrics.jsonl", tensorboard_dir=tmp_path / name / "tensorboard")
    return run_training(config, prepared["train"].dataset(), resources, name=name, storage_path=str(tmp_path),
                        callbacks=[log])


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the TensorBoard event files under ``directory``."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tensorboard_events(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def gated_model_from_checkpoint(directory, method, target):
    model, _ = load_model("tiny")
    compressor = Compressor.create(model, method, target, TrainConfig(max_steps=12), GateConfig(calibrate=False))
    compressor.load_state_dict(load_checkpoint_state(directory)["compressor"])
    return compressor


def test_two_workers_train_sspg_in_sync_survive_a_crash_and_checkpoint_matches(prepared, tmp_path, inject_faults):
    """Two DDP workers; rank 1 dies before step 7, Ray Train restarts the group from the step-4
    checkpoint (max_failures=1), and the run ends as one that never failed would (one run covers
    both: a Ray Train run costs ~20 s of start-up on 2 cores)."""
    marker = tmp_path / "crashed"
    inject_faults({"trial": "ddp", "step": 7, "rank": 1, "action": "exit", "marker": str(marker)})
    result = run(prepared, tmp_path, "ddp", workers=2, steps=16, max_failures=1)
    assert marker.exists(), "the fault was not injected"
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 16 and metrics["threshold_rank_spread"] == 0.0
    assert metrics["resumed_at"] == [4]  # the last checkpoint before step 7: nothing lost beyond it
    with result.checkpoint.as_directory() as directory:
        compressor = gated_model_from_checkpoint(directory, "sspg", 0.5)
        assert compressor.step_count == 16
        # 16 optimizer steps in all: Adam's step counter equals the planned steps (none repeated)
        adam_steps = {int(s["step"]) for s in load_checkpoint_state(directory)["compressor"]["optimizer"]["state"].values()}
        assert adam_steps == {16}
        # the reported dev scores are those of the checkpointed model on the dev split
        with torch.no_grad():
            dev = score(transcribe_rows(compressor.model, make_processor(), read_prepared_rows(prepared["dev"].path)))
        assert (metrics["dev_wer"], metrics["dev_cer"]) == (dev.wer, dev.cer)
        recomputed = compressor.on_basis(gates.achieved_sparsity(compressor.model))  # of all parameters
        assert recomputed == pytest.approx(metrics["hard_sparsity"], abs=1e-12)
        folded = __import__("transformers").AutoModelForCTC.from_pretrained(Path(directory) / CHECKPOINT_MODEL)
        assert count_parameters(folded).nonzero == count_parameters(compressor.model).nonzero
        train_result = json.loads((Path(directory) / TRAIN_RESULT).read_text())
    assert train_result["steps"] == 16 and train_result["achieved_sparsity"] == recomputed
    assert train_result["compression_seconds"] > 0
    # rank 0's every report, read back (the controller may still be writing the last one when fit returns)
    deadline = time.monotonic() + 30
    while "train/gated_sparsity" not in (scalars := tensorboard_scalars(tmp_path / "ddp" / "tensorboard")):
        assert time.monotonic() < deadline, sorted(scalars)
        time.sleep(0.5)
    assert sorted(scalars["train/ctc_loss"]) == list(range(2, 17, 2))
    for tag in ("train/lambda_1", "train/tau", "train/lr", "train/seconds", "train/soft_sparsity"):
        assert len(scalars[tag]) == 8, tag
    assert scalars["train/hard_sparsity"][16] == pytest.approx(metrics["hard_sparsity"], rel=1e-6)
    assert scalars["train/dev_wer"][16] == pytest.approx(metrics["dev_wer"], rel=1e-6)
    # rank 0's reports in order: the first group's up to its checkpoint at 4 (its report at step 6 may
    # or may not reach the driver before the crash does), then the restarted group's from step 6 on
    logged = [json.loads(line)["step"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert logged[:-6] in ([2, 4], [2, 4, 6]) and logged[-6:] == list(range(6, 17, 2)), logged


def test_resources_that_starve_the_data_stream_are_refused(prepared, tmp_path):
    config = worker_config("tiny", "dense", 0.0, TrainConfig(max_steps=2), GateConfig(),
                           train_rows=prepared["train"].num_utterances)
    with pytest.raises(ConfigError, match="leaving none for Ray Data"):
        run_training(config, prepared["train"].dataset(), ResourcesConfig(num_workers=2, cpus_per_worker=1),
                     name="starved", storage_path=str(tmp_path))


def test_a_trial_run_twice_trains_the_same_model(prepared, tmp_path):
    """Same settings and seed, same model: the seed covers the weights' start, the batch order,
    dropout and SpecAugment's time masks (transformers draws those from numpy's generator)."""
    assert TrainConfig().seed == 0 and load_model("tiny")[0].config.mask_time_prob > 0
    models = []
    for name in ("once", "twice"):
        result = run(prepared, tmp_path, name, steps=4, checkpoint_every=4)
        assert result.error is None
        with result.checkpoint.as_directory() as directory:
            models.append(load_checkpoint_state(directory)["compressor"]["model"])
    assert models[0].keys() == models[1].keys()
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_ump_runs_through_the_same_worker(prepared, tmp_path):
    """(dense runs through it in every pipeline test: test_pipeline, test_real_size, test_job_submit)"""
    method, target = "ump", 0.5
    result = run(prepared, tmp_path, method, method=method, target=target, steps=6)
    assert result.error is None and result.metrics["step"] == 6
    assert result.metrics["hard_sparsity"] == pytest.approx(target, abs=1e-3)
    with result.checkpoint.as_directory() as directory:
        compressor = gated_model_from_checkpoint(directory, method, target)
        assert compressor.step_count == 6
        before = {n: p for n, p in load_model("tiny")[0].named_parameters()}
        changed = [n for n, p in compressor.model.named_parameters() if n in before and not torch.equal(p, before[n])]
        assert changed  # the weights trained
