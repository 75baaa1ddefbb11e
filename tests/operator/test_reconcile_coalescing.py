"""Many runs at once (issue 7, operator scale): Job-event reconciles are coalesced per run and
never block a handler thread behind another reconcile of the same run; Succeeded Jobs that left
no metrics are not looked for on every reconcile; kopf is not configured to serve only a few
objects at a time."""
from __future__ import annotations

import threading
import time

import pytest

kubernetes = pytest.importorskip("kubernetes")
kopf = pytest.importorskip("kopf")

from ratatouille_operator import main as operator_main  # noqa: E402
from ratatouille_operator.reconciler import MISSING_METRICS_RECHECK_S, Reconciler, Settings, StorageView  # noqa: E402
from tests.operator.harness import IMAGE, JOBS, PODS, RUNS, run_manifest  # noqa: E402


def make_run(k8s, name="r", **kw) -> dict:
    return k8s.create(RUNS, run_manifest(name, dataset="s3://ratatouille/datasets/target", **kw), namespace="default")



def test_a_request_while_the_run_is_busy_returns_at_once_and_the_busy_call_reconciles_again(k8s, api):
    make_run(k8s, runs=2)
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None))
    key = (k8s.ns("default"), "r")
    entered, release = threading.Event(), threading.Event()
    reads = []

    def read():
        reads.append(time.monotonic())
        if len(reads) == 1:
            entered.set()
            assert release.wait(10)
        return k8s.get(RUNS, "default", "r"), None

    results = []
    busy = threading.Thread(target=lambda: results.append(rec.reconcile_coalesced(key, read, handler="t")))
    busy.start()
    assert entered.wait(10)
    # The run is busy: further requests (a burst of Job events) neither wait nor reconcile.
    t0 = time.monotonic()
    for _ in range(5):
        assert rec.reconcile_coalesced(key, read, handler="t") is None
    assert time.monotonic() - t0 < 1.0
    assert len(reads) == 1
    release.set()
    busy.join(10)
    # The busy call read its inputs once more after them (so it saw what they were about), once
    # for all five, and created the first Job exactly once.
    assert len(reads) == 2
    assert results[0] is not None and results[0].phase in ("Pending", "Auxiliary")
    assert [j["metadata"]["name"] for j in k8s.list(JOBS, "default")] == ["r-lp-0-a1"]
    # Idle again: the next request reconciles itself.
    assert rec.reconcile_coalesced(key, read, handler="t") is not None
    assert len(reads) == 3


def test_a_failed_coalesced_reconcile_leaves_the_run_free(k8s, api):
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None))

    def broken():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        rec.reconcile_coalesced((k8s.ns("default"), "r"), broken)
    body = make_run(k8s, runs=1)
    result = rec.reconcile_coalesced((k8s.ns("default"), "r"), lambda: (body, None))
    assert result is not None and result.created == ["r-lp-0-a1"]
    # A run that is gone: nothing to do.
    assert rec.reconcile_coalesced((k8s.ns("default"), "gone"), lambda: (None, None)) is None


def test_settle_lets_a_burst_join_the_first_request(k8s, api):
    make_run(k8s, runs=1)
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None), settle=0.3)
    reads = []

    def read():
        reads.append(1)
        return k8s.get(RUNS, "default", "r"), None

    first = threading.Thread(target=rec.reconcile_coalesced, args=((k8s.ns("default"), "r"), read))
    first.start()
    time.sleep(0.05)
    for _ in range(3):  # within the settle time: served by the first request's single read
        assert rec.reconcile_coalesced((k8s.ns("default"), "r"), read) is None
    first.join(10)
    assert len(reads) == 1


def test_a_succeeded_job_without_metrics_is_not_looked_for_on_every_reconcile(k8s, api):
    body = make_run(k8s, runs=1)
    now = [time.time()]  # real time: the Jobs' timestamps are the server's
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None), clock=lambda: now[0])
    rec.reconcile(body)
    k8s.finish_job("r-lp-0-a1")
    pod_lists = lambda: k8s.count("list", PODS)  # noqa: E731
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert pod_lists() == 1  # looked for in the pod's termination message: nothing there
    for _ in range(3):
        now[0] += 1
        rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert pod_lists() == 1
    # Now and then it is looked for again, and found if it is there after all (a late status
    # update of the pod, as a kubelet may send).
    pod = k8s.list(PODS, labels={"job-name": "r-lp-0-a1"})[0]
    statuses = pod["status"]["containerStatuses"]
    statuses[0]["state"]["terminated"]["message"] = '{"valAccuracy": 0.5}'
    k8s.patch(PODS, "default", pod["metadata"]["name"] + "/status", {"status": {"containerStatuses": statuses}})
    # (The next Job's pod runs: a Job pending for a while would have its pods read for why.)
    k8s.wait_for(lambda: (k8s.get(JOBS, "default", "r-target-0-a1").get("status") or {}).get("ready") == 1)
    now[0] += MISSING_METRICS_RECHECK_S
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert pod_lists() == 2
    jobs = {j["name"]: j for j in k8s.get(RUNS, "default", "r")["status"]["jobs"]}
    assert jobs["r-lp-0-a1"]["valAccuracy"] == "0.500"
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert pod_lists() == 2  # found: remembered for good


def test_startup_does_not_cap_kopf_object_workers(api, monkeypatch):
    """A cap of N per-object workers let only N runs be handled at a time (each worker lingers
    seconds after its object's last event): the N+1st run created waited for its first Jobs."""
    import ratatouille_operator.observability as observability

    monkeypatch.setattr(observability, "start_http_server", lambda *a, **k: None)
    monkeypatch.setattr(operator_main, "_api_client", lambda: api)
    monkeypatch.setenv("RATATOUILLE_RECONCILE_INTERVAL", "3600")
    settings = kopf.OperatorSettings()
    saved = (operator_main.STATE.reconciler, operator_main.STATE.settings, operator_main.STATE.metrics)
    try:
        operator_main.startup(settings=settings)
        assert settings.queueing.worker_limit is None
        assert settings.execution.max_workers >= 16
        assert operator_main.STATE.reconciler.settle == operator_main.JOB_EVENT_SETTLE_S > 0
    finally:
        operator_main.cleanup()
        operator_main.STATE.reconciler, operator_main.STATE.settings, operator_main.STATE.metrics = saved


def test_metrics_that_could_not_be_read_are_looked_for_again_at_once(k8s, api):
    def unreachable(uri, endpoint):
        raise ConnectionError("storage is down")

    body = make_run(k8s, runs=1)
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(unreachable))
    rec.reconcile(body)
    k8s.finish_job("r-lp-0-a1")
    for n in (1, 2, 3):
        rec.reconcile(k8s.get(RUNS, "default", "r"))
        assert k8s.count("list", PODS) == n


def test_the_resync_does_not_wait_behind_a_run_another_thread_is_reconciling(k8s, api):
    # A Job event's reconcile that creates a stage's Jobs can take tens of seconds under load:
    # the periodic resync must pass that run by (the busy reconcile reads its own inputs), not
    # make every run after it in the list wait (the 64-148 s transitions bench_operator.py saw).
    body = make_run(k8s, runs=1)
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None))
    lock = rec._lock((k8s.ns("default"), "r"))
    held, release = threading.Event(), threading.Event()

    def busy():
        with lock:
            held.set()
            release.wait(10)
    t = threading.Thread(target=busy)
    t.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        assert rec.reconcile(body, None, handler="resync", wait=False) is None
        assert time.monotonic() - started < 1.0
        assert k8s.list(JOBS, "default") == []  # it did nothing for the busy run
    finally:
        release.set()
        t.join(10)
    assert rec.reconcile(body, None, handler="resync", wait=False).created == ["r-lp-0-a1"]
