"""``python tests/multinode_run.py WORKDIR``: run ``pinch-ray run WORKDIR/pipeline.yaml`` on a
multi-node Ray cluster on this machine, lose a node in the middle of a trial, add another, and write
what happened to ``WORKDIR/report.json`` (read by ``tests/test_multinode.py``; the driver's output
is in ``WORKDIR/driver.log``).

The cluster (``ray.cluster_utils.Cluster``, Ray's own multi-node test tooling: one raylet per node,
each with its own object store): a head with 1 CPU (the driver, Tune trials and Train controllers,
which Ray Train keeps on the driver's node, and Ray Data's read tasks) and 2 worker nodes with 2 CPUs.
Every Train worker asks for 1.5 CPUs, so no node holds two: the trial's 2 DDP workers are on 2 nodes.
Storage is a local directory, which every "node" here shares. (Two trials on four worker nodes took
4-6.5 minutes on 2 cores, most of it the raylets starting worker processes; one trial keeps what the
test is for, a lost node, at a cost the test suite can carry.)

When ``sspg-0.5`` has its step-4 checkpoint registered and its rank 1 hangs before step 6 (fault
injection, ``PINCH_RAY_FAULTS``), the node of rank 1 is removed (its raylet and every process on it
killed, as when a machine is lost) and a fresh node is added (the cluster grows back). Each
worker's steps, node and process are in the step trace (``PINCH_RAY_TRACE``).

Runs in a process of its own: the test session's Ray cluster stays as it is.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER_NODES, WORKER_NODE_CPUS, HEAD_CPUS = 2, 2, 1
OBJECT_STORE = 100 * 1024**2
LOSE = {"trial": "sspg-0.5", "rank": 1, "step": 6, "checkpoint": "step-0000004"}


def lose_a_node(cluster, driver: subprocess.Popen, workdir: Path, storage: Path, report: dict) -> None:
    """Wait for the hang, then remove the node of the hung worker and add a new one."""
    marker, trace = workdir / "hung", workdir / "trace" / f"{LOSE['trial']}.rank{LOSE['rank']}.jsonl"
    snapshot = storage / LOSE["trial"] / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 600
    while not (marker.exists() and snapshot.exists() and LOSE["checkpoint"] in snapshot.read_text()):
        if time.monotonic() > deadline or driver.poll() is not None:
            report["lose_error"] = "the worker never hung with its checkpoint registered"
            return
        time.sleep(0.5)
    node_id = json.loads(trace.read_text().splitlines()[-1])["node"]
    victim = next(node for node in cluster.worker_nodes if node.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=False)
    report["removed_node"] = node_id
    report["added_node"] = cluster.add_node(num_cpus=WORKER_NODE_CPUS, object_store_memory=OBJECT_STORE).node_id


def main(workdir: Path) -> None:
    from pinch_ray.config import load_pipeline
    from pinch_ray.pipeline.debug import FAULTS_ENV, TRACE_ENV
    from pinch_ray.storage import STAGING_ENV, local_path

    # set before any raylet starts: every worker process inherits them
    os.environ[TRACE_ENV] = str(workdir / "trace")
    os.environ[FAULTS_ENV] = str(workdir / "faults.json")
    (workdir / "faults.json").write_text(json.dumps([{**{k: LOSE[k] for k in ("trial", "rank", "step")},
                                                      "action": "hang", "marker": str(workdir / "hung")}]))
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
    report: dict = {"head_node": cluster.head_node.node_id}
    report["worker_nodes"] = [cluster.add_node(num_cpus=WORKER_NODE_CPUS, object_store_memory=OBJECT_STORE).node_id
                              for _ in range(WORKER_NODES)]
    cluster.wait_for_nodes()
    report["cluster_start_s"] = time.monotonic() - started
    cfg = load_pipeline(workdir / "pipeline.yaml")
    # the driver joins the cluster from a process of its own, as under `ray job submit`
    with open(workdir / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "pinch_ray.cli", "run", str(workdir / "pipeline.yaml")],
                                  env={**os.environ, "RAY_ADDRESS": cluster.address,
                                       STAGING_ENV: str(workdir / "staging")}, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            lose_a_node(cluster, driver, workdir, Path(local_path(cfg.run_storage())), report)  # main thread: Ray's
            report["rc"] = driver.wait(timeout=1200)  # node start installs signal handlers
        finally:
            if driver.poll() is None:
                driver.kill()
            report["run_s"] = time.monotonic() - started - report["cluster_start_s"]
            (workdir / "report.json").write_text(json.dumps(report, indent=1))
            cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
