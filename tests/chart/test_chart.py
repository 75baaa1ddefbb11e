"""The Helm chart, rendered offline with helm-python-sdk (the real Helm v4 library).

Lint, render with the default values and every ci/*-values.yaml, validate every manifest against
the Kubernetes schemas (kubernetes-validate, strict), and check the contract between the chart
and the operator: command, environment, ports, RBAC, the CRD, monitoring objects.
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from . import helmutil as H

helm = pytest.importorskip("helm_python")
kv = pytest.importorskip("kubernetes_validate")

K8S_VERSION = "1.30.0"
VALUE_SETS = [None] + H.CI_VALUES
VALUE_IDS = ["defaults"] + [p.name.removesuffix("-values.yaml") for p in H.CI_VALUES]
CRD_FILE = H.REPO_ROOT / "crds" / "ratatouilleruns.ratatouille.dev.yaml"

# The operator contract (ARCHITECTURE / issue 5): exactly these environment variables, no others.
CONTRACT_ENV = {
    "RATATOUILLE_WATCH_NAMESPACES", "RATATOUILLE_DEFAULT_IMAGE",
    "RATATOUILLE_DEFAULT_STORAGE_ENDPOINT", "RATATOUILLE_DEFAULT_CREDENTIALS_SECRET",
    "RATATOUILLE_RECONCILE_INTERVAL", "RATATOUILLE_METRICS_PORT", "RATATOUILLE_LIVENESS_PORT",
    "RATATOUILLE_TRAINER_METRICS_PORT", "RATATOUILLE_JOB_SERVICE_ACCOUNT", "RATATOUILLE_LOG_LEVEL",
}

# (apiGroup, resource, verb) the operator uses, and nothing more.
NAMESPACED_GRANTS = {
    *(("ratatouille.dev", "ratatouilleruns", v) for v in ("get", "list", "watch", "patch")),
    *(("ratatouille.dev", "ratatouilleruns/status", v) for v in ("get", "patch", "update")),
    ("ratatouille.dev", "ratatouilleruns/finalizers", "update"),
    *(("batch", "jobs", v) for v in ("get", "list", "watch", "create", "patch", "delete")),
    *(("", "pods", v) for v in ("get", "list", "watch")),
    # list: the Job controller's FailedCreate Events say why a Job has no pod
    *(("", "events", v) for v in ("create", "patch", "list")),
    *(("events.k8s.io", "events", v) for v in ("create", "patch")),
    # a suspended run's queued Jobs are held by deactivating their Kueue Workloads
    *(("kueue.x-k8s.io", "workloads", v) for v in ("list", "patch")),
}
CLUSTER_SCOPED_GRANTS = {
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def grants(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role.get("rules", []):
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), rule
        for group in rule.get("apiGroups", []):
            for res in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    out.add((group, res, verb))
    return out


def values_of(param) -> dict | None:
    return None if param is None else H.load_values(param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Manifests per value set, rendered once for the module."""
    return {vid: H.render_chart(values_of(v)) for vid, v in zip(VALUE_IDS, VALUE_SETS)}


# ---------------------------------------------------------------------------------------------
# lint, render, validate

@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_lint_strict_is_clean(values):
    report = H.lint_chart(values_of(values), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    assert report["total_charts_linted"] == 1
    assert problems == [], problems


def test_lint_reports_a_typo_in_values():
    report = H.lint_chart({"reconcileIntervall": 5}, strict=True)
    text = json.dumps(report)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])
    assert "reconcileIntervall" in text


def test_ci_value_sets_exist():
    names = {p.name for p in H.CI_VALUES}
    assert {"namespaced-values.yaml", "monitoring-values.yaml", "custom-values.yaml"} <= names


@pytest.mark.parametrize("vid", VALUE_IDS)
def test_every_manifest_validates(rendered, vid):
    docs = rendered[vid]
    assert len(docs) >= 5 and H.find(docs, "Deployment") and H.find(docs, "Service")
    seen = set()
    for doc in docs:
        kind = doc["kind"]
        name = doc["metadata"]["name"]
        assert (kind, doc["metadata"].get("namespace"), name) not in seen, f"duplicate {kind}/{name}"
        seen.add((kind, doc["metadata"].get("namespace"), name))
        if kind in H.MONITORING_KINDS:
            jsonschema.validate(doc, MONITORING_SCHEMAS[kind])
            continue
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as err:  # the message holds the whole schema: keep the head
            pytest.fail(f"{kind}/{name}: {str(err)[:600]}")


@pytest.mark.parametrize("vid", VALUE_IDS)
def test_namespaced_objects_land_in_the_release_namespace(rendered, vid):
    cluster_kinds = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for doc in rendered[vid]:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_kinds:
            assert ns is None, doc["metadata"]
        elif doc["kind"] in ("Role", "RoleBinding"):
            assert ns in ("team-a", "team-b")
        elif doc["kind"] == "ConfigMap" and vid == "monitoring":
            assert ns == "monitoring"  # dashboards.namespace
        else:
            assert ns == "ratatouille", (doc["kind"], ns)


@pytest.mark.parametrize("bad", [
    {"reconcileIntervall": 5},
    {"image": {"repository": "x", "tga": "1"}},
    {"monitoring": {"enabeld": True}},
    {"monitoring": {"serviceMonitor": {"intervall": "10s"}}},
    {"trainer": {"metricsPort": 70000}},
    {"logLevel": "LOUD"},
    {"watchNamespaces": "team-a"},
    {"storage": {"bucket": "b"}},
], ids=lambda v: json.dumps(v))
def test_values_schema_rejects_bad_values(bad):
    with pytest.raises(helm.HelmValuesError) as info:
        H.render_chart(bad)
    assert "specifications of the schema" in str(info.value), str(info.value)


def test_values_schema_names_the_typo():
    with pytest.raises(helm.HelmValuesError, match="additional properties 'enabeld' not allowed"):
        H.render_chart({"monitoring": {"enabeld": True}})
    H.render_chart({"monitoring": {"enabled": True}})  # the correct spelling renders


def test_values_schema_closes_every_object():
    schema = json.loads((H.CHART_DIR / "values.schema.json").read_text())
    passthrough = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" or "properties" in node:
            if "properties" in node:
                assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            elif isinstance(node.get("additionalProperties"), dict):
                pass  # a typed map (labels, annotations, resource lists)
            else:
                passthrough.append(path)  # a Kubernetes type handed through (affinity terms ...)
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")
        for key in ("anyOf", "oneOf", "allOf"):
            for i, sub in enumerate(node.get(key) or []):
                walk(sub, f"{path}<{key}{i}>")

    walk(schema, "$")
    # Only Kubernetes objects passed through verbatim may stay open, each one named here.
    assert set(passthrough) <= {
        "$.global", "$.tolerations[items]", "$.extraEnv[items].valueFrom", "$.affinity.nodeAffinity",
        "$.affinity.podAffinity", "$.affinity.podAntiAffinity",
        "$.networkPolicy.prometheusNamespaceSelector", "$.networkPolicy.prometheusPodSelector",
        "$.networkPolicy.extraEgress[items]",
    }, passthrough


def test_values_yaml_and_ci_values_pass_the_schema():
    schema = json.loads((H.CHART_DIR / "values.schema.json").read_text())
    defaults = yaml.safe_load((H.CHART_DIR / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for path in H.CI_VALUES:
        merged = H._deep_merge(defaults, H.load_values(path))
        jsonschema.validate(merged, schema)


# ---------------------------------------------------------------------------------------------
# RBAC

def test_cluster_role_grants_exactly_what_the_operator_uses(rendered):
    role = H.one(rendered["defaults"], "ClusterRole", "rt-ratatouille-operator")
    got = grants(role)
    assert not any("*" in g for triple in got for g in triple), "wildcard granted"
    assert got == NAMESPACED_GRANTS | CLUSTER_SCOPED_GRANTS
    assert not any(res in ("secrets", "configmaps") for _, res, _ in got)
    binding = H.one(rendered["defaults"], "ClusterRoleBinding", "rt-ratatouille-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "rt-ratatouille-operator"}
    sa = H.one(rendered["defaults"], "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "ratatouille"}]
    dep = H.one(rendered["defaults"], "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert not H.find(rendered["defaults"], "Role")


def test_namespaced_mode_uses_roles_per_namespace(rendered):
    docs = rendered["namespaced"]
    roles = H.find(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        got = grants(role)
        assert got == NAMESPACED_GRANTS
    bindings = H.find(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "ratatouille-ops",
                                  "namespace": "ratatouille"}]
    operator_roles = [r for r in H.find(docs, "ClusterRole") if r["metadata"]["name"].endswith("-operator")]
    assert len(operator_roles) == 1
    # Cluster-wide only what cannot be namespaced: CRD discovery.
    assert grants(operator_roles[0]) == {g for g in CLUSTER_SCOPED_GRANTS if g[1] != "namespaces"}
    env = {e["name"]: e.get("value") for e in H.one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RATATOUILLE_WATCH_NAMESPACES"] == "team-a,team-b"


def test_user_roles_aggregate_into_view_and_edit(rendered):
    docs = rendered["defaults"]
    view = H.one(docs, "ClusterRole", "rt-ratatouille-view")
    edit = H.one(docs, "ClusterRole", "rt-ratatouille-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert {v for _, r, v in grants(view) if r == "ratatouilleruns"} == {"get", "list", "watch"}
    assert {v for _, r, v in grants(edit) if r == "ratatouilleruns"} == {
        "get", "list", "watch", "create", "update", "patch", "delete"}
    assert all(g == "ratatouille.dev" for g, _, _ in grants(view) | grants(edit))
    assert not H.find(rendered["custom"], "ClusterRole", "rt-ratatouille-view")  # userRoles.create=false


# ---------------------------------------------------------------------------------------------
# the Deployment against the operator contract

def _port(container: dict, name_or_number) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name_or_number)


@pytest.mark.parametrize("vid", VALUE_IDS)
def test_deployment_matches_the_operator_contract(rendered, vid):
    docs = rendered[vid]
    dep = H.one(docs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["ratatouille", "operator"] and "args" not in c
    env = {e["name"]: e.get("value") for e in c["env"]}
    ratatouille_env = {k for k in env if k.startswith("RATATOUILLE_")}
    assert ratatouille_env <= CONTRACT_ENV, ratatouille_env - CONTRACT_ENV
    assert {"RATATOUILLE_METRICS_PORT", "RATATOUILLE_LIVENESS_PORT", "RATATOUILLE_TRAINER_METRICS_PORT",
            "RATATOUILLE_RECONCILE_INTERVAL", "RATATOUILLE_WATCH_NAMESPACES", "RATATOUILLE_DEFAULT_IMAGE",
            "RATATOUILLE_LOG_LEVEL"} <= ratatouille_env
    assert all(isinstance(v, str) for v in env.values() if v is not None)
    assert env["HF_HUB_OFFLINE"] == "1"

    # metrics: env == container port == Service port, and the ServiceMonitor uses its name
    metrics_port = int(env["RATATOUILLE_METRICS_PORT"])
    assert metrics_port == 9090 == _port(c, "http-metrics")
    svc = H.one(docs, "Service")
    [sp] = svc["spec"]["ports"]
    assert sp["port"] == metrics_port and sp["name"] == "http-metrics" and sp["targetPort"] == "http-metrics"
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    for sm in H.find(docs, "ServiceMonitor"):
        assert [e["port"] for e in sm["spec"]["endpoints"]] == [sp["name"]]
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["jobLabel"] in svc["metadata"]["labels"]

    # liveness: kopf's endpoint on the port the operator is told to serve it on
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert _port(c, probe["port"]) == int(env["RATATOUILLE_LIVENESS_PORT"]) == 8080
    assert "readinessProbe" not in c

    # hardening
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"} == csc["seccompProfile"]
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]} and csc["runAsNonRoot"] is True
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert "emptyDir" in tmp
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_default_environment_values(rendered):
    c = H.one(rendered["defaults"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RATATOUILLE_WATCH_NAMESPACES"] == ""
    # two images: the operator's has no torch, child Jobs get the trainer's
    assert c["image"] == "ghcr.io/ratatouille-dev/ratatouille-operator:0.1.0"
    assert env["RATATOUILLE_DEFAULT_IMAGE"] == "ghcr.io/ratatouille-dev/ratatouille:0.1.0"
    assert env["RATATOUILLE_RECONCILE_INTERVAL"] == "15"
    assert env["RATATOUILLE_TRAINER_METRICS_PORT"] == "9400"
    assert env["RATATOUILLE_LOG_LEVEL"] == "INFO"
    # unset defaults are left out so the operator's own defaults apply
    for absent in ("RATATOUILLE_DEFAULT_STORAGE_ENDPOINT", "RATATOUILLE_DEFAULT_CREDENTIALS_SECRET",
                   "RATATOUILLE_JOB_SERVICE_ACCOUNT"):
        assert absent not in env


def test_custom_values_reach_the_operator(rendered):
    docs = rendered["custom"]
    pod = H.one(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == "registry.example.com/ml/ratatouille:0.1.0-cuda"
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert env["RATATOUILLE_DEFAULT_IMAGE"] == "registry.example.com/ml/ratatouille-trainer:0.1.0-cuda"
    assert env["RATATOUILLE_DEFAULT_STORAGE_ENDPOINT"] == "http://minio.minio.svc:9000"
    assert env["RATATOUILLE_DEFAULT_CREDENTIALS_SECRET"] == "ratatouille-s3"
    assert env["RATATOUILLE_JOB_SERVICE_ACCOUNT"] == "ratatouille-trainer"
    assert env["RATATOUILLE_TRAINER_METRICS_PORT"] == "9500"
    assert env["RATATOUILLE_RECONCILE_INTERVAL"] == "30"
    assert env["RATATOUILLE_LOG_LEVEL"] == "DEBUG"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert H.one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "ml-platform"
    assert not H.find(docs, "CustomResourceDefinition")  # crds.install=false
    assert not H.find(docs, "ConfigMap")  # dashboards.enabled=false
    assert not any(d["kind"] in H.MONITORING_KINDS for d in docs)  # monitoring.enabled=false


# ---------------------------------------------------------------------------------------------
# CRD

def test_templated_crd_equals_the_repository_crd_plus_keep(rendered):
    crd = H.one(rendered["defaults"], "CustomResourceDefinition")
    expected = yaml.safe_load(CRD_FILE.read_text())
    meta = crd["metadata"]
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert expected["metadata"]["labels"].items() <= meta["labels"].items()
    stripped = dict(crd, metadata={k: v for k, v in meta.items() if k not in ("annotations", "labels")})
    expected["metadata"].pop("labels", None)
    assert stripped == expected
    assert H.one(H.render_chart({"crds": {"keep": False}}), "CustomResourceDefinition")["metadata"].get(
        "annotations") in (None, {})


def test_chart_ships_no_crds_directory():
    # crds/ in a chart is install-once and never upgraded: the CRD is templated instead.
    assert not (H.CHART_DIR / "crds").exists()


def test_readme_documents_crd_upgrades():
    text = (H.CHART_DIR / "README.md").read_text()
    assert "kubectl apply --server-side" in text and "crds/" in text
    assert "helm.sh/resource-policy" in text


# ---------------------------------------------------------------------------------------------
# monitoring, dashboards, NetworkPolicy

def test_monitoring_is_off_without_the_api_or_flag(rendered):
    # Offline rendering serves no monitoring.coreos.com/v1, so the null default means off.
    assert not any(d["kind"] in H.MONITORING_KINDS for d in rendered["defaults"])
    assert "Set monitoring.enabled=true" in H.notes()


def test_monitoring_objects_when_enabled(rendered):
    docs = rendered["monitoring"]
    for kind in H.MONITORING_KINDS:
        obj = H.one(docs, kind)
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = H.one(docs, "PodMonitor")["spec"]
    assert pm["selector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "ratatouille-operator"}}
    assert [e["port"] for e in pm["podMetricsEndpoints"]] == ["metrics"]
    assert pm["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert pm["podTargetLabels"] == ["ratatouille.dev/run", "ratatouille.dev/stage", "ratatouille.dev/member"]
    assert pm["namespaceSelector"] == {"any": True}
    sm = H.one(docs, "ServiceMonitor")["spec"]
    assert sm["endpoints"][0]["interval"] == "15s" and sm["endpoints"][0]["honorLabels"] is True
    rule = H.one(docs, "PrometheusRule")
    assert [g["name"] for g in rule["spec"]["groups"]] == ["ratatouille"]


def test_monitoring_components_toggle_and_namespaced_podmonitor():
    docs = H.render_chart({"monitoring": {"enabled": True, "podMonitor": {"enabled": False}},
                           "watchNamespaces": ["team-a"]})
    assert H.find(docs, "ServiceMonitor") and H.find(docs, "PrometheusRule")
    assert not H.find(docs, "PodMonitor")
    docs = H.render_chart({"monitoring": {"enabled": True}, "watchNamespaces": ["team-a", "team-b"]})
    assert H.one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert not any(d["kind"] in H.MONITORING_KINDS for d in H.render_chart({"monitoring": {"enabled": False}}))


def test_dashboard_configmap(rendered):
    cm = H.one(rendered["defaults"], "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["ratatouille.json"]) == H.dashboards()["ratatouille.json"]
    cm = H.one(rendered["monitoring"], "ConfigMap")
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Ratatouille"}
    cm = H.one(H.render_chart({"dashboards": {"label": "dash", "labelValue": "yes"}}), "ConfigMap")
    assert cm["metadata"]["labels"]["dash"] == "yes" and "grafana_dashboard" not in cm["metadata"]["labels"]


def test_network_policy_only_when_enabled(rendered):
    assert not H.find(rendered["defaults"], "NetworkPolicy")
    np = H.one(rendered["namespaced"], "NetworkPolicy")["spec"]
    dep = H.one(rendered["namespaced"], "Deployment")
    assert np["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for r in np["ingress"] for p in r["ports"]] == ["http-metrics"]
    assert np["ingress"][0]["from"][0]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    egress_ports = {p["port"] for r in np["egress"] for p in r.get("ports", [])}
    assert {53, 443, 6443, 9000} <= egress_ports
    api_rule = next(r for r in np["egress"] if any(p["port"] == 6443 for p in r["ports"]))
    assert api_rule["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]


def test_release_name_containing_chart_name_is_not_doubled():
    docs = H.render_chart(release="ratatouille")
    assert H.one(docs, "Deployment")["metadata"]["name"] == "ratatouille-operator"


# ---------------------------------------------------------------------------------------------
# Structural schemas for the Prometheus Operator kinds (their CRDs are not available offline).
# Closed at every level that the chart fills in, after monitoring.coreos.com/v1's field names.

_STR = {"type": "string"}
_STRMAP = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STRMAP, "matchExpressions": {"type": "array"}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": _STR}, "separator": _STR, "targetLabel": _STR,
    "regex": _STR, "modulus": {"type": "integer"}, "replacement": _STR,
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                        "lowercase", "uppercase", "keepequal", "dropequal"]}}}
_ENDPOINT_PROPS = {
    "port": _STR, "targetPort": {"type": ["string", "integer"]}, "path": {"type": "string", "pattern": "^/"},
    "scheme": {"enum": ["http", "https"]}, "params": {"type": "object"}, "interval": _DURATION,
    "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
    "relabelings": {"type": "array", "items": _RELABEL}, "metricRelabelings": {"type": "array", "items": _RELABEL},
}


def _kind_schema(kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                "metadata": {"type": "object", "required": ["name", "namespace"], "additionalProperties": False,
                             "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                                            "namespace": _STR, "labels": _STRMAP, "annotations": _STRMAP}},
                "spec": spec}}


MONITORING_SCHEMAS = {
    "ServiceMonitor": _kind_schema("ServiceMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
        "properties": {"jobLabel": _STR, "targetLabels": {"type": "array"}, "podTargetLabels": {"type": "array"},
                       "namespaceSelector": _NS_SELECTOR, "selector": _SELECTOR,
                       "endpoints": {"type": "array", "minItems": 1, "items": {
                           "type": "object", "additionalProperties": False, "required": ["port"],
                           "properties": _ENDPOINT_PROPS}}}}),
    "PodMonitor": _kind_schema("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {"jobLabel": _STR, "podTargetLabels": {"type": "array", "items": _STR},
                       "namespaceSelector": _NS_SELECTOR, "selector": _SELECTOR,
                       "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                           "type": "object", "additionalProperties": False, "required": ["port"],
                           "properties": _ENDPOINT_PROPS}}}}),
    "PrometheusRule": _kind_schema("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": _STR, "interval": _DURATION, "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {"alert": _STR, "record": _STR, "expr": {"type": "string", "minLength": 1},
                               "for": _DURATION, "keep_firing_for": _DURATION,
                               "labels": _STRMAP, "annotations": _STRMAP}}}}}}}}),
}


def test_structural_schemas_reject_a_bad_monitor():
    good = H.one(H.render_chart({"monitoring": {"enabled": True}}), "PodMonitor")
    jsonschema.validate(good, MONITORING_SCHEMAS["PodMonitor"])
    bad = json.loads(json.dumps(good))
    bad["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, MONITORING_SCHEMAS["PodMonitor"])


def test_is_granted_helper_follows_the_bindings():
    assert H.is_granted("batch", "jobs", "create", "ml")
    assert H.is_granted("ratatouille.dev", "ratatouilleruns/status", "patch", None)
    assert not H.is_granted("", "secrets", "get", "ml")
    assert not H.is_granted("batch", "jobs", "deletecollection", "ml")
    ns_values = {"watchNamespaces": ["team-a"]}
    assert H.is_granted("batch", "jobs", "create", "team-a", values=ns_values)
    assert not H.is_granted("batch", "jobs", "create", "team-b", values=ns_values)
    assert not H.is_granted("batch", "jobs", "list", None, values=ns_values)  # no cluster-wide list
    assert H.is_granted("apiextensions.k8s.io", "customresourcedefinitions", "list", None, values=ns_values)
