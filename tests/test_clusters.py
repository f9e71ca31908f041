"""clusters/: every file is checked against the shape its tool expects, and everything it names
(entry points, training configs, the Serve import path) exists in this repository."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
LAUNCHER_FILES = ["aws.yaml", "local.yaml"]
REPO_PATH = re.compile(r"\b((?:pipelines|serve|bench|clusters)/[\w./-]+\.(?:py|yaml))\b")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def named_paths(text: str) -> set[str]:
    return set(REPO_PATH.findall(text))


def test_every_cluster_file_is_covered():
    files = {str(p.relative_to(CLUSTERS)) for p in CLUSTERS.rglob("*.yaml")}
    assert files == {*LAUNCHER_FILES, "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"}


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_matches_rays_schema(name):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(name)
    jsonschema.validate(config, schema)  # the schema `ray up` validates against
    if config["provider"]["type"] != "local":
        assert config["head_node_type"] in config["available_node_types"]
        for node_type in config["available_node_types"].values():
            assert "node_config" in node_type and "resources" in node_type


def test_aws_cluster_has_gpu_workers_s3_profile_and_installs_the_project():
    config = load("aws.yaml")
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())
    setup = " ".join(config["setup_commands"])
    assert "constraints.txt" in setup and "-e ." in setup and "requirements-nodeps.txt" in setup
    for path in ("constraints.txt", "requirements-nodeps.txt"):
        assert (ROOT / path).is_file()


@pytest.mark.parametrize("name", [*LAUNCHER_FILES, "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "README.md"])
def test_paths_named_in_cluster_files_exist(name):
    text = (CLUSTERS / name).read_text()
    for path in named_paths(text):
        assert (ROOT / path).is_file(), f"{name} names {path}, which is not in the repository"


def _pod_templates(cluster_spec: dict) -> list[dict]:
    head = cluster_spec["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType", "enableIngress", "headService"}
    templates = [head["template"]]
    for group in cluster_spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        templates.append(group["template"])
    for template in templates:
        containers = template["spec"]["containers"]
        assert containers and all(c["image"] and c["name"] for c in containers)
    return templates


def test_rayjob_runs_the_training_entry_point():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    known = {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit",
             "rayClusterSpec", "submitterPodTemplate", "activeDeadlineSeconds", "suspend", "submissionMode", "metadata"}
    assert set(spec) <= known, set(spec) - known
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "pipelines/train.py"] and entry[2] == "--config"
    assert (ROOT / entry[3]).is_file()
    from pipelines.training.config import load_train_config

    load_train_config(ROOT / entry[3])  # the config the job runs validates
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    templates = _pod_templates(spec["rayClusterSpec"])
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for t in templates for c in t["spec"]["containers"])


def test_rayservice_serve_config_validates_with_ray_serve_and_our_args():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeArgs

    service = load("kuberay/rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert set(service["spec"]) <= {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serviceUnhealthySecondThreshold",
                                    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc"}
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, attribute = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    args = ServeArgs.model_validate(app.args)
    assert args.api_key_env  # bearer auth on in the cluster manifest
    _pod_templates(service["spec"]["rayClusterConfig"])


def test_local_serve_config_validates_too():
    from ray.serve.schema import ServeDeploySchema

    from serve.config import ServeArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    ServeArgs.model_validate(config.applications[0].args)
