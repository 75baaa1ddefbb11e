"""Deploy-and-observe, end to end: the chart installed by Helm with monitoring on (its
ServiceMonitor, PodMonitor and PrometheusRule validated by the API server against the Prometheus
Operator's CRDs), the operator running as its Deployment's pod on the upstream control plane; a
real Prometheus scraping it the way the chart's ServiceMonitor would, and the training pods the
way its PodMonitor would (the node agent gives every trainer a loopback metrics port and keeps a
file_sd list of the live ones, labelled like the PodMonitor's relabeling); then every alert
expression and every dashboard panel query of the chart is evaluated against what Prometheus
scraped.

Two runs: `observed` trains for real (a linear probe, two targets, one of which fails its first
attempt and is retried, the average) and succeeds; `doomed` (instant Jobs, one member always
failing) fails, so the failure panels and the RatatouilleRunsFailing alert have data too.
"""
from __future__ import annotations

import contextlib
import json
import time
import urllib.request

import pytest

from tests.cluster.nodeagent import prometheus_label_name
from tests.operator.harness import RELEASE_NS, ChartOperator, run_manifest, write_datasets

pytest.importorskip("kopf")
pytest.importorskip("timm")
pytest.importorskip("helm_python")
from tests.chart import helmutil  # noqa: E402  (needs helm_python)

pytestmark = pytest.mark.slow

RELEASE_NAMESPACE = RELEASE_NS  # where ChartOperator installs the release
RUN_NS, FAILED_NS = "obs-main", "obs-failing"
# Long enough that each target trains for ~10 s on an idle 2-core machine: Prometheus 2.x's
# discovery manager passes target changes to the scrape pools at most every 5 s, so a pod that lives
# only a few seconds (40-step targets did) may never be scraped at all.
TARGET_STEPS = 600

# Dashboard panels that legitimately show nothing after these two runs: no storage operation
# failed, no handler raised, no average collapsed. Every other panel must have data.
MAY_BE_EMPTY = {"Storage errors", "Reconcile errors", "Averaging collapses (24h)"}
# Panels the brief names explicitly (must have data whatever MAY_BE_EMPTY says).
MUST_HAVE_DATA = {"Runs by phase", "Jobs created, failed and retried by stage", "Reconcile latency p95",
                  "Training step", "Training loss", "Throughput", "Validation accuracy (latest)"}


def _panels() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every panel target."""
    out = []
    for dash in helmutil.dashboards().values():
        for panel in helmutil.iter_panels(dash.get("panels", [])):
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append((panel.get("title", "?"), helmutil.substitute_variables(target["expr"])))
    return out


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as rsp:
        return rsp.status, rsp.read().decode(errors="replace")


def _result(res: dict) -> list:
    assert res.get("status") == "success", res
    return res["data"]["result"]


@pytest.fixture(scope="module")
def monitoring_objects():
    """The chart's ServiceMonitor, its Service and PodMonitor, rendered with monitoring on."""
    docs = helmutil.render_chart({"monitoring": {"enabled": True}}, namespace=RELEASE_NAMESPACE)
    return {"ServiceMonitor": helmutil.one(docs, "ServiceMonitor"), "Service": helmutil.one(docs, "Service"),
            "PodMonitor": helmutil.one(docs, "PodMonitor")}


@pytest.fixture(scope="module")
def cluster(k8s_cluster, monitoring_objects):
    """The session's cluster, its node agent giving trainers metrics ports and listing them as
    targets the way the rendered PodMonitor selects and labels pods."""
    if helmutil.prometheus_binary() is None:
        pytest.skip("prometheus is not installed (make system-deps)")
    pm = monitoring_objects["PodMonitor"]["spec"]
    pod_labels = list(pm["podTargetLabels"])
    # The PodMonitor's relabelings copy further pod labels into target labels.
    for endpoint in pm["podMetricsEndpoints"]:
        for rule in endpoint.get("relabelings") or []:
            for source in rule.get("sourceLabels") or []:
                prefix = "__meta_kubernetes_pod_label_"
                assert source.startswith(prefix), rule
                # Pod labels are ratatouille.dev/<x>; the sanitized name is all discovery keeps.
                original = "ratatouille.dev/" + source[len(prefix + "ratatouille_dev_"):]
                assert prometheus_label_name(original) == source[len(prefix):] == rule["targetLabel"], rule
                pod_labels.append(original)
    agent = k8s_cluster.controller
    agent.reset()
    saved = (agent.metrics_ports, agent.metrics_pod_selector, agent.metrics_pod_labels)
    agent.metrics_ports, agent.metrics_pod_selector = True, dict(pm["selector"]["matchLabels"])
    agent.metrics_pod_labels = pod_labels
    try:
        yield k8s_cluster
    finally:
        agent.metrics_ports, agent.metrics_pod_selector, agent.metrics_pod_labels = saved
        agent.reset()


def _installed(cluster, op: ChartOperator) -> dict:
    """What Helm installed: the operator container's ports, probe and the environment the node
    agent gave it, checked to be self-consistent; and the monitoring objects the API server took."""
    deployment = json.loads(cluster.kubectl("get", "deployment", f"{op.release}-operator", "-n", op.namespace,
                                            "-o", "json").stdout)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports") or []}
    probe = container["livenessProbe"]["httpGet"]
    env = op.env
    assert env["RATATOUILLE_METRICS_PORT"] == str(ports["http-metrics"]) == str(op.metrics_port)
    assert env["RATATOUILLE_LIVENESS_PORT"] == str(ports[probe["port"]]) == str(op.liveness_port)
    for kind in ("servicemonitors", "podmonitors", "prometheusrules"):
        listed = json.loads(cluster.kubectl("get", f"{kind}.monitoring.coreos.com", "-n", op.namespace,
                                            "-o", "json").stdout)["items"]
        assert listed, f"helm installed no {kind}"
    return {"liveness_path": probe["path"], "command": container["command"], "env": env}


def test_chart_deployment_operator_is_scraped_and_every_chart_query_evaluates(
        cluster, monitoring_objects, tmp_path):
    ctl = cluster.controller
    op = ChartOperator(cluster, values={
        "monitoring": {"enabled": True},  # the API server validates its monitoring objects
        "reconcileInterval": 2,  # resync (and so the runs-by-phase gauge) every 2 s, not 15
    })
    metrics_port, liveness_port = op.metrics_port, op.liveness_port
    # -- what Prometheus scrapes, as the chart's ServiceMonitor / PodMonitor describe it ----------
    sm, svc, pm = (monitoring_objects[k] for k in ("ServiceMonitor", "Service", "PodMonitor"))
    operator_job = svc["metadata"]["labels"][sm["spec"]["jobLabel"]]
    assert "ratatouille" in operator_job
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] == "http-metrics"
    trainer_job = f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"  # the PodMonitor's job label
    pm_endpoint = pm["spec"]["podMetricsEndpoints"][0]
    scrape_configs = [
        {"job_name": operator_job, "honor_labels": bool(endpoint.get("honorLabels")),
         "metrics_path": endpoint["path"],
         "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"],
                             "labels": {"namespace": op.namespace, "service": svc["metadata"]["name"],
                                        "endpoint": endpoint["port"], "container": "operator",
                                        "pod": "rt-ratatouille-operator-0"}}]},
        {"job_name": trainer_job, "metrics_path": pm_endpoint["path"],
         "file_sd_configs": [{"files": [str(ctl.metrics_sd_file)], "refresh_interval": "1s"}]},
    ]

    ns, failing_ns = cluster.namespace(RUN_NS), cluster.namespace(FAILED_NS)
    local = write_datasets(tmp_path / "data")
    dataset = cluster.upload_dir(local["target"], "datasets/obs-target")
    manifest = run_manifest("observed", dataset=dataset, runs=2, min_succeeded=1, max_attempts=2)
    manifest["spec"]["finetune"].update(steps=TARGET_STEPS, evalEvery=150)
    manifest["spec"]["storage"] = {"uri": "s3://ratatouille/runs"}  # endpoint and Secret: the chart's defaults
    ctl.set_fail("observed-target-1-a1", 1)  # one retried Job: failure and retry panels get data
    ctl.instant = lambda job: job["metadata"]["namespace"] == failing_ns
    ctl.set_fail(lambda job: job["metadata"]["namespace"] == failing_ns
                 and job["metadata"]["labels"].get("ratatouille.dev/member") == "1", 99)
    doomed = run_manifest("doomed", dataset=dataset, runs=2, min_succeeded=2)

    (tmp_path / "prom").mkdir()
    with helmutil.Prometheus(scrape_configs, workdir=tmp_path / "prom") as prom, contextlib.ExitStack() as stack:
        t0 = time.time()
        op.install()
        stack.callback(op.uninstall)
        logs = lambda: "--- operator log\n" + op.log_tail(40) + "\n--- prometheus log\n" + prom.read_log()  # noqa: E731
        info = _installed(cluster, op)

        # 1. The installed ports answer: /metrics on the metrics port, 200 on the probe's path.
        status, text = _get(f"http://127.0.0.1:{metrics_port}{endpoint['path']}")
        assert status == 200 and "ratatouille_build_info" in text
        status, _ = _get(f"http://127.0.0.1:{liveness_port}{info['liveness_path']}")
        assert status == 200

        cluster.apply(manifest, ns)
        cluster.apply(doomed, failing_ns)
        run = cluster.wait_phase(ns, "observed", ("Succeeded", "Failed"), timeout=240, operator=op)
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
        failed = cluster.wait_phase(failing_ns, "doomed", ("Succeeded", "Failed"), timeout=60, operator=op)
        assert failed["status"]["phase"] == "Failed"
        assert {"observed-target-1-a1", "observed-target-1-a2"} <= cluster.job_names(ns, "observed")

        # The operator ran on the chart's settings: child Jobs carry the chart's storage endpoint,
        # the trainer metrics port and the default image.
        job = cluster.get("batch/v1/jobs", ns, "observed-avg-0-a1")
        container = job["spec"]["template"]["spec"]["containers"][0]
        job_env = {e["name"]: e.get("value") for e in container["env"]}
        assert job_env["AWS_ENDPOINT_URL"] == cluster.s3.endpoint
        assert job_env["RATATOUILLE_METRICS_PORT"] == info["env"]["RATATOUILLE_TRAINER_METRICS_PORT"]
        assert container["image"] == info["env"]["RATATOUILLE_DEFAULT_IMAGE"]
        assert container["ports"] == [{"name": pm_endpoint["port"], "containerPort": int(info["env"]["RATATOUILLE_TRAINER_METRICS_PORT"]), "protocol": "TCP"}]
        # Every trainer pod was listed as a target while it lived, none is left now.
        seen = ctl.metrics_targets_seen
        assert {(g["labels"]["ratatouille_dev_stage"], g["labels"]["ratatouille_dev_member"]) for g in seen} == {
            ("linear-probe", "0"), ("target", "0"), ("target", "1"), ("average", "0")}
        assert all(g["labels"]["namespace"] == ns and g["labels"]["ratatouille_dev_run"] == "observed"
                   and g["labels"]["pod"].startswith("observed-") for g in seen)
        cluster.wait_for(lambda: json.loads(ctl.metrics_sd_file.read_text()) == [], 10, "the target list to empty")

        # Prometheus has the runs' outcome and a resync's gauges.
        def scraped():
            done = _result(prom.query("sum by (namespace, result) (ratatouille_runs_finished_total)"))
            phases = _result(prom.query(f'ratatouille_runs{{namespace="{ns}", phase="Succeeded"}}'))
            return {(r["metric"]["namespace"], r["metric"]["result"]) for r in done} >= {
                (ns, "Succeeded"), (failing_ns, "Failed")} and phases
        cluster.wait_for(scraped, 30, "the finished runs in Prometheus", detail=logs, interval=0.5)
        time.sleep(3)  # a few more scrapes after the last change: rates and increases need two samples
        t1 = time.time()

        # 2a. The operator target: job label as the ServiceMonitor yields, up.
        up = _result(prom.query(f'up{{job="{operator_job}"}}'))
        assert [r["value"][1] for r in up] == ["1"], up
        # 2b. The training members were scraped while they trained.
        window = f"[{int(t1 - t0) + 5}s]"
        info_series = _result(prom.query(f'max_over_time(ratatouille_trainer_info{window})'))
        members = {(r["metric"]["ratatouille_dev_stage"], r["metric"]["ratatouille_dev_member"]) for r in info_series}
        assert ("target", "0") in members or ("target", "1") in members, (members, logs())
        for r in info_series:
            m = r["metric"]
            assert (m["job"], m["namespace"], m["ratatouille_dev_run"]) == (trainer_job, ns, "observed"), m
            assert (m["stage"], m["member"]) == (m["ratatouille_dev_stage"], m["ratatouille_dev_member"]), m
        steps = prom.api("query_range", query=f'ratatouille_trainer_step{{ratatouille_dev_stage="target"}}',
                         start=str(t0), end=str(t1), step="0.5")
        mid_training = [(s["metric"]["ratatouille_dev_member"], v) for s in _result(steps)
                        for _, v in s["values"] if 0 < float(v) < TARGET_STEPS]
        assert mid_training, f"no target member was scraped between its first and last step: {steps}"
        # The operator read the members' metrics from storage with the keys the chart wired in:
        # no storage error was ever counted, and the result carries the averaged accuracy.
        assert _result(prom.query(f"max_over_time(ratatouille_storage_errors_total{window})")) == []
        assert 0.0 <= float(run["status"]["result"]["valAccuracy"]) <= 1.0

        # 2c. Every alert expression evaluates; the two whose state these runs determine are right.
        alerts = {r["alert"]: r["expr"].strip() for r in helmutil.alert_rules()}
        assert sorted(alerts.values()) == sorted(helmutil.alert_exprs())
        fired = {}
        for name, expr in alerts.items():
            fired[name] = _result(prom.query(expr, t1))
        assert fired["RatatouilleOperatorDown"] == [], fired["RatatouilleOperatorDown"]
        assert {r["metric"]["namespace"] for r in fired["RatatouilleRunsFailing"]} == {failing_ns}

        # 2d. Every dashboard panel query evaluates (instant, at the end) and, over the run's
        #     window as Grafana draws it (query_range), has data unless it legitimately cannot.
        panels = _panels()
        assert sorted(e for _, e in panels) == sorted(helmutil.dashboard_queries())
        coverage: dict[str, bool] = {}
        for title, expr in panels:
            _result(prom.query(expr, t1))
            series = _result(prom.api("query_range", query=expr, start=str(t0), end=str(t1), step="1"))
            coverage[title] = coverage.get(title, False) or bool(series)
        empty = sorted(t for t, has in coverage.items() if not has)
        print("\npanel coverage:", json.dumps(coverage, indent=1), "\nalerts with results:",
              sorted(n for n, r in fired.items() if r), "\nmid-training samples:", len(mid_training),
              "\nports:", json.dumps({"metrics": metrics_port, "liveness": liveness_port}))
        assert MUST_HAVE_DATA <= set(coverage), sorted(coverage)
        assert not (set(empty) & MUST_HAVE_DATA), f"panels without data: {empty}"
        assert set(empty) <= MAY_BE_EMPTY, f"panels without data: {empty}"

        # The liveness endpoint still answers after the run.
        assert _get(f"http://127.0.0.1:{liveness_port}{info['liveness_path']}")[0] == 200


def test_rendered_rules_pass_promtool_and_count_counters_born_at_one(tmp_path):
    """`promtool check rules` on the rendered rules, and `promtool test rules`: the operator
    creates a namespace's Failed / collapse series at the first event, so they are born at 1 (as
    in the end-to-end test above); the alerts must fire for them, and stop once the window passed."""
    import subprocess

    import yaml

    promtool = helmutil.promtool_binary()
    if promtool is None:
        pytest.skip("promtool is not installed")
    rules = helmutil.write_rules_file(tmp_path / "rules.yaml")
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(helmutil.alert_rules())} rules found" in proc.stdout + proc.stderr

    exprs = {r["alert"]: r["expr"] for r in helmutil.alert_rules()}
    failing, collapse = exprs["RatatouilleRunsFailing"], exprs["RatatouilleAveragingCollapse"]
    born_at_one = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [
            {"series": 'ratatouille_runs_finished_total{namespace="ml", result="Failed"}', "values": "_ _ 1x60"},
            {"series": 'ratatouille_averaging_collapse_total{namespace="ml"}', "values": "_ _ 1x90"},
            {"series": 'ratatouille_runs_finished_total{namespace="ok", result="Succeeded"}', "values": "_ _ 1x60"},
        ],
        "promql_expr_test": [
            {"expr": failing, "eval_time": "1m", "exp_samples": []},
            {"expr": failing, "eval_time": "3m", "exp_samples": [{"labels": '{namespace="ml"}', "value": 1}]},
            {"expr": failing, "eval_time": "31m", "exp_samples": [{"labels": '{namespace="ml"}', "value": 1}]},
            {"expr": failing, "eval_time": "40m", "exp_samples": []},
            {"expr": collapse, "eval_time": "3m", "exp_samples": [{"labels": '{namespace="ml"}', "value": 1}]},
            {"expr": collapse, "eval_time": "70m", "exp_samples": []},
        ],
    }]}
    tests = tmp_path / "born-at-one.test.yaml"
    tests.write_text(yaml.safe_dump(born_at_one, sort_keys=False))
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
