"""Shared test fixtures: offline Hugging Face, one local Ray cluster per test session; a reader of
TensorBoard event files."""

import os
import struct

# Tests never touch the network and never attach to a cluster a developer has running.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster shared by every test that needs Ray (startup costs ~5 s)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


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
