"""deploy/ for multi_worker jobs: the KubeRay manifests and the compose `ray` profile, offline.

The RayCluster is validated against the v1 schema of KubeRay's own CRD
(vendored in deploy/k8s/crd/), made strict the way the API server's pruning
would make a typo vanish silently: an unknown field is an error here.
"""

from __future__ import annotations

import copy
import subprocess

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT, compose_without_project_name, require_tool

K8S = REPO_ROOT / "deploy" / "k8s"
COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def _strict(schema):
    """The schema with unknown fields refused wherever it names the fields it knows."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def raycluster_schema():
    (crd,) = _documents("crd/ray.io_rayclusters.yaml")
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is the API server's (ObjectMeta), not the CRD's to describe.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def test_the_raycluster_is_valid_against_kuberays_crd(raycluster_schema):
    (cluster,) = _documents("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    jsonschema.validate(cluster, raycluster_schema)
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 2  # a typo of `replicas`
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(broken, raycluster_schema)


def test_every_pod_shares_the_servers_state_directory_and_ray_address():
    (cluster,) = _documents("raycluster.yaml")
    deployment, service = _documents("ntrain.yaml")
    claims = {doc["metadata"]["name"] for doc in _documents("storage.yaml")}
    assert all(
        doc["spec"]["accessModes"] == ["ReadWriteMany"] for doc in _documents("storage.yaml")
    )
    server = deployment["spec"]["template"]["spec"]
    args = dict(arg.split("=", 1) for arg in server["containers"][0]["args"][1:])
    state_dir = args["--state-dir"]
    assert args["--ray-address"] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert cluster["spec"]["rayVersion"] == "2.60.0"  # the version the ray extra pins
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"], server]
    pods += [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        state = volumes[mounts[state_dir]]
        assert state["persistentVolumeClaim"]["claimName"] == "ntrain-state"
        assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
                if "persistentVolumeClaim" in v} <= claims  # fmt: skip
    (gpu_group,) = cluster["spec"]["workerGroupSpecs"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu_group["rayStartParams"]["num-gpus"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_compose_ray_profile_validates_and_shares_the_state_volume(tmp_path):
    compose = require_tool("docker-compose")
    override = REPO_ROOT / "deploy" / "docker-compose.ray.yml"
    # docker-compose 1.29 predates the top-level `name`; Compose v2 checks the file
    # whole in CI (.ci/containers.sh).
    unnamed = compose_without_project_name(yaml.safe_load(COMPOSE.read_text()), tmp_path)
    done = subprocess.run(
        [
            compose,
            "-f",
            str(unnamed),
            "-f",
            str(override),
            "--project-directory",
            str(COMPOSE.parent),
            "--profile",
            "ray",
            "config",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)["services"]
    assert merged["trainer"]["environment"]["NTRAIN_RAY_ADDRESS"] == "http://ray-head:8265"

    def mounts(service: str) -> set[tuple[str, str]]:  # docker-compose 1.29: "SOURCE:TARGET:MODE"
        return {tuple(volume.split(":")[:2]) for volume in merged[service]["volumes"]}

    assert ("ntrain-state", "/var/lib/ntrain") in mounts("trainer")
    for name in ("ray-head", "ray-worker"):
        assert merged[name]["profiles"] == ["ray"]
        assert ("ntrain-state", "/var/lib/ntrain") in mounts(name)
    devices = merged["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
