"""End-to-end harness for the operator on the upstream control plane.

`tests/cluster/` starts etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built
from their Go modules), a node agent that stands in for the kubelet, and moto S3. The operator
is installed by real Helm from `charts/ratatouille` and runs as the chart deploys it: the
Deployment's pod, run by the node agent, authenticating with its ServiceAccount's token, so the
chart's RBAC is enforced by the API server. Children are real batch/v1 Jobs, run by the real
Job controller; their pods run real trainer processes (or the node agent's test hooks).

Fixtures: `cluster` (the session's `Cluster`, hooks reset per test module) and
`operator_process` (module-scoped `ChartOperator`: a Helm release, uninstalled afterwards).
Import them into a test module with
`from tests.operator.harness import cluster, operator_process  # noqa: F401`.
"""
from __future__ import annotations

import base64
import collections
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pytest
import yaml

from tests.cluster.controlplane import ControlPlane, free_port, path_for
from tests.cluster.nodeagent import NodeAgent
from tests.cluster.s3 import CREDENTIALS_SECRET, MotoS3

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "ratatouilleruns.ratatouille.dev.yaml"
CHART = REPO / "charts" / "ratatouille"
RUNS = "ratatouille.dev/v1alpha1/ratatouilleruns"
JOBS = "batch/v1/jobs"
EVENTS = "v1/events"
PODS = "v1/pods"
BUCKET = "ratatouille"
IMAGE = "ratatouille:e2e"
IMAGE_USER = 10001  # the Dockerfile's non-root user
RELEASE, RELEASE_NS = "ratatouille", "ratatouille-system"
# Dummy key material, distinctive so that a leak anywhere is found by a plain substring search.
ACCESS_KEY = "AKIARATATOUILLE0TEST"
SECRET_KEY = "rt-dummy-secret/9f2c7e41b0d3a6"
BIN = Path(sys.executable).parent


def _node_env() -> dict[str, str]:
    """What every container gets from the node (never credentials: those come from Secrets)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "KUBECONFIG"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RATATOUILLE_DEVICE="cpu",
               AWS_DEFAULT_REGION="us-east-1", PYTHONUNBUFFERED="1")
    env.pop("RATATOUILLE_ABORT_AT_STEP", None)
    return env


class Cluster:
    """The control plane + node agent + moto S3, with the helpers the e2e tests use."""

    def __init__(self, tmp: Path, *, agent_options: Mapping[str, Any] | None = None):
        self.tmp = Path(tmp)
        self.cp = ControlPlane(self.tmp / "control-plane")
        self.rest = None
        self.s3 = MotoS3([BUCKET], log_path=self.tmp / "moto.log", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        self.agent_options = dict(agent_options or {})
        self.controller: NodeAgent | None = None
        self.kubeconfig = self.cp.kubeconfig

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        self.cp.start()
        self.rest = self.cp.rest()
        # The Prometheus Operator's CRDs, so the chart's monitoring objects are validated for real.
        for crd in self.cp.monitoring_crds:
            self.kubectl("apply", "--server-side", "-f", str(crd))
        self.s3.__enter__()
        options = {"images": (IMAGE,), "image_users": {IMAGE: IMAGE_USER}, "env": _node_env(),
                   "restart_backoff": 1.0, **self.agent_options}
        self.controller = NodeAgent(self.cp, workdir=self.tmp / "node", **options).start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self.s3.__exit__()
        self.cp.stop()

    def install_crd(self) -> None:
        """`kubectl apply` the CRD (as a user without Helm would) and wait until it is served;
        nothing when it is there already (a chart installed it)."""
        if self.rest.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ratatouilleruns.ratatouille.dev"):
            return
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                     "crd/ratatouilleruns.ratatouille.dev")

    # -- namespaces, secrets, storage ---------------------------------------------------------------
    def namespace(self, name: str, pod_security: str = "restricted") -> str:
        """A namespace labelled for PodSecurity `restricted`, with the storage Secret in it."""
        labels = {f"pod-security.kubernetes.io/{mode}": pod_security for mode in ("enforce", "warn")}
        if self.rest.get(f"/api/v1/namespaces/{name}") is None:
            self.rest.create("/api/v1/namespaces", {"metadata": {"name": name, "labels": labels}})
        if self.rest.get(f"/api/v1/namespaces/{name}/secrets/{CREDENTIALS_SECRET}") is None:
            self.create_secret(name, CREDENTIALS_SECRET, {"AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                                          "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        self._wait_default_service_account(name)
        return name

    def _wait_default_service_account(self, ns: str) -> None:
        self.wait_for(lambda: self.rest.get(f"/api/v1/namespaces/{ns}/serviceaccounts/default"), 60,
                      f"the default ServiceAccount in {ns}")

    def create_secret(self, ns: str, name: str, data: Mapping[str, str]) -> None:
        self.rest.create(f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Upload a directory tree to s3://ratatouille/<prefix>/; returns the URI."""
        client = self.s3.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")
        return f"s3://{BUCKET}/{prefix}"

    def upload_file(self, local: Path, key: str) -> str:
        self.s3.client().upload_file(str(local), BUCKET, key)
        return f"s3://{BUCKET}/{key}"

    def s3_keys(self, prefix: str) -> list[str]:
        client = self.s3.client()
        keys, token = [], None
        while True:
            kw = {"Bucket": BUCKET, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = client.list_objects_v2(**kw)
            keys += [o["Key"] for o in page.get("Contents") or []]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]

    def s3_read(self, key: str) -> bytes:
        return self.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    # -- kubectl and helm -----------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cp.kubectl(*args, input=input, check=check, kubeconfig=kubeconfig, timeout=timeout)

    def apply(self, manifest: Mapping | str, namespace: str = "default") -> None:
        """Plain `kubectl apply -f -`: client-side OpenAPI validation and the server's strict
        field validation, as a user gets them."""
        # JSON, a subset of YAML: PyYAML would write "1e-4" unquoted, which kubectl reads as a number.
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", "-n", namespace, "-f", "-", input=text)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), HELM_CACHE_HOME=str(self.tmp / "helm-cache"),
                   HELM_CONFIG_HOME=str(self.tmp / "helm-config"), HELM_DATA_HOME=str(self.tmp / "helm-data"))
        proc = subprocess.run([str(self.cp.helm_path), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # -- the audit log: who asked the API server for what ---------------------------------------------
    def audit(self) -> list[dict]:
        return list(self.cp.audit_events())

    @property
    def job_creates(self) -> collections.Counter:
        """Successful Job creates per (namespace, name), from the API server's audit log."""
        out: collections.Counter = collections.Counter()
        for e in self.audit():
            ref = e.get("objectRef") or {}
            if (e.get("verb") == "create" and ref.get("resource") == "jobs" and not ref.get("subresource")
                    and (e.get("responseStatus") or {}).get("code") == 201
                    and "dryRun" not in (e.get("requestURI") or "")):
                out[(ref.get("namespace"), ref.get("name"))] += 1
        return out

    def requests_of(self, username: str, since: int = 0) -> list[tuple[str, str, int]]:
        """(verb, group/resource[/sub], response code) of every request the user made, except
        with kubectl (the tests borrow the operator's token with kubectl to be refused)."""
        out = []
        for e in self.audit()[since:]:
            if ((e.get("user") or {}).get("username") != username or not e.get("objectRef")
                    or (e.get("userAgent") or "").startswith("kubectl")):
                continue
            ref = e["objectRef"]
            res = f"{ref['apiGroup']}/{ref['resource']}" if ref.get("apiGroup") else ref.get("resource", "")
            if ref.get("subresource"):
                res += "/" + ref["subresource"]
            out.append((e.get("verb", ""), res, int((e.get("responseStatus") or {}).get("code") or 0)))
        return out

    # -- reading state ----------------------------------------------------------------------------------
    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        return self.rest.get(path_for(kind, namespace, name))

    def run(self, namespace: str, name: str) -> dict | None:
        return self.get(RUNS, namespace, name)

    def jobs(self, namespace: str | None = None, run: str | None = None) -> list[dict]:
        query = {"labelSelector": f"ratatouille.dev/run={run}"} if run else {}
        return self.rest.items(path_for(JOBS, namespace), **query)

    def job_names(self, namespace: str, run: str | None = None) -> set[str]:
        return {j["metadata"]["name"] for j in self.jobs(namespace, run)}

    def events(self, namespace: str, name: str | None = None) -> list[dict]:
        return [e for e in self.rest.items(path_for(EVENTS, namespace))
                if name is None or (e.get("involvedObject") or {}).get("name") == name]

    def pods(self, namespace: str | None = None, selector: str | None = None) -> list[dict]:
        query = {"labelSelector": selector} if selector else {}
        return self.rest.items(path_for(PODS, namespace), **query)

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str,
                 operator: "ChartOperator | None" = None, interval: float = 0.2,
                 detail: Callable[[], str] | None = None) -> Any:
        """Poll until predicate() is truthy; fail with the operator's log, the node agent's
        errors and `detail()` when it times out."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                text = ""
                if operator is not None:
                    text = "\n--- operator log (tail)\n" + operator.log_tail()
                if self.controller is not None and self.controller.errors:
                    text += f"\n--- node agent errors: {self.controller.errors[-5:]}"
                if detail is not None:
                    text += "\n" + detail()
                dead = {k: v for k, v in self.cp.alive().items() if v is not None}
                if dead:
                    text += f"\n--- control plane processes that exited: {dead}"
                raise AssertionError(f"timed out after {timeout} s waiting for {what}{text}")
            time.sleep(interval)

    def wait_phase(self, namespace: str, name: str, phases: str | Iterable[str], timeout: float = 120,
                   operator: "ChartOperator | None" = None) -> dict:
        wanted = {phases} if isinstance(phases, str) else set(phases)

        def check():
            run = self.run(namespace, name)
            return run if run and (run.get("status") or {}).get("phase") in wanted else None

        try:
            return self.wait_for(check, timeout, f"{namespace}/{name} phase in {sorted(wanted)}", operator)
        except AssertionError as err:
            run = self.run(namespace, name) or {}
            jobs = {j["metadata"]["name"]: (j.get("status") or {}).get("conditions") for j in self.jobs(namespace, name)}
            raise AssertionError(f"{err}\n--- status: {json.dumps(run.get('status'), indent=1)[:4000]}"
                                 f"\n--- jobs: {jobs}") from None


class ChartOperator:
    """The operator as the chart deploys it: `helm install` into the control plane, its pod run
    by the node agent with the ServiceAccount's token. kill() is a SIGKILL of the container
    (the kubelet then restarts it, as after an OOM kill); stop()/start() scale the Deployment."""

    def __init__(self, cluster: Cluster, *, values: Mapping[str, Any] | None = None,
                 release: str = RELEASE, namespace: str = RELEASE_NS, interval: float = 2.0):
        self.cluster = cluster
        self.release, self.namespace = release, namespace
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.values: dict[str, Any] = {
            "image": {"repository": IMAGE.split(":")[0], "tag": IMAGE.split(":")[1]},
            "trainer": {"image": IMAGE},
            "storage": {"endpoint": cluster.s3.endpoint, "credentialsSecret": CREDENTIALS_SECRET},
            "reconcileInterval": interval,
            "ports": {"metrics": self.metrics_port, "liveness": self.liveness_port},
        }
        _merge(self.values, values or {})
        self.starts = 0
        self.installed = False
        self.upgrades: list[tuple[int, int]] = []  # audit-log windows of helm upgrades
        self.audit_start = 0

    @property
    def fullname(self) -> str:
        """The chart's fullname: the release name when it holds the chart name, else both."""
        return self.release if "ratatouille" in self.release else f"{self.release}-ratatouille"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.release},app.kubernetes.io/name=ratatouille"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}/healthz"

    def _values_file(self) -> Path:
        path = self.cluster.tmp / f"values-{self.release}.yaml"
        path.write_text(yaml.safe_dump(self.values))
        return path

    def install(self, *extra: str) -> "ChartOperator":
        # Requests before this install (an earlier release of the same name, uninstalled while
        # its pod still ran) are not this operator's.
        self.audit_start = len(self.cluster.audit())
        self.cluster.namespace(self.namespace)
        # --take-ownership: the CRD may already be there, applied with kubectl or kept by an
        # uninstalled release (crds.keep); this release adopts it.
        self.cluster.helm("upgrade", "--install", "--take-ownership", self.release, str(CHART), "-n",
                          self.namespace, "-f", str(self._values_file()), *extra)
        self.installed = True
        self.wait_ready()
        return self

    def upgrade(self, values: Mapping[str, Any]) -> None:
        """`helm upgrade` with changed values; the Deployment rolls (Recreate) to a new pod.
        Helm changes the RBAC before the old pod stops: when it narrows the RBAC, the old pod's
        last requests are refused, so refused() leaves the upgrade's window out."""
        start = len(self.cluster.audit())
        old = {p["metadata"]["uid"] for p in self.cluster.pods(self.namespace, self.selector)}
        _merge(self.values, values)
        self.cluster.helm("upgrade", self.release, str(CHART), "-n", self.namespace, "-f", str(self._values_file()))
        self.cluster.wait_for(lambda: self._pod() and self._pod()["metadata"]["uid"] not in old, 60,
                              "the upgraded operator pod", self)
        self.wait_ready()
        self.upgrades.append((start, len(self.cluster.audit())))

    def uninstall(self) -> None:
        if self.installed:
            self.cluster.helm("uninstall", self.release, "-n", self.namespace, "--wait", check=False)
            self.installed = False

    def _pod(self) -> dict | None:
        pods = [p for p in self.cluster.pods(self.namespace, self.selector)
                if not p["metadata"].get("deletionTimestamp")]
        return pods[0] if pods else None

    def wait_ready(self, timeout: float = 90) -> None:
        """The pod runs and kopf's liveness endpoint answers (a kubelet's probe would, too)."""
        def ready():
            pod = self._pod()
            cs = ((pod or {}).get("status") or {}).get("containerStatuses") or [{}]
            if "running" not in (cs[0].get("state") or {}):
                return False
            try:
                with urllib.request.urlopen(self.liveness_url, timeout=2) as rsp:
                    return rsp.status == 200
            except OSError:
                return False

        self.cluster.wait_for(ready, timeout, "the operator pod to be running and live", self)
        self.starts += 1

    def start(self, wait: bool = True) -> "ChartOperator":
        if not self.installed:
            return self.install()
        pod = self._pod()
        if pod is None:
            self.cluster.kubectl("scale", "deployment", f"{self.fullname}-operator", "-n", self.namespace,
                                 "--replicas=1")
        if wait:
            self.wait_ready()
        return self

    def _is_mine(self, pod: Mapping) -> bool:
        return (pod["metadata"]["namespace"] == self.namespace
                and (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == self.release)

    @property
    def env(self) -> dict[str, str]:
        """The environment the node agent gave the operator's container."""
        return self.cluster.controller.env_of(self._is_mine)

    def kill(self) -> None:
        """SIGKILL the operator's container: no cleanup, no goodbye (an OOM kill or a crash)."""
        killed = self.cluster.controller.kill_container(self._is_mine)
        assert killed, "no running operator container to kill"

    def stop(self) -> None:
        self.cluster.kubectl("scale", "deployment", f"{self.fullname}-operator", "-n", self.namespace,
                             "--replicas=0")
        self.cluster.wait_for(lambda: not self.cluster.pods(self.namespace, self.selector), 60,
                              "the operator pod to be gone")

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        logs = sorted((self.cluster.controller.workdir / "logs").glob(f"{self.namespace}_{self.release}-operator-*.log"),
                      key=lambda p: p.stat().st_mtime)
        return "".join(p.read_text(errors="replace") for p in logs)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as rsp:
            return rsp.read().decode()

    def requests(self, since: int | None = None) -> set[tuple[str, str]]:
        since = self.audit_start if since is None else since
        return {(verb, res) for verb, res, _ in self.cluster.requests_of(self.service_account, since)}

    def refused(self, since: int | None = None) -> list[tuple[str, str, int]]:
        """Requests the server refused (403) since this install, outside the windows of helm
        upgrades."""
        since = self.audit_start if since is None else since
        out = []
        for i, e in enumerate(self.cluster.audit()):
            if i < since or any(a <= i < b for a, b in self.upgrades):
                continue
            if ((e.get("user") or {}).get("username") == self.service_account
                    and not (e.get("userAgent") or "").startswith("kubectl")
                    and (e.get("responseStatus") or {}).get("code") == 403):
                ref = e.get("objectRef") or {}
                out.append((e.get("verb", ""), ref.get("resource", ""), 403, ref.get("namespace")))
        return out


def _merge(into: dict, values: Mapping[str, Any]) -> dict:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


@pytest.fixture(scope="module")
def cluster(k8s_cluster):
    """The session's cluster, with the node agent's test hooks cleared for this module."""
    k8s_cluster.controller.reset()
    yield k8s_cluster
    k8s_cluster.controller.reset()
    k8s_cluster.controller.release()


@pytest.fixture(scope="module")
def operator_process(cluster):
    op = ChartOperator(cluster)
    op.install()
    try:
        yield op
    finally:
        op.uninstall()


def run_manifest(name: str, *, dataset: str, foundation_weights: str | None = None, aux: list[dict] | None = None,
                 include_foundation: bool = True, runs: int = 2, min_succeeded: int = 1,
                 selection: str = "uniform", parallelism: int = 2, max_attempts: int = 2,
                 backoff_limit: int = 0, test_domains=("d2",), extra_spec: Mapping | None = None) -> dict:
    """A tiny RatatouilleRun (timm test_resnet at 32 px, a handful of steps) storing on the bucket."""
    spec: dict[str, Any] = {
        "foundation": {"model": "test_resnet", "inputSize": 32},
        "target": {"dataset": dataset, "testDomains": list(test_domains)},
        "auxiliaries": aux or [],
        "includeFoundation": include_foundation,
        "linearProbe": {"steps": 4, "batchSize": 4},
        "auxiliaryFinetune": {"steps": 4, "batchSize": 4},
        "finetune": {"runs": runs, "steps": 6, "batchSize": 4, "headWarmupSteps": 2, "evalEvery": 3},
        "averaging": {"selection": selection},
        "storage": {"uri": f"s3://{BUCKET}/runs", "credentialsSecret": CREDENTIALS_SECRET},
        "parallelism": parallelism,
        "failurePolicy": {"backoffLimit": backoff_limit, "maxAttempts": max_attempts,
                          "minSucceeded": min_succeeded, "retryBackoffSeconds": 0},
    }
    if foundation_weights:
        spec["foundation"]["weights"] = foundation_weights
    for key, value in (extra_spec or {}).items():
        spec[key] = value
    if not spec["auxiliaries"]:
        del spec["auxiliaries"]
    return {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
            "metadata": {"name": name}, "spec": spec}


def write_datasets(root: Path) -> dict[str, Path]:
    """Tiny DomainBed-layout image folders: a 3-domain target and a 2-domain auxiliary."""
    from tests.trainer.util import write_dataset

    root = Path(root)
    return {"target": write_dataset(root / "target", domains=("d0", "d1", "d2"), per_class=6, seed=1),
            "aux": write_dataset(root / "aux", domains=("a0", "a1"), classes=("p", "q"), per_class=6, seed=2)}


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()
