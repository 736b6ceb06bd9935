"""cluster/ configs, validated offline: the launcher YAML against Ray's own autoscaler schema, the
KubeRay RayJob for the fields the operator requires, and both for pointing at a real pipeline."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

from pinch_ray.config import load_pipeline

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def pipeline_command(command: str) -> tuple[str, list[str]]:
    """(pipeline yaml, overrides) of a `python -m pinch_ray.cli run ...` / `pinch-ray run ...` line."""
    words = shlex.split(command)
    at = words.index("run")
    assert words[at - 1] in ("pinch-ray", "pinch_ray.cli"), command
    return words[at + 1], [w for w in words[at + 2:] if "=" in w]


def test_launcher_yaml_matches_ray_autoscaler_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU instances
    setup = " ".join(config["setup_commands"])
    assert "ray[default,data,train,tune]==2.60.0" in setup and "torch==2.11.0" in setup


def test_rayjob_has_the_fields_kuberay_requires():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
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
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]


def test_both_run_a_valid_paper_pipeline():
    commands = [yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]["entrypoint"]]
    header = (CLUSTER / "aws-gpu.yaml").read_text()
    commands.append(" ".join(line.lstrip("# ").rstrip("\\ ") for line in header.splitlines()
                             if "pinch_ray.cli run" in line or line.lstrip("# ").startswith("storage_path=")))
    for command in commands:
        pipeline, overrides = pipeline_command(command)
        assert pipeline == "pipelines/wav2vec2_base_ls100.yaml"
        cfg = load_pipeline(REPO / pipeline, overrides, check_paths=False)
        assert cfg.model.init_from == "facebook/wav2vec2-base" and cfg.resources.use_gpu
        # runs and checkpoints in the object store; artifacts and prepared shards on the shared mount
        assert cfg.corpus.root.startswith("s3://") and cfg.storage_path.startswith("s3://")
        assert cfg.output_dir.startswith("/mnt/") and cfg.data.cache_dir.startswith("/mnt/")
