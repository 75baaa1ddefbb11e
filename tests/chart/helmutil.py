"""Helpers for the chart tests (and the end-to-end tests that reuse them).

- ``render_chart(values, namespace)``: ``helm template`` through helm-python-sdk, parsed into a
  list of manifests (NOTES.txt and empty documents dropped).
- ``dashboard_queries()`` / ``alert_exprs()``: every PromQL expression the chart ships, ready to
  send to Prometheus (Grafana variables substituted).
- ``write_rules_file(path)``: the rendered PrometheusRule's spec as a Prometheus rule file.
- ``Prometheus``: a real ``prometheus`` on a free loopback port with a throw-away TSDB.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "ratatouille"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
DEFAULT_RELEASE = "rt"

# What Grafana would substitute for the dashboard's variables when querying Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "${namespace}": ".*",
    "$namespace": ".*",
}

# Kinds defined by the Prometheus Operator's CRDs, not by Kubernetes itself.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _helm():
    import helm_python
    return helm_python


def render_files(values: dict | None = None, namespace: str = "ratatouille",
                 release: str = DEFAULT_RELEASE) -> dict[str, list[dict]]:
    """Template path -> the manifests it rendered (raises helm_python.HelmError on failure)."""
    helm = _helm()
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered = chart.render(values=values, name=release, namespace=namespace,
                                is_install=True)
    out: dict[str, list[dict]] = {}
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        docs = [d for d in yaml.safe_load_all(text) if d]
        if docs:
            out[path] = docs
    return out


def render_chart(values: dict | None = None, namespace: str = "ratatouille",
                 release: str = DEFAULT_RELEASE) -> list[dict]:
    """All manifests `helm template` renders for these values, in template-path order."""
    return [doc for docs in render_files(values, namespace, release).values() for doc in docs]


def notes(values: dict | None = None, namespace: str = "ratatouille",
          release: str = DEFAULT_RELEASE) -> str:
    helm = _helm()
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered = chart.render(values=values, name=release, namespace=namespace, is_install=True)
    return next((text for path, text in rendered.items() if path.endswith("NOTES.txt")), "")


def lint_chart(values: dict | None = None, strict: bool = True) -> dict[str, Any]:
    """`helm lint [--strict]` report: {"messages": [{"severity", "path", "error"}], "errors": [...]}."""
    return _helm().lint(str(CHART_DIR), values, strict=strict, namespace="ratatouille")


def load_values(path: str | os.PathLike) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def find(docs: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind
            and (name is None or d.get("metadata", {}).get("name") == name)]


def one(docs: Iterable[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def operator_container(values: dict | None = None, namespace: str = "ratatouille") -> dict:
    """The operator Deployment's container (command, env, ports) as rendered."""
    dep = one(render_chart(values, namespace), "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]


def operator_env(values: dict | None = None, namespace: str = "ratatouille") -> dict[str, str]:
    """The operator's plain environment variables (valueFrom ones are left out)."""
    return {e["name"]: e["value"] for e in operator_container(values, namespace)["env"]
            if "value" in e}


def role_grants(role: dict) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a Role/ClusterRole grants (wildcards kept as "*")."""
    return {(g, r, v) for rule in role.get("rules", []) for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}


def operator_grants(values: dict | None = None) -> dict[str | None, set[tuple[str, str, str]]]:
    """What the operator's service account may do: namespace (None = cluster-wide) ->
    {(apiGroup, resource, verb)}, from the rendered (Cluster)RoleBindings of that account."""
    docs = render_chart(values)
    sa = next((d["metadata"]["name"] for d in find(docs, "ServiceAccount")),
              (values or {}).get("serviceAccount", {}).get("name") or "default")
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    out: dict[str | None, set[tuple[str, str, str]]] = {}
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in b.get("subjects", [])):
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        out.setdefault(ns, set()).update(role_grants(role))
    return out


def is_granted(group: str, resource: str, verb: str, namespace: str | None = None,
               values: dict | None = None, _cache: dict = {}) -> bool:
    """Whether the operator may `verb` `group/resource` (subresources as "runs/status") in
    `namespace` (None: a cluster-scoped or all-namespaces request). Exact matches only: the chart
    grants no wildcards."""
    key = json.dumps(values, sort_keys=True)
    if key not in _cache:
        _cache[key] = operator_grants(values)
    grants = _cache[key]
    triple = (group, resource, verb)
    if triple in grants.get(None, set()):
        return True
    return namespace is not None and triple in grants.get(namespace, set())


# ---------------------------------------------------------------------------------------------
# PromQL shipped with the chart

def dashboards() -> dict[str, dict]:
    """File name -> Grafana dashboard model, for every dashboard the chart ships."""
    return {p.name: json.loads(p.read_text()) for p in sorted((CHART_DIR / "dashboards").glob("*.json"))}


def iter_panels(panels: list[dict]) -> Iterable[dict]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels") or [])


def substitute_variables(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    return expr


def dashboard_queries(substitute: bool = True) -> list[str]:
    """Every panel target's PromQL in every shipped dashboard; with Grafana's variables replaced
    by what Grafana would send (namespace=All -> ".*") unless ``substitute`` is False."""
    out = []
    for dash in dashboards().values():
        for panel in iter_panels(dash.get("panels", [])):
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if expr:
                    out.append(substitute_variables(expr) if substitute else expr)
    return out


def prometheus_rule(values: dict | None = None) -> dict:
    """The rendered PrometheusRule object (monitoring forced on unless values say otherwise)."""
    merged = {"monitoring": {"enabled": True}}
    if values:
        merged = _deep_merge(merged, values)
    return one(render_chart(merged), "PrometheusRule")


def alert_rules() -> list[dict]:
    """Every alerting rule of the rendered PrometheusRule."""
    return [r for g in prometheus_rule()["spec"]["groups"] for r in g["rules"] if "alert" in r]


def alert_exprs() -> list[str]:
    return [r["expr"].strip() for r in alert_rules()]


def write_rules_file(path: str | os.PathLike) -> Path:
    """Write the rendered PrometheusRule's spec as a Prometheus rule file (for promtool or
    prometheus --config rule_files)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False))
    return path


def metric_names(expr: str) -> set[str]:
    """Names of the ratatouille_* series an expression selects (a lexical scan: PromQL function
    names and label names never start with `ratatouille_` except the PodMonitor's
    `ratatouille_dev_*` target labels, which are excluded)."""
    names = set(re.findall(r"\bratatouille_[a-z0-9_]+", expr))
    return {n for n in names if not n.startswith("ratatouille_dev_")}


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------------------------------------
# A real Prometheus on loopback

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus") or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus") or None


def promtool_binary() -> str | None:
    return shutil.which("promtool") or (os.path.exists("/usr/bin/promtool") and "/usr/bin/promtool") or None


class Prometheus:
    """``prometheus`` on 127.0.0.1:<free port> with its own temporary TSDB; a context manager.

    scrape_configs: Prometheus scrape_config dicts (e.g. static targets on loopback);
    rule_files: paths of rule files to evaluate; scrape_interval: global interval.
    """

    def __init__(self, scrape_configs: list[dict] | None = None,
                 rule_files: list[str | os.PathLike] | None = None,
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 workdir: str | os.PathLike | None = None):
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (make system-deps)")
        self.binary = binary
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="ratatouille-prom-"))
        self.config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": list(scrape_configs or []),
            "rule_files": [str(Path(p).resolve()) for p in rule_files or []],
        }
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        cfg = self.dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config))
        (self.dir / "data").mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.read_log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>; returns the decoded body also for 4xx answers (status "error")."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": body.decode(errors="replace"), "code": err.code}

    def query(self, expr: str, time_: float | None = None) -> dict:
        params = {"query": expr}
        if time_ is not None:
            params["time"] = str(time_)
        return self.api("query", **params)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
