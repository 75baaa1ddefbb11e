"""The kopf operator: thin handlers that feed the Reconciler (and so the planner) with a run and
its Jobs. `ratatouille operator` runs it; so does `kopf run -m ratatouille_operator.main`.

Reconciles happen on run create/resume/spec change, on every child Job event (from kopf's index
of Jobs by run), and on a periodic resync that LISTs runs and Jobs (the level-triggered safety
net). No timers or daemons: kopf would add a finalizer to every run for them, and deleting a run
would then block while the operator is down. Child Jobs go away with their run through owner
references, so the operator has no cleanup of its own and no finalizer.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any

import kopf

from . import manifests, planner
from .manifests import parse_time
from .reconciler import Reconciler, Settings, StorageView, child_job_counts, list_slim_jobs
from .spec import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger("ratatouille.operator")
RUNS = (API_GROUP, API_VERSION, PLURAL)
#: Threads for kopf's synchronous handlers. A reconcile mostly waits on the API and storage,
#: so more of them than cores; a new run's create handler must not queue behind a few slow
#: reconciles of other runs.
HANDLER_THREADS = 16
#: How long a reconcile asked for by a Job event waits before it reads the run's Jobs, so that
#: the events that come with it (a Job's several status updates, the Jobs of a stage created or
#: finishing together) are served by the same reconcile. It delays only Job-driven reconciles;
#: a new run's first Jobs come from its create handler, which does not wait.
JOB_EVENT_SETTLE_S = 0.05


class _State:
    reconciler: Reconciler | None = None
    settings: Settings | None = None
    metrics: Any = None
    stop = threading.Event()


STATE = _State()


def _api_client():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _open_storage(uri: str, endpoint: str | None):
    from ratatouille_trainer.storage import open_storage  # boto3 only: no torch

    return open_storage(uri, endpoint=endpoint)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress and the last-handled spec live in annotations of our own prefix; nothing
    # is written into status but what the planner computes.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="ratatouille.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="ratatouille.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "ratatouille.dev/finalizer"
    settings.posting.enabled = False  # we post our own Events, one per transition
    settings.watching.server_timeout = 300
    # Only our own Jobs, selected by the API server: on a cluster with thousands of other Jobs
    # the operator neither receives nor keeps them (the handlers' label filters are client-side).
    settings.watching.label_selectors["batch", "jobs"] = planner.LABEL_RUN_UID
    # No cap on kopf's per-object workers (its default). A worker serves one object and lingers
    # `queueing.idle_timeout` (5 s) after that object's last event, so a cap of N let only N runs
    # (and N Jobs) be processed at a time: the runs created after the first N waited seconds for
    # their create handler, behind older runs whose status writes kept their workers busy, and
    # Job events (the index of children) lagged behind the same way. Workers are asyncio tasks;
    # what runs our (synchronous) handlers is the thread pool below, and Job events are coalesced
    # per run (Reconciler.reconcile_coalesced), so unbounded workers do not mean unbounded threads.
    settings.queueing.worker_limit = None
    settings.execution.max_workers = HANDLER_THREADS

    cfg = Settings.from_env()
    if cfg.watch_namespaces:
        # Exact namespace names: kopf needs no namespace LIST/WATCH (cluster-scoped RBAC) to
        # resolve them, and the CRD is installed before the operator (chart), so no CRD watch.
        settings.scanning.disabled = True
    STATE.settings = cfg
    from .observability import OperatorMetrics, start_http_server

    metrics = OperatorMetrics()
    start_http_server(cfg.metrics_port, metrics.registry)
    STATE.metrics = metrics
    trusted = [cfg.default_storage_endpoint] + [
        e.strip() for e in os.environ.get("RATATOUILLE_TRUSTED_STORAGE_ENDPOINTS", "").split(",") if e.strip()]
    STATE.reconciler = Reconciler(_api_client(), cfg, storage_view=StorageView(_open_storage, metrics, trusted),
                                  metrics=metrics, settle=JOB_EVENT_SETTLE_S)
    STATE.stop.clear()
    threading.Thread(target=_resync_loop, name="ratatouille-resync", daemon=True).start()
    log.info("ratatouille operator started: metrics on :%d, resync every %ss, namespaces %s",
             cfg.metrics_port, cfg.reconcile_interval, ",".join(cfg.watch_namespaces) or "all")


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    STATE.stop.set()


@kopf.on.probe(id="reconciler")
def probe(**_: Any) -> bool:
    return STATE.reconciler is not None


# -- indexes: the in-memory view of children, rebuilt by kopf from LIST+WATCH -------------------
# The indexes are async: kopf runs a sync index function in the same thread pool as the
# handlers, so index updates (and the Job events whose handlers read them) would queue behind
# reconciles that take seconds (creating a stage's Jobs) while the pool is busy.
@kopf.index("batch", "v1", "jobs", labels={planner.LABEL_RUN_UID: kopf.PRESENT})
async def run_jobs(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    return {(namespace, labels.get(planner.LABEL_RUN)): manifests.slim_job(body)}


@kopf.index(*RUNS)
async def runs(namespace: str, name: str, body: kopf.Body, **_: Any):
    return {(namespace, name): dict(body)}


def _reconcile(body: dict, jobs=None, handler: str = "reconcile") -> None:
    if STATE.reconciler is None:
        raise kopf.TemporaryError("operator still starting", delay=1)
    result = STATE.reconciler.reconcile(body, list(jobs) if jobs is not None else None, handler=handler)
    if result.retry_after is not None:
        # The API server could not take a create now (5xx, 429, a full quota): kopf calls the
        # handler again after the back-off (Job events and the resync may come sooner).
        raise kopf.TemporaryError("the API server could not create every Job now", delay=result.retry_after)


def _handled(fn):
    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except kopf.TemporaryError:
            raise
        except Exception as exc:  # noqa: BLE001 - counted, logged, retried by kopf
            if STATE.metrics is not None:
                STATE.metrics.reconcile_errors.labels(handler=fn.__name__).inc()
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=5) from exc
    return wrapper


# Explicit handler ids: kopf records handler progress under them in the run's annotations, so
# they must not change with refactoring.
@kopf.on.resume(*RUNS, id="reconcile")
@kopf.on.create(*RUNS, id="reconcile")
@kopf.on.update(*RUNS, field="spec", id="reconcile")
@_handled
def run_changed(body: kopf.Body, namespace: str, name: str, run_jobs: kopf.Index, **_: Any) -> None:
    _reconcile(dict(body), run_jobs.get((namespace, name), []), handler="run_changed")


def _snapshot(index: kopf.Index, key: Any) -> list[dict]:
    """The index's values for key, copied (kopf updates its indexes in the event loop's thread
    while handlers run in others)."""
    for _ in range(3):
        try:
            return list(index.get(key, []))
        except RuntimeError:  # changed during the copy
            continue
    return list(index.get(key, []))


def _owner_run(bodies: list[dict], run_uid_label: str | None) -> dict | None:
    for b in bodies:
        uid = (b.get("metadata") or {}).get("uid") or ""
        if uid == run_uid_label or planner.label_value(uid) == run_uid_label:
            return b
    return None


@kopf.on.event("batch", "v1", "jobs", labels={planner.LABEL_RUN_UID: kopf.PRESENT}, id="job_changed")
def job_changed(namespace: str, labels: dict, run_jobs: kopf.Index, runs: kopf.Index, **_: Any) -> None:
    run_name = labels.get(planner.LABEL_RUN)
    key = (namespace, run_name)
    run_uid = labels.get(planner.LABEL_RUN_UID)
    if _owner_run(_snapshot(runs, key), run_uid) is None:
        return  # the run is gone (owner references take its Jobs with it), or it is another run's Job
    if STATE.reconciler is None:
        return  # starting: the resync covers it

    def read():
        # Read when the reconcile starts, not when this event came: the reconcile may be one
        # asked for by several Job events of the run (coalesced), the last of them after this.
        # Those may be events of Jobs of an earlier run of the same name: reconcile the run there
        # is now (the reconciler looks only at the Jobs of its uid).
        bodies = _snapshot(runs, key)
        return _owner_run(bodies, run_uid) or (bodies[0] if bodies else None), _snapshot(run_jobs, key)

    try:
        STATE.reconciler.reconcile_coalesced(key, read, handler="job_changed")
    except Exception as exc:  # noqa: BLE001 - event handlers are not retried: the resync will
        if STATE.metrics is not None:
            STATE.metrics.reconcile_errors.labels(handler="job_changed").inc()
        log.warning("reconcile of %s/%s after a Job event failed: %s", namespace, run_name, exc)


# -- the periodic resync: LIST everything, reconcile every unfinished run --------------------
def _list_runs(rec: Reconciler, namespaces: tuple[str, ...]) -> list[dict]:
    if namespaces:
        items = []
        for ns in namespaces:
            items += rec.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL).get("items") or []
        return items
    return rec.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL).get("items") or []


def _list_jobs(rec: Reconciler, namespaces: tuple[str, ...]) -> list[dict]:
    selector = planner.LABEL_RUN_UID
    if namespaces:
        items = []
        for ns in namespaces:
            items += list_slim_jobs(rec.batch.list_namespaced_job, ns, label_selector=selector)
        return items
    return list_slim_jobs(rec.batch.list_job_for_all_namespaces, label_selector=selector)


def resync_once(rec: Reconciler, namespaces: tuple[str, ...], metrics=None) -> int:
    """Reconcile every run that is not finished (or whose spec changed since), and recompute the
    gauges from what the API says now. Returns the number of runs seen."""
    items = _list_runs(rec, namespaces)
    rec.forget_all_but({((b.get("metadata") or {}).get("namespace") or "default", (b.get("metadata") or {}).get("name"))
                        for b in items}, namespaces)
    phases: dict[tuple[str, str], int] = {}
    oldest_pending = 0.0
    now = time.time()
    for body in items:
        meta = body.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        status = body.get("status") or {}
        phase = status.get("phase")
        if phase not in planner.TERMINAL_PHASES or meta.get("generation") != status.get("observedGeneration"):
            try:
                # jobs=None: the reconciler LISTs the run's Jobs under the run's lock, so a
                # reconcile running meanwhile (a Job event) cannot leave this one a stale view.
                # Not behind a run another thread is reconciling now (a Job event's reconcile):
                # that one reads its inputs itself; the next resync, 2 s on, looks again.
                result = rec.reconcile(body, None, handler="resync", wait=False)
                if result is not None:
                    phase = result.phase
            except Exception as exc:  # noqa: BLE001
                if metrics is not None:
                    metrics.reconcile_errors.labels(handler="resync").inc()
                log.warning("resync of %s/%s failed: %s", ns, meta.get("name"), exc)
        key = (ns, phase or "Pending")
        phases[key] = phases.get(key, 0) + 1
        if phase in (None, "Pending"):
            created = parse_time(meta.get("creationTimestamp"))
            if created is not None:
                oldest_pending = max(oldest_pending, now - created)
    if metrics is not None:
        metrics.runs.clear()  # phases no run is in any more drop to nothing, not to stale values
        for (ns, phase), n in phases.items():
            metrics.runs.labels(namespace=ns, phase=phase).set(n)
        metrics.oldest_pending_run_age.set(oldest_pending)
        metrics.child_jobs.clear()
        for (ns, stage, state), n in child_job_counts(_list_jobs(rec, namespaces)).items():
            metrics.child_jobs.labels(namespace=ns, stage=stage, state=state).set(n)
    return len(items)


def _resync_loop() -> None:
    while not STATE.stop.wait(STATE.settings.reconcile_interval if STATE.settings else 15):
        rec, cfg = STATE.reconciler, STATE.settings
        if rec is None or cfg is None:
            continue
        try:
            resync_once(rec, cfg.watch_namespaces, STATE.metrics)
        except Exception as exc:  # noqa: BLE001 - keep the loop alive
            log.warning("resync failed: %s", exc)


def run_operator(args) -> int:
    """`ratatouille operator`: run kopf standalone (one replica; no peering)."""
    cfg = Settings.from_env()
    if getattr(args, "all_namespaces", False) and args.namespace:
        raise SystemExit("ratatouille operator: --all-namespaces and --namespace exclude each other")
    if getattr(args, "all_namespaces", False):
        namespaces = []
    else:
        namespaces = list(args.namespace or []) or list(cfg.watch_namespaces)
    # The resync thread reads the same setting (startup builds Settings from the environment).
    os.environ["RATATOUILLE_WATCH_NAMESPACES"] = ",".join(namespaces)
    verbose = bool(getattr(args, "verbose", False))
    kopf.configure(verbose=verbose)  # one stream handler on the root logger (kopf's format)
    logging.getLogger().setLevel(logging.DEBUG if verbose else getattr(logging, cfg.log_level, logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # liveness probes every few seconds
    if not verbose:
        # kopf says "Handler 'job_changed' succeeded" for every Job event; the reconciler logs
        # what it does (Jobs created, deleted, suspended; phase transitions) itself.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=f"http://0.0.0.0:{cfg.liveness_port}/healthz")
    return 0
