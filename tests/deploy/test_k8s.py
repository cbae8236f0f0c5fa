"""k8s/: every kustomization renders with ``kubectl kustomize``; every object validates offline against
the Kubernetes JSON schemas (kubernetes-validate, strict, Kubernetes 1.33 and the oldest version the
manifests support, 1.30: the preStop ``sleep`` action); the CRDs against their published schemas (the
kubernetes-models validators) and their required fields; checkov finds nothing unexplained; and the
objects fit together the way a cluster needs (selectors, ports, probes, drain budget, settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import MAKE_TOOLS, require_tool
from .helpers import ROOT, TOOLS_VENV

K8S_VERSIONS = ("1.33.0", "1.30.0")
COMPLETE_SET = {
    "Namespace",
    "ServiceAccount",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "ConfigMap",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
    "PrometheusRule",
}
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "serving.kserve.io/")
APP_LABEL = {"app.kubernetes.io/name": "deepvit-serve"}


def _one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _settings_map(objs: list[dict[str, Any]]) -> dict[str, str]:
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("deepvit-settings"))
    data: dict[str, str] = cm["data"]
    return data


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(objs, "Deployment", "deepvit-serve")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "server"]
    return container


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_overlay_renders_the_complete_set(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    assert {o["kind"] for o in objs} == COMPLETE_SET
    assert all(o["metadata"].get("namespace") == "deepvit" for o in objs if o["kind"] != "Namespace")
    dashboards = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard")]
    (dashboard,) = dashboards
    shipped = json.loads((ROOT / "monitoring" / "deepvit-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["deepvit-dashboard.json"]) == shipped


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu", "overlays/gpu-keda"])
def test_every_object_lands_in_the_deepvit_namespace(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    stray = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in rendered[overlay]
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "deepvit"
    ]
    assert not stray, f"{overlay}: {stray} would go to the caller's current namespace"


def test_keda_overlay_replaces_the_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {o["kind"] for o in rendered["overlays/gpu-keda"]}
    assert kinds == (COMPLETE_SET - {"HorizontalPodAutoscaler"}) | {"ScaledObject"}
    so = _one(rendered["overlays/gpu-keda"], "ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == "deepvit-serve"
    queries = " ".join(t["metadata"]["query"] for t in so["spec"]["triggers"])
    assert "deepvit_inflight_requests" in queries
    assert "deepvit_queue_wait_seconds" in queries
    assert "cpu" not in {t["type"] for t in so["spec"]["triggers"]}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_validate_against_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, version: str
) -> None:
    validate = require_tool("kubernetes-validate", MAKE_TOOLS)
    files = []
    for name, objs in rendered.items():
        builtin = [o for o in objs if not o["apiVersion"].startswith(CRD_GROUPS)]
        if not builtin:
            continue
        path = tmp_path / (name.replace("/", "-") + ".yaml")
        path.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        files.append(str(path))
    assert len(files) == 3
    proc = subprocess.run(
        [validate, "--kubernetes-version", version, "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    # Every object was checked against a schema (none skipped as unknown).
    checked = len(re.findall(r"\bINFO\b.*passed", report))
    total = sum(len([o for o in objs if not o["apiVersion"].startswith(CRD_GROUPS)]) for objs in rendered.values())
    assert checked == total, report


def test_custom_resources_validate_against_published_schemas(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    node = require_tool("node", "install Node.js (the CRD validators are the kubernetes-models packages)")
    modules = TOOLS_VENV / "crd"
    if not (modules / "node_modules" / "@kubernetes-models").is_dir():
        require_tool("crd-schemas-in-.venv-tools/crd", f"{MAKE_TOOLS} with npm available")
    objs = [o for objs in rendered.values() for o in objs if o["apiVersion"].startswith(CRD_GROUPS)]
    objects_file = tmp_path / "objects.json"
    objects_file.write_text(json.dumps(objs))
    proc = subprocess.run(
        [node, str(ROOT / "tests" / "deploy" / "crd" / "validate.mjs"), str(modules), str(objects_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    checked = {(r["kind"], r["name"]): r["errors"] for r in results if r["errors"] is not None}
    assert {k for k, _ in checked} == {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    assert all(errors == [] for errors in checked.values()), checked


def _require(obj: dict[str, Any], *paths: str) -> None:
    for path in paths:
        node: Any = obj
        for part in path.split("."):
            present = isinstance(node, dict) and node.get(part) not in (None, "", [], {})
            assert present, f"{obj['kind']} {obj['metadata'].get('name')}: {path} is required"
            node = node[part]


def test_custom_resources_have_their_required_fields(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The fields each operator requires (from the CRDs' `required` lists), for every CR including the
    InferenceService, whose CRD schema no installable package publishes."""
    seen = set()
    for objs in rendered.values():
        for o in (o for o in objs if o["apiVersion"].startswith(CRD_GROUPS)):
            seen.add(o["kind"])
            _require(o, "apiVersion", "kind", "metadata.name", "spec")
            if o["kind"] == "ServiceMonitor":
                _require(o, "spec.selector.matchLabels", "spec.endpoints")
                assert all(e.get("port") and e.get("path") for e in o["spec"]["endpoints"])
            elif o["kind"] == "PrometheusRule":
                for group in o["spec"]["groups"]:
                    assert group["name"]
                    assert group["rules"]
                    for rule in group["rules"]:
                        assert rule.get("expr")
                        assert rule.get("alert") or rule.get("record")
            elif o["kind"] == "ScaledObject":
                _require(o, "spec.scaleTargetRef.name", "spec.triggers")
                assert all(t["type"] and t["metadata"] for t in o["spec"]["triggers"])
            elif o["kind"] == "InferenceService":
                assert o["apiVersion"] == "serving.kserve.io/v1beta1"
                _require(o, "spec.predictor.containers")
                (c,) = o["spec"]["predictor"]["containers"]
                assert c["name"] == "kserve-container"
                assert c["image"]
                (port,) = c["ports"]  # Knative routes one port: http1 for REST, h2c for gRPC
                if port["name"] == "h2c":
                    assert c["args"][c["args"].index("--grpc-port") + 1] == str(port["containerPort"])
                    assert c["readinessProbe"]["grpc"]["port"] == port["containerPort"]  # grpc.health.v1
                else:
                    assert port["name"] == "http1"
                    assert c["args"][c["args"].index("--port") + 1] == str(port["containerPort"])
                    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
                # What Knative's admission accepts without cluster feature flags: no "privileged", and on
                # the pod only the seccomp profile (the user goes on the container).
                assert "privileged" not in c["securityContext"]
                assert c["securityContext"]["runAsNonRoot"] is True
                assert set(o["spec"]["predictor"].get("securityContext", {})) <= {"seccompProfile"}
            else:
                pytest.fail(f"unexpected custom resource {o['kind']}")
    assert seen == {"ServiceMonitor", "PrometheusRule", "ScaledObject", "InferenceService"}


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_objects_fit_together(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    deploy = _one(objs, "Deployment", "deepvit-serve")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    container = _container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001}
    assert container["args"][container["args"].index("--port") + 1] == "8000"
    assert container["args"][container["args"].index("--grpc-port") + 1] == "8001"

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    service = _one(objs, "Service", "deepvit-serve")
    assert selects(service["spec"]["selector"])
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http", "grpc"]
    assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]} == {
        "http": "http",
        "grpc": "kubernetes.io/h2c",
    }
    assert selects(deploy["spec"]["selector"]["matchLabels"])
    assert selects(_one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    netpol = _one(objs, "NetworkPolicy")
    assert selects(netpol["spec"]["podSelector"]["matchLabels"])
    assert {p["port"] for p in netpol["spec"]["ingress"][0]["ports"]} == set(ports)
    assert netpol["spec"]["egress"] == []
    monitor = _one(objs, "ServiceMonitor")
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert "accelerator" in monitor["spec"]["podTargetLabels"]
    assert "accelerator" in pod_labels
    hpa = _one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "deepvit-serve"}
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    pvc = _one(objs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert container["args"][container["args"].index("--model-repository") + 1] == "/models"
    assert set(mounts) == {"/models", "/tmp"}, "the only writable path is /tmp"
    settings = _settings_map(objs)
    assert container["envFrom"] == [{"configMapRef": {"name": _cm_name(objs)}}]
    assert settings["DEEPVIT_LOG_FORMAT"] == "json"


def _cm_name(objs: list[dict[str, Any]]) -> str:
    return next(
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("deepvit-settings")
    )


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    pod = _one(rendered[overlay], "Deployment", "deepvit-serve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = _container(rendered[overlay])["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    namespace = _one(rendered[overlay], "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spread = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert spread == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_probes_and_drain_budget(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objs = rendered[overlay]
    pod = _one(objs, "Deployment", "deepvit-serve")["spec"]["template"]["spec"]
    c = _container(objs)
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_settings_map(objs)["DEEPVIT_GRACE_PERIOD_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    # The startup probe allows a slow model load before liveness can restart the pod.
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300


def test_gpu_and_cpu_overlays_differ_where_they_should(rendered: dict[str, list[dict[str, Any]]]) -> None:
    gpu, cpu = rendered["overlays/gpu"], rendered["overlays/cpu"]
    g, c = _container(gpu), _container(cpu)
    assert g["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert g["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert g["image"].endswith("-gpu")
    assert c["image"].endswith("-cpu")
    assert _settings_map(gpu)["DEEPVIT_PROVIDERS"].split(",")[0] == "cuda"
    assert _settings_map(cpu)["DEEPVIT_PROVIDERS"] == "cpu"
    gpod = _one(gpu, "Deployment", "deepvit-serve")["spec"]["template"]
    assert gpod["metadata"]["labels"]["accelerator"] == "gpu"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpod["spec"]["tolerations"])
    cpod = _one(cpu, "Deployment", "deepvit-serve")["spec"]["template"]
    assert cpod["metadata"]["labels"]["accelerator"] == "cpu"


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_settings_are_accepted_by_the_service(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every DEEPVIT_ variable of the ConfigMap names a setting and holds a value Settings accepts."""
    from deepvit.service.config import Settings

    settings = _settings_map(rendered[overlay])
    known = {f"DEEPVIT_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= known, f"unknown settings: {sorted(set(settings) - known)}"
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    built = Settings()
    assert built.grace_period_s == float(settings["DEEPVIT_GRACE_PERIOD_S"])


# The host memory one deepvit_S version holds (docs/limits.md): on the CPU overlay's 4 cores four
# single-threaded instances and the solo session (measured: 699 MiB for the four on 2 cores); on a GPU host
# CUDA's and cuDNN's libraries and the session's host side (an estimate: no GPU measured it here).
VERSION_BYTES = {"overlays/cpu": 1 << 30, "overlays/gpu": 2 << 30}
PROCESS_BYTES = 90 << 20


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_memory_follows_the_services_memory_budget(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks its memory budget against the container's limit (service/budget.py): with the
    overlay's settings and two versions in memory (a swap), the limit holds it and the request reserves it."""
    from deepvit.service.budget import MemoryBudget, upload_bound
    from deepvit.service.config import Settings

    for key, value in _settings_map(rendered[overlay]).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    resources = _container(rendered[overlay])["resources"]
    limit = _bytes(resources["limits"]["memory"])
    budget = MemoryBudget(limit, PROCESS_BYTES, settings.max_decode_memory_bytes, upload_bound(settings, limit))
    budget.check_start()
    budget.add_version("deepvit_S", 1, VERSION_BYTES[overlay])
    budget.add_version("deepvit_S", 2, VERSION_BYTES[overlay])  # raises when it does not fit
    assert _bytes(resources["requests"]["memory"]) >= sum(budget.parts().values()), budget.describe()


def test_hpa_scales_on_metrics_the_adapter_serves(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hpa = _one(rendered["overlays/gpu"], "HorizontalPodAutoscaler")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Pods"}, "scale on load signals, not CPU"
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    values = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    served = set()
    for rule in values["rules"]["custom"]:
        assert re.fullmatch(rule["name"]["matches"], series_of(rule["seriesQuery"]))
        assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
        for template in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert template in rule["metricsQuery"]
        served.add(rule["name"]["as"])
    assert wanted <= served
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 120


def series_of(series_query: str) -> str:
    return series_query.split("{", 1)[0]


def test_prometheusrule_is_the_rules_file(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rule = _one(rendered["overlays/gpu"], "PrometheusRule")
    source = yaml.safe_load((ROOT / "monitoring" / "deepvit.rules.yml").read_text())
    assert rule["spec"]["groups"] == source["groups"], "run: python monitoring/sync_k8s.py"


def test_checkov_finds_nothing_unexplained_in_k8s(tmp_path: Path) -> None:
    checkov = require_tool("checkov", MAKE_TOOLS)
    report = run_checkov(checkov, ROOT / "k8s", "kustomize", tmp_path)
    assert report["failed"] == [], report["failed"]
    assert report["passed"] > 100
    # Each skip is an inline annotation with its reason; only the image digest is skipped.
    assert {s["check_id"] for s in report["skipped"]} <= {"CKV_K8S_43"}
    for skipped in report["skipped"]:
        assert len(skipped["reason"]) > 40, f"{skipped['check_id']} skipped without a reason"


def run_checkov(checkov: str, directory: Path, framework: str, tmp_path: Path) -> dict[str, Any]:
    """checkov on one directory, offline (--skip-download); failed/skipped checks and the passed count."""
    proc = subprocess.run(
        [checkov, "--directory", str(directory), "--framework", framework, "--output", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{Path(checkov).parent}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    reports = data if isinstance(data, list) else [data]
    failed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    passed = 0
    for r in reports:
        if "results" not in r:
            continue
        assert r["summary"]["parsing_errors"] == 0, r["results"].get("parsing_errors")
        failed += [{"check_id": c["check_id"], "file": c["file_path"]} for c in r["results"]["failed_checks"]]
        skipped += [
            {"check_id": c["check_id"], "reason": c["check_result"].get("suppress_comment", "")}
            for c in r["results"]["skipped_checks"]
        ]
        passed += r["summary"]["passed"]
    return {"failed": failed, "skipped": skipped, "passed": passed}
