"""The KubeRay manifests are valid RayCluster / RayJob objects and autoscale the way we mean.

Two independent readers check ``cluster/kuberay.yaml`` and ``cluster/kuberay-job.yaml``:

* KubeRay's own CRD OpenAPI schemas (v1.7.0, vendored in ``kuberay_crds/``, provenance in
  ``kuberay_crds/PROVENANCE.md``), applied with ``jsonschema`` the way the API server applies
  them under ``kubectl apply``'s default strict field validation: unknown fields are errors
  (except where the schema says ``x-kubernetes-preserve-unknown-fields``), required ones must
  be there. CEL rules (``x-kubernetes-validations``) and defaulting are the server's and are
  not checked here.
* Ray's own KubeRay adapter (``ray.autoscaler._private.kuberay.autoscaling_config``), which
  turns a RayCluster into the autoscaler config the in-cluster autoscaler runs: the GPU group
  must come out as a node type with a GPU, scaling from zero, and the head with none.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "kuberay_crds"
#: sha256 of the uncompressed upstream files (kuberay_crds/PROVENANCE.md)
CRD_SHA256 = {
    "RayCluster": (
        "ray.io_rayclusters.yaml.gz",
        "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
    ),
    "RayJob": ("ray.io_rayjobs.yaml.gz", "01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5"),
}


def _strict(node: Any) -> Any:
    """A CRD's structural schema as JSON Schema with the API server's strict field validation:
    objects with declared properties reject others; ``nullable`` admits null."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    decided = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if out.get("type") == "object" and "properties" in out and not decided:
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The v1 schema of ``kind``'s vendored CRD, checked against its recorded hash first."""
    name, sha256 = CRD_SHA256[kind]
    raw = gzip.decompress((CRDS / name).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == sha256, f"{name} is not the vendored upstream file"
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1-2 MB each
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_class(schema)


def documents(name: str) -> dict[str, dict]:
    """The manifest's documents by kind."""
    docs = [d for d in yaml.safe_load_all((REPO / "cluster" / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def crd_errors(obj: dict) -> list[str]:
    """What the API server would refuse in ``obj`` (``[]``: nothing)."""
    assert obj["apiVersion"] == "ray.io/v1"
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


RAYCLUSTER = documents("kuberay.yaml")["RayCluster"]
RAYJOB = documents("kuberay-job.yaml")["RayJob"]


@pytest.mark.parametrize("obj", [RAYCLUSTER, RAYJOB], ids=lambda o: o["kind"])
def test_manifest_is_valid_for_the_kuberay_crd(obj):
    assert crd_errors(obj) == []


def _misspell_max_replicas(spec: dict) -> None:
    group = spec["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        (_misspell_max_replicas, "maxReplica"),  # unknown field and a missing required one
        # a typo next to the right field: only strict field validation sees it
        (lambda s: s["workerGroupSpecs"][0].update(maxReplicass=8), "'maxReplicass' was unexpected"),
        (lambda s: s["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (lambda s: s.pop("headGroupSpec"), "'headGroupSpec' is a required property"),
        (lambda s: s["autoscalerOptions"].update(version="v3"), "'v3' is not one of"),
        (lambda s: s["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
        (lambda s: s["workerGroupSpecs"][0].update(minReplicas="0"), "'0' is not of type 'integer'"),
        (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a"),
    ],
)
@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_the_schema_check_catches_broken_manifests(kind, break_it, expected):
    obj = copy.deepcopy(RAYCLUSTER if kind == "RayCluster" else RAYJOB)
    break_it(obj["spec"] if kind == "RayCluster" else obj["spec"]["rayClusterSpec"])
    errors = crd_errors(obj)
    assert any(expected in e for e in errors), errors


def test_the_rayjob_runs_the_benchmark_on_the_same_cluster():
    assert RAYJOB["spec"]["rayClusterSpec"] == RAYCLUSTER["spec"], "keep the two manifests' clusters equal"
    entrypoint = RAYJOB["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "experiments/benchmark.py", "--config", "quickstart"]
    overrides = dict(arg.split("=", 1) for arg in entrypoint[4:])
    assert overrides["resources.use_gpu"] == "true"  # "auto" would see no GPU yet and never scale
    assert RAYJOB["spec"]["shutdownAfterJobFinishes"] is True


def test_autoscaling_token_auth_and_the_shared_volume():
    spec = RAYCLUSTER["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token", "secretName": "vlprompt-ray-token"}
    head = spec["headGroupSpec"]["template"]["spec"]
    pods = [head] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    claim = documents("kuberay.yaml")["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in pods:
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"].startswith("http")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        assert mounts == {"shared": "/mnt/vlprompt"} and volumes == {"shared": claim["metadata"]["name"]}
    entrypoint = RAYJOB["spec"]["entrypoint"]
    for key in ("data.root", "data.feature_cache", "sweep.storage_path"):
        assert f"{key}=/mnt/vlprompt/" in entrypoint


def test_rays_kuberay_autoscaler_sees_a_gpu_group_scaling_from_zero():
    cr = copy.deepcopy(RAYCLUSTER)
    cr["metadata"]["namespace"] = "default"
    config = _derive_autoscaling_config_from_ray_cr(cr)  # runs Ray's validate_config too
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and head["resources"]["CPU"] == 4
    gpu = nodes["gpu"]
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 7
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)
    assert config["idle_timeout_minutes"] == pytest.approx(5.0)
    container = cr["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["resources"]["GPU"]
