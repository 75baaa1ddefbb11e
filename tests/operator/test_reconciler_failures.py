"""Failure paths on the upstream control plane (issue 11, "Survive a real cluster"): pods that
never start, creates the API server refuses or cannot take now, the trainer's bad input under
the Job's podFailurePolicy, child Jobs that disappear, a missing credentials Secret. The
Reconciler runs in-process against the real API server, Job controller and scheduler; the node
agent reports pod states as a kubelet does. Every case must end in a visible reason (the run's
status and a Warning Event), within a bounded time, without losing what was done.

(Named to run after the chart-operator modules, like test_reconciler.py: a cluster-wide operator
installed later would find these tests' runs in their terminating namespaces.)"""
from __future__ import annotations

import json
import shlex
import time

import pytest

kubernetes = pytest.importorskip("kubernetes")

from ratatouille_operator.reconciler import PENDING_EXPLAIN_AFTER_S, Reconciler, Settings, StorageView  # noqa: E402
from tests.cluster.controlplane import ApiError, path_for  # noqa: E402
from tests.cluster.nodeagent import matches  # noqa: E402
from tests.operator.harness import EVENTS, IMAGE, JOBS, PODS, RUNS, run_manifest  # noqa: E402

FAILURE_POLICY = {"backoffLimit": 0, "maxAttempts": 2, "minSucceeded": 1, "retryBackoffSeconds": 0,
                  "podStartTimeoutSeconds": 120}


class Clock:
    """Real time (the Jobs' timestamps are the server's) plus an offset a test moves forward."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def reconciler(api, clock=None) -> Reconciler:
    # Ahead of real time by more than PENDING_EXPLAIN_AFTER_S: a pending Job is explained at once.
    return Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None),
                      clock=clock or Clock(PENDING_EXPLAIN_AFTER_S + 5))


def make_run(k8s, name="r", *, template=None, failure_policy=None, storage=None, runs=1) -> dict:
    extra = {"failurePolicy": {**FAILURE_POLICY, **(failure_policy or {})}}
    if template is not None:
        extra["template"] = template
    manifest = run_manifest(name, dataset="s3://ratatouille/datasets/target", runs=runs, extra_spec=extra)
    if storage:
        manifest["spec"]["storage"].update(storage)
    return k8s.create(RUNS, manifest)


def run_status(k8s, name="r") -> dict:
    return k8s.get(RUNS, "default", name).get("status") or {}


def job_entry(k8s, job: str, name="r") -> dict:
    return next(j for j in run_status(k8s, name)["jobs"] if j["name"] == job)


def run_events(k8s) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in k8s.list(EVENTS)
            if e["involvedObject"]["kind"] == "RatatouilleRun"]


def condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def waiting_reason(k8s, job: str) -> str | None:
    for pod in k8s.list(PODS, labels={"job-name": job}):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in (None, "ContainerCreating"):
                return waiting["reason"]
    return None


def end_held_pod(k8s, job: str, script: str) -> None:
    """Let the Job's held pod run `script` (sh) instead of the trainer."""
    ns = k8s.ns("default")
    mine = lambda pod: pod["metadata"]["namespace"] == ns and matches(job, pod)  # noqa: E731
    k8s.wait_for(lambda: k8s.cluster.controller.release(mine, run=script), 60)


def job_condition(k8s, job: str, ctype: str) -> dict | None:
    body = k8s.get(JOBS, "default", job) or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or []
                 if c["type"] == ctype and c["status"] == "True"), None)


# -- pods that never start ---------------------------------------------------------------------

def test_an_image_that_cannot_be_pulled_is_reported_then_fails_its_attempts_and_the_run(k8s, api):
    make_run(k8s, template={"image": "registry.example/ratatouille:missing"})
    clock = Clock(PENDING_EXPLAIN_AFTER_S + 5)
    rec = reconciler(api, clock)
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == ["r-lp-0-a1"]
    k8s.wait_for(lambda: waiting_reason(k8s, "r-lp-0-a1"), 60)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    # Within one reconcile: the member's entry and a Warning Event say why.
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["state"] == "Pending" and entry["reason"] in ("ErrImagePull", "ImagePullBackOff"), entry
    assert "registry.example/ratatouille:missing" in entry["message"]
    warnings = [(r, m) for t, r, m in run_events(k8s) if t == "Warning"]
    assert len(warnings) == 1 and warnings[0][0] == entry["reason"], warnings
    assert "linear-probe/0 attempt 1" in warnings[0][1] and "registry.example" in warnings[0][1]
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert len([e for e in run_events(k8s) if e[0] == "Warning"]) == 1  # said once, not per reconcile

    # Past podStartTimeoutSeconds the attempt is failed: its Job deleted, the next one created.
    clock.offset += 130
    result = rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert result.created == ["r-lp-0-a2"]
    k8s.wait_for(lambda: k8s.get(JOBS, "default", "r-lp-0-a1") is None, 30)
    status = run_status(k8s)
    assert status["attempts"]["linear-probe/0"]["attempt"] == 1
    assert status["attempts"]["linear-probe/0"]["state"] == "Failed"
    assert status["attempts"]["linear-probe/0"]["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert "podStartTimeoutSeconds=120" in status["attempts"]["linear-probe/0"]["message"]
    assert any(r == "PodStartTimeout" for _, r, _ in run_events(k8s))

    # The second attempt does not start either: the budget (maxAttempts=2) is gone, the run Failed
    # with that reason, and no Job is left behind.
    k8s.wait_for(lambda: waiting_reason(k8s, "r-lp-0-a2"), 60)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    clock.offset += 130
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).phase == "Failed"
    failed = condition(run_status(k8s), "Failed")
    assert failed["reason"] == "LinearProbeFailed"
    assert "ImagePull" in failed["message"] and "registry.example/ratatouille:missing" in failed["message"]
    k8s.wait_for(lambda: not k8s.list(JOBS), 30)
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == []


def test_a_missing_credentials_secret_is_a_visible_create_container_config_error(k8s, api):
    make_run(k8s, storage={"credentialsSecret": "no-such-secret"})
    rec = reconciler(api)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    job = k8s.get(JOBS, "default", "r-lp-0-a1")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "no-such-secret"}}]  # not optional
    k8s.wait_for(lambda: waiting_reason(k8s, "r-lp-0-a1") == "CreateContainerConfigError", 60)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["reason"] == "CreateContainerConfigError" and "no-such-secret" in entry["message"], entry
    assert any(t == "Warning" and r == "CreateContainerConfigError" and "no-such-secret" in m
               for t, r, m in run_events(k8s))


def test_an_unschedulable_pod_reports_the_scheduler_message(k8s, api):
    gpus = {"nvidia.com/gpu": 64}  # the node has 2 (the linear probe's own resources: by default it
    make_run(k8s, template={"stageResources": {"linearProbe": {"requests": gpus, "limits": gpus}}})  # takes at most 1)
    rec = reconciler(api)
    rec.reconcile(k8s.get(RUNS, "default", "r"))

    def unschedulable():
        return any(c.get("reason") == "Unschedulable" for p in k8s.list(PODS)
                   for c in (p.get("status") or {}).get("conditions") or [])
    k8s.wait_for(unschedulable, 60)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["reason"] == "Unschedulable" and "nvidia.com/gpu" in entry["message"], entry
    assert any(t == "Warning" and r == "Unschedulable" for t, r, _ in run_events(k8s))


def test_pods_that_cannot_be_created_report_the_job_controllers_failed_create(k8s, api):
    make_run(k8s, template={"priorityClassName": "no-such-class"})
    rec = reconciler(api)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    k8s.wait_for(lambda: any(e["reason"] == "FailedCreate" for e in k8s.list(EVENTS)), 60)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["reason"] == "FailedCreate" and "no-such-class" in entry["message"], entry
    assert any(t == "Warning" and r == "FailedCreate" and "no-such-class" in m for t, r, m in run_events(k8s))


# -- creates the API server refuses, or cannot take now ---------------------------------------

def test_a_create_the_server_refuses_fails_the_member_once_with_the_servers_message(k8s, api):
    # Requests above limits pass the CRD (both are quantities) and are refused on the Job (422).
    make_run(k8s, template={"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}})
    rec = reconciler(api)
    result = rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert result.created == [] and result.phase == "Failed"
    assert k8s.list(JOBS) == []
    status = run_status(k8s)
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["state"] == "Failed" and entry["reason"] == "Invalid", entry
    assert "must be less than or equal to cpu limit" in entry["message"]
    rejected = condition(status, "JobsRejected")
    assert rejected["status"] == "True" and "less than or equal to cpu limit" in rejected["message"]
    assert status["attempts"]["linear-probe/0"]["rejected"] is True
    assert condition(status, "Failed")["reason"] == "LinearProbeFailed"
    assert [r for t, r, _ in run_events(k8s) if r == "CreateRejected"] == ["CreateRejected"]
    # Permanent: not tried again (no retry loop, not even as attempt 2).
    for _ in range(2):
        assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == []
    assert k8s.count("create", JOBS) == 1


def test_a_full_quota_and_server_errors_are_retried_with_backoff(k8s, api):
    ns = k8s.ns("default")
    k8s.create("v1/resourcequotas", {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
    k8s.wait_for(lambda: (k8s.get("v1/resourcequotas", "default", "no-jobs").get("status") or {}).get("hard"), 60)
    make_run(k8s)
    rec = reconciler(api)
    first = rec.reconcile(k8s.get(RUNS, "default", "r"))
    second = rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert first.created == second.created == [] and (first.retry_after, second.retry_after) == (2.0, 4.0)
    status = run_status(k8s)
    assert status["phase"] != "Failed" and "linear-probe/0" not in status.get("attempts", {})
    k8s.rest.delete(path_for("v1/resourcequotas", ns, "no-jobs"))

    # A 5xx and a 429 from the server: the same (a fake transport error on top of the real API).
    real = rec.batch.create_namespaced_job
    answers = [503, 429]

    def flaky(*args, **kwargs):
        if answers:
            raise kubernetes.client.ApiException(status=answers.pop(0), reason="unavailable")
        return real(*args, **kwargs)
    rec.batch.create_namespaced_job = flaky
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).retry_after == 8.0
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).retry_after == 16.0

    def created():
        result = rec.reconcile(k8s.get(RUNS, "default", "r"))  # the quota's removal takes a moment
        return result.created == ["r-lp-0-a1"] and result.retry_after is None
    k8s.wait_for(created, 30, interval=0.5)
    assert run_status(k8s)["phase"] != "Failed"


def test_a_resource_quantity_that_is_not_one_is_refused_at_apply(k8s):
    bad = run_manifest("q", dataset="s3://ratatouille/datasets/target",
                       extra_spec={"template": {"resources": {"requests": {"cpu": "2 cores"}}}})
    with pytest.raises(ApiError) as err:
        k8s.create(RUNS, bad)
    assert err.value.status == 422 and "spec.template.resources.requests.cpu" in str(err.value)


# -- podFailurePolicy: the trainer's bad input -----------------------------------------------------

def test_bad_input_fails_the_job_at_once_and_the_trainers_error_reaches_status_and_event(k8s, api):
    make_run(k8s, failure_policy={"backoffLimit": 3})
    rec = reconciler(api)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    message = json.dumps({"error": "dataset s3://ratatouille/datasets/target has no domain d2", "exitCode": 2})
    end_held_pod(k8s, "r-lp-0-a1", f'printf %s {shlex.quote(message)} > "$RATATOUILLE_TERMINATION_LOG"; exit 2\n')
    failed = k8s.wait_for(lambda: job_condition(k8s, "r-lp-0-a1", "Failed"), 60)
    # FailJob: no second pod although backoffLimit is 3.
    assert failed["reason"] == "PodFailurePolicy"
    assert len(k8s.list(PODS, labels={"job-name": "r-lp-0-a1"})) == 1
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    entry = job_entry(k8s, "r-lp-0-a1")
    assert entry["state"] == "Failed" and entry["reason"] == "BadInput", entry
    assert entry["message"] == "exit code 2: dataset s3://ratatouille/datasets/target has no domain d2"
    warnings = {r: m for t, r, m in run_events(k8s) if t == "Warning"}
    assert "has no domain d2" in warnings["AttemptFailed"] and "has no domain d2" in warnings["Retrying"]


# -- children that disappear ------------------------------------------------------------------

def test_deleted_finished_children_neither_reset_attempts_nor_loop_the_run(k8s, api):
    make_run(k8s)
    ns = k8s.ns("default")
    rec = reconciler(api)
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    k8s.finish_job("r-lp-0-a1", message=json.dumps({"valAccuracy": 0.5}))
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == ["r-target-0-a1"]
    k8s.finish_job("r-target-0-a1", fail=True)
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == ["r-target-0-a2"]
    progress = run_status(k8s)["progress"]
    # A user (or a TTL) deletes the finished Jobs.
    for job in ("r-lp-0-a1", "r-target-0-a1"):
        k8s.rest.delete(path_for(JOBS, ns, job), {"propagationPolicy": "Background"})
    k8s.wait_for(lambda: {j["metadata"]["name"] for j in k8s.list(JOBS)} == {"r-target-0-a2"}, 30)
    for _ in range(2):
        assert rec.reconcile(k8s.get(RUNS, "default", "r")).created == []  # no lp or attempt 1 again
    status = run_status(k8s)
    assert status["progress"] == progress and status["stages"]["linearProbe"]["succeeded"] == 1
    assert status["attempts"]["linear-probe/0"] == {"attempt": 1, "state": "Succeeded"}
    assert status["attempts"]["target/0"]["attempt"] == 1 and status["attempts"]["target/0"]["state"] == "Failed"
    # The last attempt fails too: the budget counts the deleted one, the run ends.
    k8s.finish_job("r-target-0-a2", fail=True)
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).phase == "Failed"
    assert condition(run_status(k8s), "Failed")["reason"] == "MinSucceededNotMet"
    assert k8s.count("create", JOBS) == 3
