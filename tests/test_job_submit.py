"""End to end: a small cut of the demo pipeline through the CLI, submitted as a Ray job.

A local head (``ray start --head`` on loopback, its temp dir under the test's tmp) runs
``python -m pinch_ray.cli run pipelines/demo.yaml <small budgets>`` submitted with
``JobSubmissionClient`` and ``--working-dir``-style upload of the repository, exactly as
``ray job submit --working-dir . -- python -m pinch_ray.cli run ...`` does on a cluster. The job must
reach SUCCEEDED, and every artifact the demo promises must exist and parse.

This is the only test that starts a second Ray cluster (the job server needs a head with a
dashboard); it is stopped by terminating its ``ray start --block`` process, never ``ray stop``
(which would also kill the session cluster of the other tests).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tensorboard_events

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRIALS = ("dense", "sspg-0.65")  # the cut's trials (demo.yaml's sspg-0.65 and its reference), in summary order


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head with the job server; yields the dashboard URL."""
    temp_dir = tmp_path_factory.mktemp("rh")  # short: Ray's socket paths must stay < 108 characters
    # Every port of its own: the session cluster of the other tests runs beside it, and its
    # dashboard agent holds Ray's default agent ports (the job server then has "No available agent").
    port, dashboard_port, agent_port, agent_grpc, metrics, runtime_env_agent = (_free_port() for _ in range(6))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster: no token to hand to the client
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--include-dashboard=true", f"--dashboard-agent-listen-port={agent_port}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env_agent}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 240  # a loaded 2-core machine can take minutes
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited: {head.stdout.read().decode(errors='replace')[-3000:]}")
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except (ConnectionError, RuntimeError, OSError):  # the job server is not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def demo_job(ray_head, tmp_path_factory):
    """The demo pipeline with tiny budgets, submitted as a job; returns (output dir, job logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = tmp_path_factory.mktemp("job")
    overrides = [
        f"output_dir={root / 'out'}", f"data.cache_dir={root / 'cache'}", f"corpus.root={root / 'corpus'}",
        "corpus.synth_utterances=80", "training.max_steps=3", "training.batch_size=4", "training.warmup_steps=1",
        "training.report_every=1", "training.checkpoint_every=2",
        # demo.yaml's sspg-0.65 and its dense reference; its ump and sspg-0.5 trials run the same code
        # (test_pipeline runs ump, and the actor-pool evaluation that demo.yaml turns off)
        "sweep.methods=[sspg]", "sweep.target_sparsities=[0.65]", "sweep.method_targets={}",
    ]
    client = JobSubmissionClient(ray_head)
    deadline = time.monotonic() + 240
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=" ".join([sys.executable, "-m", "pinch_ray.cli", "run", "pipelines/demo.yaml", *overrides]),
                runtime_env={"working_dir": str(REPO), "excludes": ["runs/", ".cache/", ".git/"]})
            break
        except RuntimeError as error:  # the job server answers before its agent is up: "try again later"
            if "try again" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                            JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after 600 s:\n{client.get_job_logs(job_id)[-5000:]}")
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    return root / "out", logs


def _parse(path: Path) -> None:
    """Read ``path`` with the parser its type calls for; raises if it does not parse."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".safetensors.gz") else path.suffix
    if suffix in (".json", ".done"):
        json.loads(path.read_text())
    elif suffix == ".jsonl":
        lines = path.read_text().splitlines()
        assert lines, path
        for line in lines:
            json.loads(line)
    elif suffix == ".yaml":
        yaml.safe_load(path.read_text())
    elif suffix == ".csv":
        with open(path, newline="") as file:
            assert len(list(csv.DictReader(file))) > 0, path
    elif suffix == ".png":
        from matplotlib.image import imread

        assert imread(path).ndim == 3, path
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        assert load_file(path), path
    elif suffix == ".safetensors.gz":
        from safetensors.torch import load

        assert load(gzip.decompress(path.read_bytes())), path
    elif suffix == ".py":  # the loader of a neuron-pruned model
        compile(path.read_text(), str(path), "exec")
    elif suffix in (".md", ".txt"):
        assert path.read_text(encoding="utf-8").strip(), path
    elif path.name.startswith("events.out.tfevents."):  # TensorBoard: TFRecord frames of Event protos
        assert len(tensorboard_events(path)) > 1, path
    else:
        raise AssertionError(f"{path}: an artifact of unexpected type; add its parser here")


def test_demo_cut_succeeds_as_a_ray_job(demo_job):
    out, logs = demo_job
    # one progress line per stage, each with its elapsed time
    for number, stage in enumerate(("prepare", "baseline", "compress", "finalize"), start=1):
        assert f"[stage {number}/4] {stage} ... done in" in logs, logs[-3000:]
    # a progress line per training report, from every run
    assert "[dense] step 3/3" in logs and "[sspg-0.65] step 3/3" in logs, logs[-3000:]
    assert "Reporting training result" not in logs  # Ray Train's line per report per worker: quietened


def test_every_demo_artifact_exists_and_parses(demo_job):
    from transformers import AutoModelForCTC, AutoProcessor

    from pinch_ray.config import load_pipeline
    from pinch_ray.core.export import load_compact
    from pinch_ray.pipeline.report import METRICS_FILE

    out, _ = demo_job
    for name in ("summary.json", "summary.md", "wer_vs_params.png", "pipeline.yaml"):
        assert (out / name).is_file(), name
    cfg = load_pipeline(out / "pipeline.yaml")
    assert cfg.name == "demo" and cfg.training.max_steps == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == list(TRIALS)
    table = (out / "summary.md").read_text()
    assert all(f"| {trial} |" in table for trial in TRIALS)
    for trial in TRIALS:
        directory = out / trial
        for name in (METRICS_FILE, "per_layer_sparsity.csv", "per_layer_sparsity.png", "model/config.json",
                     "compact/manifest.json", "hypotheses/dev.txt", "hypotheses/test.txt"):
            assert (directory / name).is_file(), f"{trial}/{name}"
        metrics = json.loads((directory / METRICS_FILE).read_text())
        assert set(metrics["wer"]) == {"dev", "test"} and metrics["trial"] == trial
        # the exported model is a stock Hugging Face model; the compact copy holds the same weights
        # (a neuron-pruned model has smaller layers: its loader ships in the directory)
        model = AutoModelForCTC.from_pretrained(directory / "model", trust_remote_code=metrics["method"] == "sspg-neuron")
        AutoProcessor.from_pretrained(directory / "model")
        compact = load_compact(directory / "compact").state_dict()
        assert list(compact) == list(model.state_dict())
        for name, weight in model.state_dict().items():  # fp16 values: equal to the model's, rounded once
            torch.testing.assert_close(compact[name], weight.half().to(weight.dtype), atol=0, rtol=0, msg=name)
        assert (out / "logs" / f"{trial}.jsonl").is_file()
    artifacts = [path for path in out.rglob("*") if path.is_file() and "runs" not in path.relative_to(out).parts]
    assert len(artifacts) > 40
    for path in artifacts:
        _parse(path)
