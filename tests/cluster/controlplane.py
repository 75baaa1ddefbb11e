"""The upstream Kubernetes control plane on loopback, for tests and `make dev-cluster`.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, as built by
`scripts/k8s/build.sh` from their Go modules (versions pinned in scripts/k8s/versions.env), run
the way a cluster runs them: TLS with a private CA, RBAC (`Node,RBAC`), service-account tokens
signed by the API server, the default admission plugins plus PodSecurity,
OwnerReferencesPermissionEnforcement, ResourceQuota and LimitRanger, the real Job,
garbage-collector, namespace, service-account, ttl-after-finished, Deployment and ReplicaSet
controllers and the real scheduler. The one simulated part is the kubelet (`nodeagent.py`).

Every request is written to an audit log (`audit_events()`), which is how the tests count Job
creates and see which user did what, without wrapping anything inside the server.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "k8s" / "build.sh"
ADMISSION = ("NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,DefaultStorageClass,"
             "DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,"
             "ValidatingAdmissionPolicy,MutatingAdmissionPolicy,ResourceQuota,Priority,"
             "OwnerReferencesPermissionEnforcement,RuntimeClass,CertificateApproval,"
             "CertificateSigning,CertificateSubjectRestriction,PersistentVolumeClaimResize,"
             "StorageObjectInUseProtection,TaintNodesByCondition,DefaultIngressClass,"
             "ClusterTrustBundleAttest")
CONTROLLERS = ",".join(f"{name}-controller" for name in (
    "job", "garbage-collector", "namespace", "serviceaccount", "serviceaccount-token", "ttl-after-finished",
    "deployment", "replicaset", "pod-garbage-collector", "resourcequota", "root-ca-certificate-publisher",
    "clusterrole-aggregation"))
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: None
  nonResourceURLs: ["/readyz*", "/livez*", "/healthz*", "/openapi*", "/version", "/api*"]
  verbs: [get]
- level: Metadata
"""


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port free now, drawn below the kernel's ephemeral range: a port the kernel
    hands out (bind to 0) is also what outgoing connections take, so under load another
    process's connection can occupy it before the server that was given it binds (a
    kube-scheduler once failed to start that way). A random draw from the range below makes
    that collision unlikely."""
    lo = _ephemeral_range()[0]
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, lo) if lo > 11000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free loopback port found")


def binaries() -> Path:
    """The directory of the built binaries (building what is missing; cached per machine)."""
    override = os.environ.get("RATATOUILLE_K8S_BIN")
    if override:
        return Path(override)
    out = subprocess.run(["bash", str(BUILD)], check=True, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    return Path(out.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, the API server's serving certificate, an admin client certificate (system:masters)
    and the service-account signing key pair, with the openssl command line."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "admin.crt").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=ratatouille-test-ca", cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (("server", "/CN=kube-apiserver", "server.ext"),
                            ("admin", "/O=system:masters/CN=admin", "client.ext")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subj, cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", ext, cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def kubeconfig_text(server: str, ca: Path, *, cert: Path | None = None, key: Path | None = None,
                    token: str | None = None, namespace: str = "default", user: str = "admin") -> str:
    auth: dict[str, Any] = {}
    if token is not None:
        auth["token"] = token
    else:
        auth["client-certificate"] = str(cert)
        auth["client-key"] = str(key)
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "ratatouille",
        "clusters": [{"name": "ratatouille", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": "ratatouille", "context": {"cluster": "ratatouille", "user": user,
                                                         "namespace": namespace}}],
    }, indent=1) + "\n"


class ControlPlane:
    """Start with `start()` (or as a context manager); `kubeconfig` is the admin's."""

    def __init__(self, workdir: str | os.PathLike, *, bin_dir: Path | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bin = bin_dir or binaries()
        self.pki = self.dir / "pki"
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.audit_log = self.dir / "audit.log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.startup_seconds: float | None = None

    @property
    def kubectl_path(self) -> Path:
        return self.bin / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.bin / "helm"

    @property
    def monitoring_crds(self) -> list[Path]:
        """The Prometheus Operator's CRDs that build.sh generated (ServiceMonitor, PodMonitor,
        PrometheusRule)."""
        return sorted((self.bin.parent / "crds").glob("monitoring.coreos.com_*.yaml"))

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        t0 = time.monotonic()
        make_pki(self.pki)
        self.kubeconfig.write_text(kubeconfig_text(self.server, self.pki / "ca.crt",
                                                   cert=self.pki / "admin.crt", key=self.pki / "admin.key"))
        (self.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        etcd_port, peer_port = free_port(), free_port()
        etcd = f"http://127.0.0.1:{etcd_port}"
        try:
            self._spawn("etcd", [
                str(self.bin / "etcd"), "--name", "default", "--data-dir", str(self.dir / "etcd"),
                "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
                "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
                "--unsafe-no-fsync", "--log-level", "warn"])
            self._wait_http(f"{etcd}/health", "etcd", 60)
            p = self.pki
            self._spawn("kube-apiserver", [
                str(self.bin / "kube-apiserver"), f"--etcd-servers={etcd}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
                f"--tls-cert-file={p / 'server.crt'}", f"--tls-private-key-file={p / 'server.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC", f"--enable-admission-plugins={ADMISSION}",
                f"--audit-policy-file={self.dir / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
                "--audit-log-maxsize=0", "--profiling=false", "--endpoint-reconciler-type=none",
                "--event-ttl=1h", "-v=1"])
            self._wait_ready(120)
            kcm_port, sched_port = free_port(), free_port()
            self._spawn("kube-controller-manager", [
                str(self.bin / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
                f"--controllers={CONTROLLERS}", f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}", "--leader-elect=false", "--bind-address=127.0.0.1",
                f"--secure-port={kcm_port}", "--concurrent-job-syncs=10", "--profiling=false", "-v=1"])
            self._spawn("kube-scheduler", [
                str(self.bin / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={sched_port}", "--profiling=false", "-v=1"])
            self._wait_for_default_service_account(120)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def alive(self) -> dict[str, int | None]:
        return {name: proc.poll() for name, proc in self.procs.items()}

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _check_alive(self, what: str) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                   + self.log_tail(name))

    def _wait_http(self, url: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(what)
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as rsp:
                    if rsp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not become ready within {timeout} s")
            time.sleep(0.2)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ctx = self.ssl_context()
        while True:
            self._check_alive("the API server")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.server}/readyz", timeout=3, context=ctx) as rsp:
                    if rsp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready within {timeout} s:\n" + self.log_tail("kube-apiserver"))
            time.sleep(0.3)

    def _wait_for_default_service_account(self, timeout: float) -> None:
        """Pods can be created once the service-account controller made `default` in default."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("the default service account")
            proc = self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the service-account controller made no default ServiceAccount:\n"
                                   + self.log_tail("kube-controller-manager"))
            time.sleep(0.3)

    # -- clients ------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=str(kubeconfig or self.kubeconfig))
        env.setdefault("HOME", str(self.dir))
        proc = subprocess.run([str(self.kubectl_path), f"--cache-dir={self.dir}/kubectl-cache", *args],
                              env=env, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def api_client(self, kubeconfig: Path | None = None):
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def token_kubeconfig(self, namespace: str, service_account: str, path: Path,
                         duration: int = 86400) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount with a TokenRequest token."""
        token = self.kubectl("create", "token", service_account, "-n", namespace,
                             f"--duration={duration}s").stdout.strip()
        path.write_text(kubeconfig_text(self.server, self.pki / "ca.crt", token=token, namespace=namespace,
                                        user=f"{namespace}-{service_account}"))
        return path

    def rest(self) -> "Rest":
        return Rest(self.server, self.ssl_context())

    def audit_events(self) -> Iterator[dict]:
        if not self.audit_log.exists():
            return
        with open(self.audit_log, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


class ApiError(Exception):
    def __init__(self, status: int, body: dict | str, method: str, path: str):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"{method} {path}: {status} {message}")


class Rest:
    """A small JSON client for the API server (the admin's, unless given another SSL context or
    token): what the node agent and the tests use to read and write objects as plain dicts."""

    def __init__(self, server: str, context: ssl.SSLContext, token: str | None = None):
        self.server, self.context, self.token = server, context, token

    def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                content_type: str = "application/json", timeout: float = 30) -> dict:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        req.add_header("User-Agent", "ratatouille-tests")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as rsp:
                raw = rsp.read()
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed: dict | str = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(err.code, parsed, method, path) from None
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: Any) -> dict | None:
        try:
            return self.request("GET", path, query=query or None)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def items(self, path: str, **query: Any) -> list[dict]:
        return list((self.request("GET", path, query=query or None)).get("items") or [])

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str, body: dict | None = None) -> dict | None:
        try:
            return self.request("DELETE", path, body)
        except ApiError as err:
            if err.status == 404:
                return None
            raise


def path_for(kind: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    """REST path for 'group/version/plural' (or 'v1/plural' for the core group)."""
    parts = kind.split("/")
    base = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
    plural = parts[-1]
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def main() -> None:  # pragma: no cover - manual smoke check: python -m tests.cluster.controlplane
    import tempfile

    with ControlPlane(tempfile.mkdtemp(prefix="rt-k8s-")) as cp:
        print(f"control plane up in {cp.startup_seconds:.1f} s; KUBECONFIG={cp.kubeconfig}")
        print(cp.kubectl("get", "--raw", "/version").stdout)


if __name__ == "__main__":  # pragma: no cover
    main()
