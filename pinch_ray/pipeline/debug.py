"""Hooks for tests and debugging that no product signature carries: environment variables read by
every Ray Train worker. A worker inherits the environment of the raylet it runs under, so set them
before ``ray.init`` / ``ray start``, or in a job's ``runtime_env`` ``env_vars``.

- ``PINCH_RAY_FAULTS``: a JSON file of faults, e.g. ``[{"trial": "ump-0.5", "step": 7, "rank": 1,
  "action": "exit", "marker": "/tmp/ump-crashed"}]``. Just before training step ``step``, worker
  ``rank`` of run ``trial`` writes ``marker`` and then ``exit``: dies (a crashed worker), or
  ``hang``: stops where it is (so a test can kill the driver or a node at a known step). A fault
  whose marker exists has happened, so each fires once, whatever restarts follow.
- ``PINCH_RAY_TRACE``: a directory; every worker appends one JSON line per training step to
  ``<dir>/<trial>.rank<r>.jsonl``: the step, epoch, index of the batch in its epoch, time, node,
  process, and the ids of the utterances the step trained on (what resume tests check: none
  repeated, none skipped).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

FAULTS_ENV = "PINCH_RAY_FAULTS"
TRACE_ENV = "PINCH_RAY_TRACE"
ACTIONS = ("exit", "hang")
# Ray Train's controller registers reports when it polls the workers (every few seconds): a worker
# that is about to die waits this long, so the checkpoints it reported are known to the controller.
REGISTER_WAIT_S = 5.0


def faults_for(trial: str, rank: int) -> list[dict]:
    """The faults of ``PINCH_RAY_FAULTS`` for worker ``rank`` of run ``trial`` (none without it).

    Raises:
        ValueError: the file is not a JSON list of faults with trial, step, rank, action, marker.
    """
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return []
    faults = json.loads(Path(path).read_text())
    for fault in faults:
        missing = {"trial", "step", "rank", "action", "marker"} - set(fault)
        if missing or fault["action"] not in ACTIONS:
            raise ValueError(f"{FAULTS_ENV}={path}: fault {fault} needs trial, step, rank, marker and "
                             f"an action in {ACTIONS} (missing: {sorted(missing)})")
    return [fault for fault in faults if fault["trial"] == trial and fault["rank"] == rank]


def maybe_fail(faults: list[dict], step: int, rank: int) -> None:
    """Before training ``step``: carry out the first of ``faults`` (:func:`faults_for`) due now that
    has not happened yet."""
    for fault in faults:
        if fault["step"] != step or os.path.exists(fault["marker"]):
            continue
        Path(fault["marker"]).write_text(f"worker {rank} pid {os.getpid()}: {fault['action']} before step {step}\n")
        log.warning("fault injection: worker %d %ss before step %d", rank, fault["action"], step)
        time.sleep(REGISTER_WAIT_S)
        if fault["action"] == "exit":
            os._exit(1)
        while True:  # hang: until the process is killed
            time.sleep(60)


class StepTrace:
    """The ``PINCH_RAY_TRACE`` log of one worker (does nothing without the variable)."""

    def __init__(self, trial: str, rank: int, node: str):
        directory = os.environ.get(TRACE_ENV)
        self.path = Path(directory) / f"{trial}.rank{rank}.jsonl" if directory else None
        self.fixed = {"rank": rank, "node": node, "host": socket.gethostname(), "pid": os.getpid()}
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def step(self, step: int, epoch: int, index: int, micro_batches: list[dict]) -> None:
        if self.path is None:
            return
        ids = [utterance for batch in micro_batches for utterance in batch["ids"]]
        record = {"step": step, "epoch": epoch, "batch_in_epoch": index, "time": time.time(), **self.fixed,
                  "ids": ids}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
