"""The Kubernetes adapter (Reconciler, resync) in-process against the upstream API server, the
real Job controller and the node agent, without trainer processes (the pods are held, then ended
by the test)."""
from __future__ import annotations

import json

import pytest

kubernetes = pytest.importorskip("kubernetes")

from ratatouille_operator.main import resync_once  # noqa: E402
from ratatouille_operator.observability import OperatorMetrics  # noqa: E402
from ratatouille_operator.reconciler import Reconciler, Settings, StorageView  # noqa: E402
from tests.operator.harness import EVENTS, IMAGE, JOBS, RUNS, run_manifest  # noqa: E402


def reconciler(api, metrics=None) -> Reconciler:
    return Reconciler(api, Settings(default_image=IMAGE), storage_view=StorageView(None), metrics=metrics)


def make_run(k8s, name="r", namespace="default", **kw) -> dict:
    return k8s.create(RUNS, run_manifest(name, dataset="s3://ratatouille/datasets/target", **kw), namespace=namespace)



def run_events(k8s) -> list[str]:
    """The reasons of the Events about runs (the Job controller and scheduler post their own)."""
    return [e["reason"] for e in k8s.list(EVENTS, "default") if e["involvedObject"]["kind"] == "RatatouilleRun"]


def test_first_reconcile_creates_owned_jobs_and_a_repeat_from_a_stale_body_changes_nothing(k8s, api):
    body = make_run(k8s, runs=2)
    rec = reconciler(api)
    result = rec.reconcile(body)
    assert result.created == ["r-lp-0-a1"] and result.phase in ("Pending", "Auxiliary")
    job = k8s.get(JOBS, "default", "r-lp-0-a1")
    ref = job["metadata"]["ownerReferences"][0]
    assert (ref["uid"], ref["controller"], ref["blockOwnerDeletion"]) == (body["metadata"]["uid"], True, True)
    run = k8s.get(RUNS, "default", "r")
    assert run["status"]["observedGeneration"] == 1
    # Its (held) pod runs before the next reconcile, so that the Job's state no longer changes
    # between the reconciles below: a Job turning Active in between is a real status change.
    k8s.wait_for(lambda: (k8s.get(JOBS, "default", "r-lp-0-a1").get("status") or {}).get("ready") == 1, 60)
    # The Job is seen: the phase moves on from Pending, once.
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).phase == "Auxiliary"
    events = run_events(k8s)
    assert events == ["Accepted", "AuxiliaryStage"]
    patches = k8s.count("patch", RUNS, subresource="status")
    # The first (now stale) body again, from a caller whose view lacks the Job: no new Job, no
    # repeated phase Events, no status write.
    for _ in range(2):
        again = rec.reconcile(body, jobs=[])
        assert again.created == [] and again.phase == "Auxiliary"
    assert run_events(k8s) == events
    assert k8s.count("patch", RUNS, subresource="status") == patches
    # Its create attempts were refused as AlreadyExists: the Job is the one first created.
    assert k8s.get(JOBS, "default", "r-lp-0-a1")["metadata"]["uid"] == job["metadata"]["uid"]
    assert [j["metadata"]["name"] for j in k8s.list(JOBS)] == ["r-lp-0-a1"]


def test_a_job_of_another_run_holding_the_name_is_not_adopted(k8s, api):
    body = make_run(k8s)
    k8s.create(JOBS, {"metadata": {"name": "r-lp-0-a1", "labels": {"ratatouille.dev/run-uid": "someone-else"}},
                      "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}],
                                                     "restartPolicy": "Never"}}}}, namespace="default")
    with pytest.raises(RuntimeError, match="belongs to another run"):
        reconciler(api).reconcile(body, jobs=[])


# The API server's schema and CEL rules refuse nearly every invalid spec at apply; the operator
# validates again (a CRD from an older chart may lack rules). A dataset URI with a space is one
# thing only the operator refuses, so it reaches the operator's InvalidSpec path.
SPACED = "s3://ratatouille/datasets/my target"


def test_invalid_spec_reports_once_and_a_fixed_spec_proceeds(k8s, api):
    body = k8s.create(RUNS, run_manifest("r", dataset=SPACED, runs=2))
    rec = reconciler(api)
    assert rec.reconcile(body).phase == "Failed"
    run = k8s.get(RUNS, "default", "r")
    accepted = next(c for c in run["status"]["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "spec.target.dataset" in accepted["message"]
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert run_events(k8s) == ["InvalidSpec"]
    assert k8s.list(JOBS, "default") == []
    fixed = k8s.patch(RUNS, "default", "r", {"spec": {"target": {"dataset": "s3://ratatouille/datasets/target"}}})
    assert fixed["metadata"]["generation"] == 2
    assert rec.reconcile(fixed).created == ["r-lp-0-a1"]
    run = k8s.get(RUNS, "default", "r")
    assert next(c for c in run["status"]["conditions"] if c["type"] == "Accepted")["status"] == "True"
    assert run["status"]["observedGeneration"] == 2


def test_member_metrics_fall_back_to_the_pod_termination_message(k8s, api):
    body = make_run(k8s, runs=1)
    rec = reconciler(api)
    rec.reconcile(body)
    k8s.finish_job("r-lp-0-a1", message=json.dumps({"valAccuracy": 0.75}))
    result = rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert result.created == ["r-target-0-a1"]
    jobs = {j["name"]: j for j in k8s.get(RUNS, "default", "r")["status"]["jobs"]}
    assert jobs["r-lp-0-a1"]["valAccuracy"] == "0.750"


def test_a_retrained_auxiliary_is_an_event_and_a_status_message_once(k8s, api):
    body = make_run(k8s, runs=2, parallelism=3, aux=[{"name": "shapes", "dataset": "s3://ratatouille/datasets/shapes"},
                                      {"name": "glyphs", "dataset": "s3://ratatouille/datasets/glyphs"}])
    rec = reconciler(api)
    created = rec.reconcile(body).created
    retrained, hit = "r-aux-shapes-0-a1", "r-aux-glyphs-0-a1"
    assert {retrained, hit} <= set(created)
    why = "the dataset s3://ratatouille/datasets/shapes changed since it was trained (4 -> 5 objects)"
    k8s.finish_job(retrained, message=json.dumps({"stage": "aux", "member": "shapes-0", "retrained": why}))
    k8s.finish_job(hit)  # a cache hit: the trainer exits at once and says nothing
    rec.reconcile(k8s.get(RUNS, "default", "r"))

    def seen():
        jobs = {j["name"]: j for j in k8s.get(RUNS, "default", "r")["status"]["jobs"]}
        events = [e for e in k8s.list(EVENTS) if e["reason"] == "AuxiliaryRetrained"]
        return jobs, events
    jobs, events = seen()
    assert jobs[retrained]["message"] == why and "message" not in jobs[hit]
    assert len(events) == 1 and events[0]["type"] == "Normal" and why in events[0]["message"]
    assert "aux/shapes-0" in events[0]["message"]
    # Again, and from a restarted operator that remembers nothing: the same status, no second Event.
    for r in (rec, reconciler(api)):
        r.reconcile(k8s.get(RUNS, "default", "r"))
    jobs, events = seen()
    assert jobs[retrained]["message"] == why and len(events) == 1


def test_resync_reconciles_unfinished_runs_and_sets_the_gauges(k8s, api):
    metrics = OperatorMetrics(version="test")
    rec = reconciler(api, metrics)
    make_run(k8s, "a", runs=1)
    make_run(k8s, "b", "other", runs=1)
    default, other = k8s.ns("default"), k8s.ns("other")
    # (The shared test cluster has other tests' runs: the resync is scoped to this test's namespaces.)
    assert resync_once(rec, (default, other), metrics) == 2
    assert {j["metadata"]["name"] for j in k8s.list(JOBS) + k8s.list(JOBS, "other")} == {"a-lp-0-a1", "b-lp-0-a1"}
    assert metrics.registry.get_sample_value("ratatouille_runs", {"namespace": other, "phase": "Pending"}) == 1
    assert metrics.registry.get_sample_value(
        "ratatouille_child_jobs", {"namespace": default, "stage": "linear-probe", "state": "Pending"}) == 1
    assert metrics.registry.get_sample_value(
        "ratatouille_child_jobs_created_total", {"namespace": default, "stage": "linear-probe"}) == 1
    assert metrics.registry.get_sample_value("ratatouille_runs_created_total", {"namespace": default}) == 1
    # Namespaced: only the watched namespace.
    assert resync_once(rec, (other,), metrics) == 1
