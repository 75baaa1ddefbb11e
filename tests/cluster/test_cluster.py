"""The test cluster itself: the upstream control plane refuses what our old emulator accepted, and
the node agent (the one simulated part) behaves as a kubelet does under the real Job controller."""
from __future__ import annotations

import json
import sys

import pytest

from tests.cluster.controlplane import ApiError

pytest.importorskip("kubernetes")

JOBS = "/apis/batch/v1/namespaces/{ns}/jobs"


@pytest.fixture()
def ns(k8s_cluster, request):
    name = "c-" + request.node.name.replace("_", "-")[5:40].strip("-").lower()
    k8s_cluster.namespace(name)
    yield name
    k8s_cluster.controller.reset()
    k8s_cluster.rest.delete(f"/api/v1/namespaces/{name}")


def job(name: str, command: list[str], *, image: str = "ratatouille:e2e", backoff_limit: int = 1,
        env=(), env_from=(), container_extra: dict | None = None) -> dict:
    container = {"name": "main", "image": image, "command": command, "env": list(env), "envFrom": list(env_from),
                 "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}}
    container.update(container_extra or {})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": {"app": "t"}},
            "spec": {"backoffLimit": backoff_limit, "template": {
                "metadata": {"labels": {"app": "t"}},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                         "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                         "containers": [container]}}}}


def wait_condition(cluster, ns: str, name: str, ctype: str, timeout: float = 60) -> dict:
    def done():
        obj = cluster.rest.get(f"{JOBS.format(ns=ns)}/{name}")
        return obj if any(c["type"] == ctype and c["status"] == "True"
                          for c in (obj.get("status") or {}).get("conditions") or []) else None
    return cluster.wait_for(done, timeout, f"Job {ns}/{name} {ctype}")


def waiting_reason(cluster, ns: str, job_name: str) -> tuple[str, str] | None:
    for pod in cluster.pods(ns, f"job-name={job_name}"):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
                return waiting["reason"], waiting.get("message", "")
    return None


# -- the API server refuses what the emulator accepted ----------------------------------------------

def test_the_server_refuses_a_malformed_quantity_and_an_invalid_label_value(k8s_cluster, ns):
    bad = job("bad-quantity", ["true"], container_extra={"resources": {"requests": {"cpu": "two"}}})
    with pytest.raises(ApiError) as err:
        k8s_cluster.rest.create(JOBS.format(ns=ns), bad)
    assert err.value.status in (400, 422) and "quantities must match" in str(err.value)
    bad = job("bad-label", ["true"])
    bad["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "not a label value!"
    with pytest.raises(ApiError) as err:
        k8s_cluster.rest.create(JOBS.format(ns=ns), bad)
    assert err.value.status == 422 and "metadata.labels" in str(err.value) and "not a label value!" in str(err.value)


def test_strict_field_validation_refuses_an_unknown_field(k8s_cluster, ns):
    k8s_cluster.install_crd()
    manifest = {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun", "metadata": {"name": "typo"},
                "spec": {"foundation": {"model": "test_resnet", "inputSize": 32},
                         "target": {"dataset": "s3://b/d", "testDomains": ["d2"]},
                         "storage": {"uri": "s3://b/runs"}, "finetune": {"runz": 3}}}
    proc = k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest), check=False)
    assert proc.returncode != 0 and 'unknown field "spec.finetune.runz"' in proc.stderr, proc.stderr
    assert k8s_cluster.run(ns, "typo") is None


def test_pod_security_restricted_refuses_a_pod_that_may_run_as_root(k8s_cluster, ns):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "rooty"},
           "spec": {"containers": [{"name": "c", "image": "ratatouille:e2e", "command": ["true"]}]}}
    with pytest.raises(ApiError) as err:
        k8s_cluster.rest.create(f"/api/v1/namespaces/{ns}/pods", pod)
    assert err.value.status == 403 and "violates PodSecurity" in str(err.value)


# -- the node agent under the real Job controller ----------------------------------------------------

def test_a_pod_is_retried_within_backoff_limit_and_its_termination_message_and_secret_reach_it(k8s_cluster, ns):
    c = k8s_cluster
    c.create_secret(ns, "creds", {"AWS_ACCESS_KEY_ID": "AKIA-NODE-TEST", "REGION": "eu-west-3"})
    script = ('test "$AWS_ACCESS_KEY_ID" = AKIA-NODE-TEST && test "$CFG_REGION" = eu-west-3 '
              '&& test -z "$AWS_SECRET_ACCESS_KEY" && test "$POD_NS" = ' + ns +
              ' && printf \'{"valAccuracy": 0.5}\' > "$RATATOUILLE_TERMINATION_LOG"')
    env = [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}}},
           {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    c.controller.set_fail(lambda pod: pod["metadata"]["namespace"] == ns and "ok" in pod["metadata"]["name"], 1)
    c.rest.create(JOBS.format(ns=ns), job("ok", ["sh", "-c", script], env=env,
                                          env_from=[{"secretRef": {"name": "creds"}, "prefix": "CFG_"}]))
    c.rest.create(JOBS.format(ns=ns), job("bad", ["false"], backoff_limit=1))
    ok = wait_condition(c, ns, "ok", "Complete")
    bad = wait_condition(c, ns, "bad", "Failed")
    assert (ok["status"]["succeeded"], ok["status"].get("failed")) == (1, 1)
    assert bad["status"]["failed"] == 2
    assert next(x for x in bad["status"]["conditions"] if x["type"] == "Failed")["reason"] == "BackoffLimitExceeded"
    assert c.controller.starts[f"{ns}/ok"] == 2 and c.controller.starts[f"{ns}/bad"] == 2
    pods = c.pods(ns, "job-name=ok")
    states = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in pods]
    assert sorted(s["exitCode"] for s in states) == [0, 1]
    assert json.loads(next(s["message"] for s in states if s["exitCode"] == 0)) == {"valAccuracy": 0.5}


def test_waiting_reasons_a_kubelet_reports(k8s_cluster, ns):
    c = k8s_cluster
    c.rest.create(JOBS.format(ns=ns), job("pull", ["true"], image="registry.example/missing:1"))
    c.rest.create(JOBS.format(ns=ns), job("nokey", ["true"], env=[
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "K"}}}]))
    c.rest.create(JOBS.format(ns=ns), job("root", ["true"], image="ratatouille:root"))
    c.controller.images.add("ratatouille:root")  # an image that runs as root (no USER)
    try:
        reason, message = c.wait_for(lambda: waiting_reason(c, ns, "pull"), 30, "a pull error")
        assert reason in ("ErrImagePull", "ImagePullBackOff") and "registry.example/missing:1" in message
        c.wait_for(lambda: (waiting_reason(c, ns, "pull") or ("",))[0] == "ImagePullBackOff", 30, "the back-off")
        reason, message = c.wait_for(lambda: waiting_reason(c, ns, "nokey"), 30, "a config error")
        assert reason == "CreateContainerConfigError" and 'secret "nope" not found' in message
        reason, message = c.wait_for(lambda: waiting_reason(c, ns, "root"), 30, "a config error")
        assert reason == "CreateContainerConfigError" and "runAsNonRoot" in message
    finally:
        c.controller.images.discard("ratatouille:root")


def test_suspend_stops_the_process_resume_restarts_it_and_deleting_the_job_kills_it(k8s_cluster, ns):
    c = k8s_cluster
    c.rest.create(JOBS.format(ns=ns), job("sleepy", [sys.executable, "-c", "import time; time.sleep(120)"]))
    c.wait_for(lambda: "sleepy" in c.controller.running(), 60, "the process to run")
    c.rest.merge_patch(f"{JOBS.format(ns=ns)}/sleepy", {"spec": {"suspend": True}})
    wait_condition(c, ns, "sleepy", "Suspended")
    c.wait_for(lambda: "sleepy" not in c.controller.running(), 60, "the process to stop")
    c.rest.merge_patch(f"{JOBS.format(ns=ns)}/sleepy", {"spec": {"suspend": False}})
    c.wait_for(lambda: "sleepy" in c.controller.running(), 60, "the process to run again")
    assert c.controller.starts[f"{ns}/sleepy"] == 2
    c.rest.delete(f"{JOBS.format(ns=ns)}/sleepy", {"propagationPolicy": "Background"})
    c.wait_for(lambda: "sleepy" not in c.controller.running(), 60, "the process to be killed")
    c.wait_for(lambda: not c.pods(ns), 60, "the garbage collector to delete the pod")


def test_a_gpu_request_no_node_holds_stays_unschedulable(k8s_cluster, ns):
    c = k8s_cluster
    c.rest.create(JOBS.format(ns=ns), job("greedy", ["true"], container_extra={
        "resources": {"limits": {"nvidia.com/gpu": "64"}}}))

    def unschedulable():
        for pod in c.pods(ns, "job-name=greedy"):
            for cond in (pod.get("status") or {}).get("conditions") or []:
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return cond["message"]
        return None
    message = c.wait_for(unschedulable, 60, "the scheduler's verdict")
    assert "nvidia.com/gpu" in message
