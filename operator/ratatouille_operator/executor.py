"""Embedded mode: run a RatatouilleRun on this machine, with local processes standing in for Jobs.

The local executor is an adapter around the same planner the operator uses. Each Job the planner
asks for is rendered to the batch/v1 manifest the operator would create, and its container
command and environment are run as a local process; process exit codes become Job states.
Re-running the same manifest resumes: the run's uid is derived from (namespace, name, spec), the
status is kept in storage, and members whose DONE marker exists are not redone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ratatouille_contract import layout
from ratatouille_trainer.cli import EXIT_DIVERGED
from ratatouille_trainer import inputs
from ratatouille_trainer.integrity import Verifier

from . import manifests, planner
from .spec import RunSpec

# Fields that change what a run computes; the others (parallelism, suspend, placement, deadlines)
# may change between re-runs without starting over.
_RESULT_FIELDS = ("foundation", "target", "auxiliaries", "includeFoundation", "linearProbe",
                  "auxiliaryFinetune", "finetune", "averaging", "seed", "storage")

TERMINAL = ("Succeeded", "Failed")


def embedded_uid(namespace: str, name: str, spec: Mapping) -> str:
    """Deterministic run uid for embedded mode: same manifest, same uid, so a re-run resumes."""
    material = {k: spec.get(k) for k in _RESULT_FIELDS}
    digest = hashlib.sha256(json.dumps([namespace, name, material], sort_keys=True, default=str).encode())
    return str(uuid.UUID(bytes=digest.digest()[:16], version=5))


@dataclass
class LocalJob:
    """One local process standing in for a batch/v1 Job."""
    name: str
    stage: str
    member: str
    attempt: int
    state: str = "Pending"
    start_time: float | None = None
    finish_time: float | None = None
    reason: str | None = None
    message: str | None = None  # why a finished auxiliary entry was trained again (its trainer says)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    pump: threading.Thread | None = field(default=None, repr=False)
    log_path: str | None = None

    def observed(self) -> planner.ObservedJob:
        return planner.ObservedJob(name=self.name, stage=self.stage, member=self.member,
                                   attempt=self.attempt, state=self.state, start_time=self.start_time,
                                   finish_time=self.finish_time, reason=self.reason, message=self.message,
                                   held=self.state == "Suspended")  # only the executor suspends

    def to_record(self) -> dict:
        return {"name": self.name, "stage": self.stage, "member": self.member, "attempt": self.attempt,
                "state": self.state, "startTime": self.start_time, "finishTime": self.finish_time,
                "reason": self.reason}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Own process group (so a Job's whole tree can be signalled) and, on Linux, SIGKILL when
    the executor dies: a killed `ratatouille run` must not leave members training unseen."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen, grace: float, *, group: bool = False,
                 signalled: bool = False) -> None:
    """Stop ``proc`` the way a kubelet stops a container: SIGTERM (to its whole process group
    with ``group``; not again when ``signalled``), up to ``grace`` seconds to exit, then SIGKILL.
    Returns once it is reaped."""
    def send(sig: int) -> None:
        if proc.poll() is not None:
            return
        if group:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        elif sig == signal.SIGTERM:
            proc.terminate()
        else:
            proc.kill()

    if not signalled:
        send(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def _parse_saved(raw: bytes) -> tuple[dict, list[LocalJob]]:
    """status.json as (record, jobs); ValueError/TypeError/KeyError when it is malformed."""
    saved = json.loads(raw)
    if not isinstance(saved, dict):
        raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
    if not isinstance(saved.get("status") or {}, dict):
        raise ValueError("'status' is not an object")
    _number_or_none(saved.get("creationTime"))
    jobs = []
    for rec in saved.get("jobs") or []:
        if not isinstance(rec, dict):
            raise ValueError("a job record is not an object")
        job = LocalJob(name=str(rec["name"]), stage=str(rec["stage"]), member=str(rec["member"]),
                       attempt=int(rec["attempt"]), state=str(rec["state"]),
                       start_time=_number_or_none(rec.get("startTime")),
                       finish_time=_number_or_none(rec.get("finishTime")),
                       reason=None if rec.get("reason") is None else str(rec["reason"]))
        if job.state not in ("Pending", "Active", "Succeeded", "Failed", "Suspended"):
            raise ValueError(f"job {job.name!r} has an unknown state {job.state!r}")
        jobs.append(job)
    return saved, jobs


def _number_or_none(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def trainer_executable() -> list[str]:
    """How to start `ratatouille-trainer` here: the console script beside this interpreter."""
    script = Path(sys.executable).with_name("ratatouille-trainer")
    if script.exists():
        return [str(script)]
    found = shutil.which("ratatouille-trainer")
    return [found] if found else [sys.executable, "-m", "ratatouille_trainer.cli"]


def local_command(job: Mapping, env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that the Job's single container would run with.

    Secret references are resolved from this machine's environment (the same variable names the
    Secret would carry), so credentials pass through without ever being written anywhere.
    """
    container = job["spec"]["template"]["spec"]["containers"][0]
    argv = list(container["command"]) + list(container.get("args") or [])
    if argv and argv[0] == "ratatouille-trainer":
        argv = trainer_executable() + argv[1:]
    out = dict(env)
    for var in container.get("env") or []:
        if "value" in var:
            out[var["name"]] = str(var["value"])
        elif "valueFrom" in var and var["name"] in env:
            out[var["name"]] = env[var["name"]]
    # A pod would have its own /tmp; keep each member's cache on the machine-wide cache instead.
    out.pop("RATATOUILLE_CACHE_DIR", None)
    out.pop("RATATOUILLE_METRICS_PORT", None)
    # Which device a pod's resources imply is a cluster matter: here this machine's own setting.
    if "RATATOUILLE_DEVICE" in env:
        out["RATATOUILLE_DEVICE"] = env["RATATOUILLE_DEVICE"]
    else:
        out.pop("RATATOUILLE_DEVICE", None)
    return argv, out


class LocalExecutor:
    """Drives planner.plan() with local processes until the run is Succeeded or Failed."""

    def __init__(self, namespace: str, name: str, spec: RunSpec, *, storage,
                 workdir: str | os.PathLike, parallelism: int | None = None,
                 env: Mapping[str, str] | None = None,
                 on_event: Callable[[str, dict], None] | None = None,
                 clock: Callable[[], float] = time.time, poll_interval: float = 0.5,
                 threads_per_job: int | None = None):
        self.spec = spec
        self.storage = storage
        self.clock = clock
        self.poll_interval = poll_interval
        self.workdir = Path(workdir)
        self.logdir = self.workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.parallelism = parallelism or spec.parallelism
        if not isinstance(self.parallelism, int) or self.parallelism < 1:
            raise ValueError(f"parallelism must be a positive integer, got {self.parallelism!r}")
        self.on_event = on_event or (lambda kind, data: None)
        base_env = dict(os.environ if env is None else env)
        base_env.setdefault("HF_HUB_OFFLINE", "1")
        cpus = os.cpu_count() or 1
        threads = threads_per_job or max(1, cpus // max(1, min(self.parallelism, cpus)))
        base_env.setdefault("OMP_NUM_THREADS", str(threads))
        base_env.setdefault("RATATOUILLE_TORCH_THREADS", str(threads))
        self.env = base_env
        uid = embedded_uid(namespace, name, spec.raw)
        self.run = planner.RunRef(namespace=namespace, name=name, uid=uid, generation=1,
                                  creation_time=clock())
        self.prefix = layout.run_prefix(spec.storage.uri, self.run)
        self.status_uri = layout.status_uri(self.prefix)
        self.jobs: dict[str, LocalJob] = {}
        self.metrics: dict[str, dict] = {}
        self.status: dict = {}
        self._lock = threading.Lock()
        self.verifier = Verifier(storage, what="finished member")
        self._inputs: dict[str, dict] = {}
        self._current_entries: set[str] = set()
        self._load_previous()

    # -- state kept in storage so that a re-run resumes ------------------------------------
    def _load_previous(self) -> None:
        if not self.storage.exists(self.status_uri):
            return
        raw = self.storage.read_bytes(self.status_uri)  # storage failures are errors, as everywhere
        try:
            saved, records = _parse_saved(raw)
        except (ValueError, TypeError, KeyError) as e:
            # The saved status only speeds up a resume; the DONE markers are the truth. A damaged
            # record is set aside (kept beside it for a look) and the run resumes from them.
            aside = self.status_uri + ".damaged"
            print(f"ratatouille: warning: ignoring {self.status_uri}: {e}; resuming from the "
                  f"members' DONE markers (the damaged file is kept as {aside})", file=sys.stderr)
            self.storage.write_bytes(aside, raw)
            self.status = {}
            return
        self.status = saved.get("status") or {}
        created = saved.get("creationTime")
        if created:
            self.run = dataclasses.replace(self.run, creation_time=float(created))
        for job in records:
            # Trust storage, not the record: a member counts as finished only if its DONE marker
            # exists and its files verify (one that does not loses DONE and is redone), and one
            # that finished after the last save (killed executor) counts too.
            done = self.verifier.check(planner.member_output(self.spec, self.run, job.stage, job.member))
            if done:
                job.state = "Succeeded"
            elif job.state == "Succeeded":
                continue
            elif job.state != "Failed":
                # Its process died with the previous executor: the Job no longer exists, and the
                # planner will create it again under the same name; the trainer resumes from
                # the member's checkpoint.
                continue
            self.jobs[job.name] = job
        if self.status.get("phase") in TERMINAL and self.status.get("phase") == "Failed":
            # A failed run is re-tried from where it stopped on an explicit re-run.
            self.status = {k: v for k, v in self.status.items() if k not in ("phase", "conditions")}
            self.jobs = {n: j for n, j in self.jobs.items() if j.state == "Succeeded"}

    def _save(self) -> None:
        record = {"run": dataclasses.asdict(self.run), "creationTime": self.run.creation_time,
                  "status": self.status, "jobs": [j.to_record() for j in self.jobs.values()]}
        self.storage.write_json(self.status_uri, record)

    # -- observation -----------------------------------------------------------------------
    def _current(self, aux, uri: str) -> bool:
        """Was the entry at ``uri`` trained on ``aux``'s inputs as they are now (inputs.py)? The
        inputs are read once per executor, and an entry found current stays so; inputs that
        cannot be read make it a miss (its Job then says what is wrong)."""
        if uri in self._current_entries:
            return True
        try:
            if aux.name not in self._inputs:
                self._inputs[aux.name] = inputs.identity(self.storage, str(aux.dataset),
                                                         self.spec.foundation.weights)
            current = inputs.changed(self.storage, uri, self._inputs[aux.name]) is None
        except Exception:  # noqa: BLE001 - DataError / NotFound / StorageError: not a hit
            return False
        if current:
            self._current_entries.add(uri)
        return current

    def _cache_hits(self) -> frozenset[str]:
        # a cached entry is used only if its model is the one DONE vouches for (a corrupted or
        # incomplete entry is a miss, retrained with a warning) and it was trained on the inputs'
        # current content (otherwise its Job retrains it, saying what changed)
        return frozenset(e.key for e in planner.aux_entries(self.spec)
                         if self.verifier.check(e.uri) and self._current(e.auxiliary, e.uri))

    def _member_metrics(self) -> dict[str, dict]:
        for job in self.jobs.values():
            key = f"{job.stage}/{job.member}"
            if job.state == "Succeeded" and key not in self.metrics:
                uri = layout.metrics_uri(planner.member_output(self.spec, self.run, job.stage, job.member))
                if self.storage.exists(uri):
                    self.metrics[key] = self.storage.read_json(uri)
        return dict(self.metrics)

    def observe(self) -> planner.Observed:
        self._reap()
        return planner.Observed(jobs=tuple(j.observed() for j in self.jobs.values()),
                                cache_hits=self._cache_hits(), member_metrics=self._member_metrics())

    def _reap(self) -> None:
        for job in self.jobs.values():
            if job.proc is None or job.state not in ("Active", "Pending"):
                continue
            rc = job.proc.poll()
            if rc is None:
                continue
            job.finish_time = self.clock()
            if job.pump is not None:
                job.pump.join(5)  # the process has exited: its last stdout lines (result) are read
            if rc == 0:
                job.state = "Succeeded"
            else:
                job.state = "Failed"
                job.reason = ("Diverged" if rc == EXIT_DIVERGED else f"ExitCode{rc}" if rc > 0
                              else f"Signal{-rc}")
            job.proc = None
            self.on_event("finished", {"job": job, "returncode": rc, "tail": self._log_tail(job)})

    def _log_tail(self, job: LocalJob, lines: int = 5) -> list[str]:
        if not job.log_path or not os.path.exists(job.log_path):
            return []
        with open(job.log_path, errors="replace") as fh:
            return [ln.rstrip() for ln in fh.readlines()[-lines:]]

    # -- actions ---------------------------------------------------------------------------
    def _start(self, action: planner.CreateJob) -> None:
        if action.name in self.jobs:
            return  # idempotent, as "already exists" is for the operator
        job_manifest = manifests.render_job(self.run, self.spec, action, default_image="local")
        argv, env = local_command(job_manifest, self.env)
        job = LocalJob(name=action.name, stage=action.stage, member=action.member,
                       attempt=action.attempt, state="Active", start_time=self.clock())
        job.log_path = str(self.logdir / f"{action.name}.log")
        log = open(job.log_path, "w")
        job.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                    preexec_fn=_die_with_parent)
        job.pump = threading.Thread(target=self._pump, args=(job, log), daemon=True)
        job.pump.start()
        self.jobs[action.name] = job
        self.on_event("started", {"job": job})

    def _pump(self, job: LocalJob, log) -> None:
        """Copy the trainer's stdout to its log, keeping the latest progress event and why a
        finished result was trained again (its result event says)."""
        assert job.proc is not None and job.proc.stdout is not None
        for line in job.proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "progress":
                    self.on_event("progress", {"job": job, "progress": event})
                elif isinstance(event, dict) and event.get("event") == "result" and event.get("retrained"):
                    job.message = str(event["retrained"])
        log.close()

    def _signal(self, job: LocalJob, sig: int) -> None:
        if job.proc is not None and job.proc.poll() is None:
            try:
                os.killpg(job.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _apply(self, action) -> None:
        if isinstance(action, planner.CreateJob):
            self._start(action)
        elif isinstance(action, planner.DeleteJob):
            job = self.jobs.get(action.name)
            if job is not None:
                if job.proc is not None:
                    stop_process(job.proc, 10, group=True)
                job.proc = None
                if job.state in ("Active", "Pending", "Suspended"):
                    job.state = "Failed"
                    job.reason = action.reason
                    job.finish_time = self.clock()
        elif isinstance(action, planner.SetSuspend):
            # A suspended Job deletes its pods; the member resumes from its checkpoint.
            job = self.jobs.get(action.name)
            if job is None:
                return
            if action.suspend and job.state in ("Active", "Pending"):
                self._signal(job, signal.SIGTERM)
                if job.proc is not None:
                    job.proc.wait()
                job.proc = None
                job.state = "Suspended"
            elif not action.suspend and job.state == "Suspended":
                del self.jobs[job.name]  # re-created under the same name by the next plan

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> planner.Plan:
        now = self.clock()
        result = planner.plan(self.run, self._effective_spec(), self.observe(), now,
                              previous_status=self.status or None)
        for ev in result.events:
            self.on_event("event", {"event": ev})
        for action in result.actions:
            self._apply(action)
        changed = result.status != self.status
        self.status = result.status
        if changed or result.actions:
            self._save()
        return result

    def _effective_spec(self) -> RunSpec:
        if self.parallelism == self.spec.parallelism:
            return self.spec
        return dataclasses.replace(self.spec, parallelism=self.parallelism)

    def run_to_completion(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                result = self.step()
                if self.status.get("phase") in TERMINAL and not self._running():
                    return self.status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run did not finish within {timeout} s")
                wait = self.poll_interval
                if result.requeue_after is not None and not self._running() and not result.actions:
                    wait = max(self.poll_interval, min(result.requeue_after, 5.0))
                time.sleep(wait)
        finally:
            self.shutdown()

    def _running(self) -> bool:
        return any(j.proc is not None and j.proc.poll() is None for j in self.jobs.values())

    def shutdown(self) -> None:
        """Stop any process still running (Ctrl-C, timeout): a later re-run resumes them."""
        for job in self.jobs.values():  # all at once, then wait for each
            self._signal(job, signal.SIGTERM)
        for job in self.jobs.values():
            if job.proc is not None:
                stop_process(job.proc, 10, group=True, signalled=True)
