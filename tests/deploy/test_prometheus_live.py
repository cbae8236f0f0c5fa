"""A real Prometheus server (Debian's) scrapes a real ``deepvit serve`` process on loopback with the
shipped scrape config (only the target, the intervals and the rules path adapted), and PromQL through its
HTTP API returns every series the alerts, the dashboard and the autoscalers use, with the label values
they match on. Everything listens on 127.0.0.1 and stops at the end of the module."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from .conftest import SERVED_BODY_LIMIT
from .helpers import (
    CONTRACT_METRICS,
    ROOT,
    ServerProcess,
    free_port,
    http_get,
    http_post,
    png_bytes,
    prom_query,
)
from .test_monitoring import alerts, dashboard_exprs

pytestmark = pytest.mark.integration

MONITORING = ROOT / "monitoring"


@pytest.fixture(scope="module")
def traffic(served: ServerProcess) -> ServerProcess:
    """Requests a user would send: images (one colour each), a multipart batch, a bad image, an
    oversized body (a rejection), and a v2 metadata call."""
    for i in range(12):
        status, body = http_post(f"{served.url}/classify", png_bytes(color=(20 * i, 80, 160)), "image/png")
        assert status == 200, body
    boundary = "deepvitboundary"
    parts = b"".join(
        b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="x%d.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" % i + png_bytes(color=(i, i, i)) + b"\r\n"
        for i in range(3)
    )
    body = parts + b"--" + boundary.encode() + b"--\r\n"
    status, answer = http_post(f"{served.url}/classify", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    status, _ = http_post(f"{served.url}/classify", b"not an image", "image/png")
    assert status == 400
    status, _ = http_post(f"{served.url}/classify", b"\0" * (SERVED_BODY_LIMIT + 1), "image/png")
    assert status == 413
    return served


@pytest.fixture(scope="module")
def prometheus(prometheus_bin: str, traffic: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on loopback with monitoring/prometheus.yml, scraping the served process every second.
    The target is labelled accelerator=gpu on purpose: the server runs on the CPU provider, so the
    GPU-fallback alert must find it."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    (workdir / "targets").mkdir()
    (workdir / "targets" / "deepvit.yml").write_text(
        yaml.safe_dump([{"targets": [f"127.0.0.1:{traffic.port}"], "labels": {"accelerator": "gpu"}}])
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while http_get(f"{base}/-/ready", timeout=2)[0] != 200:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        # Until the scrapes carry the traffic and the rules were evaluated at least once.
        while not prom_query(base, "deepvit_images_total > 0") or not _rules_evaluated(base):
            assert time.monotonic() < deadline, "no deepvit series scraped:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(2.5)  # two more scrapes: rate() over the traffic has two samples
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _rules_evaluated(base: str) -> bool:
    status, body = http_get(f"{base}/api/v1/rules", timeout=5)
    groups = json.loads(body or b"{}").get("data", {}).get("groups", [])
    rules = [r for g in groups for r in g["rules"]]
    return status == 200 and bool(rules) and all(r.get("lastEvaluation", "").startswith("20") for r in rules)


def test_target_is_up_with_the_shipped_scrape_config(prometheus: str) -> None:
    (target,) = json.loads(http_get(f"{prometheus}/api/v1/targets")[1])["data"]["activeTargets"]
    assert target["health"] == "up", target
    assert target["labels"]["job"] == "deepvit"
    assert target["scrapeUrl"].endswith("/metrics")


def test_every_contract_metric_is_scraped(prometheus: str) -> None:
    names = {r["metric"]["__name__"] for r in prom_query(prometheus, 'count by (__name__) ({__name__=~"deepvit_.+"})')}
    for metric, kind in CONTRACT_METRICS.items():
        wanted = [f"{metric}{s}" for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [metric]
        missing = [w for w in wanted if w not in names]
        assert not missing, f"Prometheus has no {missing}: the service exports {sorted(names)}"


def test_every_alert_evaluates_and_loads(prometheus: str) -> None:
    for alert in alerts():
        prom_query(prometheus, alert["expr"])  # raises on a PromQL error
    groups = json.loads(http_get(f"{prometheus}/api/v1/rules")[1])["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {a["alert"] for a in alerts()}
    assert all(r["health"] == "ok" for r in loaded.values()), {n: r.get("lastError") for n, r in loaded.items()}


def test_alerts_match_the_real_label_values(prometheus: str) -> None:
    """The label values the alerts match on are the ones the service writes: status codes, routes,
    providers, weights. The tiny model is untrained and on the CPU behind a target labelled gpu, so
    those two alert expressions find it; the error ratio sees the requests and no 5xx."""
    by_name = {a["alert"]: a["expr"] for a in alerts()}
    assert prom_query(prometheus, by_name["DeepvitUntrainedModelServing"])
    (on_cpu,) = prom_query(prometheus, by_name["DeepvitModelOnCPU"])
    assert on_cpu["metric"]["provider"] in ("cpu", "openvino")  # the CPU's engines, chosen by measurement
    assert not prom_query(prometheus, by_name["DeepvitHighErrorRatio"])
    assert not prom_query(prometheus, by_name["DeepvitModelNotReady"])
    inference = 'deepvit_request_duration_seconds_count{route=~"/classify|/v2/models/.+/infer"}'
    assert prom_query(prometheus, inference), "the inference-route matcher finds /classify"
    assert prom_query(prometheus, 'deepvit_http_requests_total{status=~"4..", route="/classify"}')
    assert prom_query(prometheus, "deepvit_rejected_requests_total > 0")


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$job", ".+").replace("$model", ".+")


def test_every_dashboard_query_runs_and_the_key_panels_have_data(prometheus: str) -> None:
    dashboard = json.loads((MONITORING / "deepvit-dashboard.json").read_text())
    for expr in dashboard_exprs(dashboard):
        if expr.startswith("label_values("):
            series = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", expr)
            assert series, expr
            assert prom_query(prometheus, _grafana_to_promql(series[1])), expr
            continue
        prom_query(prometheus, _grafana_to_promql(expr))
    with_data = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if prom_query(prometheus, _grafana_to_promql(target["expr"])):
                with_data += 1
                break
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert with_data == len(panels), "every panel shows something after a little traffic"


def test_autoscaling_queries_return_per_pod_values(prometheus: str) -> None:
    """prometheus-adapter's rules and KEDA's queries, with their templates filled as the adapter does
    (label matchers of one pod, grouped by pod), answer with a value."""
    values: dict[str, Any] = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    for rule in values["rules"]["custom"]:
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", rule["seriesQuery"].split("{", 1)[0])
            .replace("<<.LabelMatchers>>", 'job="deepvit"')
            .replace("<<.GroupBy>>", "instance")
        )
        (sample,) = prom_query(prometheus, query)
        assert float(sample["value"][1]) >= 0, (rule["name"]["as"], sample)
    scaled = yaml.safe_load((ROOT / "k8s" / "components" / "keda" / "scaledobject.yaml").read_text())
    for trigger in scaled["spec"]["triggers"]:
        query = trigger["metadata"]["query"].replace('namespace="deepvit"', 'job="deepvit"')
        (sample,) = prom_query(prometheus, query)
        assert float(sample["value"][1]) >= 0, (trigger["name"], sample)


def test_metric_types_are_the_contract(traffic: ServerProcess) -> None:
    """Alerts use histogram_quantile on the histograms and rate() on the counters: the types must hold."""
    status, body = http_get(f"{traffic.url}/metrics")
    assert status == 200
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), flags=re.MULTILINE))
    for metric, kind in CONTRACT_METRICS.items():
        declared = families.get(metric) or families.get(metric.removesuffix("_total"))
        assert declared == kind, (metric, declared)
