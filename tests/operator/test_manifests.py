"""Job manifests: what the operator creates for a CreateJob, and how a Job reads back."""
from __future__ import annotations

import json

import pytest

from ratatouille_operator import manifests as M
from ratatouille_operator import planner as P
from ratatouille_contract.jobdesc import JobDescription, trainer_argv

from .test_planner import RUN, make_spec

OWNER = {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
         "metadata": {"name": "office", "namespace": "team-a", "uid": "uid-123"}}


def first_create(spec) -> P.CreateJob:
    p = P.plan(RUN, spec, P.Observed(), now=1000.0)
    return next(a for a in p.actions if isinstance(a, P.CreateJob) and a.stage == "aux")


def env_of(job: dict) -> dict:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_render_job_basics():
    spec = make_spec(queueName="gpu-queue", suspend=False,
                     template={"resources": {"limits": {"nvidia.com/gpu": "1"}},
                               "nodeSelector": {"gpu": "h100"},
                               "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                               "priorityClassName": "batch-low"})
    action = first_create(spec)
    job = M.render_job(RUN, spec, action, default_image="ghcr.io/x/ratatouille:1", owner=OWNER,
                       service_account="trainer")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == action.name == "office-aux-pacs-0-a1" and meta["namespace"] == "team-a"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert meta["labels"] == job["spec"]["template"]["metadata"]["labels"] == dict(action.labels)
    assert meta["ownerReferences"] == [{"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
                                        "name": "office", "uid": "uid-123", "controller": True,
                                        "blockOwnerDeletion": True}]
    js = job["spec"]
    assert js["backoffLimit"] == 1 and js["suspend"] is False and "activeDeadlineSeconds" not in js
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "trainer"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "batch-low"
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (c,) = pod["containers"]
    assert c["name"] == "trainer" and c["image"] == "ghcr.io/x/ratatouille:1"
    assert c["command"] == trainer_argv(action.description)
    assert JobDescription.from_json(c["command"][-1]) == action.description
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    env = env_of(job)
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["RATATOUILLE_CACHE_DIR"]["value"] == "/tmp/ratatouille-cache"
    assert env["RATATOUILLE_METRICS_PORT"]["value"] == "9400"
    assert (env["RATATOUILLE_RUN"]["value"], env["RATATOUILLE_STAGE"]["value"],
            env["RATATOUILLE_MEMBER"]["value"]) == ("office", "aux", "pacs-0")
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    json.dumps(job)   # plain JSON all the way down


def test_template_image_wins_and_suspend_is_mirrored():
    spec = make_spec(suspend=True, template={"image": "registry/own:2"})
    job = M.render_job(RUN, spec, first_create(make_spec()), default_image="default:1", metrics_port=None)
    assert job["spec"]["suspend"] is True
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry/own:2"
    assert "ports" not in c and "RATATOUILLE_METRICS_PORT" not in env_of(job)
    assert "ownerReferences" not in job["metadata"]


def test_credentials_are_secret_references_never_literals():
    spec = make_spec()
    job = M.render_job(RUN, spec, first_create(spec), default_image="img")
    container = job["spec"]["template"]["spec"]["containers"][0]
    # The whole Secret, not optional (a missing one is a visible CreateContainerConfigError).
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not any(name.startswith("AWS_") and name != "AWS_ENDPOINT_URL" for name in env_of(job))
    text = json.dumps(job)
    assert "testing" not in text and "AWS_SESSION_TOKEN" not in text

    no_secret = make_spec(storage={"uri": "file:///tmp/runs"})
    job = M.render_job(RUN, no_secret, first_create(no_secret), default_image="img")
    assert not any(name.startswith("AWS_") for name in env_of(job))
    assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]


def test_pod_failure_policy_fails_bad_input_at_once_and_ignores_disruptions():
    spec = make_spec()
    job = M.render_job(RUN, spec, first_create(spec), default_image="img")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                             "values": [2]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_rendered_job_is_a_valid_batch_v1_job():
    kv = pytest.importorskip("kubernetes_validate")
    spec = make_spec(queueName="q", template={"resources": {"limits": {"cpu": "2"}},
                                              "affinity": {"nodeAffinity": {}}})
    job = M.render_job(RUN, spec, first_create(spec), default_image="img", owner=OWNER)
    kv.validate(job, "1.30", strict=True)


def _with_status(job: dict, status: dict, suspend: bool = False) -> dict:
    job = json.loads(json.dumps(job))
    job["spec"]["suspend"] = suspend
    job["status"] = status
    return job


T0, T1 = "2024-05-01T10:00:00Z", "2024-05-01T10:30:00.5Z"
E0, E1 = 1714557600.0, 1714559400.5


@pytest.mark.parametrize("status, suspend, state, start, finish, reason", [
    ({}, False, "Pending", None, None, None),
    ({"startTime": T0, "active": 1, "ready": 0}, False, "Pending", E0, None, None),
    ({"startTime": T0, "active": 1, "ready": 1}, False, "Active", E0, None, None),
    ({"startTime": T0, "active": 1}, False, "Active", E0, None, None),
    ({"startTime": T0, "completionTime": T1, "succeeded": 1,
      "conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                     {"type": "Complete", "status": "True", "lastTransitionTime": T1}]},
     False, "Succeeded", E0, E1, None),
    ({"startTime": T0, "failed": 2,
      "conditions": [{"type": "FailureTarget", "status": "True"},
                     {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                      "lastTransitionTime": "2024-05-01T12:30:00.5+02:00"}]},
     False, "Failed", E0, E1, "BackoffLimitExceeded"),
    ({"conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]},
     True, "Suspended", None, None, "JobSuspended"),
    ({"conditions": [{"type": "Suspended", "status": "False"}], "active": 1, "ready": 1},
     False, "Active", None, None, None),
])
def test_parse_job_round_trip(status, suspend, state, start, finish, reason):
    spec = make_spec()
    action = first_create(spec)
    job = _with_status(M.render_job(RUN, spec, action, default_image="img"), status, suspend)
    assert M.parse_job(job) == P.ObservedJob(name=action.name, stage="aux", member="pacs-0", attempt=1,
                                             state=state, start_time=start, finish_time=finish, reason=reason)


def test_parse_job_ignores_foreign_jobs_and_keeps_long_members():
    assert M.parse_job({"metadata": {"name": "x", "labels": {"app": "other"}}}) is None
    spec = make_spec(auxiliaries=[{"name": "a" * 62, "dataset": "s3://d/a"}])
    action = first_create(spec)
    assert len(action.labels["ratatouille.dev/member"]) <= 63
    parsed = M.parse_job(M.render_job(RUN, spec, action, default_image="img"))
    assert parsed.member == "a" * 62 + "-0" and parsed.name == action.name and len(parsed.name) <= 63
