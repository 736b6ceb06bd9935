"""Shared test fixtures: offline Hugging Face, one local Ray cluster per test session, fault
injection into its workers; file modification times; a reader of TensorBoard event files; the
benchmark scripts as modules."""

import importlib.util
import json
import os
import struct
from pathlib import Path

# Tests never touch the network and never attach to a cluster a developer has running.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s by default, so a run's end reaches the driver
# up to seconds late; and each worker group starts a preemption-watcher actor (one more process) to
# follow node drains, which a one-machine test cluster never has. A suite of ~25 short runs on 2
# cores pays both per run; set before any Ray process starts, so every raylet and worker inherits them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory):
    """The session's ``PINCH_RAY_FAULTS`` file (no faults), set before Ray starts so that every Ray
    worker sees the variable; tests put faults in it with the ``inject_faults`` fixture."""
    from pinch_ray.pipeline.debug import FAULTS_ENV

    path = tmp_path_factory.mktemp("faults") / "faults.json"
    path.write_text("[]")
    os.environ[FAULTS_ENV] = str(path)
    return path


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory):
    """The session's ``PINCH_RAY_TRACE`` directory: every Ray worker logs the utterance ids of each
    training step to ``<dir>/<trial>.rank<r>.jsonl`` (tests that read it use trial names of their own)."""
    from pinch_ray.pipeline.debug import TRACE_ENV

    path = tmp_path_factory.mktemp("trace")
    os.environ[TRACE_ENV] = str(path)
    return path


@pytest.fixture
def inject_faults(faults_file):
    """``inject_faults(fault, ...)``: the faults (see :mod:`pinch_ray.pipeline.debug`) every worker
    started from now on obeys, until the test ends."""
    def inject(*faults: dict) -> None:
        faults_file.write_text(json.dumps(list(faults)))

    yield inject
    faults_file.write_text("[]")


@pytest.fixture(scope="session")
def ray_cluster(faults_file, trace_dir):
    """One local Ray cluster shared by every test that needs Ray (startup costs ~5 s)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module, so a test runs its functions in process."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mtimes(directory) -> dict[str, int]:
    """``{relative path: modification time (ns)}`` of every file under ``directory``: equal before and
    after a rerun when the rerun rewrote nothing there."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def tensorboard_events(path) -> list:
    """The Event protos of one TensorBoard event file (TFRecord framing: length u64, its CRC, the
    record, its CRC), asserting the frames cover the whole file."""
    from tensorboardX.proto import event_pb2

    data, offset, events = open(path, "rb").read(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
        offset += 16 + length
    assert offset == len(data), path
    return events
