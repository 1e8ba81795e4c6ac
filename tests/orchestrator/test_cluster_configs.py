"""cluster/: the launcher config, the KubeRay manifests and the runtime env parse, label GPU kinds
so placement works, and name only files that exist."""
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def kind_resources(resources: dict) -> set[str]:
    return {k for k in resources if k.startswith("gpu_") or k.startswith("accelerator_type:")}


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_cluster_yaml_parses(path):
    assert documents(path)


def test_the_launcher_has_two_worker_types_of_different_gpu_kinds():
    (config,) = documents("aws-heterogeneous.yaml")
    head = config["head_node_type"]
    workers = {name: spec for name, spec in config["available_node_types"].items() if name != head}
    kinds = {}
    for name, spec in workers.items():
        resources = spec["resources"]
        labels = kind_resources(resources)
        gpu_labels = [k for k in labels if k.startswith("gpu_")]
        assert len(gpu_labels) == 1 and any(k.startswith("accelerator_type:") for k in labels), name
        assert resources[gpu_labels[0]] == resources["GPU"], f"{name}: one gpu_<kind> unit per GPU"
        kinds[name] = gpu_labels[0]
    assert len(set(kinds.values())) >= 2
    assert "GPU" not in config["available_node_types"][head]["resources"]
    assert any("pip install" in c and "e3va-detection" in c for c in config["setup_commands"])
    for local in config["file_mounts"].values():
        assert (REPO / local).exists(), local


def _start_resources(group: dict) -> dict:
    return yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))


@pytest.mark.parametrize("name, path", [("RayCluster", "kuberay-cluster.yaml"), ("RayJob", "kuberay-job.yaml")])
def test_kuberay_has_two_worker_groups_of_different_kinds(name, path):
    (manifest,) = documents(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == name
    spec = manifest["spec"] if name == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    groups = spec["workerGroupSpecs"]
    assert len(groups) == 2
    labels = [set(_start_resources(g)) for g in groups]
    assert all(len(label) == 1 and next(iter(label)).startswith("gpu_") for label in labels)
    assert labels[0] != labels[1]
    selectors = [g["template"]["spec"]["nodeSelector"] for g in groups]
    assert selectors[0] != selectors[1]
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_the_rayjob_runs_an_existing_experiment():
    (job,) = documents("kuberay-job.yaml")
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "orchestrator", "run"]
    assert (REPO / entrypoint[4]).is_file()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/e3va-detection"
    assert "WORKDIR /home/ray/e3va-detection" in (CLUSTER / "Dockerfile").read_text()


def test_every_file_named_in_cluster_exists():
    text = "\n".join(p.read_text() for p in CLUSTER.iterdir() if p.is_file())
    named = set(re.findall(r"(?<![\w/])(?:experiments|cluster|detectors|orchestrator|tests)/[\w./-]+\.(?:yaml|txt|py)", text))
    assert named
    for path in named:
        assert (REPO / path).is_file(), path
    for source in re.findall(r"^COPY (?:--\S+ )?(.+) \S+$", (CLUSTER / "Dockerfile").read_text(), re.M):
        for item in source.split():
            assert (REPO / item).exists(), item


def test_the_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv
    (env,) = documents("runtime_env.yaml")
    assert set(env) <= RuntimeEnv.known_fields
    requirements = env["pip"]["packages"]
    assert (REPO / requirements).is_file()
    parsed = RuntimeEnv(**env)  # what `ray job submit --runtime-env` builds; reads the requirements file
    assert "torch==2.14.1" in parsed["pip"]["packages"]


def test_the_runtime_env_requirements_follow_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {*project["dependencies"], *(d for d in project["optional-dependencies"]["train"] if not d.startswith("ray"))}
    listed = {line.strip() for line in (CLUSTER / "requirements.txt").read_text().splitlines() if line.strip()}
    assert listed == wanted
