"""The pipeline on a multi-node Ray cluster (head + 2 worker nodes on this machine, see
``tests/multinode_run.py``): a trial's DDP workers on two nodes, and a node lost mid-trial, after
which the trial goes on from its last checkpoint on what is left and ends with the right step count
and every artifact. The prepared shards, the runs and the outputs go to ``file://`` URIs, standing
in for an object store."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pinch_ray.pipeline.report import METRICS_FILE
from pinch_ray.pipeline.runs import final_result_dir, read_train_result

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
MAX_STEPS = 6  # one epoch: 48 utterances, 2 ranks, batches of 4
PIPELINE = {
    "name": "multinode",
    "corpus": {"synth_utterances": 60, "eval_splits": ["dev"]},
    "dense_baseline": False,
    "training": {"max_steps": MAX_STEPS, "batch_size": 4, "warmup_steps": 1, "report_every": 2,
                 "checkpoint_every": 4, "eval_every": 100, "torch_threads": 1},
    "sweep": {"methods": ["sspg"], "target_sparsities": [0.5], "init_from_dense": False},
    "resources": {"num_workers": 2, "cpus_per_worker": 1.5, "max_failures": 1},
    "evaluation": {"batch_size": 8, "num_actors": 0},  # the driver evaluates: no actor to start
}


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multinode")
    spec = {**PIPELINE, "output_dir": f"file://{workdir}/out",  # an object store, as on a cluster
            "corpus": {**PIPELINE["corpus"], "root": str(workdir / "corpus")},
            "data": {"cache_dir": f"file://{workdir}/cache", "rows_per_shard": 8}}
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, str(HERE / "multinode_run.py"), str(workdir)], capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0 and (workdir / "report.json").exists(), done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    log = (workdir / "driver.log").read_text()
    # Ray Data's progress bars stay off in the workers of a cluster joined (the job's runtime env)
    assert "equal=True): Tasks" not in log
    assert report.get("rc") == 0 and "lose_error" not in report, (report, log[-4000:], done.stderr[-4000:])
    traces = {}
    for path in sorted((workdir / "trace").glob("*.jsonl")):
        trial, rank = path.stem.rsplit(".rank", 1)
        for record in map(json.loads, path.read_text().splitlines()):
            traces.setdefault(trial, []).append({**record, "rank": int(rank)})
    return {"workdir": workdir, "report": report, "traces": traces, "log": log}


def nodes_of(records: list[dict]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for record in records:
        out.setdefault(record["rank"], set()).add(record["node"])
    return out


def test_a_trials_ddp_workers_spread_over_the_worker_nodes(multinode):
    report, traces = multinode["report"], multinode["traces"]
    assert sorted(traces) == ["sspg-0.5"]
    first_attempt = {r["pid"] for r in traces["sspg-0.5"] if r["step"] == 1}  # before the node was lost
    placement = nodes_of([r for r in traces["sspg-0.5"] if r["pid"] in first_attempt])
    assert sorted(placement) == [0, 1]
    assert all(len(nodes) == 1 for nodes in placement.values()), placement  # a rank stays on its node
    assert placement[0] != placement[1]  # the trial's DDP workers on two nodes
    # Train workers on worker nodes, not the head (where the trial and its controller run)
    assert set().union(*placement.values()) <= set(report["worker_nodes"])


def test_a_lost_node_costs_the_trial_only_the_steps_since_its_checkpoint(multinode):
    report, traces, out = multinode["report"], multinode["traces"], multinode["workdir"] / "out"
    removed = report["removed_node"]
    records = traces["sspg-0.5"]
    first_pids = {r["pid"] for r in records if r["step"] == 1}
    before = [r for r in records if r["pid"] in first_pids]
    after = [r for r in records if r["pid"] not in first_pids]
    assert removed in {r["node"] for r in before if r["rank"] == 1}
    # the restarted workers: on what is left (not the lost node), from step 5 (the checkpoint at 4)
    assert after and removed not in {r["node"] for r in after}
    for rank in (0, 1):
        steps = sorted(r["step"] for r in after if r["rank"] == rank)
        assert steps == list(range(5, MAX_STEPS + 1)), (rank, steps)
    # the restart repeats the batches of steps 5.. exactly as the lost run had them
    lost = {(r["rank"], r["step"]): r["ids"] for r in before if r["step"] == 5}
    assert lost and all(ids == next(r["ids"] for r in after if (r["rank"], r["step"]) == key)
                        for key, ids in lost.items())
    result = read_train_result(final_result_dir(str(out / "runs"), "sspg-0.5"))
    assert result["steps"] == MAX_STEPS and result["resumed_at"] == [4]
    summary = json.loads((out / "summary.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == ["sspg-0.5"]
    for artifact in ("model/config.json", "compact/manifest.json", "hypotheses/dev.txt", METRICS_FILE):
        assert (out / "sspg-0.5" / artifact).is_file(), artifact
