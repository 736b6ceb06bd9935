"""A killed driver: ``pinch-ray run`` is SIGKILLed while a trial trains, and the same command run
again finishes the job as if nothing had happened.

The driver joins the session's Ray cluster (``RAY_ADDRESS``), as a job submitted to a cluster does,
so killing it leaves the cluster up and Ray cleans up the job's trials and workers. Trials run one
at a time, 12 steps each (one epoch): ``sspg-0.4`` finishes, then ``ump-0.4`` hangs before step 6
(fault injection), after its checkpoint at step 4, and the driver is killed there. The rerun must reuse ``sspg-0.4`` untouched,
resume ``ump-0.4`` at step 4 and train the rest of its epoch on exactly the utterances it had not
reached: none repeated, none skipped (the step trace records every step's utterance ids).

Everything the run writes goes to an object store (``file://`` URIs stand in for ``s3://``): the
prepared shards, the runs and checkpoints, and the output directory, which each driver writes
through a staging copy of its own; the rerun starts from an empty one, as a new driver machine would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pinch_ray import storage
from pinch_ray.config import load_pipeline
from pinch_ray.data.batches import read_prepared_rows
from pinch_ray.pipeline.runs import final_result_dir, read_train_result, run_dir

from conftest import mtimes

pytestmark = pytest.mark.slow

BATCH, MAX_STEPS, HANG_AT, CHECKPOINT_EVERY = 4, 12, 6, 4  # 12 steps: one epoch
PIPELINE = {
    "name": "killed-driver",
    "corpus": {"synth_utterances": 60, "eval_splits": ["dev"]},  # 48 train utterances: 12 steps an epoch
    "dense_baseline": False,
    "training": {"max_steps": MAX_STEPS, "batch_size": BATCH, "warmup_steps": 1, "report_every": 2,
                 "checkpoint_every": CHECKPOINT_EVERY, "eval_every": 100, "torch_threads": 1},
    "sweep": {"methods": ["sspg", "ump"], "target_sparsities": [0.4], "init_from_dense": False,
              "max_concurrent_trials": 1},
    "resources": {"cpus_per_worker": 0.5, "max_failures": 0},
    "evaluation": {"batch_size": 8, "num_actors": 0},
}


def wait_for(condition, what: str, driver: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            driver.kill()
            pytest.fail(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_killed_driver_rerun_reuses_finished_trials_and_resumes_exactly(ray_cluster, inject_faults, trace_dir,
                                                                         tmp_path):
    spec = {**PIPELINE, "output_dir": f"file://{tmp_path}/out",
            "corpus": {**PIPELINE["corpus"], "root": str(tmp_path / "corpus")},
            "data": {"cache_dir": f"file://{tmp_path}/cache", "rows_per_shard": 8}}
    pipeline = tmp_path / "killed.yaml"
    pipeline.write_text(yaml.safe_dump(spec))
    cfg = load_pipeline(pipeline)
    hung = tmp_path / "ump-hung"
    inject_faults({"trial": "ump-0.4", "step": HANG_AT, "rank": 0, "action": "hang", "marker": str(hung)})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           storage.STAGING_ENV: str(tmp_path / "staging-first")}
    command = [sys.executable, "-m", "pinch_ray.cli", "run", str(pipeline)]
    assert cfg.run_storage() == f"file://{tmp_path}/out/runs"
    store = tmp_path / "out" / "runs"
    snapshot = Path(storage.local_path(run_dir(cfg.run_storage(), "ump-0.4"))) / "checkpoint_manager_snapshot.json"

    first_log = tmp_path / "first.log"
    with open(first_log, "w") as out:
        driver = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # killed once ump-0.4 hangs and Ray Train has registered its step-4 checkpoint
            wait_for(lambda: hung.exists() and snapshot.exists() and "step-0000004" in snapshot.read_text(),
                     "registered checkpoint of the hung trial", driver, first_log)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert final_result_dir(cfg.run_storage(), "ump-0.4") is None
    sspg_done = final_result_dir(cfg.run_storage(), "sspg-0.4")
    assert sspg_done is not None, "sspg-0.4 should have finished before ump-0.4 started"
    sspg_files = mtimes(store / "sspg-0.4")
    assert (tmp_path / "out" / ".stages" / "prepare.done").is_file()  # uploaded when the stage finished
    assert not (tmp_path / "out" / ".stages" / "compress.done").exists()
    cache = mtimes(tmp_path / "cache")

    # the same command on another driver machine: nothing staged there
    env[storage.STAGING_ENV] = str(tmp_path / "staging-second")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[stage 1/4] prepare ... already done" in second.stderr and mtimes(tmp_path / "cache") == cache

    assert mtimes(store / "sspg-0.4") == sspg_files  # reused: not a file rewritten
    ump = read_train_result(final_result_dir(cfg.run_storage(), "ump-0.4"))
    assert ump["steps"] == MAX_STEPS and ump["resumed_at"] == [CHECKPOINT_EVERY]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(trial["trial"] for trial in summary["trials"]) == ["sspg-0.4", "ump-0.4"]
    for trial in ("sspg-0.4", "ump-0.4"):  # every artifact reached the store, the marker last
        for artifact in ("metrics.json", "model/model.safetensors", "compact/unpack_compact.py", "hypotheses/dev.txt"):
            assert (tmp_path / "out" / trial / artifact).is_file(), (trial, artifact)
    assert (tmp_path / "out" / ".stages" / "finalize.done").is_file()
    assert not list((tmp_path / "out").rglob(f"*{storage.TMP_TAG}*"))

    # the data position: the rerun's step 5 is the killed run's step 5, and the epoch, put together
    # from both runs, trains every train utterance once (48 = 12 full batches of 4)
    records = [json.loads(line) for line in (trace_dir / "ump-0.4.rank0.jsonl").read_text().splitlines()]
    pids = list(dict.fromkeys(record["pid"] for record in records))
    assert len(pids) == 2, pids
    killed, resumed = ({r["step"]: r for r in records if r["pid"] == pid} for pid in pids)
    assert sorted(killed) == list(range(1, HANG_AT))
    assert sorted(resumed) == list(range(CHECKPOINT_EVERY + 1, MAX_STEPS + 1))
    assert resumed[CHECKPOINT_EVERY + 1]["ids"] == killed[CHECKPOINT_EVERY + 1]["ids"]
    steps = {**{s: r for s, r in killed.items() if s <= CHECKPOINT_EVERY}, **resumed}
    first_epoch = [i for s in sorted(steps) if steps[s]["epoch"] == 0 for i in steps[s]["ids"]]
    train_ids = {row["id"] for row in read_prepared_rows(f"file://{next((tmp_path / 'cache').glob('train-*'))}")}
    assert len(train_ids) == 48 and sorted(first_epoch) == sorted(train_ids)
    assert [steps[s]["epoch"] for s in sorted(steps)] == [0] * 12
