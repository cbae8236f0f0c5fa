"""k8s/rayjob: the RayJob renders, validates against KubeRay's published CRD schema (vendored in
tests/deploy/crd/kuberay, strict about unknown fields), and runs a ``deepvit predict`` that this version's
command line accepts, on a cluster of the project's batch image that ends with the job and retries by
resuming."""

from __future__ import annotations

import gzip
import shlex
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml

from .conftest import require_tool
from .helpers import ROOT, read_dockerfile

CRD = ROOT / "tests" / "deploy" / "crd" / "kuberay" / "ray.io_rayjobs.yaml.gz"
# Ray's dashboard agent (its default port): the node's raylet, and on the head its GCS.
NODE_HEALTH = {"path": "/api/healthz", "port": 52365}


def _strict(schema: Any) -> Any:
    """The CRD's schema with unknown fields refused where the API server's strict validation refuses them:
    an object that lists its properties, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    kubectl = require_tool("kubectl", "install kubectl (its built-in kustomize renders k8s/rayjob)")
    proc = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "rayjob")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (obj,) = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert (obj["apiVersion"], obj["kind"]) == ("ray.io/v1", "RayJob")
    return dict(obj)


def _errors(validator: jsonschema.protocols.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_the_rayjob_validates_against_kuberays_crd(
    validator: jsonschema.protocols.Validator, rayjob: dict[str, Any]
) -> None:
    assert _errors(validator, rayjob) == []


def test_the_validation_refuses_what_the_operator_would(
    validator: jsonschema.protocols.Validator, rayjob: dict[str, Any]
) -> None:
    misspelt = {**rayjob, "spec": {**rayjob["spec"], "shutdownAfterJobFinish": True}}
    assert any("shutdownAfterJobFinish" in e for e in _errors(validator, misspelt))
    wrong_type = {**rayjob, "spec": {**rayjob["spec"], "backoffLimit": "three"}}
    assert any("backoffLimit" in e for e in _errors(validator, wrong_type))
    no_head = {**rayjob, "spec": {**rayjob["spec"], "rayClusterSpec": {"rayVersion": "2.60.0"}}}
    assert any("headGroupSpec" in e for e in _errors(validator, no_head))


def test_the_job_is_a_resumable_deepvit_predict_that_ends_its_cluster(rayjob: dict[str, Any]) -> None:
    from deepvit.cli import build_parser

    spec = rayjob["spec"]
    assert rayjob["metadata"]["namespace"] == "deepvit"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] >= 1, "a failed attempt is retried, and the retry resumes"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["deepvit", "predict"]
    args = build_parser().parse_args(argv[1:])  # the flags this version of the command takes
    assert args.output.startswith(("s3://", "gs://")), "every attempt, on any node, finds the rows of the last"
    assert args.src.startswith(("s3://", "gs://"))
    assert args.address is None, "the job's RAY_ADDRESS joins the cluster made for it"
    assert "runtimeEnvYAML" not in spec, "nothing is installed at job start: the image has it all"

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in (head, *workers) for c in pod["containers"]}
    assert images == {"deepvit-serve:0.1.0-batch"}  # the tag docker/Dockerfile.batch's header builds
    assert "-t deepvit-serve:0.1.0-batch " in (ROOT / "docker" / "Dockerfile.batch").read_text()
    # The artifact is read from the model repository volume on the head, where the driver runs.
    mounts = {m["mountPath"]: m for m in head["containers"][0]["volumeMounts"]}
    assert args.artifact.startswith("/models/")
    assert mounts["/models"]["readOnly"] is True
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "deepvit-models"
    image_user = read_dockerfile(ROOT / "docker" / "Dockerfile.batch")[-1].last("USER")
    for pod in (head, *workers):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert f"{pod['securityContext']['runAsUser']}:" in f"{image_user}:"
        assert pod["automountServiceAccountToken"] is False
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["envFrom"] == [{"secretRef": {"name": "deepvit-batch-s3"}}]
        assert container["resources"]["limits"]["memory"]
        # HTTP probes of the node's health (test_batch_image.py asks the same of a node of the image): an
        # operator that would put in its own wget probes keeps these.
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == NODE_HEALTH, probe


def test_the_image_runs_the_ray_version_the_project_installs(rayjob: dict[str, Any]) -> None:
    import ray

    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
