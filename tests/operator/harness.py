"""End-to-end harness for the operator: an emulated cluster (kmock emulator serving the project's
CRD, the stand-in Job controller, moto S3) and the REAL operator as a subprocess
(`ratatouille operator`), which tests may SIGKILL and restart.

Fixtures: `cluster` (module-scoped `Cluster`) and `operator_process` (module-scoped, cluster-wide
`OperatorProcess`, started). Import them into a test module with
`from tests.operator.harness import cluster, operator_process  # noqa: F401`.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pytest
import yaml

from ratatouille_operator.devcluster import (CREDENTIALS_SECRET, JobController, MotoS3,
                                             create_credentials_secret, free_port)
from ratatouille_operator.emulator import JOBS, Emulator, _parse_path

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "ratatouilleruns.ratatouille.dev.yaml"
RUNS = "ratatouille.dev/v1alpha1/ratatouilleruns"
EVENTS = "v1/events"
PODS = "v1/pods"
BUCKET = "ratatouille"
# Dummy key material, distinctive so that a leak anywhere is found by a plain substring search.
ACCESS_KEY = "AKIARATATOUILLE0TEST"
SECRET_KEY = "rt-dummy-secret/9f2c7e41b0d3a6"
KUBECTL = shutil.which("kubectl")
BIN = Path(sys.executable).parent


def _job_env() -> dict[str, str]:
    """What a pod's container gets from the 'node' (never credentials: those come from the Secret)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "KUBECONFIG"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RATATOUILLE_DEVICE="cpu",
               AWS_DEFAULT_REGION="us-east-1", PYTHONUNBUFFERED="1")
    env.pop("RATATOUILLE_ABORT_AT_STEP", None)
    return env


class Cluster:
    """Emulator + moto S3 + JobController, with the helpers the e2e tests use."""

    def __init__(self, tmp: Path, controller_options: Mapping[str, Any] | None = None):
        """controller_options: further JobController keyword arguments (e.g. metrics_ports=True)."""
        self.tmp = Path(tmp)
        self.controller_options = dict(controller_options or {})
        self.emulator = Emulator(crds=[CRD], namespaces=("default",))
        self.s3 = MotoS3([BUCKET], log_path=self.tmp / "moto.log", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
        self.controller: JobController | None = None
        self.kubeconfig = self.tmp / "kubeconfig"
        self.job_creates: collections.Counter = collections.Counter()  # (namespace, name) -> successful creates
        self.http_requests: list[tuple[str, str, str]] = []  # (User-Agent, verb, resource)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        self.emulator.start()
        self._count_job_creates()
        self._record_user_agents()
        self.s3.__enter__()
        self.emulator.write_kubeconfig(self.kubeconfig)
        self.controller = JobController(self.emulator, workdir=self.tmp / "jobs", env=_job_env(),
                                        secrets=None, parallel=2, **self.controller_options).start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        self.s3.__exit__()
        self.emulator.stop()

    def _count_job_creates(self) -> None:
        """Count successful creates per Job name at the API (every client, HTTP or direct)."""
        core = self.emulator._core  # the emulator's store; wrapping its create sees every request
        original = core.create

        def create(rd, ns, body, *args, **kwargs):
            obj = original(rd, ns, body, *args, **kwargs)
            if rd.key == JOBS and not kwargs.get("dry_run"):
                self.job_creates[(obj["metadata"]["namespace"], obj["metadata"]["name"])] += 1
            return obj

        core.create = create

    # -- namespaces, secrets, storage ---------------------------------------------------------------
    def namespace(self, name: str) -> str:
        if self.emulator.get("v1/namespaces", None, name) is None:
            self.emulator.create("v1/namespaces", {"metadata": {"name": name}})
        if self.emulator.get("v1/secrets", name, CREDENTIALS_SECRET) is None:
            create_credentials_secret(self.emulator, name, ACCESS_KEY, SECRET_KEY)
        return name

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

    # -- kubectl --------------------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        if KUBECTL is None:
            pytest.skip("kubectl is not installed")
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), HOME=str(self.tmp))
        proc = subprocess.run([KUBECTL, f"--cache-dir={self.tmp}/kubectl-cache", *args], env=env,
                              input=input, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)} failed: {proc.stderr}"
        return proc

    def apply(self, manifest: Mapping | str, namespace: str = "default") -> None:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(dict(manifest), sort_keys=False)
        self.kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=text)

    def _record_user_agents(self) -> None:
        """Remember each HTTP request's User-Agent with its RBAC verb and resource, so that the
        operator's requests can be told from kubectl's (the Job controller and the tests use the
        emulator's direct accessors, which are not HTTP requests)."""
        handler = self.emulator.kmock
        original = handler._shim_handle

        async def shim(raw):
            parsed = _parse_path(raw.path)
            if parsed is not None:
                watch = raw.query.get("watch", "").lower() in ("true", "1")
                name = parsed["name"]
                verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                        "PATCH": "patch", "PUT": "update",
                        "DELETE": "delete" if name else "deletecollection"}.get(raw.method.upper(), raw.method)
                res = f"{parsed['group']}/{parsed['plural']}" if parsed["group"] else parsed["plural"]
                if parsed["subresource"]:
                    res += "/" + parsed["subresource"]
                self.http_requests.append((raw.headers.get("User-Agent", ""), verb, res))
            return await original(raw)

        handler._shim_handle = shim

    def operator_requests(self) -> set[tuple[str, str]]:
        """Every (verb, group/resource[/subresource]) sent to the API by anything but kubectl."""
        return {(verb, res) for ua, verb, res in list(self.http_requests) if not ua.startswith("kubectl")}

    # -- reading state ----------------------------------------------------------------------------------
    def run(self, namespace: str, name: str) -> dict | None:
        return self.emulator.get(RUNS, namespace, name)

    def jobs(self, namespace: str, run: str | None = None) -> list[dict]:
        labels = {"ratatouille.dev/run": run} if run else None
        return self.emulator.list(JOBS, namespace, labels=labels)

    def job_names(self, namespace: str, run: str | None = None) -> set[str]:
        return {j["metadata"]["name"] for j in self.jobs(namespace, run)}

    def events(self, namespace: str, name: str | None = None) -> list[dict]:
        return [e for e in self.emulator.list(EVENTS, namespace)
                if name is None or (e.get("involvedObject") or {}).get("name") == name]

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str,
                 operator: "OperatorProcess | None" = None) -> Any:
        """The emulator's wait_for, failing the test with the operator's log and the job
        controller's errors when it times out."""
        try:
            return self.emulator.wait_for(predicate, timeout=timeout, interval=0.1)
        except TimeoutError:
            detail = ""
            if operator is not None:
                detail = "\n--- operator log (tail)\n" + operator.log_tail()
            if self.controller is not None and self.controller.errors:
                detail += f"\n--- job controller errors: {self.controller.errors[-5:]}"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}") from None

    def wait_phase(self, namespace: str, name: str, phases: str | Iterable[str], timeout: float = 120,
                   operator: "OperatorProcess | None" = None) -> dict:
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


class OperatorProcess:
    """`ratatouille operator` as a subprocess against the cluster; SIGKILL and restart at will.

    By default it runs `<venv>/bin/ratatouille operator <args>` with this process's environment
    plus test settings (free ports, the cluster's kubeconfig, S3 endpoint and dummy keys). With
    `argv` and `env` it runs exactly that command (looked up on env's PATH) with exactly that
    environment (e.g. a rendered chart Deployment's container); its ports are then the ones env
    names (RATATOUILLE_METRICS_PORT / RATATOUILLE_LIVENESS_PORT, the operator's defaults when
    unset) and `liveness_path` is where readiness is polled.
    """

    def __init__(self, cluster: Cluster, args: Iterable[str] = ("-A",), *, interval: float = 2.0,
                 extra_env: Mapping[str, str] | None = None, argv: Iterable[str] | None = None,
                 env: Mapping[str, str] | None = None, liveness_path: str = "/healthz"):
        self.cluster = cluster
        self.args = list(args)
        self.argv = list(argv) if argv is not None else None
        self.liveness_path = liveness_path
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log_path = cluster.tmp / "operator.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update({
            "KUBECONFIG": str(cluster.kubeconfig),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "RATATOUILLE_METRICS_PORT": str(self.metrics_port),
            "RATATOUILLE_LIVENESS_PORT": str(self.liveness_port),
            "RATATOUILLE_RECONCILE_INTERVAL": str(interval),
            "RATATOUILLE_DEFAULT_STORAGE_ENDPOINT": cluster.s3.endpoint,
            "RATATOUILLE_DEFAULT_IMAGE": "ratatouille:e2e",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
        })
        self.env.update(extra_env or {})
        if env is not None:
            self.env = dict(env)
            self.metrics_port = int(self.env.get("RATATOUILLE_METRICS_PORT") or 9090)
            self.liveness_port = int(self.env.get("RATATOUILLE_LIVENESS_PORT") or 8080)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}{self.liveness_path}"

    def start(self, wait: bool = True) -> "OperatorProcess":
        assert self.proc is None or self.proc.poll() is not None, "the operator is already running"
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== operator start #{self.starts} =====\n".encode())
        log.flush()
        argv = self.argv if self.argv is not None else [str(BIN / "ratatouille"), "operator", *self.args]
        self.proc = subprocess.Popen(argv, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.liveness_url, timeout=2) as rsp:
                    if rsp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator's liveness endpoint did not answer within {timeout} s:\n"
                                     + self.log_tail())
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, no goodbye (what a node failure or OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as rsp:
            return rsp.read().decode()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("kmock")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.start()
    try:
        yield c
    finally:
        record = os.environ.get("RATATOUILLE_RBAC_RECORD")
        if record:
            path = Path(record)
            old = set()
            if path.exists():
                try:
                    old = {tuple(x) for x in json.loads(path.read_text())}
                except ValueError:
                    old = set()
            path.write_text(json.dumps(sorted(old | c.operator_requests()), indent=1) + "\n")
        c.stop()


@pytest.fixture(scope="module")
def operator_process(cluster):
    op = OperatorProcess(cluster, ["-A"])
    op.start()
    try:
        yield op
    finally:
        op.stop()


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
