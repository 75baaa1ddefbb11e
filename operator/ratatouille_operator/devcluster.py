"""A development cluster on loopback: the Kubernetes API emulator, a stand-in Job controller and
an S3 server (moto), for `ratatouille dev-cluster` and for the operator's end-to-end tests.

`JobController` plays the parts a real cluster has and the emulator lacks: the batch/v1 Job
controller and the kubelet. For each Job that is neither suspended nor finished it runs the
Job's container command as a local process (the local executor's `local_command`), creates a v1
Pod object per attempt, and writes the Job's status the way the real controller does
(startTime, active/ready, then succeeded + Complete, or pod retries up to spec.backoffLimit and
then Failed/BackoffLimitExceeded; Suspended on spec.suspend). Like a kubelet it resolves
`secretKeyRef` environment values (from a given dict or the Secret objects) and never logs them.

Test hooks: `fail` (run `false` instead of the command for the first N pods of chosen Jobs),
`instant` (no process: complete at once), `hold` (the pod's process waits on a gate until
`release()`), and `parallel` (at most this many pods running at once).

Metrics (`metrics_ports=True`): every pod that runs a Job's real command and whose container
declares a port named `metrics` gets a free loopback port in RATATOUILLE_METRICS_PORT (with
RATATOUILLE_METRICS_ADDR=127.0.0.1) instead of the declared one, and the controller keeps a
Prometheus file_sd JSON file (`metrics_sd_file`) of those pods while they live, labelled the way
the chart's PodMonitor relabels a Kubernetes pod target: namespace, pod, container, endpoint and
the sanitized pod labels of `metrics_pod_labels` (ratatouille.dev/stage -> ratatouille_dev_stage).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .executor import local_command, stop_process

log = logging.getLogger("ratatouille.devcluster")

JOBS = "batch/v1/jobs"
PODS = "v1/pods"
SECRETS = "v1/secrets"
_POD_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"
# Variables a kubelet would never pass from the host into a container.
_HOST_ONLY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
              "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", "KUBECONFIG")
_TERMINATION_MAX = 4096

JobMatcher = Callable[[Mapping], bool] | str


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(matcher: JobMatcher | bool | None, job: Mapping) -> bool:
    if matcher is None or matcher is False:
        return False
    if matcher is True:
        return True
    if isinstance(matcher, str):
        return job["metadata"]["name"] == matcher
    return bool(matcher(job))


def _condition(ctype: str, status: str, reason: str, message: str) -> dict:
    now = _now()
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastProbeTime": now, "lastTransitionTime": now}


@dataclass
class _Pod:
    name: str
    proc: subprocess.Popen | None
    started: float
    term_file: str | None
    log_path: str | None
    failing: bool = False
    metrics_port: int | None = None


# Pod labels the chart's PodMonitor turns into target labels (podTargetLabels, and the relabeling
# of ratatouille.dev/attempt).
METRICS_POD_LABELS = ("ratatouille.dev/run", "ratatouille.dev/stage", "ratatouille.dev/member",
                      "ratatouille.dev/attempt")


def prometheus_label_name(name: str) -> str:
    """A Kubernetes label name as Prometheus' Kubernetes discovery exposes it (invalid characters
    become underscores): ratatouille.dev/stage -> ratatouille_dev_stage."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


@dataclass
class _Tracked:
    """What the controller knows about one Job (by uid)."""
    uid: str
    namespace: str
    name: str
    pods_started: int = 0
    failed: int = 0
    pod: _Pod | None = None
    finished: bool = False
    gate: str | None = None
    pod_names: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)


class JobController:
    """Stand-in for the Job controller and kubelet of a cluster, against an `Emulator`.

    `fail` maps a Job name (or a predicate on the Job object) to how many of its pods fail
    (the command becomes `false`); `instant` (bool or predicate) completes Jobs without a
    process; `hold` (bool or predicate) makes pods wait on a gate until `release()`.
    `starts["<namespace>/<name>"]` counts pods started per Job; `processes[...]` counts the
    pods among them that ran the Job's real command.
    """

    def __init__(self, emulator, *, workdir: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None,
                 secrets: Mapping[str, Mapping[str, str]] | None = None,
                 fail: Mapping[JobMatcher, int] | None = None,
                 instant: bool | Callable[[Mapping], bool] = False,
                 hold: bool | Callable[[Mapping], bool] | None = None,
                 parallel: int | None = None, poll_interval: float = 0.1,
                 metrics_ports: bool = False, metrics_sd_file: str | os.PathLike | None = None,
                 metrics_pod_selector: Mapping[str, str] | None = None,
                 metrics_pod_labels: Iterable[str] = METRICS_POD_LABELS):
        self.emulator = emulator
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ratatouille-jobs-"))
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        base = dict(os.environ if env is None else env)
        for name in _HOST_ONLY:
            base.pop(name, None)
        base.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        base.setdefault("HF_HUB_OFFLINE", "1")
        self.env = base
        self.secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self.fail: list[list] = [[m, int(n)] for m, n in (fail or {}).items()]
        self.instant = instant
        self.hold = hold
        self.parallel = parallel
        self.poll_interval = poll_interval
        self.starts: dict[str, int] = {}
        self.processes: dict[str, int] = {}
        self.errors: list[str] = []
        self._jobs: dict[str, _Tracked] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.usage_lines = ["stand-in Job controller: runs each Job's command as a local process",
                            f"  pod logs under {self.workdir / 'logs'}"]
        # Metrics: pod name -> file_sd target group; written to metrics_sd_file on every change.
        self.metrics_ports = bool(metrics_ports)
        self.metrics_sd_file = Path(metrics_sd_file or self.workdir / "metrics-targets.json")
        self.metrics_pod_selector = dict(metrics_pod_selector or {})
        self.metrics_pod_labels = tuple(metrics_pod_labels)
        self.metrics_targets: dict[str, dict] = {}
        self.metrics_targets_seen: list[dict] = []  # every target group ever listed, in order
        if self.metrics_ports:
            self._write_metrics_targets()
            self.usage_lines.append(f"  trainer metrics targets (Prometheus file_sd) in {self.metrics_sd_file}")

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "JobController":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "JobController":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="job-controller", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        with self._lock:
            for t in self._jobs.values():
                self._kill(t)

    # -- test hooks -----------------------------------------------------------------------------
    def set_fail(self, matcher: JobMatcher, times: int) -> None:
        with self._lock:
            self.fail.append([matcher, int(times)])

    def release(self, matcher: JobMatcher | bool = True) -> list[str]:
        """Open the gates of the held pods of matching Jobs (all by default): they go on to run
        their command. Pods started later are held again while `hold` matches them. Returns the
        names of the Jobs released."""
        released = []
        with self._lock:
            for t in self._jobs.values():
                if t.gate and (matcher is True or _matches(matcher, {"metadata": {
                        "name": t.name, "namespace": t.namespace, "labels": t.labels}})):
                    Path(t.gate).touch()
                    released.append(t.name)
        return released

    def reset(self) -> None:
        """Forget the test hooks (fail, instant, hold); running pods are left alone."""
        with self._lock:
            self.fail = []
            self.instant = False
            self.hold = None

    def running(self) -> list[str]:
        """Names of the Jobs whose pod process is alive now."""
        with self._lock:
            return sorted(t.name for t in self._jobs.values()
                          if t.pod and t.pod.proc is not None and t.pod.proc.poll() is None)

    def log_of(self, job_name: str) -> str:
        """The concatenated logs of a Job's pods (for failure messages in tests)."""
        out = []
        for path in sorted((self.workdir / "logs").glob(f"{job_name}-*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep going; tests read .errors
                if not self._stop.is_set():
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    log.exception("job controller tick failed")
            self._stop.wait(self.poll_interval)

    def tick(self) -> None:
        """One pass over every Job (public so tests can drive it step by step)."""
        with self._lock:
            jobs = self.emulator.list(JOBS)
            live = {j["metadata"]["uid"]: j for j in jobs}
            for uid in list(self._jobs):
                if uid not in live:  # deleted: its pods go with it
                    self._kill(self._jobs.pop(uid))
            running = sum(1 for t in self._jobs.values() if t.pod is not None and not t.finished)
            for job in sorted(jobs, key=lambda j: int(j["metadata"].get("resourceVersion") or 0)):
                meta = job["metadata"]
                t = self._jobs.get(meta["uid"])
                if t is None:
                    t = self._jobs[meta["uid"]] = _Tracked(meta["uid"], meta["namespace"], meta["name"],
                                                           labels=dict(meta.get("labels") or {}))
                if t.finished or meta.get("deletionTimestamp"):
                    continue
                spec = job.get("spec") or {}
                status = job.get("status") or {}
                if spec.get("suspend"):
                    if t.pod is not None:
                        running -= 1
                    self._suspend(t, job)
                    continue
                if t.pod is not None:
                    self._check_pod(t, job)
                    if t.pod is None:
                        running -= 1
                    continue
                if _suspended(status):
                    self._resume(t, job)
                    status = (self.emulator.get(JOBS, t.namespace, t.name) or {}).get("status") or {}
                if not status.get("startTime"):
                    self._status(t, {"startTime": _now(), "active": 1, "ready": 0})
                if self.parallel is not None and running >= self.parallel:
                    continue
                self._start_pod(t, job)
                running += 1

    # -- pods -------------------------------------------------------------------------------------
    def _take_failure(self, job: Mapping) -> bool:
        for entry in self.fail:
            if entry[1] > 0 and _matches(entry[0], job):
                entry[1] -= 1
                return True
        return False

    def _env_for(self, job: Mapping) -> tuple[dict[str, str], str | None]:
        """Job env with secret references resolved (kubelet's job); an error message if one
        non-optional reference cannot be resolved."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        env = dict(self.env)
        for var in container.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            value = self._secret_value(job["metadata"]["namespace"], ref.get("name"), ref.get("key"))
            if value is None:
                if not ref.get("optional"):
                    return env, f"secret {ref.get('name')!r} key {ref.get('key')!r} not found"
                continue
            env[var["name"]] = value
        return env, None

    def _secret_value(self, namespace: str, name: str | None, key: str | None) -> str | None:
        if name in self.secrets:
            return self.secrets[name].get(key)
        obj = self.emulator.get(SECRETS, namespace, name) if name else None
        if not obj:
            return None
        if key in (obj.get("stringData") or {}):
            return str(obj["stringData"][key])
        raw = (obj.get("data") or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None

    def _start_pod(self, t: _Tracked, job: Mapping) -> None:
        name = f"{t.name}-" + "".join(random.choice(_POD_SUFFIX) for _ in range(5))
        t.pods_started += 1
        key = f"{t.namespace}/{t.name}"
        self.starts[key] = self.starts.get(key, 0) + 1
        failing = self._take_failure(job)
        instant = _matches(self.instant, job)
        held = _matches(self.hold, job)
        env, env_error = self._env_for(job)
        term_file = log_path = None
        proc = None
        metrics_port = None
        if not (instant and not held) or failing or env_error:
            fd, term_file = tempfile.mkstemp(prefix=f"{name}-", suffix=".termination", dir=self.workdir)
            os.close(fd)
            log_path = str(self.workdir / "logs" / f"{name}.log")
            if env_error:
                argv, penv = ["sh", "-c", f"echo {shlex.quote(env_error)} >&2; exit 1"], dict(self.env)
            elif failing:
                argv, penv = ["false"], dict(self.env)
            elif instant:
                argv, penv = ["true"], dict(self.env)
            else:
                argv, penv = local_command(job, env)
                self.processes[key] = self.processes.get(key, 0) + 1
                metrics_port = self._metrics_port_for(job)
                if metrics_port is not None:
                    penv["RATATOUILLE_METRICS_PORT"] = str(metrics_port)
                    penv["RATATOUILLE_METRICS_ADDR"] = "127.0.0.1"
            if held:
                t.gate = str(self.workdir / f"{name}.gate")
                argv = ["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.1; done; exec "$@"', t.gate, *argv]
            penv["RATATOUILLE_TERMINATION_LOG"] = term_file
            with open(log_path, "wb") as out:
                proc = subprocess.Popen(argv, env=penv, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        t.pod = _Pod(name, proc, time.time(), term_file, log_path, failing, metrics_port)
        t.pod_names.append(name)
        pod = self._create_pod_object(t, job, name)
        if metrics_port is not None:
            self._add_metrics_target(pod, metrics_port)
        self._status(t, {"active": 1, "ready": 1})

    # -- metrics targets (Prometheus file_sd) --------------------------------------------------------
    def _metrics_port_for(self, job: Mapping) -> int | None:
        """A free loopback port when metrics_ports is on and the container declares a `metrics`
        port whose pod the PodMonitor's selector matches; None otherwise."""
        if not self.metrics_ports:
            return None
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        if not any(p.get("name") == "metrics" for p in container.get("ports") or []):
            return None
        labels = (template.get("metadata") or {}).get("labels") or {}
        if any(labels.get(k) != v for k, v in self.metrics_pod_selector.items()):
            return None
        return free_port()

    def _add_metrics_target(self, pod: Mapping, port: int) -> None:
        meta = pod["metadata"]
        labels = {"namespace": meta["namespace"], "pod": meta["name"],
                  "container": pod["spec"]["containers"][0]["name"], "endpoint": "metrics"}
        for name in self.metrics_pod_labels:
            value = (meta.get("labels") or {}).get(name)
            if value is not None:
                labels[prometheus_label_name(name)] = str(value)
        group = {"targets": [f"127.0.0.1:{port}"], "labels": labels}
        with self._lock:
            self.metrics_targets[meta["name"]] = group
            self.metrics_targets_seen.append(copy.deepcopy(group))
            self._write_metrics_targets()

    def _drop_metrics_target(self, pod_name: str) -> None:
        with self._lock:
            if self.metrics_targets.pop(pod_name, None) is not None:
                self._write_metrics_targets()

    def _write_metrics_targets(self) -> None:
        """Atomically replace metrics_sd_file (Prometheus never reads a half-written file)."""
        path = self.metrics_sd_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(list(self.metrics_targets.values()), out, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _create_pod_object(self, t: _Tracked, job: Mapping, name: str) -> dict:
        template = copy.deepcopy(job["spec"]["template"])
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update({"job-name": t.name, "batch.kubernetes.io/job-name": t.name,
                       "controller-uid": t.uid, "batch.kubernetes.io/controller-uid": t.uid})
        container = template["spec"]["containers"][0]["name"]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": t.namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": t.name,
                                              "uid": t.uid, "controller": True, "blockOwnerDeletion": True}]},
            "spec": template["spec"],
            "status": {"phase": "Running", "startTime": _now(),
                       "containerStatuses": [{"name": container, "ready": True, "restartCount": 0,
                                              "image": template["spec"]["containers"][0].get("image"),
                                              "imageID": "", "containerID": f"local://{name}",
                                              "state": {"running": {"startedAt": _now()}}}]},
        }
        try:
            self.emulator.create(PODS, pod, namespace=t.namespace)
        except Exception as exc:  # noqa: BLE001 - the pod object is informative only
            self.errors.append(f"pod {name}: {exc}")
        return pod

    def _finish_pod_object(self, t: _Tracked, name: str, code: int, message: str) -> None:
        pod = self.emulator.get(PODS, t.namespace, name)
        if pod is None:
            return
        cs = copy.deepcopy((pod.get("status") or {}).get("containerStatuses") or [{}])
        cs[0].update(ready=False, state={"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else "Error",
            "message": message, "startedAt": pod["status"].get("startTime"), "finishedAt": _now()}})
        try:
            self.emulator.patch_status(PODS, t.namespace, name, {
                "phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": cs})
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"pod {name}: {exc}")

    def _check_pod(self, t: _Tracked, job: Mapping) -> None:
        pod = t.pod
        assert pod is not None
        code = pod.proc.poll() if pod.proc is not None else 0
        if code is None:
            return
        # A finished pod leaves discovery (the PodMonitor drops Succeeded/Failed pods).
        self._drop_metrics_target(pod.name)
        message = ""
        if pod.term_file:
            try:
                message = Path(pod.term_file).read_text(errors="replace")[:_TERMINATION_MAX]
            except OSError:
                message = ""
            with contextlib.suppress(OSError):
                os.unlink(pod.term_file)
        if not message and code != 0 and pod.log_path:  # terminationMessagePolicy FallbackToLogsOnError
            with contextlib.suppress(OSError):
                message = Path(pod.log_path).read_text(errors="replace")[-2048:]
        self._finish_pod_object(t, pod.name, code, message)
        t.pod = None
        t.gate = None
        status = (self.emulator.get(JOBS, t.namespace, t.name) or {}).get("status") or {}
        if code == 0:
            t.finished = True
            now = _now()
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "Suspended"]
            conds += [_condition("SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number of succeeded pods"),
                      _condition("Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods")]
            self._status(t, {"active": 0, "ready": 0, "succeeded": 1, "completionTime": now,
                             "conditions": conds})
            return
        t.failed += 1
        backoff_limit = int((job.get("spec") or {}).get("backoffLimit", 6))
        if t.failed > backoff_limit:
            t.finished = True
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "Suspended"]
            conds += [_condition("FailureTarget", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                      _condition("Failed", "True", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]
            self._status(t, {"active": 0, "ready": 0, "failed": t.failed, "conditions": conds})
        else:
            self._status(t, {"active": 1, "ready": 0, "failed": t.failed})

    def _suspend(self, t: _Tracked, job: Mapping) -> None:
        status = job.get("status") or {}
        if t.pod is not None:
            name = t.pod.name
            self._kill(t)
            self._finish_pod_object(t, name, 137, "")
            t.pod = None
        if not _suspended(status):
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "Suspended"]
            conds.append(_condition("Suspended", "True", "JobSuspended", "Job suspended"))
            self._status(t, {"active": 0, "ready": 0, "conditions": conds})

    def _resume(self, t: _Tracked, job: Mapping) -> None:
        status = job.get("status") or {}
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "Suspended"]
        conds.append(_condition("Suspended", "False", "JobResumed", "Job resumed"))
        # A resumed Job's startTime is reset (as the real controller does).
        self._status(t, {"conditions": conds, "startTime": _now()})

    def _kill(self, t: _Tracked) -> None:
        pod = t.pod
        if pod is not None:
            self._drop_metrics_target(pod.name)
        if pod is None or pod.proc is None or pod.proc.poll() is not None:
            return
        try:
            os.killpg(pod.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            pod.proc.wait(10)

    def _status(self, t: _Tracked, status: Mapping) -> None:
        try:
            self.emulator.patch_status(JOBS, t.namespace, t.name, dict(status))
        except Exception as exc:  # noqa: BLE001 - the Job may be gone
            if "404" not in str(exc):
                raise


def _suspended(status: Mapping) -> bool:
    return any(c.get("type") == "Suspended" and c.get("status") == "True"
               for c in status.get("conditions") or [])


# -- S3 on loopback --------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """`moto_server` (moto[s3,server], beside this interpreter) on a loopback port, with buckets."""

    def __init__(self, buckets: Iterable[str] = ("ratatouille",), *, port: int = 0,
                 log_path: str | os.PathLike | None = None,
                 access_key: str = "dev-access-key", secret_key: str = "dev-secret-key"):
        self.buckets = list(buckets)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.usage_lines: list[str] = []

    def __enter__(self) -> "MotoS3":
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise RuntimeError(f"{binary} not found: install moto[s3,server]")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"moto_server did not answer on {self.endpoint}")
                time.sleep(0.1)
        client = self.client()
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        self.usage_lines = [f"S3 (moto) at {self.endpoint}, buckets: {', '.join(self.buckets)}"]
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}))

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None


CREDENTIALS_SECRET = "s3-credentials"


def create_credentials_secret(emulator, namespace: str, access_key: str, secret_key: str,
                              name: str = CREDENTIALS_SECRET) -> dict:
    """The Secret runs reference through spec.storage.credentialsSecret."""
    data = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    return emulator.create(SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}, namespace=namespace)


DEMO_PREFIX = "s3://ratatouille"


def upload_demo_assets(endpoint: str, data_dir: str | os.PathLike,
                       foundation: str | os.PathLike = "crds/examples/quickstart-foundation.safetensors",
                       prefix: str = DEMO_PREFIX) -> list[str]:
    """Copy the demo datasets and foundation into S3 where crds/examples/operator-demo.yaml
    expects them: <prefix>/datasets/<name>/... and <prefix>/models/quickstart-foundation.safetensors."""
    from ratatouille_trainer.storage import open_storage

    store = open_storage(prefix, endpoint=endpoint)
    data_dir = Path(data_dir)
    uploaded = []
    for dataset in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for path in sorted(dataset.rglob("*")):
            if path.is_file():
                store.upload(str(path), f"{prefix}/datasets/{path.relative_to(data_dir).as_posix()}")
        uploaded.append(f"{prefix}/datasets/{dataset.name}")
    if Path(foundation).is_file():
        store.upload(str(foundation), f"{prefix}/models/{Path(foundation).name}")
        uploaded.append(f"{prefix}/models/{Path(foundation).name}")
    return uploaded


def serve(args, *, stop_event: threading.Event | None = None, out=None) -> int:
    """`ratatouille dev-cluster`: emulator + CRD, moto S3 with bucket `ratatouille`, the Secret
    `s3-credentials` in `default`, the stand-in Job controller; blocks until Ctrl-C/SIGTERM."""
    from .emulator import serve_forever

    workdir = Path(getattr(args, "dir", None) or ".ratatouille/dev-cluster").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = workdir / "kubeconfig"
    s3 = MotoS3(["ratatouille"], log_path=workdir / "moto_server.log")

    @contextlib.contextmanager
    def storage(emulator):
        with s3:
            create_credentials_secret(emulator, "default", s3.access_key, s3.secret_key)
            demo = getattr(args, "demo_data", None)
            if demo:
                if not Path(demo).is_dir():
                    raise SystemExit(f"ratatouille: error: --demo-data {demo}: no such directory (run `make demo` first)")
                # moto takes any keys; the upload uses the same ones the Secret holds
                os.environ.setdefault("AWS_ACCESS_KEY_ID", s3.access_key)
                os.environ.setdefault("AWS_SECRET_ACCESS_KEY", s3.secret_key)
                for uri in upload_demo_assets(s3.endpoint, demo):
                    s3.usage_lines.append(f"uploaded {uri}")
            s3.usage_lines += [
                f"Secret default/{CREDENTIALS_SECRET} holds its (dummy) keys",
                "",
                "Start the operator in another shell:",
                f"  export KUBECONFIG={kubeconfig}",
                "  export AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1   # moto takes any keys",
                f"  export RATATOUILLE_DEFAULT_STORAGE_ENDPOINT={s3.endpoint}",
                f"  export RATATOUILLE_DEFAULT_CREDENTIALS_SECRET={CREDENTIALS_SECRET}",
                "  ratatouille operator -A",
                "and use kubectl with the same KUBECONFIG (`kubectl apply --validate=false -f run.yaml`,",
                "`kubectl get rrun`); runs store under s3://ratatouille/... and their datasets may be",
                "local paths or s3:// URIs on this endpoint.",
            ]
            yield s3

    def controller(emulator):
        return JobController(emulator, workdir=workdir / "jobs",
                             secrets={CREDENTIALS_SECRET: {"AWS_ACCESS_KEY_ID": s3.access_key,
                                                           "AWS_SECRET_ACCESS_KEY": s3.secret_key}},
                             parallel=getattr(args, "parallel", None))

    ns = types.SimpleNamespace(kubeconfig=str(kubeconfig), port=getattr(args, "port", 0) or 0,
                               host="127.0.0.1", crds=None)
    return serve_forever(ns, services=[storage, controller], stop_event=stop_event, out=out)
