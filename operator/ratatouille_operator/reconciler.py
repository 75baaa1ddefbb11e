"""The Kubernetes adapter around the planner: read a run and its Jobs, plan, apply, write status.

Level-based: every call recomputes from the run object and its child Jobs (from kopf's index or a
LIST), so it does the same thing whichever event woke it, and after a restart it rebuilds
everything it needs. The only memory it keeps is a cache of facts that never change once true
(a member's metrics, an auxiliary cache entry being DONE), for a while the Succeeded Jobs that
left no metrics anywhere (so that every reconcile does not read storage and LIST pods again for
each of them), the names it created moments ago whose watch events have not arrived yet, and the
status it last wrote per run (used only when the run body it is handed is older than that write,
so that a stale body from an index never repeats a phase-transition Event).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from ratatouille_contract import layout

from . import manifests, planner
from .policy import REASON_NOT_ALLOWED, Policy, PolicyError
from .spec import API_GROUP, API_VERSION, PLURAL, SpecError
from .validation import validate_manifest

log = logging.getLogger("ratatouille.operator")

#: How long a Succeeded Job whose metrics were found neither in storage nor in its pod's
#: termination message is not looked for again (seconds).
MISSING_METRICS_RECHECK_S = 60.0
#: Past this many remembered missing-metrics entries, the expired ones are dropped.
MAX_REMEMBERED = 10_000
#: A Job pending this long (seconds since it started) gets its pods read for why.
PENDING_EXPLAIN_AFTER_S = 10.0
#: Kueue's Workload API (deactivating a Workload is how a queued Job is held).
KUEUE_GROUP, KUEUE_VERSIONS, KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io", ("v1beta2", "v1beta1"), "kueue.x-k8s.io/job-uid"
#: How soon to try again to hold a queued Job whose Workload Kueue has not made yet.
KUEUE_WORKLOAD_WAIT_S = 2.0


class _Once:
    """A value computed on first use, then kept (one LIST per reconcile, shared)."""

    def __init__(self, fn: Callable[[], Any]):
        self._fn, self._done, self._value = fn, False, None

    def __call__(self) -> Any:
        if not self._done:
            self._value, self._done = self._fn(), True
        return self._value


@dataclass(frozen=True)
class Settings:
    """Operator settings, from environment variables (the chart sets them)."""
    watch_namespaces: tuple[str, ...] = ()
    default_image: str = "ghcr.io/ratatouille-dev/ratatouille:0.1.0"
    default_storage_endpoint: str | None = None
    default_credentials_secret: str | None = None
    reconcile_interval: float = 15.0
    metrics_port: int = 9090
    liveness_port: int = 8080
    trainer_metrics_port: int = 9400
    job_service_account: str | None = None
    log_level: str = "INFO"
    #: What runs may ask for (images, tolerations, priority classes): policy.py.
    policy: Policy = Policy()
    #: Auxiliary cache entries shared between namespaces (else each namespace has its own).
    shared_aux_cache: bool = False

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> "Settings":
        e = os.environ if env is None else env

        def opt(name: str) -> str | None:
            return e.get(name) or None

        return Settings(
            watch_namespaces=tuple(n.strip() for n in (e.get("RATATOUILLE_WATCH_NAMESPACES") or "").split(",") if n.strip()),
            default_image=e.get("RATATOUILLE_DEFAULT_IMAGE") or Settings.default_image,
            default_storage_endpoint=opt("RATATOUILLE_DEFAULT_STORAGE_ENDPOINT"),
            default_credentials_secret=opt("RATATOUILLE_DEFAULT_CREDENTIALS_SECRET"),
            reconcile_interval=float(e.get("RATATOUILLE_RECONCILE_INTERVAL") or 15),
            metrics_port=int(e.get("RATATOUILLE_METRICS_PORT") or 9090),
            liveness_port=int(e.get("RATATOUILLE_LIVENESS_PORT") or 8080),
            trainer_metrics_port=int(e.get("RATATOUILLE_TRAINER_METRICS_PORT") or 9400),
            job_service_account=opt("RATATOUILLE_JOB_SERVICE_ACCOUNT"),
            log_level=(e.get("RATATOUILLE_LOG_LEVEL") or "INFO").upper(),
            policy=Policy.from_env(e),
            shared_aux_cache=(e.get("RATATOUILLE_SHARED_AUX_CACHE") or "").lower() in ("1", "true", "yes"),
        )


def _norm_endpoint(endpoint: str | None) -> str | None:
    return endpoint.rstrip("/").lower() if endpoint else None


def _ts(value: Any) -> float:
    t = manifests.parse_time(value)
    return t if t is not None else time.time()


def _fill_defaults(body: Mapping, settings: Settings) -> dict:
    """Operator-level defaults for what a run leaves out (storage endpoint and secret)."""
    body = dict(body)
    spec = dict(body.get("spec") or {})
    storage = dict(spec.get("storage") or {})
    if not storage.get("endpoint") and settings.default_storage_endpoint:
        storage["endpoint"] = settings.default_storage_endpoint
    if not storage.get("credentialsSecret") and settings.default_credentials_secret:
        storage["credentialsSecret"] = settings.default_credentials_secret
    if storage:
        spec["storage"] = storage
    body["spec"] = spec
    return body


class StorageView:
    """The one fact the planner may take from storage: a finished member's metrics.json, when
    its pod's termination message did not carry them. Auxiliary cache hits are never read here
    (their trainers find them, ratatouille_trainer.inputs).

    Uses the operator's own credentials (environment), and so only with the endpoints the
    operator is configured with (`trusted_endpoints`: the chart's storage.endpoint and
    RATATOUILLE_TRUSTED_STORAGE_ENDPOINTS): a run's spec.storage.endpoint is the tenant's choice,
    and presenting the operator's keys there, or believing what it answers, would make the
    operator a confused deputy. For any other endpoint nothing is read: metrics come from the
    pods' termination messages, as when storage is unreachable. One client per endpoint and
    scheme, at most MAX_CLIENTS kept.
    """

    MAX_CLIENTS = 8
    #: Member prefixes remembered with their metrics, most recently used kept: a bounded
    #: memory whatever the number of runs and members (a forgotten one is read again).
    MAX_PREFIXES = 4096

    def __init__(self, open_storage: Callable[[str, str | None], Any] | None, metrics=None,
                 trusted_endpoints: Iterable[str | None] | None = None):
        self._open = open_storage
        self._clients: "collections.OrderedDict[tuple[str, str | None], Any]" = collections.OrderedDict()
        self._metrics: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
        self._missing: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._m = metrics
        # None: every endpoint (tests that hand in their own opener)
        self._trusted = None if trusted_endpoints is None else {_norm_endpoint(e) for e in trusted_endpoints}

    def trusts(self, endpoint: str | None) -> bool:
        return self._trusted is None or _norm_endpoint(endpoint) in self._trusted

    def _client(self, uri: str, endpoint: str | None):
        if self._open is None or not self.trusts(endpoint):
            return None
        key = (uri.split("://", 1)[0] if "://" in uri else "file", _norm_endpoint(endpoint))
        if key in self._clients:
            self._clients.move_to_end(key)
        else:
            self._clients[key] = self._open(uri, endpoint)
            while len(self._clients) > self.MAX_CLIENTS:
                self._clients.popitem(last=False)
        return self._clients[key]

    def _error(self, op: str, uri: str, exc: Exception) -> None:
        log.warning("storage %s %s failed: %s", op, uri, exc)
        if self._m is not None:
            self._m.storage_errors.labels(op=op).inc()

    def _remember(self, table: "collections.OrderedDict", key: str, value: Any = None) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.MAX_PREFIXES:
            table.popitem(last=False)

    def metrics(self, prefix: str, endpoint: str | None) -> dict | None:
        if prefix in self._metrics:
            self._metrics.move_to_end(prefix)
            return self._metrics[prefix]
        try:
            client = self._client(prefix, endpoint)
            if client is None:
                return None
            data = client.read_json(layout.metrics_uri(prefix))
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "NotFound":
                # Not an error of the storage: the member left no metrics.json (the termination
                # message may have them). Said once per member, not on every reconcile.
                if prefix not in self._missing:
                    self._remember(self._missing, prefix)
                    log.info("no metrics.json under %s", prefix)
            else:
                self._error("get", prefix, exc)
            return None
        if not isinstance(data, dict):
            return None
        self._remember(self._metrics, prefix, data)
        return data

    def remember_metrics(self, prefix: str, data: dict) -> None:
        if prefix not in self._metrics:
            self._remember(self._metrics, prefix, data)

    def said_missing(self, prefix: str, endpoint: str | None = None) -> bool:
        """Whether storage answered that prefix has no metrics.json (not: could not be read), or
        there is no storage the operator may read."""
        return self._open is None or not self.trusts(endpoint) or prefix in self._missing


@dataclass
class ReconcileResult:
    phase: str | None
    created: list[str] = field(default_factory=list)
    requeue_after: float | None = None
    #: The API server could not take a create now (5xx, 429, a full quota): try again after this
    #: many seconds (grows while it lasts).
    retry_after: float | None = None


#: How long a create the API server refused is remembered in memory before the run's status
#: (status.attempts) must hold it.
REJECTED_MEMORY_S = 300.0
#: Back-off for creates the API server could not take now: 2, 4, 8 ... up to this (seconds).
MAX_CREATE_BACKOFF_S = 300.0


def _api_error(exc) -> tuple[str, str]:
    """(reason, message) of an ApiException, from the server's Status body when there is one."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("reason") or exc.reason or f"HTTP{exc.status}")
    message = str(body.get("message") or exc.reason or "")
    return reason, message


def _transient(exc) -> bool:
    """A create worth trying again: the server is unwell (5xx), asks us to slow down (429), or
    a quota is full for now (403 exceeded quota). Any other 4xx would fail the same way again."""
    status = int(exc.status or 0)
    if status == 429 or status >= 500 or status == 0:
        return True
    return status == 403 and "exceeded quota" in _api_error(exc)[1]


#: Trainer exit codes (docs/contract.md) -> the reason a failed attempt shows.
_EXIT_REASONS = {manifests.EXIT_BAD_INPUT: "BadInput", manifests.EXIT_DIVERGED: "Diverged"}


def _rv(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class Reconciler:
    """Plans one run at a time against the Kubernetes API (kubernetes client, injected)."""

    def __init__(self, api_client, settings: Settings, *, storage_view: StorageView | None = None,
                 metrics=None, clock: Callable[[], float] = time.time, settle: float = 0.0):
        """settle: seconds reconcile_coalesced waits before it reads its inputs, so that a burst
        of requests (the Job events of one run) is served by one reconcile."""
        from kubernetes import client as k8s

        self.k8s = k8s
        self.batch = k8s.BatchV1Api(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        self.settings = settings
        self.storage = storage_view or StorageView(None)
        self.metrics = metrics
        self.clock = clock
        self.settle = settle
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Coalescing of event-driven reconciles (reconcile_coalesced): runs one of them is busy
        # with, and those of them that got another request meanwhile.
        self._busy: set[tuple[str, str]] = set()
        self._dirty: set[tuple[str, str]] = set()
        # (run uid, Job name) of Succeeded Jobs whose metrics were found neither in storage nor
        # in a pod's termination message -> when that was last checked (see _member_metrics).
        self._no_metrics: dict[tuple[str, str], float] = {}
        # Names created moments ago whose watch event may not have reached the index yet.
        self._recent: dict[str, tuple[float, str, planner.ObservedJob]] = {}
        # The status this process last wrote per run (uid, resourceVersion after the write,
        # status): a run body from an index or a LIST may predate it, and planning from an older
        # status would repeat its phase-transition Events. Only ever used when it is newer.
        self._written: dict[tuple[str, str], tuple[str, int, dict]] = {}
        # Creates the API server refused (4xx): name -> (when, run uid, the failed attempt),
        # until the run's status remembers them.
        self._rejected: dict[str, tuple[float, str, planner.ObservedJob]] = {}
        # Runs whose creates the server could not take now -> consecutive times.
        self._create_trouble: dict[tuple[str, str], int] = {}
        # (run uid, Job name) of failed Jobs -> (reason, message) read from their pods.
        self._failure_info: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        # (run uid, Job name) of succeeded auxiliary Jobs -> why their trainer trained a finished
        # cache entry again (None: it did not), read once per Job (see _retrained).
        self._retrain_info: dict[tuple[str, str], str | None] = {}
        # Kueue's served Workload API version: None not looked up yet, False not served.
        self._kueue_version: str | bool | None = None

    # -- reading ---------------------------------------------------------------------------
    def list_jobs(self, namespace: str, run_name: str) -> list[dict]:
        return list_slim_jobs(self.batch.list_namespaced_job, namespace,
                              label_selector=f"{planner.LABEL_RUN}={planner.label_value(run_name)}")

    def _lock(self, key: tuple[str, str]) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget_all_but(self, live: set[tuple[str, str]], namespaces: Iterable[str] = ()) -> None:
        """Drop what is remembered of runs that no longer exist (called with a fresh LIST)."""
        namespaces = set(namespaces)
        for key in list(self._written):
            if key not in live and (not namespaces or key[0] in namespaces):
                self._written.pop(key, None)

    # -- the reconcile ---------------------------------------------------------------------
    def reconcile(self, body: Mapping, jobs: Iterable[Mapping] | None = None, *, handler: str = "reconcile",
                  wait: bool = True) -> ReconcileResult | None:
        """Plan the run and act. wait=False: return None at once when another thread is
        reconciling this run (the periodic resync: it must not queue behind one run's slow
        reconcile, creating a stage's Jobs, while every run after it in the list waits)."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta["name"]
        lock = self._lock((namespace, name))
        if not lock.acquire(blocking=wait):
            return None
        try:
            started = time.perf_counter()
            try:
                return self._reconcile(body, jobs)
            finally:
                if self.metrics is not None:
                    self.metrics.reconcile_duration.labels(handler=handler).observe(time.perf_counter() - started)
        finally:
            lock.release()

    def reconcile_coalesced(self, key: tuple[str, str],
                            read: Callable[[], tuple[Mapping | None, Iterable[Mapping] | None]], *,
                            handler: str = "reconcile") -> ReconcileResult | None:
        """Reconcile the run `key` (namespace, name) from what `read()` returns (its body, or None
        when it is gone, and its Jobs, or None to LIST them), for callers that are told that
        something changed (child Job events) and come in bursts.

        Level-based, so one reconcile that reads its inputs after a change covers every change
        before it. A call made while another one for the same run is busy does not wait for it
        (a thread blocked on the run's lock per Job event would starve the handlers of other
        runs): it marks the run and returns None at once, and the busy call reconciles again,
        from a new `read()`, when it is done. The busy call first waits `settle` seconds, so that
        the rest of a burst (a Job's several status updates, the Jobs of a stage finishing
        together) joins it. Returns the last reconcile's result, or None.
        """
        with self._locks_guard:
            if key in self._busy:
                self._dirty.add(key)
                return None
            self._busy.add(key)
        result = None
        try:
            while True:
                if self.settle > 0:
                    time.sleep(self.settle)
                with self._locks_guard:
                    self._dirty.discard(key)
                # Read only now: a request that found this run busy came after its change was
                # visible to `read` (kopf updates its indexes before it calls the handlers).
                body, jobs = read()
                if body is not None:
                    result = self.reconcile(body, jobs, handler=handler)
                with self._locks_guard:
                    if key not in self._dirty:
                        self._busy.discard(key)
                        return result
        except BaseException:
            with self._locks_guard:
                self._busy.discard(key)
                self._dirty.discard(key)
            raise

    def _previous_status(self, namespace: str, name: str, meta: Mapping, body: Mapping) -> dict:
        prev = dict(body.get("status") or {})
        written = self._written.get((namespace, name))
        if written is not None:
            uid, rv, status = written
            body_rv = _rv(meta.get("resourceVersion"))
            if uid == meta.get("uid") and body_rv is not None and body_rv < rv:
                return dict(status)
        return prev

    def _admit(self, body: Mapping, prev_status: dict, generation: int):
        """(the validated run, the previous status to plan from), or the ReconcileResult of a
        run refused as invalid or not allowed."""
        meta = body["metadata"]
        try:
            validated = validate_manifest(_fill_defaults({k: v for k, v in body.items() if k != "status"}, self.settings))
        except SpecError as err:
            return self._invalid(body, prev_status, generation, err), prev_status
        if prev_status.get("phase") not in planner.TERMINAL_PHASES or _was_invalid(prev_status):
            try:  # (a finished run stays as it finished, whatever the policy says now)
                self.settings.policy.check(validated.spec, self.settings.default_image)
            except PolicyError as err:
                return self._invalid(body, prev_status, generation, err, REASON_NOT_ALLOWED), prev_status
        if _was_invalid(prev_status):
            # The spec was fixed: plan from scratch (the invalid verdict is not a run outcome).
            log.info("RatatouilleRun %s/%s: the spec is valid again", meta.get("namespace") or "default", meta["name"])
            prev_status = {}
        return validated, prev_status

    def _observe(self, run: planner.RunRef, jobs: list[Mapping], prev_status: Mapping, pods: "_Once",
                 now: float) -> dict[str, planner.ObservedJob]:
        """The run's Jobs as the planner sees them: listed ones (explained by their pods while the
        run is live), plus those created or refused moments ago that a LIST may not show yet."""
        observed_jobs = {}
        for job in jobs:  # (a Job of an earlier run with the same name has another uid label)
            o = manifests.parse_job(job)
            if o is not None:
                observed_jobs[o.name] = o
        if prev_status.get("phase") not in planner.TERMINAL_PHASES:
            observed_jobs.update(self._explain(run, jobs, observed_jobs, prev_status, pods, now))
            observed_jobs.update(self._retrained(run, observed_jobs, prev_status, pods))
        for jname, (t, owner_uid, o) in list(self._recent.items()):
            if jname in observed_jobs or now - t > 60:
                self._recent.pop(jname, None)
            elif owner_uid == run.uid:
                observed_jobs[jname] = o
        remembered = {f"{o.stage}/{o.member}/{o.attempt}" for o in planner.remembered_jobs(run, prev_status)}
        for jname, (t, owner_uid, o) in list(self._rejected.items()):
            if now - t > REJECTED_MEMORY_S or (owner_uid == run.uid and f"{o.stage}/{o.member}/{o.attempt}" in remembered):
                self._rejected.pop(jname, None)
            elif owner_uid == run.uid and jname not in observed_jobs:
                observed_jobs[jname] = o
        return observed_jobs

    def _act(self, run: planner.RunRef, spec, body: Mapping, actions, uids: Mapping[str, str | None]):
        """Carry out the plan's creates and suspends; returns (created names, whether to plan
        again, the delay before retrying a create the server could not take, the deletes)."""
        created, again, retry_after, deletes = [], False, None, []
        key = (run.namespace, run.name)
        for action in actions:
            if isinstance(action, planner.CreateJob):
                if retry_after is not None:
                    continue  # the server could not take the last one: the rest waits too
                outcome = self._create(run, spec, body, action)
                if outcome == "created":
                    created.append(action.name)
                elif outcome == "transient":
                    n = self._create_trouble.get(key, 0) + 1
                    self._create_trouble[key] = n
                    retry_after = min(MAX_CREATE_BACKOFF_S, 2.0 ** n)
                else:  # "exists" (a stale view) or "rejected" (recorded): plan again
                    again = True
            elif isinstance(action, planner.DeleteJob):
                deletes.append(action)
            elif isinstance(action, planner.SetSuspend):
                if not self._suspend(run.namespace, action, uids.get(action.name)):
                    retry_after = KUEUE_WORKLOAD_WAIT_S if retry_after is None else retry_after
        if retry_after is None and created:
            self._create_trouble.pop(key, None)
        return created, again, retry_after, deletes

    def _reconcile(self, body: Mapping, jobs: Iterable[Mapping] | None, *, fresh: bool = False) -> ReconcileResult:
        meta = body["metadata"]
        namespace, name, uid = meta.get("namespace") or "default", meta["name"], meta.get("uid") or ""
        generation = int(meta.get("generation") or 1)
        prev_status = self._previous_status(namespace, name, meta, body)
        if meta.get("deletionTimestamp"):
            return ReconcileResult(prev_status.get("phase"))
        validated, prev_status = self._admit(body, prev_status, generation)
        if isinstance(validated, ReconcileResult):
            return validated
        spec = validated.spec if self.settings.shared_aux_cache else replace(validated.spec, aux_cache_scope=namespace)
        run = planner.RunRef(namespace=namespace, name=name, uid=uid, generation=generation,
                             creation_time=_ts(meta.get("creationTimestamp")))
        jobs = [j for j in (self.list_jobs(namespace, name) if jobs is None else jobs)
                if (j.get("metadata", {}).get("labels") or {}).get(planner.LABEL_RUN_UID) == planner.label_value(uid)]
        uids = {(j.get("metadata") or {}).get("name"): (j.get("metadata") or {}).get("uid") for j in jobs}
        now = self.clock()
        pods = _Once(lambda: self._run_pods(run))  # at most one LIST of the run's pods
        observed_jobs = self._observe(run, jobs, prev_status, pods, now)
        known = planner.with_remembered(run, observed_jobs.values(), prev_status)
        # A finished run's status is final (the planner keeps it as it is): no storage reads and
        # no pod LISTs for it, so an operator restart costs nothing per finished run. Auxiliary
        # cache hits are not read from storage here: every auxiliary Job is created, and its
        # trainer returns at once when the entry is complete, verifies, and was trained on the
        # inputs' current content (ratatouille_trainer.inputs).
        finished = prev_status.get("phase") in planner.TERMINAL_PHASES
        observed = planner.Observed(jobs=tuple(observed_jobs.values()),
                                    member_metrics={} if finished else self._member_metrics(spec, run, known, pods))
        result = planner.plan(run, spec, observed, now, previous_status=prev_status or None)
        created, again, retry_after, deletes = self._act(run, spec, body, result.actions, uids)
        if again and not fresh:
            # A Job we meant to create exists already (the view of the children was older than
            # the API), or the server refused one (a failed member now): the status and Events
            # of this plan would be wrong, so plan again from a fresh LIST instead of writing them.
            log.debug("planning %s/%s again from a LIST", namespace, name)
            for action in deletes:
                self._delete(namespace, action)
            again_result = self._reconcile(body, None, fresh=True)
            return ReconcileResult(again_result.phase, created + again_result.created, again_result.requeue_after,
                                   retry_after if again_result.retry_after is None else again_result.retry_after)
        status = dict(result.status)
        if status != {k: prev_status.get(k) for k in status} or "observedGeneration" not in prev_status:
            self._patch_status(namespace, name, uid, status)
        # Deletes after the status write: an attempt the operator fails (its pod never started) is
        # in status.attempts before its Job goes, so that the attempt is never forgotten.
        for action in deletes:
            self._delete(namespace, action)
        # Events after the status write: should the write fail, the retry posts them (once).
        for ev in result.events:
            self.post_event(body, ev.type, ev.reason, ev.message)
        self._count(run, prev_status, status, observed_jobs.values())
        requeue = result.requeue_after
        if retry_after is not None:
            requeue = retry_after if requeue is None else min(requeue, retry_after)
        return ReconcileResult(status.get("phase"), created, requeue, retry_after)

    # -- what the pods say ------------------------------------------------------------------
    def _explain(self, run: planner.RunRef, jobs: list[Mapping], observed: Mapping[str, planner.ObservedJob],
                 prev_status: Mapping, run_pods: "_Once", now: float) -> dict[str, planner.ObservedJob]:
        """Pending Jobs get their pod's waiting reason and message (or the Job's FailedCreate
        Event when it has no pod) and since when they have been waiting; failed ones the failed
        container's termination message. One LIST of the run's pods, only when one is needed:
        a Job pending for PENDING_EXPLAIN_AFTER_S or more (most pods start within seconds), or a
        failed one not explained yet."""
        ledger = prev_status.get("attempts") if isinstance(prev_status.get("attempts"), Mapping) else {}
        bodies = {(j.get("metadata") or {}).get("name"): j for j in jobs}
        pending = []
        for o in observed.values():
            if o.state != planner.PENDING:
                continue
            meta, status = (bodies.get(o.name) or {}).get("metadata") or {}, (bodies.get(o.name) or {}).get("status") or {}
            since = manifests.parse_time(status.get("startTime")) or manifests.parse_time(meta.get("creationTimestamp"))
            if since is not None and now - since >= PENDING_EXPLAIN_AFTER_S:
                pending.append(o)
        failed = []
        for o in observed.values():
            if o.state != planner.FAILED:
                continue
            known = self._failure_info.get((run.uid, o.name))
            entry = ledger.get(f"{o.stage}/{o.member}") or {}
            if known is None and entry.get("attempt") == o.attempt and entry.get("state") == planner.FAILED \
                    and "message" in entry:
                known = (entry.get("reason"), entry.get("message"))
            if known is None:
                failed.append(o)
            else:
                observed = {**observed, o.name: replace(o, reason=known[0] or o.reason, message=known[1])}
        out = {o.name: observed[o.name] for o in observed.values() if o.state == planner.FAILED}
        if not pending and not failed:
            return out
        pods = run_pods()
        if pods is None:
            return out
        by_job: dict[str, list[dict]] = {}
        for pod in pods:
            jname = ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")
            if jname:
                by_job.setdefault(jname, []).append(pod)
        for o in pending:
            out[o.name] = self._waiting(run, o, bodies.get(o.name) or {}, by_job.get(o.name, []))
        for o in failed:
            reason, message = _failure(bodies.get(o.name) or {}, by_job.get(o.name, []), o.reason)
            if len(self._failure_info) > MAX_REMEMBERED:
                self._failure_info.clear()
            self._failure_info[(run.uid, o.name)] = (reason, message)
            out[o.name] = replace(o, reason=reason, message=message)
        return out

    def _retrained(self, run: planner.RunRef, observed: Mapping[str, planner.ObservedJob], prev_status: Mapping,
                   run_pods: "_Once") -> dict[str, planner.ObservedJob]:
        """Succeeded auxiliary Jobs whose trainer trained a finished cache entry again carry why
        (the termination message's "retrained": the dataset or the foundation changed, or the
        entry did not verify), for the status and an AuxiliaryRetrained Event. Read once per Job:
        from the previous status when it shows the Job succeeded already, else from its pod
        (the one LIST of the run's pods this reconcile may make)."""
        before = {e.get("name"): e for e in prev_status.get("jobs") or [] if isinstance(e, Mapping)}
        out = {}
        for o in observed.values():
            if o.state != planner.SUCCEEDED or o.stage != planner.STAGE_AUX:
                continue
            key = (run.uid, o.name)
            if key not in self._retrain_info:
                entry = before.get(o.name) or {}
                if entry.get("state") == planner.SUCCEEDED:
                    why = entry.get("message")
                else:
                    data, final = self._termination_message(o.name, run_pods)
                    if data is None and not final:
                        continue  # the pods could not be listed: look again next time
                    why = (data or {}).get("retrained")
                if len(self._retrain_info) > MAX_REMEMBERED:
                    self._retrain_info.clear()
                self._retrain_info[key] = str(why) if why else None
            if self._retrain_info[key]:
                out[o.name] = replace(o, message=self._retrain_info[key])
        return out

    def _run_pods(self, run: planner.RunRef) -> list[dict] | None:
        try:
            resp = self.core.list_namespaced_pod(
                run.namespace, label_selector=f"{planner.LABEL_RUN_UID}={planner.label_value(run.uid)}",
                _preload_content=False)
            return json.loads(resp.data).get("items") or []
        except (self.k8s.ApiException, ValueError) as exc:
            log.debug("cannot list the pods of %s/%s: %s", run.namespace, run.name, exc)
            return None

    def _waiting(self, run: planner.RunRef, o: planner.ObservedJob, job: Mapping, pods: list[dict]) -> planner.ObservedJob:
        meta, status = job.get("metadata") or {}, job.get("status") or {}
        times = [manifests.parse_time(status.get("startTime")) or manifests.parse_time(meta.get("creationTimestamp"))]
        live = []
        for pod in pods:
            times.append(manifests.parse_time((pod.get("metadata") or {}).get("creationTimestamp")))
            pstatus = pod.get("status") or {}
            if pstatus.get("phase") in ("Succeeded", "Failed") or (pod.get("metadata") or {}).get("deletionTimestamp"):
                for cs in pstatus.get("containerStatuses") or []:
                    times.append(manifests.parse_time(((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")))
            else:
                live.append(pod)
        since = max((t for t in times if t is not None), default=None)
        reason = message = None
        live.sort(key=lambda p: manifests.parse_time((p.get("metadata") or {}).get("creationTimestamp")) or 0)
        for pod in reversed(live):
            pstatus = pod.get("status") or {}
            scheduled = next((c for c in pstatus.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
            if scheduled is not None and scheduled.get("status") == "False":
                reason, message = scheduled.get("reason") or "Unschedulable", scheduled.get("message")
                break
            waiting = next(((cs.get("state") or {}).get("waiting") for cs in pstatus.get("containerStatuses") or []
                            if (cs.get("state") or {}).get("waiting")), None)
            if waiting:
                reason, message = waiting.get("reason"), waiting.get("message")
                break
        if not live and job:
            reason, message = self._failed_create(run.namespace, meta.get("uid"), since) or (None, None)
        return replace(o, reason=reason or o.reason, message=message, pending_since=since)

    def _failed_create(self, namespace: str, job_uid: str | None, since: float | None) -> tuple[str, str] | None:
        """The Job controller's latest FailedCreate Event for a Job that has no pod (a quota, a
        missing ServiceAccount or PriorityClass, a pod that admission refuses)."""
        if not job_uid:
            return None
        try:
            resp = self.core.list_namespaced_event(
                namespace, field_selector=f"involvedObject.uid={job_uid},reason=FailedCreate",
                _preload_content=False)
            items = json.loads(resp.data).get("items") or []
        except (self.k8s.ApiException, ValueError) as exc:
            log.debug("cannot list the Events of Job %s in %s: %s", job_uid, namespace, exc)
            return None
        if not items:
            return None
        last = max(items, key=lambda e: manifests.parse_time(e.get("lastTimestamp") or e.get("eventTime")
                                                              or (e.get("metadata") or {}).get("creationTimestamp")) or 0)
        return "FailedCreate", str(last.get("message") or "")

    def _member_metrics(self, spec, run, jobs: Iterable[planner.ObservedJob], run_pods: "_Once") -> dict[str, dict]:
        out = {}
        now = self.clock()
        for j in jobs:
            if j.state != "Succeeded" or j.stage == planner.STAGE_AUX:
                continue
            prefix = planner.member_output(spec, run, j.stage, j.member)
            missing_key = (run.uid, j.name)
            checked = self._no_metrics.get(missing_key)
            if checked is not None and now - checked < MISSING_METRICS_RECHECK_S:
                # Looked for moments ago and found nowhere: a finished member's metrics do not
                # appear later (the trainer writes them before it exits), so do not read storage
                # and LIST pods again for it on every reconcile; look again now and then.
                continue
            data = self.storage.metrics(prefix, spec.storage.endpoint)
            answered = True
            if data is None:
                answered = self.storage.said_missing(prefix, spec.storage.endpoint)
                data, final = self._termination_message(j.name, run_pods)
                answered = answered and final
                if data is not None:
                    self.storage.remember_metrics(prefix, data)
            if data is not None:
                self._no_metrics.pop(missing_key, None)
                out[f"{j.stage}/{j.member}"] = data
            elif answered:  # not after a failed read: that one is tried again next time
                self._no_metrics[missing_key] = now
        if len(self._no_metrics) > MAX_REMEMBERED:
            for k, t in list(self._no_metrics.items()):
                if now - t >= MISSING_METRICS_RECHECK_S:
                    self._no_metrics.pop(k, None)
        return out

    def _termination_message(self, job_name: str, run_pods: "_Once") -> tuple[dict | None, bool]:
        """The trainer writes its metrics summary as the pod's termination message. Returns it
        (or None) and whether the pods could be listed."""
        pods = run_pods()
        if pods is None:
            return None, False
        pods = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == job_name]
        final = True  # every container has terminated: what it said is all it will say
        for pod in pods:
            statuses = (pod.get("status") or {}).get("containerStatuses") or []
            if not statuses:
                final = False
            for cs in statuses:
                term = (cs.get("state") or {}).get("terminated") or {}
                if not term:
                    final = False
                if term.get("exitCode") == 0 and term.get("message"):
                    try:
                        data = json.loads(term["message"])
                    except ValueError:
                        continue
                    if isinstance(data, dict):
                        return data, True
        return None, final

    # -- writing ---------------------------------------------------------------------------
    def _create(self, run: planner.RunRef, spec, body: Mapping, action: planner.CreateJob) -> str:
        """Create the Job: "created", "exists" (ours already), "transient" (try again later) or
        "rejected" (the server refused it: recorded as a failed attempt that is not retried)."""
        job = manifests.render_job(run, spec, action, default_image=self.settings.default_image,
                                   owner=body, service_account=self.settings.job_service_account,
                                   metrics_port=self.settings.trainer_metrics_port)
        try:
            self.batch.create_namespaced_job(run.namespace, job, _preload_content=False)
        except self.k8s.ApiException as exc:
            if exc.status != 409:
                reason, message = _api_error(exc)
                if _transient(exc):
                    log.warning("creating Job %s/%s failed for now (%s %s): %s; trying again later",
                                run.namespace, action.name, exc.status, reason, message)
                    return "transient"
                log.warning("the API server refused Job %s/%s (%s %s): %s", run.namespace, action.name,
                            exc.status, reason, message)
                self._rejected[action.name] = (self.clock(), run.uid, planner.ObservedJob(
                    name=action.name, stage=action.stage, member=action.member, attempt=action.attempt,
                    state=planner.FAILED, finish_time=self.clock(), reason=reason, message=message,
                    rejected=True))
                return "rejected"
            # Already exists: done, if it is ours (same run uid); otherwise someone else's Job
            # holds the name and we must not adopt it.
            resp = self.batch.read_namespaced_job(action.name, run.namespace, _preload_content=False)
            labels = (json.loads(resp.data).get("metadata") or {}).get("labels") or {}
            if labels.get(planner.LABEL_RUN_UID) != planner.label_value(run.uid):
                raise RuntimeError(f"Job {run.namespace}/{action.name} exists and belongs to another run") from None
            return "exists"
        log.info("created Job %s/%s (%s/%s attempt %d)", run.namespace, action.name, action.stage,
                 action.member, action.attempt)
        self._recent[action.name] = (self.clock(), run.uid, planner.ObservedJob(
            name=action.name, stage=action.stage, member=action.member, attempt=action.attempt,
            state="Pending", start_time=None))
        if self.metrics is not None:
            self.metrics.child_jobs_created.labels(namespace=run.namespace, stage=action.stage).inc()
            if action.attempt > 1:
                self.metrics.child_job_retries.labels(namespace=run.namespace, stage=action.stage).inc()
        return "created"

    def _delete(self, namespace: str, action: planner.DeleteJob) -> None:
        try:
            self.batch.delete_namespaced_job(action.name, namespace, propagation_policy="Background",
                                             _preload_content=False)
            log.info("deleted Job %s/%s (%s)", namespace, action.name, action.reason)
        except self.k8s.ApiException as exc:
            if exc.status != 404:
                raise

    def _suspend(self, namespace: str, action: planner.SetSuspend, job_uid: str | None) -> bool:
        """Hold or release a Job for the run's `spec.suspend`, and mark it (the `held` annotation)
        so that only what the run holds is released. A Job Kueue admits is held by deactivating
        its Workload (`spec.active: false`, which Kueue supports: it evicts the Workload and
        suspends the Job itself); flipping such a Job's `spec.suspend` would fight Kueue, which
        starts every suspended Job whose Workload is admitted. False: not done yet (Kueue has not
        made the Workload of a new Job); the caller plans again shortly."""
        verb = "held" if action.suspend else "released"
        held = {"metadata": {"annotations": {manifests.ANNOTATION_HELD: "true" if action.suspend else None}}}
        try:
            if action.queued:
                found = self._workload(namespace, job_uid)
                if found is not None:
                    version, workload = found
                    if workload.get("spec", {}).get("active", True) != (not action.suspend):
                        self.custom.patch_namespaced_custom_object(
                            KUEUE_GROUP, version, namespace, "workloads", workload["metadata"]["name"],
                            {"spec": {"active": not action.suspend}}, _preload_content=False)
                    self.batch.patch_namespaced_job(action.name, namespace, held, _preload_content=False)
                    log.info("%s Job %s/%s (its Kueue Workload %s)", verb, namespace, action.name,
                             "deactivated" if action.suspend else "activated")
                    return True
                if found is None and self._kueue_version is not False:
                    if action.suspend:
                        return False  # Kueue makes the Workload within moments: hold it then
                    self.batch.patch_namespaced_job(action.name, namespace, held, _preload_content=False)
                    return True
            self.batch.patch_namespaced_job(action.name, namespace, {**held, "spec": {"suspend": action.suspend}},
                                            _preload_content=False)
            log.info("%s Job %s/%s", verb, namespace, action.name)
        except self.k8s.ApiException as exc:
            if exc.status != 404:
                raise
        return True

    def _workload(self, namespace: str, job_uid: str | None) -> tuple[str, dict] | None:
        """The Kueue Workload of a Job (Kueue labels it with the Job's uid), as (API version,
        object); None when there is none. Remembers when Kueue's API is not served at all."""
        if not job_uid or self._kueue_version is False:
            return None
        versions = [self._kueue_version] if self._kueue_version else list(KUEUE_VERSIONS)
        for version in versions:
            try:
                resp = self.custom.list_namespaced_custom_object(
                    KUEUE_GROUP, version, namespace, "workloads",
                    label_selector=f"{KUEUE_JOB_UID_LABEL}={job_uid}", _preload_content=False)
            except self.k8s.ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            self._kueue_version = version
            items = json.loads(resp.data).get("items") or []
            return (version, items[0]) if items else None
        self._kueue_version = False
        log.info("Kueue's Workload API is not served: queued Jobs are held by their spec.suspend")
        return None

    def _patch_status(self, namespace: str, name: str, uid: str, status: dict) -> None:
        # A merge patch replaces lists (conditions, jobs) whole: the planner computes them whole.
        patch = {"status": status}
        try:
            resp = self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, PLURAL, name, patch, _preload_content=False)
        except self.k8s.ApiException as exc:
            if exc.status != 404:
                raise
            return
        try:
            rv = _rv((json.loads(resp.data).get("metadata") or {}).get("resourceVersion"))
        except ValueError:
            rv = None
        if rv is not None:
            self._written[(namespace, name)] = (uid, rv, json.loads(json.dumps(status)))

    def post_event(self, body: Mapping, type_: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = planner.format_time(time.time())
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "RatatouilleRun",
                               "name": meta.get("name"), "namespace": namespace, "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1, "source": {"component": "ratatouille-operator"},
            "reportingComponent": "ratatouille-operator",
            "reportingInstance": os.environ.get("HOSTNAME") or "ratatouille-operator",
        }
        log.log(logging.WARNING if type_ == "Warning" else logging.INFO, "RatatouilleRun %s/%s: %s: %s",
                namespace, meta.get("name"), reason, message)
        try:
            self.core.create_namespaced_event(namespace, event, _preload_content=False)
        except Exception as exc:  # noqa: BLE001 - an Event is never worth failing a reconcile
            log.warning("could not post event %s for %s/%s: %s", reason, namespace, meta.get("name"), exc)

    def _invalid(self, body: Mapping, prev_status: Mapping, generation: int, err: SpecError,
                 reason: str = planner.REASON_INVALID_SPEC) -> ReconcileResult:
        meta = body["metadata"]
        namespace = meta.get("namespace") or "default"
        message = str(err)
        old = next((c for c in prev_status.get("conditions") or [] if c.get("type") == "Accepted"), None)
        if (old and old.get("status") == "False" and old.get("message") == message
                and prev_status.get("observedGeneration") == generation):
            return ReconcileResult(prev_status.get("phase"))  # already reported
        now = planner.format_time(time.time())
        conds = [c for c in prev_status.get("conditions") or [] if c.get("type") not in ("Accepted", "Failed", "Complete")]
        conds[:0] = [
            {"type": "Accepted", "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": now, "observedGeneration": generation},
            {"type": "Complete", "status": "False", "reason": reason, "message": "",
             "lastTransitionTime": now, "observedGeneration": generation},
            {"type": "Failed", "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": now, "observedGeneration": generation},
        ]
        status = {"observedGeneration": generation, "phase": "Failed", "conditions": conds}
        self._patch_status(namespace, meta["name"], meta.get("uid") or "", status)
        if not (old and old.get("status") == "False" and old.get("message") == message):
            self.post_event(body, "Warning", reason, message)
        return ReconcileResult("Failed")

    def _count(self, run: planner.RunRef, prev: Mapping, status: Mapping, jobs: Iterable[planner.ObservedJob]) -> None:
        m = self.metrics
        if m is None:
            return
        namespace = run.namespace
        before, after = prev.get("phase"), status.get("phase")
        if after != before and after in planner.TERMINAL_PHASES:
            m.runs_finished.labels(namespace=namespace, result=after).inc()
            if run.creation_time:
                m.run_duration.labels(result=after).observe(max(self.clock() - run.creation_time, 0.0))
        if "observedGeneration" not in prev and after is not None:
            m.runs_created.labels(namespace=namespace).inc()
        prev_state = {j.get("name"): j.get("state") for j in prev.get("jobs") or []}
        for j in jobs:
            if j.state in (planner.SUCCEEDED, planner.FAILED) and prev_state.get(j.name) not in (planner.SUCCEEDED, planner.FAILED):
                if j.name not in prev_state and "observedGeneration" in prev and len(prev.get("jobs") or []) >= planner.MAX_STATUS_JOBS:
                    continue  # beyond the bounded list: cannot tell whether it is new
                if j.state == planner.FAILED:
                    m.child_job_failures.labels(namespace=namespace, stage=j.stage).inc()
                if j.start_time is not None and j.finish_time is not None:
                    m.stage_duration.labels(stage=j.stage).observe(max(j.finish_time - j.start_time, 0.0))
        if (status.get("result") or {}).get("diagnostics", {}).get("uniform", {}).get("collapse") and not \
                (prev.get("result") or {}).get("diagnostics", {}).get("uniform", {}).get("collapse"):
            m.averaging_collapse.labels(namespace=namespace).inc()


def _failure(job: Mapping, pods: list[dict], job_reason: str | None) -> tuple[str | None, str | None]:
    """(reason, message) of a failed Job: the failed trainer container's termination message
    (the trainer writes JSON with "error"; FallbackToLogsOnError gives the log's tail) and its
    exit code, else the Job's Failed condition."""
    cond = next((c for c in (job.get("status") or {}).get("conditions") or []
                 if c.get("type") == "Failed" and c.get("status") == "True"), {})
    term = None
    pods = sorted(pods, key=lambda p: manifests.parse_time((p.get("metadata") or {}).get("creationTimestamp")) or 0)
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
            if t and t.get("exitCode") not in (None, 0):
                term = t
    if term is None:
        return job_reason, cond.get("message") or None
    code = term.get("exitCode")
    text = str(term.get("message") or "").strip()
    payload = None
    if text.startswith("{"):
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None
    reason = _EXIT_REASONS.get(code) or job_reason
    if isinstance(payload, dict) and payload.get("error"):
        reason = str(payload.get("reason") or reason)
        message = str(payload["error"])
    elif text:
        message = text.splitlines()[-1]
    else:
        message = term.get("reason") or "error"
    return reason, f"exit code {code}: {message}"


#: Jobs per page of a LIST: one page of full Job bodies is in memory at a time.
JOB_LIST_PAGE = 50


def list_slim_jobs(list_fn: Callable[..., Any], *args: Any, label_selector: str) -> list[dict]:
    """Every Job a (paged) LIST returns, slimmed as it arrives (manifests.slim_job): a run's
    hundreds of Jobs of up to a few hundred KB each are never all in memory at once."""
    items: list[dict] = []
    token = None
    while True:
        kwargs = {"label_selector": label_selector, "limit": JOB_LIST_PAGE, "_preload_content": False}
        if token:
            kwargs["_continue"] = token
        page = json.loads(list_fn(*args, **kwargs).data)
        items += [manifests.slim_job(j) for j in page.get("items") or []]
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


def _was_invalid(status: Mapping) -> bool:
    return planner.refused(status, (planner.REASON_INVALID_SPEC, REASON_NOT_ALLOWED))


def child_job_counts(jobs: Iterable[Mapping]) -> dict[tuple[str, str, str], int]:
    """(namespace, stage, state) -> how many of our Jobs are in it (for ratatouille_child_jobs)."""
    counts: dict[tuple[str, str, str], int] = {}
    for job in jobs:
        o = manifests.parse_job(job)
        if o is None:
            continue
        key = ((job.get("metadata") or {}).get("namespace") or "default", o.stage, o.state)
        counts[key] = counts.get(key, 0) + 1
    return counts
