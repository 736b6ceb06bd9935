"""cluster/ configs, validated offline: the launcher YAML against Ray's own autoscaler schema, the
KubeRay RayJob for the fields the operator requires, the image both run (cluster/Dockerfile), both
for pointing at a real pipeline, and the pipeline's sizing for what an autoscaling cluster can grow to
(resources.cluster_max): the commands declare what the cluster files declare, and a run is not
refused, nor its sweep held to one trial, before the autoscaler has added the nodes."""

import dataclasses
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from pinch_ray.config import ResourcesConfig, load_pipeline
from pinch_ray.pipeline.sweep import max_concurrent_trials
from pinch_ray.pipeline.worker import resource_problems

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
RAYJOB = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())  # cluster configs


def pipeline_command(command: str) -> tuple[str, list[str]]:
    """(pipeline yaml, overrides) of a `python -m pinch_ray.cli run ...` / `pinch-ray run ...` line."""
    words = shlex.split(command)
    at = words.index("run")
    assert words[at - 1] in ("pinch-ray", "pinch_ray.cli"), command
    return words[at + 1], [w for w in words[at + 2:] if "=" in w]


def aws_job_command() -> str:
    """The `ray job submit ... -- python -m pinch_ray.cli run ...` command in aws-gpu.yaml's header
    (its backslash-continued comment lines, joined)."""
    lines = [line.lstrip("#").strip() for line in (CLUSTER / "aws-gpu.yaml").read_text().splitlines()
             if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            return " ".join(command)
    raise AssertionError("the job command in aws-gpu.yaml's header does not end")


def image_name() -> str:
    """``pinch-ray:<tag>`` of cluster/Dockerfile's `docker build -t $REGISTRY/pinch-ray:<tag>` line."""
    match = re.search(r"docker build -f cluster/Dockerfile -t \$REGISTRY/(pinch-ray:\S+) \.", DOCKERFILE)
    assert match, "cluster/Dockerfile lost its build command"
    return match.group(1)


def kuberay_autoscaling_config() -> dict:
    """rayjob.yaml's Ray cluster as KubeRay's in-tree autoscaler reads it: Ray's own translation of
    the RayCluster spec into a cluster launcher config (node types, their resources and counts)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "spec": RAYJOB["spec"]["rayClusterSpec"],
                   "metadata": {"name": RAYJOB["metadata"]["name"], "namespace": "default"}}
    return _derive_autoscaling_config_from_ray_cr(ray_cluster)


def resources_at(config: dict, stage: str) -> dict[str, float]:
    """CPUs and GPUs of a launcher-format cluster ``config`` at ``stage``: "head" (the head alone, the
    workers still booting), "start" (min_workers of each worker type) or "max" (max_workers, at most
    the cluster's max_workers in all)."""
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    total = {key: float(head.get(key, 0)) for key in ("CPU", "GPU")}
    room = config["max_workers"]
    for name, node_type in config["available_node_types"].items():
        if name != config["head_node_type"]:
            most = min(node_type["max_workers"], room)
            nodes = {"head": 0, "start": node_type.get("min_workers", 0), "max": most}[stage]
            room -= most
            for key in total:
                total[key] += nodes * node_type["resources"].get(key, 0)
    return total


# cluster file -> (its job command, its cluster as the autoscaler reads it)
CLUSTERS = {"aws-gpu.yaml": (aws_job_command, lambda: AWS),
            "rayjob.yaml": (lambda: RAYJOB["spec"]["entrypoint"], kuberay_autoscaling_config)}


def test_launcher_yaml_matches_ray_autoscaler_schema():
    config = AWS
    jsonschema.validate(config, RAY_SCHEMA)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    gpu_workers = [t for t in workers if t["node_config"]["InstanceType"].startswith(("g", "p"))]  # GPU instances
    assert gpu_workers and all(t["resources"].get("GPU", 0) > 0 for t in gpu_workers)  # declared
    # the baked image on every node, nothing installed at node start
    assert config["docker"]["image"].endswith("/" + image_name()) and config["docker"].get("pull_before_run")
    commands = " ".join(config.get("setup_commands", []) + config.get("initialization_commands", [])
                        + config.get("head_setup_commands", []) + config.get("worker_setup_commands", []))
    assert "pip install" not in commands and "torch" not in commands
    # GPU workers are up from the start
    assert any(t.get("min_workers", 0) >= 1 for t in gpu_workers)
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        # Ray fills a missing or `latest_dlami` ImageId with an Ubuntu 18.04 Deep Learning AMI, whose
        # driver cannot run torch 2.11's CUDA 13 build: the Deep Learning Base OSS Nvidia Driver AMI
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id", node.get("ImageId", "")), name
        # Ray's launcher gives its default (S3) profile to the head only: every node type names its own
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+",
                            node.get("IamInstanceProfile", {}).get("Arn", "")), name
        # declared, so what the cluster can grow to is in this file (cluster_max is checked against it)
        assert node_type["resources"].get("CPU", 0) > 0, name


def test_rayjob_has_the_fields_kuberay_requires():
    job = RAYJOB
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])  # DNS-1123 label
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and all(c["image"] and c["name"] for c in head)
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)
        assert all(c["image"] and c["name"] for c in containers)
    # maxReplicas scales only with the in-tree autoscaler
    assert cluster["enableInTreeAutoscaling"] is True
    assert any(group["maxReplicas"] > group["minReplicas"] for group in cluster["workerGroupSpecs"])
    # the baked image in every Ray container, and no dependency installed at job start
    ray_containers = head[:1] + [group["template"]["spec"]["containers"][0] for group in cluster["workerGroupSpecs"]]
    assert all(c["image"].endswith("/" + image_name()) for c in ray_containers)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert not {"pip", "uv", "conda"} & set(runtime_env), "dependencies belong in cluster/Dockerfile's image"
    # what KubeRay's autoscaler makes of it is a valid autoscaler config with GPU workers
    autoscaling = kuberay_autoscaling_config()
    jsonschema.validate(autoscaling, RAY_SCHEMA)
    assert resources_at(autoscaling, "max")["GPU"] > resources_at(autoscaling, "start")["GPU"] > 0


def test_the_image_bakes_the_pinned_dependencies_on_a_ray_gpu_image():
    base = re.search(r"^FROM (\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    # Ray's own GPU image of the Ray the project pins (the cluster's Ray must equal the job's), Python 3.11
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-cu1[2-9]\d", base), base
    lock = dict(line.split("==") for line in (REPO / "requirements-lock.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([^"]+)"', DOCKERFILE))
    assert pins["torch"] == "2.11.0" and pins["ray"] == ray.__version__
    assert {name: version for name, version in pins.items() if lock.get(name) != version} == {}  # as tested
    assert "-c /tmp/requirements-lock.txt" in DOCKERFILE  # and what they pull in, too
    # the tag names what is inside
    assert image_name() == f"pinch-ray:ray{ray.__version__}-torch{pins['torch']}"


@pytest.mark.parametrize("cluster_file", sorted(CLUSTERS))
def test_both_run_a_valid_paper_pipeline(cluster_file):
    pipeline, overrides = pipeline_command(CLUSTERS[cluster_file][0]())
    assert pipeline == "pipelines/wav2vec2_base_ls100.yaml"
    cfg = load_pipeline(REPO / pipeline, overrides, check_paths=False)
    assert cfg.model.init_from == "facebook/wav2vec2-base" and cfg.resources.use_gpu
    # everything in the object store: no shared file system to set up
    assert cfg.corpus.root.startswith("s3://") and cfg.data.cache_dir.startswith("s3://")
    assert cfg.output_dir.startswith("s3://") and cfg.run_storage() == cfg.output_dir + "/runs"


@pytest.mark.parametrize("cluster_file", sorted(CLUSTERS))
def test_the_command_declares_what_the_cluster_can_grow_to(cluster_file):
    """The job command's resources.cluster_max equals the cluster file's maximum (head + max
    workers x each node's resources); with it, a run is not refused while only the nodes the
    cluster starts with are up, and the sweep runs as many trials as the grown cluster holds."""
    command, autoscaling = CLUSTERS[cluster_file]
    pipeline, overrides = pipeline_command(command())
    resources = load_pipeline(REPO / pipeline, overrides, check_paths=False).resources
    cluster = {stage: resources_at(autoscaling(), stage) for stage in ("head", "start", "max")}
    assert resources.cluster_max == cluster["max"]
    per_trial = resources.num_workers * resources.gpus_per_worker
    grown = int(cluster["max"]["GPU"] // per_trial)
    assert grown > int(cluster["start"]["GPU"] // per_trial) and grown >= 2  # worth autoscaling for
    for stage in ("head", "start"):
        assert resource_problems(resources, cluster[stage]) == [], stage
        assert max_concurrent_trials(resources, 8, cluster[stage]) == grown, stage
    # what these files fix: without cluster_max, the run is sized by what is up
    up_now = dataclasses.replace(resources, cluster_max={})
    assert max_concurrent_trials(up_now, 8, cluster["start"]) < grown
    assert resource_problems(up_now, cluster["head"]) != []


def test_sizing_counts_what_the_cluster_can_grow_to():
    four_gpu_trials = ResourcesConfig(num_workers=4, use_gpu=True, cpus_per_worker=8)
    head_only = {"CPU": 8}
    # what is up: 4 x 8 CPUs do not fit an 8-CPU head, nor 4 GPUs a cluster without any
    problems = resource_problems(four_gpu_trials, head_only)
    assert [p.split(" take every CPU")[0].split(" need ")[0] for p in problems] == [
        "resources: 4 workers x 8 CPUs", "resources: 4 workers x 1 GPUs"]
    assert all("resources.cluster_max" in p for p in problems)  # the way out is named
    assert max_concurrent_trials(four_gpu_trials, 6, {"CPU": 56, "GPU": 4}) == 1
    # what it can grow to: head + 4 x (48 CPUs, 4 GPUs)
    grows = ResourcesConfig(num_workers=4, use_gpu=True, cpus_per_worker=8, cluster_max={"CPU": 200, "GPU": 16})
    assert resource_problems(grows, head_only) == []
    assert max_concurrent_trials(grows, 6, head_only) == 4  # GPUs: 16 / 4
    assert max_concurrent_trials(grows, 2, head_only) == 2  # at most the trials there are
    assert max_concurrent_trials(grows, 6, {"CPU": 400, "GPU": 32}) == 6  # more up than declared: what is up
    # a declared maximum too small for one trial is still refused, naming the key
    small = ResourcesConfig(num_workers=4, use_gpu=True, cpus_per_worker=8, cluster_max={"CPU": 200, "GPU": 2})
    assert [p for p in resource_problems(small, head_only) if "resources.cluster_max.GPU" in p and "need 4 GPUs" in p]
    only_gpus = ResourcesConfig(num_workers=4, use_gpu=True, cpus_per_worker=8, cluster_max={"GPU": 16})
    assert "take every CPU the cluster has (8)" in " ".join(resource_problems(only_gpus, head_only))
