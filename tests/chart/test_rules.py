"""Alerts, dashboard and metric names: promtool on the rendered PrometheusRule, promtool unit tests
of the alerts, every PromQL expression through a real Prometheus, and every metric a query names
defined by the operator (observability.OperatorMetrics) or the trainer."""
from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest
import yaml

from ratatouille_operator import observability as O

from . import helmutil as H

pytest.importorskip("helm_python")

EXPECTED_ALERTS = {
    "RatatouilleOperatorDown", "RatatouilleReconcileErrors", "RatatouilleRunsFailing",
    "RatatouilleChildJobRetriesHigh", "RatatouilleRunPendingTooLong", "RatatouilleStorageErrors",
    "RatatouilleAveragingCollapse",
}


def promtool() -> str:
    path = H.promtool_binary()
    if path is None:
        pytest.skip("promtool not installed (make system-deps)")
    return path


# ---------------------------------------------------------------------------------------------
# alerts

def test_alert_set_and_annotations():
    rules = H.alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    assert len(rules) == len(EXPECTED_ALERTS)
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip()
    by_name = {r["alert"]: r for r in rules}
    assert by_name["RatatouilleOperatorDown"]["for"] == "5m"
    assert by_name["RatatouilleOperatorDown"]["labels"]["severity"] == "critical"
    assert by_name["RatatouilleReconcileErrors"]["for"] == "15m"
    assert "[30m]" in by_name["RatatouilleRunsFailing"]["expr"]
    assert 'result="Failed"' in by_name["RatatouilleRunsFailing"]["expr"]
    assert by_name["RatatouilleChildJobRetriesHigh"]["expr"].rstrip().endswith("> 10")
    assert by_name["RatatouilleRunPendingTooLong"]["expr"].rstrip().endswith("> 3600")


def test_promtool_check_rules_on_the_rendered_prometheusrule(tmp_path):
    path = H.write_rules_file(tmp_path / "ratatouille.rules.yaml")
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in res.stdout + res.stderr


def test_promtool_check_rules_fails_on_a_broken_rule(tmp_path):
    """The check above can fail: a syntax error in one expression is reported."""
    spec = H.prometheus_rule()["spec"]
    spec["groups"][0]["rules"][1]["expr"] = "sum by (handler (increase(ratatouille_reconcile_errors_total[5m]))"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0


# promtool unit tests: the alerts fire on the series the operator exposes, and stay quiet otherwise.
# Inside `promtool test rules` the scraped series are given as input_series with the labels
# Prometheus would attach (job/instance, and the PodMonitor's target labels for trainers).
ALERT_TESTS = """
evaluation_interval: 1m
tests:
- interval: 1m
  input_series:
  - series: 'up{job="ratatouille", instance="10.0.0.5:9090", namespace="ratatouille"}'
    values: '1x5 0x10'
  # a finished training pod is down too, but is no operator
  - series: 'up{job="ratatouille/rt-ratatouille-trainers", instance="10.0.0.9:9400", ratatouille_dev_stage="target"}'
    values: '0x15'
  alert_rule_test:
  - eval_time: 4m
    alertname: RatatouilleOperatorDown
    exp_alerts: []
  - eval_time: 12m
    alertname: RatatouilleOperatorDown
    exp_alerts:
    - exp_labels: {severity: critical, job: ratatouille, instance: "10.0.0.5:9090", namespace: ratatouille}
      exp_annotations:
        summary: The Ratatouille operator is down or not scraped.
        description: >-
          No successful scrape of the Ratatouille operator for 5 minutes. RatatouilleRuns are not
          reconciled: no child Jobs are created, retried or collected, and run status is stale.
          Check `kubectl -n <namespace> get pods -l app.kubernetes.io/component=operator`.
- interval: 1m
  input_series: []
  alert_rule_test:
  - eval_time: 6m
    alertname: RatatouilleOperatorDown
    exp_alerts:
    - exp_labels: {severity: critical}
      exp_annotations:
        summary: The Ratatouille operator is down or not scraped.
        description: >-
          No successful scrape of the Ratatouille operator for 5 minutes. RatatouilleRuns are not
          reconciled: no child Jobs are created, retried or collected, and run status is stale.
          Check `kubectl -n <namespace> get pods -l app.kubernetes.io/component=operator`.
- interval: 1m
  input_series:
  - series: 'ratatouille_runs_finished_total{namespace="ml", result="Failed"}'
    values: '0 0 1 1 1'
  - series: 'ratatouille_runs_finished_total{namespace="ml", result="Succeeded"}'
    values: '0 3 6 9 12'
  - series: 'ratatouille_oldest_pending_run_age_seconds'
    values: '3000+120x10'
  - series: 'ratatouille_child_job_retries_total{namespace="ml", stage="target"}'
    values: '0+1x60'
  - series: 'ratatouille_child_job_retries_total{namespace="ml", stage="aux"}'
    values: '0x60'
  - series: 'ratatouille_storage_errors_total{op="get"}'
    values: '0 0 0 2 2'
  - series: 'ratatouille_averaging_collapse_total{namespace="ml"}'
    values: '0x4'
  - series: 'ratatouille_reconcile_errors_total{handler="reconcile"}'
    values: '0+1x30'
  alert_rule_test:
  - eval_time: 4m
    alertname: RatatouilleRunsFailing
    exp_alerts:
    - exp_labels: {severity: warning, namespace: ml}
      exp_annotations:
        summary: RatatouilleRuns failed in namespace ml.
        description: >-
          1 RatatouilleRun(s) in ml finished Failed in the last 30 minutes.
          `kubectl -n ml get rrun` and the run's Failed condition give the reason.
  - eval_time: 2m
    alertname: RatatouilleRunPendingTooLong
    exp_alerts: []
  - eval_time: 6m
    alertname: RatatouilleRunPendingTooLong
    exp_alerts:
    - exp_labels: {severity: warning}
      exp_annotations:
        summary: A RatatouilleRun has been Pending for over an hour.
        description: >-
          The oldest Pending RatatouilleRun is 1h 2m 0s old. Its Jobs are probably not admitted
          or not scheduled: check the queue (Kueue), GPU capacity and the Jobs' pod Events.
  - eval_time: 5m
    alertname: RatatouilleChildJobRetriesHigh
    exp_alerts: []
  - eval_time: 60m
    alertname: RatatouilleChildJobRetriesHigh
    exp_alerts:
    - exp_labels: {severity: warning, namespace: ml, stage: target}
      exp_annotations:
        summary: Many target Job retries in ml.
        description: >-
          60 target child Jobs in ml were retried in the last hour. Nodes may be preempted or
          failing, or the training image may crash (see the pods' termination messages).
  - eval_time: 4m
    alertname: RatatouilleStorageErrors
    exp_alerts:
    - exp_labels: {severity: warning, op: get}
      exp_annotations:
        summary: Object storage get operations are failing.
        description: >-
          2 storage get errors in the last 15 minutes. Check the S3 endpoint, the bucket and the
          credentials Secret.
  - eval_time: 4m
    alertname: RatatouilleAveragingCollapse
    exp_alerts: []
  - eval_time: 10m
    alertname: RatatouilleReconcileErrors
    exp_alerts: []
  - eval_time: 25m
    alertname: RatatouilleReconcileErrors
    exp_alerts:
    - exp_labels: {severity: warning, handler: reconcile}
      exp_annotations:
        summary: Ratatouille handler reconcile keeps failing.
        description: >-
          The operator's reconcile handler has raised errors continuously for 15 minutes
          (5 in the last 5 minutes). Read the operator log and the Events of the affected
          RatatouilleRuns.
"""


def test_alerts_fire_as_intended(tmp_path):
    rules = H.write_rules_file(tmp_path / "ratatouille.rules.yaml")
    tests = yaml.safe_load(ALERT_TESTS)
    tests["rule_files"] = [rules.name]
    path = tmp_path / "ratatouille.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    res = subprocess.run([promtool(), "test", "rules", path.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# dashboard

def test_dashboard_structure():
    dashes = H.dashboards()
    assert list(dashes) == ["ratatouille.json"]
    dash = dashes["ratatouille.json"]
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ns = variables["namespace"]
    assert ns["type"] == "query" and ns["includeAll"] and ns["allValue"] == ".*"
    assert ns["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = list(H.iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    # panels do not overlap
    cells = set()
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_dashboard_covers_what_the_issue_asks_for():
    exprs = " ".join(H.dashboard_queries(substitute=False))
    needed = [
        "sum by (phase) (ratatouille_runs",                           # runs by phase
        "rate(ratatouille_runs_finished_total",                       # finish rate by result
        "sum by (stage, state) (ratatouille_child_jobs",              # Jobs by stage and state
        "ratatouille_child_job_failures_total", "ratatouille_child_job_retries_total",
        "histogram_quantile(0.5, sum by (le, stage) (rate(ratatouille_stage_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, stage) (rate(ratatouille_stage_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, handler) (rate(ratatouille_reconcile_duration_seconds_bucket",
        "ratatouille_reconcile_errors_total", "ratatouille_oldest_pending_run_age_seconds",
        "ratatouille_storage_errors_total",
        "ratatouille_trainer_step", "ratatouille_trainer_loss", "ratatouille_trainer_images_per_second",
        "ratatouille_trainer_val_accuracy",
    ]
    for n in needed:
        assert n in exprs, n
    assert '$namespace' in exprs and '$__rate_interval' in exprs
    assert all("$" not in q for q in H.dashboard_queries())  # substitution leaves no variables


# ---------------------------------------------------------------------------------------------
# metric names

def test_operator_metrics_match_the_contract():
    m = O.OperatorMetrics()
    collectors = {c._name: c for c in vars(m).values() if hasattr(c, "_labelnames")}
    exposed = {}
    for name, c in collectors.items():
        full = name + "_total" if c._type == "counter" else name
        exposed[full] = (c._type, tuple(c._labelnames))
    assert exposed == O.OPERATOR_METRICS
    forbidden = {"run", "name", "member", "uid", "pod"}
    assert not any(forbidden & set(labels) for _, labels in exposed.values())
    assert set(O.TRAINER_METRICS) == {
        "ratatouille_trainer_step", "ratatouille_trainer_loss", "ratatouille_trainer_images_per_second",
        "ratatouille_trainer_val_accuracy", "ratatouille_trainer_info"}


def test_operator_metrics_use_their_own_registry():
    from prometheus_client import REGISTRY, generate_latest
    a, b = O.OperatorMetrics(version="1.2.3"), O.OperatorMetrics()  # no duplicate-registration error
    a.runs_created.labels(namespace="ml").inc()
    text = generate_latest(a.registry).decode()
    assert 'ratatouille_runs_created_total{namespace="ml"} 1.0' in text
    assert 'ratatouille_build_info{version="1.2.3"} 1.0' in text
    assert "ratatouille_runs_created_total{" not in generate_latest(b.registry).decode()
    assert "ratatouille_" not in generate_latest(REGISTRY).decode()


def test_start_http_server_serves_the_registry():
    m = O.OperatorMetrics(version="9.9.9")
    m.child_jobs.labels(namespace="ml", stage="target", state="Active").set(3)
    port = H.free_port()
    server, thread = O.start_http_server(port, m.registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'ratatouille_child_jobs{namespace="ml",stage="target",state="Active"} 3.0' in body
    assert "python_gc_objects_collected_total" not in body  # not the default registry


def _known_names() -> set[str]:
    return O.OperatorMetrics().names() | set(O.TRAINER_METRICS)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_exists(source):
    exprs = H.dashboard_queries() if source == "dashboard" else H.alert_exprs()
    known = _known_names()
    used = set().union(*(H.metric_names(e) for e in exprs))
    assert used, "no ratatouille_* metric found in the queries"
    assert used <= known, used - known
    # histograms are queried through their buckets, counters through _total
    for e in exprs:
        for name in H.metric_names(e):
            assert not (name in O.OPERATOR_METRICS and O.OPERATOR_METRICS[name][0] == "histogram"), e


def test_metric_name_scan_catches_an_unknown_name():
    assert H.metric_names('rate(ratatouille_runs_finishd_total{ratatouille_dev_run="x"}[5m])') == {
        "ratatouille_runs_finishd_total"}
    assert "ratatouille_runs_finishd_total" not in _known_names()


def test_trainer_metric_names_are_the_ones_the_trainer_serves():
    progress = H.REPO_ROOT / "trainer" / "ratatouille_trainer" / "progress.py"
    if not progress.exists():
        pytest.skip("trainer progress module not present")
    served = set(re.findall(r"""["'](ratatouille_trainer_[a-z_]+)["']""", progress.read_text()))
    assert set(O.TRAINER_METRICS) <= served, set(O.TRAINER_METRICS) - served


# ---------------------------------------------------------------------------------------------
# every expression through a real Prometheus

@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    if H.prometheus_binary() is None:
        pytest.skip("prometheus not installed (make system-deps)")
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = H.write_rules_file(workdir / "ratatouille.rules.yaml")
    with H.Prometheus(rule_files=[rules], workdir=workdir) as prom:
        yield prom
    assert prom.proc is None  # stopped


def test_prometheus_loaded_the_alerts(prometheus):
    body = prometheus.api("rules")
    assert body["status"] == "success"
    groups = body["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert loaded == EXPECTED_ALERTS
    assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_evaluates(prometheus, source):
    exprs = H.dashboard_queries() if source == "dashboard" else H.alert_exprs()
    assert exprs
    failures = {}
    for expr in exprs:
        body = prometheus.query(expr)
        if body.get("status") != "success":
            failures[expr] = body.get("error")
    assert not failures, json.dumps(failures, indent=1)


def test_prometheus_rejects_a_bad_query(prometheus):
    body = prometheus.query("sum by (stage (ratatouille_child_jobs)")
    assert body["status"] == "error" and body.get("errorType") == "bad_data"
