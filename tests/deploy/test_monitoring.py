"""monitoring/: the alert rules pass ``promtool check rules`` and ``promtool test rules`` (every alert
fired from synthetic series), each alert says what happened and what to do, the scrape config passes
``promtool check config``, and the dashboard parses and names only metrics the service exports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import CONTRACT_METRICS, PROMETHEUS_SERIES, ROOT, base_metric, series_names

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "deepvit.rules.yml"
DASHBOARD = MONITORING / "deepvit-dashboard.json"


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_promtool_checks_the_rules(promtool: str) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def test_promtool_unit_tests_fire_every_alert(promtool: str) -> None:
    tests_file = MONITORING / "deepvit.rules.test.yml"
    proc = subprocess.run(
        [promtool, "test", "rules", tests_file.name], capture_output=True, text=True, timeout=120, cwd=MONITORING
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Each alert has a case where it fires (a non-empty exp_alerts).
    cases = yaml.safe_load(tests_file.read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    assert fired == {a["alert"] for a in alerts()}


def test_promtool_checks_the_scrape_config(promtool: str, tmp_path: Path) -> None:
    for name in ("prometheus.yml", "deepvit.rules.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "deepvit.yml").write_text('- targets: ["deepvit:8000"]\n  labels: {accelerator: cpu}\n')
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr


def test_every_alert_says_what_and_what_to_do() -> None:
    runbook = (MONITORING / "RUNBOOK.md").read_text()
    for alert in alerts():
        ann, labels = alert["annotations"], alert["labels"]
        assert ann["summary"].strip(), alert["alert"]
        assert ann["description"].strip(), alert["alert"]
        assert ann["runbook"].strip(), alert["alert"]
        assert labels["severity"] in {"critical", "warning", "info"}
        anchor = alert["alert"].lower()
        assert f"RUNBOOK.md#{anchor}" in ann["runbook"]
        assert f"## {alert['alert']}" in runbook, f"RUNBOOK.md has no entry for {alert['alert']}"


def test_alerts_cover_the_failure_modes() -> None:
    """Error ratio, p99 latency, queue saturation, rejections, a model not ready, GPU fallback to CPU."""
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    needed = {
        "error ratio": lambda e: "deepvit_http_requests_total" in e and '"5.."' in e,
        "p99 latency": lambda e: "histogram_quantile(0.99" in e and "deepvit_request_duration_seconds" in e,
        "queue saturation": lambda e: "deepvit_queue_wait_seconds" in e or "deepvit_queue_depth" in e,
        "rejections": lambda e: "deepvit_rejected_requests_total" in e,
        "model not ready": lambda e: "deepvit_model_ready" in e,
        "GPU model on CPU": lambda e: "deepvit_model_info" in e and 'accelerator="gpu"' in e,
    }
    for what, matches in needed.items():
        assert any(matches(e) for e in exprs.values()), f"no alert for {what}"


def test_alerts_name_only_contract_metrics() -> None:
    for alert in alerts():
        names = {base_metric(n) for n in series_names(alert["expr"])}
        assert names, alert["alert"]
        assert names <= set(CONTRACT_METRICS) | PROMETHEUS_SERIES, (alert["alert"], names)


def test_dashboard_parses_and_names_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    used = set()
    for expr in exprs:
        names = {base_metric(n) for n in series_names(expr)}
        assert names, expr
        assert names <= set(CONTRACT_METRICS), (expr, names - set(CONTRACT_METRICS))
        used |= names
    # Every metric of the contract is on the dashboard somewhere.
    assert used == set(CONTRACT_METRICS)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["title"]
    # The data source is a variable: the same JSON works in compose and in a cluster's Grafana.
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize(
    ("what", "panel_type", "needle"),
    [
        ("request rate by status", "timeseries", "sum by (status) (rate(deepvit_http_requests_total"),
        ("latency percentiles", "timeseries", "histogram_quantile(0.99, sum by (le) (rate(deepvit_request_duration"),
        ("queue wait", "timeseries", "deepvit_queue_wait_seconds_bucket"),
        ("batch-size distribution", "heatmap", "deepvit_batch_size_bucket"),
        ("queue depth", "timeseries", "deepvit_queue_depth"),
        ("rejections", "timeseries", "deepvit_rejected_requests_total"),
        ("model info", "table", "deepvit_model_info"),
    ],
)
def test_dashboard_has_the_panels_operators_need(what: str, panel_type: str, needle: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    hits = [
        p
        for p in dashboard["panels"]
        if p["type"] == panel_type and any(needle in t["expr"] for t in p.get("targets", []))
    ]
    assert hits, f"no {panel_type} panel for {what}"


def test_adapter_queries_name_only_contract_metrics() -> None:
    values = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    for rule in values["rules"]["custom"]:
        names = {base_metric(n) for n in series_names(rule["metricsQuery"])} | {
            base_metric(n) for n in series_names(rule["seriesQuery"])
        }
        assert names <= set(CONTRACT_METRICS), names


def test_prometheusrule_copy_is_in_sync() -> None:
    """k8s/base/prometheusrule.yaml holds the rules file's groups (monitoring/sync_k8s.py writes it)."""
    k8s = yaml.safe_load((ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text())
    assert k8s["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], "run python monitoring/sync_k8s.py"
