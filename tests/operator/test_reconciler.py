"""The Kubernetes adapter (Reconciler, resync) and the stand-in Job controller against the emulator,
in-process and without trainer processes (fast)."""
from __future__ import annotations

import json
import sys
import time
import types

import pytest

kubernetes = pytest.importorskip("kubernetes")
pytest.importorskip("kmock")

from ratatouille_operator.devcluster import JobController, create_credentials_secret  # noqa: E402
from ratatouille_operator.main import resync_once  # noqa: E402
from ratatouille_operator.observability import OperatorMetrics  # noqa: E402
from ratatouille_operator.reconciler import Reconciler, Settings, StorageView  # noqa: E402
from tests.operator.harness import EVENTS, JOBS, PODS, RUNS, run_manifest  # noqa: E402


def reconciler(api, metrics=None) -> Reconciler:
    return Reconciler(api, Settings(default_image="img:test"), storage_view=StorageView(None), metrics=metrics)


def make_run(k8s, name="r", namespace="default", **kw) -> dict:
    return k8s.create(RUNS, run_manifest(name, dataset="s3://ratatouille/datasets/target", **kw), namespace=namespace)


def complete(k8s, namespace, name):
    k8s.patch_status(JOBS, namespace, name, {
        "startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:00Z", "succeeded": 1,
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:01:00Z"}]})


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
    # The Job is seen (Pending): the phase moves on from Pending, once.
    assert rec.reconcile(k8s.get(RUNS, "default", "r")).phase == "Auxiliary"
    events = [e["reason"] for e in k8s.list(EVENTS, "default")]
    assert events == ["Accepted", "AuxiliaryStage"]
    patches = k8s.count("patch", RUNS, subresource="status")
    # The first (now stale) body again, from a caller whose view lacks the Job: no new Job, no
    # repeated phase Events, no status write.
    for _ in range(2):
        again = rec.reconcile(body, jobs=[])
        assert again.created == [] and again.phase == "Auxiliary"
    assert [e["reason"] for e in k8s.list(EVENTS, "default")] == events
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


def test_invalid_spec_reports_once_and_a_fixed_spec_proceeds(k8s, api):
    body = make_run(k8s, runs=2, min_succeeded=3)
    rec = reconciler(api)
    assert rec.reconcile(body).phase == "Failed"
    run = k8s.get(RUNS, "default", "r")
    accepted = next(c for c in run["status"]["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "spec.failurePolicy.minSucceeded" in accepted["message"]
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert [e["reason"] for e in k8s.list(EVENTS, "default")] == ["InvalidSpec"]
    assert k8s.list(JOBS, "default") == []
    fixed = k8s.patch(RUNS, "default", "r", {"spec": {"failurePolicy": {"minSucceeded": 1}}})
    assert fixed["metadata"]["generation"] == 2
    assert rec.reconcile(fixed).created == ["r-lp-0-a1"]
    run = k8s.get(RUNS, "default", "r")
    assert next(c for c in run["status"]["conditions"] if c["type"] == "Accepted")["status"] == "True"
    assert run["status"]["observedGeneration"] == 2


def test_member_metrics_fall_back_to_the_pod_termination_message(k8s, api):
    body = make_run(k8s, runs=1)
    rec = reconciler(api)
    rec.reconcile(body)
    complete(k8s, "default", "r-lp-0-a1")
    k8s.create(PODS, {"metadata": {"name": "r-lp-0-a1-x", "labels": {"job-name": "r-lp-0-a1"}},
                      "spec": {"containers": [{"name": "trainer", "image": "x"}]},
                      "status": {"phase": "Succeeded", "containerStatuses": [{
                          "name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                          "state": {"terminated": {"exitCode": 0, "message": json.dumps({"valAccuracy": 0.75})}}}]}},
               namespace="default")
    result = rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert result.created == ["r-target-0-a1"]
    jobs = {j["name"]: j for j in k8s.get(RUNS, "default", "r")["status"]["jobs"]}
    assert jobs["r-lp-0-a1"]["valAccuracy"] == "0.750"


def test_resync_reconciles_unfinished_runs_and_sets_the_gauges(k8s, api):
    metrics = OperatorMetrics(version="test")
    rec = reconciler(api, metrics)
    make_run(k8s, "a", runs=1)
    make_run(k8s, "b", "other", runs=1)
    assert resync_once(rec, (), metrics) == 2
    assert {j["metadata"]["name"] for j in k8s.list(JOBS)} == {"a-lp-0-a1", "b-lp-0-a1"}
    assert metrics.registry.get_sample_value("ratatouille_runs", {"namespace": "other", "phase": "Pending"}) == 1
    assert metrics.registry.get_sample_value(
        "ratatouille_child_jobs", {"namespace": "default", "stage": "linear-probe", "state": "Pending"}) == 1
    assert metrics.registry.get_sample_value(
        "ratatouille_child_jobs_created_total", {"namespace": "default", "stage": "linear-probe"}) == 1
    assert metrics.registry.get_sample_value("ratatouille_runs_created_total", {"namespace": "default"}) == 1
    # Namespaced: only the watched namespace.
    assert resync_once(rec, ("other",), metrics) == 1


# -- the stand-in Job controller ------------------------------------------------------------------

def _job(name, command, *, backoff_limit=1, env=()):
    return {"metadata": {"name": name, "labels": {"app": "t"}},
            "spec": {"backoffLimit": backoff_limit, "template": {
                "metadata": {"labels": {"app": "t"}},
                "spec": {"restartPolicy": "Never", "containers": [{
                    "name": "main", "image": "x", "command": command, "env": list(env)}]}}}}


def _wait(k8s, name, ctype, timeout=20):
    def done():
        job = k8s.get(JOBS, "default", name)
        return job if any(c["type"] == ctype and c["status"] == "True"
                          for c in (job.get("status") or {}).get("conditions") or []) else None
    return k8s.wait_for(done, timeout=timeout)


def test_job_controller_retries_a_pod_within_backoff_limit_and_reports_its_message(k8s, tmp_path):
    k8s.create("v1/namespaces", {"metadata": {"name": "x"}})
    create_credentials_secret(k8s, "default", "AKIA-CTL-TEST", "ctl-secret")
    script = ('test "$AWS_ACCESS_KEY_ID" = AKIA-CTL-TEST && test -z "$AWS_SECRET_ACCESS_KEY" '
              '&& printf \'{"valAccuracy": 0.5}\' > "$RATATOUILLE_TERMINATION_LOG"')
    env = [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-credentials",
                                                                         "key": "AWS_ACCESS_KEY_ID"}}}]
    with JobController(k8s, workdir=tmp_path / "jobs", env={"PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": "host"},
                       fail={"ok": 1}) as ctl:
        k8s.create(JOBS, _job("ok", ["sh", "-c", script], env=env), namespace="default")
        k8s.create(JOBS, _job("bad", ["false"], backoff_limit=2), namespace="default")
        ok = _wait(k8s, "ok", "Complete")
        bad = _wait(k8s, "bad", "Failed")
    assert (ok["status"]["succeeded"], ok["status"]["failed"], ok["status"]["active"]) == (1, 1, 0)
    assert ok["status"]["startTime"] and ok["status"]["completionTime"]
    assert bad["status"]["failed"] == 3 and bad["status"]["active"] == 0
    assert next(c for c in bad["status"]["conditions"] if c["type"] == "Failed")["reason"] == "BackoffLimitExceeded"
    assert ctl.starts == {"default/ok": 2, "default/bad": 3}
    pods = sorted(k8s.list(PODS, "default", labels={"job-name": "ok"}), key=lambda p: p["metadata"]["creationTimestamp"])
    assert len(pods) == 2
    states = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in pods]
    assert sorted(s["exitCode"] for s in states) == [0, 1]
    assert json.loads(next(s["message"] for s in states if s["exitCode"] == 0)) == {"valAccuracy": 0.5}
    for pod in pods:
        assert pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "ok"
        assert pod["metadata"]["labels"]["app"] == "t"
        assert pod["metadata"]["ownerReferences"][0]["uid"] == ok["metadata"]["uid"]


def test_job_controller_suspends_resumes_and_kills_deleted_jobs(k8s, tmp_path):
    with JobController(k8s, workdir=tmp_path / "jobs", env={"PATH": "/usr/bin:/bin"}) as ctl:
        k8s.create(JOBS, _job("sleepy", ["sleep", "60"]), namespace="default")
        k8s.wait_for(lambda: "sleepy" in ctl.running(), timeout=10)
        k8s.patch(JOBS, "default", "sleepy", {"spec": {"suspend": True}})
        job = _wait(k8s, "sleepy", "Suspended")
        assert job["status"]["active"] == 0 and "sleepy" not in ctl.running()
        k8s.patch(JOBS, "default", "sleepy", {"spec": {"suspend": False}})
        k8s.wait_for(lambda: "sleepy" in ctl.running(), timeout=10)
        assert ctl.starts["default/sleepy"] == 2
        k8s.delete(JOBS, "default", "sleepy")
        k8s.wait_for(lambda: not ctl.running(), timeout=10)
        k8s.wait_for(lambda: not k8s.list(PODS, "default"), timeout=10)  # pods go with their Job


def test_job_controller_instant_mode_and_parallel_limit(k8s, tmp_path):
    with JobController(k8s, workdir=tmp_path / "jobs", instant=True, parallel=1) as ctl:
        for i in range(20):
            k8s.create(JOBS, _job(f"j{i}", ["never-run"]), namespace="default")
        k8s.wait_for(lambda: all(any(c["type"] == "Complete" for c in (j.get("status") or {}).get("conditions") or [])
                                 for j in k8s.list(JOBS, "default")), timeout=30)
    assert ctl.processes == {} and len(ctl.starts) == 20


def test_dev_cluster_serves_the_api_s3_and_the_controller(tmp_path):
    import threading
    import urllib.request
    import io

    from ratatouille_operator import devcluster

    stop = threading.Event()
    out = io.StringIO()
    args = types.SimpleNamespace(dir=str(tmp_path / "dev"), port=0)
    thread = threading.Thread(target=devcluster.serve, args=(args,), kwargs={"stop_event": stop, "out": out})
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C" not in out.getvalue():
            assert thread.is_alive() and time.monotonic() < deadline, out.getvalue()
            time.sleep(0.1)
        text = out.getvalue()
        assert f"export KUBECONFIG={tmp_path / 'dev' / 'kubeconfig'}" in text
        assert "ratatouille operator" in text and "RATATOUILLE_DEFAULT_STORAGE_ENDPOINT=http://127.0.0.1:" in text
        api = kubernetes.config.new_client_from_config(config_file=str(tmp_path / "dev" / "kubeconfig"))
        core = kubernetes.client.CoreV1Api(api)
        assert core.read_namespaced_secret("s3-credentials", "default").data["AWS_ACCESS_KEY_ID"]
        batch = kubernetes.client.BatchV1Api(api)
        batch.create_namespaced_job("default", _job("hello", [sys.executable, "-c", "print('hi')"]))
        deadline = time.monotonic() + 30
        while not getattr(batch.read_namespaced_job("hello", "default").status, "succeeded", None):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        endpoint = text.split("RATATOUILLE_DEFAULT_STORAGE_ENDPOINT=")[1].split()[0]
        with urllib.request.urlopen(endpoint + "/ratatouille?list-type=2", timeout=5) as rsp:
            assert rsp.status == 200  # the bucket exists
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert "Stopping" in out.getvalue()
