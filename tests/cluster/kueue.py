"""Kueue's controller manager (built from sigs.k8s.io/kueue by scripts/k8s/build.sh) against the
test control plane, with its own CRDs and admission webhooks from the same module.

Three changes from Kueue's release manifests, each because nothing here routes to a Service:
the webhooks are called at a loopback URL (not through the `webhook-service` Service) with a
serving certificate from the test CA (Kueue's internal certificate management off: Kueue then
reads its metrics certificate from the fixed path /etc/kueue/metrics/certs, which is created
with a test certificate when it does not exist, and never overwritten); the CRDs
serve their storage version only (their conversion webhook would need the Service too); and
only the batch/v1 Job integration and Kueue's own objects have webhooks (the other frameworks'
CRDs are not installed).
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from .controlplane import ControlPlane, free_port

VERSIONS = Path(__file__).resolve().parents[2] / "scripts" / "k8s" / "versions.env"
# Webhooks kept: the Job integration and Kueue's own kinds.
WEBHOOKS = re.compile(r"^[mv](job|clusterqueue|localqueue|resourceflavor|workload|cohort)\.kb\.io$")


class KueueUnavailable(RuntimeError):
    """Kueue did not build on this machine (scripts/k8s/build.sh wrote why)."""


def kueue_version() -> str:
    m = re.search(r"^KUEUE_VERSION=(\S+)", VERSIONS.read_text(), re.M)
    assert m, "KUEUE_VERSION missing from versions.env"
    return m.group(1)


def module_dir(version: str) -> Path:
    out = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{version}"], check=True,
                         capture_output=True, text=True, cwd="/")
    return Path(json.loads(out.stdout)["Dir"])


class Kueue:
    def __init__(self, cp: ControlPlane, workdir: Path):
        self.cp = cp
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.binary = cp.bin / "kueue"
        self.proc: subprocess.Popen | None = None
        self.webhook_port = free_port()
        self.health_port = free_port()

    def start(self) -> "Kueue":
        if not self.binary.exists():
            reason = (self.cp.bin / ".kueue-failed")
            raise KueueUnavailable("kueue is not built" + (f" (see {reason})" if reason.exists() else ""))
        src = module_dir(kueue_version())
        self._apply_crds(src / "config" / "components" / "crd" / "bases")
        self.cp.kubectl("create", "namespace", "kueue-system", check=False)
        certs = self._serving_cert()
        metrics_certs = Path("/etc/kueue/metrics/certs")
        if not (metrics_certs / "tls.crt").exists():
            metrics_certs.mkdir(parents=True, exist_ok=True)
            for name in ("tls.crt", "tls.key"):
                (metrics_certs / name).write_bytes((certs / name).read_bytes())
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"port": self.webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
        }
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, KUBECONFIG=str(self.cp.kubeconfig))
        with open(self.dir / "kueue.log", "ab") as out:
            self.proc = subprocess.Popen([str(self.binary), f"--config={self.dir / 'config.yaml'}",
                                          # its on-demand visibility API needs an APIService
                                          "--feature-gates=VisibilityOnDemand=false"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_port(self.webhook_port, 120)
        self._apply_webhooks(src / "config" / "components" / "webhook" / "manifests.yaml")
        return self

    def stop(self) -> None:
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            self.cp.kubectl("delete", kind, f"kueue-{kind.split('webhook')[0]}", "--ignore-not-found", check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        path = self.dir / "kueue.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    # -- set-up ---------------------------------------------------------------------------------
    def _apply_crds(self, bases: Path) -> None:
        docs = []
        for path in sorted(bases.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            crd["spec"]["versions"] = [v for v in crd["spec"]["versions"] if v.get("storage")]
            crd["spec"].pop("conversion", None)
            docs.append(crd)
        self.cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                        input="\n---\n".join(json.dumps(d) for d in docs))
        for crd in docs:
            self.cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")

    def _serving_cert(self) -> Path:
        certs = self.dir / "certs"
        certs.mkdir(exist_ok=True)
        pki = self.cp.pki
        ext = certs / "ext.cnf"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        run = lambda *a: subprocess.run(["openssl", *a], cwd=certs, check=True, capture_output=True)  # noqa: E731
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=kueue-webhook")
        run("x509", "-req", "-in", "tls.csr", "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
            "-CAcreateserial", "-out", "tls.crt", "-days", "365", "-extfile", str(ext))
        return certs

    def _apply_webhooks(self, manifests: Path) -> None:
        ca = base64.b64encode((self.cp.pki / "ca.crt").read_bytes()).decode()
        out: list[dict[str, Any]] = []
        for doc in yaml.safe_load_all(manifests.read_text()):
            if not doc:
                continue
            kind = doc["kind"]
            doc["metadata"] = {"name": f"kueue-{kind.lower().split('webhook')[0]}"}
            kept = []
            for hook in doc.get("webhooks") or []:
                if not WEBHOOKS.match(hook["name"]):
                    continue
                path = hook["clientConfig"]["service"]["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{self.webhook_port}{path}", "caBundle": ca}
                kept.append(hook)
            doc["webhooks"] = kept
            out.append(doc)
        self.cp.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in out))

    def _wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"kueue exited with {self.proc.returncode}:\n{self.log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"kueue's webhook server did not listen within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.3)
