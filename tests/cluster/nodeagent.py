"""The one simulated part of the test cluster: a node agent that stands in for the kubelet.

It registers a Node with declared capacity (cpu, memory, pods and a fake `nvidia.com/gpu` count,
so GPU requests schedule), and runs every pod the real scheduler binds to it as local processes:
the container's command and args, with the environment a kubelet would give it (`value`,
`secretKeyRef`, `configMapKeyRef`, `fieldRef`, `envFrom`, all resolved through the API), and
reports pod status as a kubelet does: waiting (ContainerCreating, ErrImagePull ->
ImagePullBackOff, InvalidImageName, CreateContainerConfigError, CrashLoopBackOff), running,
terminated with the exit code and the termination message file's contents
(`RATATOUILLE_TERMINATION_LOG` points the trainer at it; FallbackToLogsOnError reads the log).
Deleting a pod sends SIGTERM, waits the grace period, then SIGKILL, and removes the pod.
restartPolicy Always/OnFailure restarts a container with the kubelet's doubling back-off.

Pods that mount a service-account token get a kubeconfig with a TokenRequest token for their
ServiceAccount (bound to the pod) in KUBECONFIG, so a pod talks to the API server as its
ServiceAccount and the server's RBAC applies.

Images: only those in `images` "exist" here (anything else cannot be pulled); `image_users`
says which user an image runs as when the pod does not set runAsUser (for runAsNonRoot).

Test hooks (plain attributes, matchers take the pod): `fail` via set_fail(matcher, times) runs
`false` instead of the command; `commands` ([matcher, argv] pairs) runs argv instead of it; `instant` exits 0 at once without running it; `hold` makes the
container wait on a gate until release(); `parallel` caps running containers (others wait in
ContainerCreating). A str matcher names the pod's Job (label `job-name`) or the pod. The hooks
act on the pods of Jobs only (never on a Deployment's, such as the operator's).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .controlplane import ApiError, ControlPlane, Rest, free_port, kubeconfig_text

log = logging.getLogger("ratatouille.nodeagent")

NODE = "ratatouille-node"
TERMINATION_MAX = 4096
BACKOFF_START, BACKOFF_MAX = 10.0, 300.0
# Host variables a kubelet never passes into a container.
HOST_ONLY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", "KUBECONFIG", "RATATOUILLE_ABORT_AT_STEP")
# An image reference as the container runtime parses it (lower-case repository path, optional
# tag and digest).
_IMAGE_RE = re.compile(r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*"
                       r"(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")

Matcher = Callable[[Mapping], bool] | str | bool | None


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def matches(matcher: Matcher, pod: Mapping) -> bool:
    if matcher is None or matcher is False:
        return False
    if matcher is True:
        return True
    if isinstance(matcher, str):
        meta = pod["metadata"]
        return matcher in ((meta.get("labels") or {}).get("job-name"), meta.get("name"))
    return bool(matcher(pod))


def prometheus_label_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


class ConfigError(Exception):
    """What makes a kubelet report CreateContainerConfigError."""


@dataclass
class Container:
    proc: subprocess.Popen | None
    started: str
    term_file: str | None
    log_path: str
    gate: str | None = None
    metrics_port: int | None = None
    exit_code: int | None = None  # for containers that never ran a process (instant)
    runtime_name: str | None = None  # a container of the runtime (podman), not a host process


@dataclass
class Tracked:
    uid: str
    namespace: str
    name: str
    pod: dict
    container: Container | None = None
    restarts: int = 0
    next_start: float = 0.0
    pulls: int = 0
    done: bool = False
    killing: bool = False
    last_state: dict | None = None
    status_sent: str = ""
    env: dict = field(default_factory=dict)  # the resolved environment (kept in memory only)


class NodeAgent:
    def __init__(self, cp: ControlPlane, *, workdir: str | os.PathLike, node: str = NODE,
                 capacity: Mapping[str, str] | None = None, images: Iterable[str] = ("ratatouille:e2e",),
                 image_users: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None,
                 path: Iterable[str] = (), parallel: int | None = None, poll_interval: float = 0.2,
                 restart_backoff: float = BACKOFF_START,
                 metrics_ports: bool = False, metrics_sd_file: str | os.PathLike | None = None,
                 metrics_pod_labels: Iterable[str] = (), metrics_pod_selector: Mapping[str, str] | None = None):
        self.cp = cp
        self.rest: Rest = cp.rest()
        self.workdir = Path(workdir)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.node = node
        self.capacity = dict(capacity or {"cpu": "32", "memory": "128Gi", "pods": "110",
                                          "nvidia.com/gpu": "2", "ephemeral-storage": "100Gi"})
        self.images = set(images)
        self.image_users = dict(image_users or {})
        base = {k: v for k, v in (env if env is not None else os.environ).items() if k not in HOST_ONLY}
        self.env = base
        self.path = [str(p) for p in path] or [str(Path(sys.executable).parent)]
        self.parallel = parallel
        self.poll_interval = poll_interval
        self.restart_backoff = restart_backoff
        self.metrics_ports = metrics_ports
        self.metrics_sd_file = Path(metrics_sd_file or self.workdir / "pod-targets.json")
        self.metrics_pod_labels = list(metrics_pod_labels)
        self.metrics_pod_selector = dict(metrics_pod_selector or {})
        self.metrics_targets: dict[str, dict] = {}
        self.metrics_targets_seen: list[dict] = []
        # hooks
        self.fail: list[list[Any]] = []
        self.instant: Matcher = None
        self.hold: Matcher = None
        self.commands: list[list[Any]] = []  # [matcher, argv]: run argv instead of the command
        # Image reference in a pod -> a local image: such containers run in that image with podman
        # (the node's network, a read-only root, emptyDirs and the termination log mounted).
        self.containers: dict[str, str] = {}
        self.containers_conf: str | None = None  # CONTAINERS_CONF for podman
        # bookkeeping the tests read
        self.pods: dict[str, Tracked] = {}
        self.starts: dict[str, int] = {}      # "<ns>/<job or pod>" -> containers started
        self.processes: dict[str, int] = {}   # the same, counting only real commands
        self.runtime_starts: dict[str, int] = {}  # the same, counting containers run by podman
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "NodeAgent":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "NodeAgent":
        self.register()
        self._thread = threading.Thread(target=self._loop, name="node-agent", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            for t in self.pods.values():
                self._kill(t, grace=0)

    def register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node,
                                                           "kubernetes.io/os": "linux",
                                                           "kubernetes.io/arch": "amd64"}}}
        with contextlib.suppress(ApiError):
            self.rest.create("/api/v1/nodes", body)
        self._node_status()
        # The TaintNodesByCondition admission plugin taints a new Node not-ready; on a cluster the
        # node-lifecycle controller lifts it once the kubelet reports Ready. That controller is
        # not run here (it would also need Lease heartbeats), so the agent lifts it itself.
        self.rest.merge_patch(f"/api/v1/nodes/{self.node}", {"spec": {"taints": None}})

    def _node_status(self) -> None:
        ts = now()
        status = {"capacity": self.capacity, "allocatable": self.capacity,
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "ratatouille node agent is posting ready status",
                                  "lastHeartbeatTime": ts, "lastTransitionTime": ts}],
                  "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                                {"type": "Hostname", "address": self.node}],
                  "nodeInfo": {"kubeletVersion": "ratatouille-node-agent", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "process://",
                               "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                               "machineID": "", "systemUUID": "", "bootID": ""}}
        self.rest.merge_patch(f"/api/v1/nodes/{self.node}/status", {"status": status})
        self._heartbeat = time.monotonic()

    # -- hooks --------------------------------------------------------------------------------
    def set_fail(self, matcher: Matcher, times: int) -> None:
        with self._lock:
            self.fail.append([matcher, times])

    def release(self, matcher: Matcher = True, run: str | None = None) -> list[str]:
        """Let held containers go on; with `run`, they run that shell script instead."""
        released = []
        with self._lock:
            for t in self.pods.values():
                c = t.container
                if c is not None and c.gate and matches(matcher, t.pod) and not os.path.exists(c.gate):
                    tmp = c.gate + ".tmp"
                    Path(tmp).write_text(run or "")
                    os.replace(tmp, c.gate)
                    released.append(t.name)
        return released

    def reset(self) -> None:
        with self._lock:
            self.fail = []
            self.instant = None
            self.hold = None
            self.commands = []
            self.containers = {}

    def running(self) -> list[str]:
        """The Job (or, for pods without one, the pod) of every running container."""
        with self._lock:
            return [(t.pod["metadata"].get("labels") or {}).get("job-name") or t.name for t in self.pods.values()
                    if t.container and t.container.proc and t.container.proc.poll() is None]

    def env_of(self, matcher: Matcher) -> dict[str, str]:
        """The environment the newest matching container was started with."""
        with self._lock:
            found = [t.env for t in self.pods.values() if t.env and matches(matcher, t.pod)]
        return dict(found[-1]) if found else {}

    def log_of(self, pod_or_job: str) -> str:
        with self._lock:
            for t in self.pods.values():
                if matches(pod_or_job, t.pod) and t.container:
                    with contextlib.suppress(OSError):
                        return Path(t.container.log_path).read_text(errors="replace")
        return ""

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - keep going; tests read .errors
                if not self._stop.is_set():
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    log.exception("node agent tick failed")
            self._stop.wait(self.poll_interval)

    def tick(self) -> None:
        if time.monotonic() - self._heartbeat > 20:
            self._node_status()
        # Finished pods need nothing more from a kubelet (the API server deletes a terminal pod
        # at once), so only the unfinished ones are read: cheap with a thousand finished Jobs.
        pods = self.rest.items("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node},"
                               "status.phase!=Succeeded,status.phase!=Failed")
        with self._lock:
            live = {p["metadata"]["uid"]: p for p in pods}
            for uid in list(self.pods):
                if uid not in live:  # finished, or removed from the API: nothing may keep running
                    t = self.pods.pop(uid)
                    if not t.done:
                        self._kill(t, grace=0)
            running = sum(1 for t in self.pods.values()
                          if t.container and t.container.proc and t.container.proc.poll() is None)
            for pod in pods:
                meta = pod["metadata"]
                t = self.pods.get(meta["uid"])
                if t is None:
                    t = self.pods[meta["uid"]] = Tracked(meta["uid"], meta["namespace"], meta["name"], pod)
                t.pod = pod
                if meta.get("deletionTimestamp"):
                    self._terminate(t)
                    continue
                if t.done:
                    continue
                if t.container is not None:
                    self._check(t)
                    continue
                if time.monotonic() < t.next_start:
                    continue
                if self.parallel is not None and running >= self.parallel:
                    self._waiting(t, "ContainerCreating", "")
                    continue
                if self._start(t):
                    running += 1

    # -- starting -----------------------------------------------------------------------------
    def _start(self, t: Tracked) -> bool:
        pod = t.pod
        spec = pod["spec"]
        container = spec["containers"][0]
        image = container.get("image") or ""
        if not _IMAGE_RE.fullmatch(image):
            self._waiting(t, "InvalidImageName", f'Failed to apply default image tag "{image}": '
                          f"couldn't parse image name \"{image}\": invalid reference format")
            return False
        if image not in self.images:
            t.pulls += 1
            reason = "ErrImagePull" if t.pulls == 1 else "ImagePullBackOff"
            message = (f'failed to pull and unpack image "{image}": pull access denied, repository does '
                       "not exist or may require authorization" if t.pulls == 1
                       else f'Back-off pulling image "{image}"')
            if t.pulls == 1:
                self._event(pod, "Warning", "Failed", f'Failed to pull image "{image}": {message}')
            self._waiting(t, reason, message)
            t.next_start = time.monotonic() + min(BACKOFF_MAX, 2.0 * t.pulls)
            return False
        try:
            env = self._env(pod, container)
            t.env = dict(env)
            self._check_user(pod, container, image)
        except ConfigError as err:
            self._event(pod, "Warning", "Failed", f"Error: {err}")
            self._waiting(t, "CreateContainerConfigError", str(err))
            t.next_start = time.monotonic() + 2.0
            return False
        key = f"{t.namespace}/{(pod['metadata'].get('labels') or {}).get('job-name') or t.name}"
        self.starts[key] = self.starts.get(key, 0) + 1
        job_pod = bool((pod["metadata"].get("labels") or {}).get("job-name"))  # hooks act on Jobs' pods only
        failing = job_pod and self._take_failure(pod)
        instant = job_pod and matches(self.instant, pod)
        held = job_pod and matches(self.hold, pod)
        log_path = str(self.workdir / "logs" / f"{t.namespace}_{t.name}_{t.restarts}.log")
        fd, term_file = tempfile.mkstemp(prefix=f"{t.name}-", suffix=".termination", dir=self.workdir)
        os.close(fd)
        metrics_port = None
        replaced = next((argv for matcher, argv in reversed(self.commands) if job_pod and matches(matcher, pod)), None)
        if failing:
            argv = ["false"]
        elif replaced is not None:
            argv = list(replaced)
        elif instant and not held:
            Path(log_path).write_text("")
            t.container = Container(None, now(), term_file, log_path, exit_code=0)
            self._running(t)
            return False
        elif instant:
            argv = ["true"]
        else:
            argv = list(container.get("command") or []) + list(container.get("args") or [])
            if not argv:
                self._waiting(t, "CreateContainerError", "the node agent runs only containers with a command")
                t.done = True
                return False
            self.processes[key] = self.processes.get(key, 0) + 1
            metrics_port = self._metrics_port_for(pod, container)
            if metrics_port is not None:
                env["RATATOUILLE_METRICS_PORT"] = str(metrics_port)
                env["RATATOUILLE_METRICS_ADDR"] = "127.0.0.1"
        runtime_name = None
        local_image = None if (failing or replaced is not None or instant) else self.containers.get(image)
        if local_image is not None:
            runtime_name = f"rt-pod-{t.uid[:18]}-{t.restarts}"
            argv = self._podman_argv(t, container, local_image, runtime_name, term_file, metrics_port, argv)
            env = dict(os.environ, **({"CONTAINERS_CONF": self.containers_conf} if self.containers_conf else {}))
            self.runtime_starts[key] = self.runtime_starts.get(key, 0) + 1
        else:
            env["RATATOUILLE_TERMINATION_LOG"] = term_file
        gate = None
        if held:
            gate = str(self.workdir / f"{t.uid}-{t.restarts}.gate")
            # release() creates the gate; a non-empty gate is a script to run instead.
            argv = ["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.1; done; '
                    'if [ -s "$0" ]; then exec sh "$0"; fi; exec "$@"', gate, *argv]
        exe = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        workdir = self.workdir / "pods" / t.uid
        workdir.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as out:
            try:
                proc = subprocess.Popen([exe, *argv[1:]], env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
            except OSError as err:
                self._waiting(t, "RunContainerError", f"exec: {err}")
                t.done = True
                return False
        t.container = Container(proc, now(), term_file, log_path, gate=gate, metrics_port=metrics_port,
                                runtime_name=runtime_name)
        if metrics_port is not None and self._listed(pod):
            self._add_metrics_target(pod, container, metrics_port)
        self._running(t)
        return True

    def _podman_argv(self, t: Tracked, container: Mapping, local_image: str, name: str, term_file: str,
                     metrics_port: int | None, argv: list[str]) -> list[str]:
        """`podman run` of the container in its image, as a kubelet would start it: the
        declared environment only (in a file of the pod's, never on a command line), emptyDir
        volumes and the termination-log file mounted, the node's network (so a loopback S3 and
        the metrics port work as for processes), a read-only root file system."""
        pod = t.pod
        env = self._declared_env(pod, container)
        if metrics_port is not None:
            env.update(RATATOUILLE_METRICS_PORT=str(metrics_port), RATATOUILLE_METRICS_ADDR="127.0.0.1")
        env["RATATOUILLE_TERMINATION_LOG"] = "/dev/termination-log"
        poddir = self.workdir / "pods" / t.uid
        poddir.mkdir(parents=True, exist_ok=True)
        env_file = poddir / f"env-{t.restarts}"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items() if "\n" not in v))
        env_file.chmod(0o600)
        os.chmod(term_file, 0o666)  # written by the image's (non-root) user
        cmd = ["podman", "run", "--rm", "--name", name, "--pull", "never", "--network", "host", "--read-only",
               "--env-file", str(env_file), "-v", f"{term_file}:/dev/termination-log"]
        user = (container.get("securityContext") or {}).get("runAsUser") or \
            (pod["spec"].get("securityContext") or {}).get("runAsUser")
        if user is not None:
            cmd += ["--user", str(user)]
        for mount, local in self._empty_dirs(pod, container).items():
            os.chmod(local, 0o777)  # an emptyDir is world-writable, as the kubelet makes it
            cmd += ["-v", f"{local}:{mount}"]
        return cmd + [local_image, *argv]

    def _take_failure(self, pod: Mapping) -> bool:
        for entry in self.fail:
            if entry[1] > 0 and matches(entry[0], pod):
                entry[1] -= 1
                return True
        return False

    def _check_user(self, pod: Mapping, container: Mapping, image: str) -> None:
        psc = pod["spec"].get("securityContext") or {}
        csc = container.get("securityContext") or {}
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        user = csc.get("runAsUser", psc.get("runAsUser"))
        if user is None:
            user = self.image_users.get(image, 0)
        if non_root and int(user) == 0:
            raise ConfigError("container has runAsNonRoot and image will run as root "
                              f"(pod: \"{pod['metadata']['name']}_{pod['metadata']['namespace']}\", "
                              f"container: {container['name']})")

    def _declared_env(self, pod: Mapping, container: Mapping) -> dict[str, str]:
        """The container's environment as its spec declares it (envFrom, then env)."""
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind in ("secretRef", "configMapRef"):
                ref = source.get(kind)
                if ref is None:
                    continue
                data = self._object_data(ns, "secrets" if kind == "secretRef" else "configmaps", ref["name"])
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{"secret" if kind == "secretRef" else "configmap"} "{ref["name"]}" not found')
                for k, v in data.items():
                    env[prefix + k] = v
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = _expand(str(var.get("value", "")), env)
                continue
            src = var["valueFrom"]
            value = self._value_from(pod, ns, src)
            if value is not None:
                env[var["name"]] = value
        return env

    def _env(self, pod: Mapping, container: Mapping) -> dict[str, str]:
        env = dict(self.env)
        env["PATH"] = os.pathsep.join([*self.path, env.get("PATH", "/usr/bin:/bin")])
        env["HOSTNAME"] = pod["metadata"]["name"]
        node_env = dict(env)  # what the pod spec sets below may point into its volumes
        env.update(self._declared_env(pod, container))
        # Processes share this machine's file system: each emptyDir volume is a directory of the
        # pod's own, and environment values under its mount path point into it (so two pods'
        # caches under /tmp do not meet).
        mounts = self._empty_dirs(pod, container)
        for name, value in list(env.items()):
            if node_env.get(name) == value:
                continue  # the node's own (PATH, the venv...): not a path inside the container
            for mount, local in mounts.items():
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    env[name] = local + value[len(mount.rstrip("/")):]
        if "/tmp" in mounts:
            env["TMPDIR"] = mounts["/tmp"]
        if self._automounts(pod):
            env["KUBECONFIG"] = self._token_kubeconfig(pod)
        return env

    def _empty_dirs(self, pod: Mapping, container: Mapping) -> dict[str, str]:
        volumes = {v["name"] for v in pod["spec"].get("volumes") or [] if "emptyDir" in v}
        out = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in volumes:
                local = self.workdir / "pods" / pod["metadata"]["uid"] / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                out[mount["mountPath"]] = str(local)
        return out

    def _value_from(self, pod: Mapping, ns: str, src: Mapping) -> str | None:
        for kind, resource, label in (("secretKeyRef", "secrets", "secret"),
                                      ("configMapKeyRef", "configmaps", "configmap")):
            ref = src.get(kind)
            if ref is None:
                continue
            data = self._object_data(ns, resource, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    return None
                raise ConfigError(f'{label} "{ref.get("name")}" not found')
            if ref.get("key") not in data:
                if ref.get("optional"):
                    return None
                kind_name = "Secret" if label == "secret" else "ConfigMap"
                raise ConfigError(f"couldn't find key {ref.get('key')} in {kind_name} {ns}/{ref.get('name')}")
            return data[ref["key"]]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            meta = pod["metadata"]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
            return {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                    "metadata.uid": meta["uid"], "spec.nodeName": self.node,
                    "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                    "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}.get(path, "")
        return None  # resourceFieldRef: not modelled

    def _object_data(self, ns: str, resource: str, name: str) -> dict[str, str] | None:
        obj = self.rest.get(f"/api/v1/namespaces/{ns}/{resource}/{name}")
        if obj is None:
            return None
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()} \
            if resource == "secrets" else dict(obj.get("data") or {})
        return data

    def _automounts(self, pod: Mapping) -> bool:
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not None:
            return bool(spec["automountServiceAccountToken"])
        sa = self.rest.get(f"/api/v1/namespaces/{pod['metadata']['namespace']}/serviceaccounts/"
                           f"{spec.get('serviceAccountName') or 'default'}") or {}
        return sa.get("automountServiceAccountToken", True) is not False

    def _token_kubeconfig(self, pod: Mapping) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        sa = spec.get("serviceAccountName") or "default"
        req = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"audiences": [], "expirationSeconds": 86400,
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}}
        try:
            out = self.rest.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", req)
        except ApiError as err:
            raise ConfigError(f"failed to fetch token: {err}") from None
        path = self.workdir / "pods" / meta["uid"] / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(kubeconfig_text(self.cp.server, self.cp.pki / "ca.crt", token=out["status"]["token"],
                                        namespace=meta["namespace"], user=f"system:serviceaccount:{meta['namespace']}:{sa}"))
        return str(path)

    # -- running ------------------------------------------------------------------------------
    def _check(self, t: Tracked) -> None:
        c = t.container
        assert c is not None
        code = c.exit_code if c.proc is None else c.proc.poll()
        if code is None:
            return
        self._drop_metrics_target(t.name)
        message = ""
        if c.term_file:
            with contextlib.suppress(OSError):
                message = Path(c.term_file).read_text(errors="replace")[:TERMINATION_MAX]
            with contextlib.suppress(OSError):
                os.unlink(c.term_file)
        container = t.pod["spec"]["containers"][0]
        if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                message = Path(c.log_path).read_text(errors="replace")[-2048:]
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": c.started, "finishedAt": now(), "containerID": f"process://{t.uid}/{t.restarts}"}
        if message:
            terminated["message"] = message
        policy = t.pod["spec"].get("restartPolicy", "Always")
        t.container = None
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            t.last_state = {"terminated": terminated}
            delay = min(BACKOFF_MAX, self.restart_backoff * 2 ** t.restarts)
            t.restarts += 1
            t.next_start = time.monotonic() + delay
            self._waiting(t, "CrashLoopBackOff", f"back-off {int(delay)}s restarting failed container="
                          f"{container['name']} pod={t.name}")
            return
        t.done = True
        self._send_status(t, "Succeeded" if code == 0 else "Failed", {"terminated": terminated}, ready=False)

    def _terminate(self, t: Tracked) -> None:
        """A pod being deleted: stop its container within the grace period, then remove it."""
        if not t.killing:
            t.killing = True
            grace = t.pod["metadata"].get("deletionGracePeriodSeconds")
            threading.Thread(target=self._kill_and_remove, args=(t, 30 if grace is None else int(grace)),
                             daemon=True).start()

    def _kill_and_remove(self, t: Tracked, grace: int) -> None:
        code = self._kill(t, grace)
        if not t.done and code is not None:
            t.done = True
            with contextlib.suppress(Exception):
                self._send_status(t, "Failed", {"terminated": {
                    "exitCode": code, "reason": "Error" if code else "Completed", "finishedAt": now(),
                    "startedAt": t.container.started if t.container else now()}}, ready=False)
        with contextlib.suppress(Exception):
            self.rest.delete(f"/api/v1/namespaces/{t.namespace}/pods/{t.name}",
                             {"gracePeriodSeconds": 0, "preconditions": {"uid": t.uid}})

    def _kill(self, t: Tracked, grace: float) -> int | None:
        c = t.container
        if c is None:
            return None
        self._drop_metrics_target(t.name)
        if c.proc is None:
            return c.exit_code
        if c.proc.poll() is None:
            if grace <= 0:
                self._remove_container(c)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                c.proc.wait(grace if grace > 0 else 10)
            except subprocess.TimeoutExpired:
                self._remove_container(c)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(10)
        return c.proc.returncode

    def _remove_container(self, c: Container) -> None:
        """A container run by podman outlives a SIGKILLed podman client: remove it at once."""
        if c.runtime_name:
            subprocess.run(["podman", "rm", "-f", "-t", "0", c.runtime_name], capture_output=True,
                           env=dict(os.environ, **({"CONTAINERS_CONF": self.containers_conf}
                                                   if self.containers_conf else {})))

    def kill_container(self, matcher: Matcher) -> list[str]:
        """SIGKILL the running container of matching pods (an OOM kill or a crash); the pod's
        restartPolicy decides what happens next."""
        killed = []
        with self._lock:
            for t in self.pods.values():
                c = t.container
                if c is not None and c.proc is not None and c.proc.poll() is None and matches(matcher, t.pod):
                    self._remove_container(c)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(c.proc.pid, signal.SIGKILL)
                    c.proc.wait(10)
                    killed.append(t.name)
        return killed

    # -- status -------------------------------------------------------------------------------
    def _waiting(self, t: Tracked, reason: str, message: str) -> None:
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        self._send_status(t, "Pending" if t.restarts == 0 else "Running", state, ready=False)

    def _running(self, t: Tracked) -> None:
        c = t.container
        assert c is not None
        self._send_status(t, "Running", {"running": {"startedAt": c.started}}, ready=True)

    def _send_status(self, t: Tracked, phase: str, state: dict, *, ready: bool) -> None:
        container = t.pod["spec"]["containers"][0]
        cs = {"name": container["name"], "image": container.get("image", ""), "imageID": "",
              "ready": ready, "started": "running" in state, "restartCount": t.restarts, "state": state}
        if t.last_state:
            cs["lastState"] = t.last_state
        if "running" in state or "terminated" in state:
            cs["containerID"] = f"process://{t.uid}/{t.restarts}"
        ts = now()
        conds = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": ts},
                 {"type": "Initialized", "status": "True", "lastTransitionTime": ts},
                 {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": ts},
                 {"type": "Ready", "status": str(ready), "lastTransitionTime": ts}]
        status = {"phase": phase, "conditions": conds, "containerStatuses": [cs],
                  "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                  "startTime": (t.pod.get("status") or {}).get("startTime") or ts}
        fingerprint = json.dumps([phase, state, ready, t.restarts], sort_keys=True)
        if fingerprint == t.status_sent:
            return
        try:
            self.rest.merge_patch(f"/api/v1/namespaces/{t.namespace}/pods/{t.name}/status", {"status": status})
            t.status_sent = fingerprint
        except ApiError as err:
            if err.status != 404:
                raise

    def _event(self, pod: Mapping, etype: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        ts = now()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                   "namespace": meta["namespace"], "uid": meta["uid"],
                                   "fieldPath": "spec.containers{%s}" % pod["spec"]["containers"][0]["name"]},
                "type": etype, "reason": reason, "message": message, "count": 1,
                "firstTimestamp": ts, "lastTimestamp": ts, "source": {"component": "kubelet", "host": self.node}}
        with contextlib.suppress(ApiError):
            self.rest.create(f"/api/v1/namespaces/{meta['namespace']}/events", body)

    # -- metrics targets (Prometheus file_sd) ---------------------------------------------------
    def _metrics_port_for(self, pod: Mapping, container: Mapping) -> int | None:
        """Pods share this machine's network namespace: a container port named `metrics` is moved
        to a free loopback port (RATATOUILLE_METRICS_PORT), so that pods do not collide."""
        if not any(p.get("name") == "metrics" for p in container.get("ports") or []):
            return None
        return free_port()

    def _listed(self, pod: Mapping) -> bool:
        """Whether a pod's metrics port goes into the file_sd list (the PodMonitor's selector)."""
        labels = pod["metadata"].get("labels") or {}
        return self.metrics_ports and all(labels.get(k) == v for k, v in self.metrics_pod_selector.items())

    def _add_metrics_target(self, pod: Mapping, container: Mapping, port: int) -> None:
        meta = pod["metadata"]
        labels = {"namespace": meta["namespace"], "pod": meta["name"], "container": container["name"],
                  "endpoint": "metrics"}
        for name in self.metrics_pod_labels:
            value = (meta.get("labels") or {}).get(name)
            if value is not None:
                labels[prometheus_label_name(name)] = str(value)
        group = {"targets": [f"127.0.0.1:{port}"], "labels": labels}
        self.metrics_targets[meta["name"]] = group
        self.metrics_targets_seen.append(copy.deepcopy(group))
        self._write_metrics_targets()

    def _drop_metrics_target(self, pod_name: str) -> None:
        if self.metrics_targets.pop(pod_name, None) is not None:
            self._write_metrics_targets()

    def _write_metrics_targets(self) -> None:
        path = self.metrics_sd_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(list(self.metrics_targets.values()), indent=1, sort_keys=True))
        os.replace(tmp, path)


def _expand(value: str, env: Mapping[str, str]) -> str:
    """$(VAR) references in env values, as the kubelet expands them ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)
