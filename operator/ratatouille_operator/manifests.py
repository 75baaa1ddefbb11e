"""batch/v1 Job manifests for the planner's CreateJob actions, and the way back (Job -> ObservedJob).

The operator creates exactly these objects; the local executor renders them too and runs their
container command, so both modes execute the same thing. Pure: no kopf or kubernetes client here.
Credentials never appear in a manifest: the container's environment comes from the Secret
`spec.storage.credentialsSecret` (envFrom).
"""
from __future__ import annotations

from typing import Any, Mapping

from ratatouille_contract.jobdesc import trainer_argv

from . import planner
from .planner import parse_time
from .spec import API_GROUP, API_VERSION, KIND, RunSpec

CONTAINER_NAME = "trainer"
CACHE_DIR = "/tmp/ratatouille-cache"
ANNOTATION_MEMBER = "ratatouille.dev/member"
#: On a child Job the run holds suspended (`spec.suspend`); only those are released on resume.
ANNOTATION_HELD = "ratatouille.dev/held"
#: The trainer's exit codes (docs/contract.md, "Trainer exit codes"): 2 bad input, 3 diverged.
EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def _container(run: planner.RunRef, spec: RunSpec, action: planner.CreateJob, default_image: str,
               metrics_port: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer container, and the emptyDir settings of its scratch volume."""
    env: list[dict[str, Any]] = [
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RATATOUILLE_RUN", "value": run.name},
        {"name": "RATATOUILLE_STAGE", "value": action.stage},
        {"name": "RATATOUILLE_MEMBER", "value": action.member},
        {"name": "RATATOUILLE_ATTEMPT", "value": str(action.attempt)},
        {"name": "RATATOUILLE_CACHE_DIR", "value": CACHE_DIR},
    ]
    if metrics_port is not None:
        env.append({"name": "RATATOUILLE_METRICS_PORT", "value": str(metrics_port)})
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    secret = spec.storage.credentials_secret
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.template.image or default_image,
        "command": trainer_argv(action.description),
        "env": env,
        # The whole Secret (a session token and a region work too), and not optional: a missing
        # Secret keeps the pod in CreateContainerConfigError, a reason the run reports, instead
        # of a trainer silently falling back to the node's identity.
        **({"envFrom": [{"secretRef": {"name": secret}}]} if secret else {}),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if metrics_port is not None:
        container["ports"] = [{"name": "metrics", "containerPort": int(metrics_port), "protocol": "TCP"}]
    tp = spec.template
    resources = stage_resources(tp, action.stage)
    device = _device(resources, _plain(tp.resources) if tp.resources else {})
    if device:
        # The trainer then fails (exit 2) instead of training a GPU pod's work on the CPU, and
        # a stage that was left without the template's GPUs never looks for one.
        env.append({"name": "RATATOUILLE_DEVICE", "value": device})
    scratch: dict[str, Any] = {}
    if tp.scratch_size:
        # A bounded scratch volume, and the node storage it needs reserved for it.
        scratch["sizeLimit"] = tp.scratch_size
        resources.setdefault("requests", {}).setdefault("ephemeral-storage", tp.scratch_size)
    if resources:
        container["resources"] = resources
    return container, scratch


def _pod_spec(spec: RunSpec, container: dict[str, Any], scratch: dict[str, Any],
              service_account: str | None) -> dict[str, Any]:
    tp = spec.template
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": scratch}],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        # The trainer never talks to the API server: no token in its pods.
        "automountServiceAccountToken": False,
    }
    if tp.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in tp.image_pull_secrets]
    if tp.runtime_class_name:
        pod_spec["runtimeClassName"] = tp.runtime_class_name
    if tp.node_selector:
        pod_spec["nodeSelector"] = dict(tp.node_selector)
    if tp.tolerations:
        pod_spec["tolerations"] = [_plain(t) for t in tp.tolerations]
    if tp.affinity:
        pod_spec["affinity"] = _plain(tp.affinity)
    if tp.priority_class_name:
        pod_spec["priorityClassName"] = tp.priority_class_name
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    return pod_spec


def _job_metadata(run: planner.RunRef, action: planner.CreateJob, owner: Mapping | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": action.name,
        "namespace": run.namespace,
        "labels": dict(action.labels),
        # Label values are capped at 63 characters; the annotation keeps the exact member.
        "annotations": {ANNOTATION_MEMBER: action.member},
    }
    if owner is not None:
        meta = owner.get("metadata") if isinstance(owner.get("metadata"), Mapping) else owner
        metadata["ownerReferences"] = [{
            "apiVersion": owner.get("apiVersion") or f"{API_GROUP}/{API_VERSION}",
            "kind": owner.get("kind") or KIND,
            "name": meta.get("name") or run.name,
            "uid": meta.get("uid") or run.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }]
    return metadata


def render_job(run: planner.RunRef, spec: RunSpec, action: planner.CreateJob, *, default_image: str,
               owner: Mapping | None = None, service_account: str | None = None,
               metrics_port: int | None = 9400) -> dict:
    """The batch/v1 Job for one CreateJob action."""
    container, scratch = _container(run, spec, action, default_image, metrics_port)
    # The user's pod labels and annotations; the operator's own labels win.
    pod_meta: dict[str, Any] = {"labels": {**dict(spec.template.pod_labels), **dict(action.labels)}}
    if spec.template.pod_annotations:
        pod_meta["annotations"] = dict(spec.template.pod_annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _job_metadata(run, action, owner),
        "spec": {
            "backoffLimit": spec.failure_policy.backoff_limit,
            "podFailurePolicy": pod_failure_policy(),
            "completions": 1,
            "parallelism": 1,
            "suspend": bool(spec.suspend),
            "template": {"metadata": pod_meta, "spec": _pod_spec(spec, container, scratch, service_account)},
        },
    }


#: CRD key of each stage under `template.stageResources`.
STAGE_RESOURCE_KEYS = {planner.STAGE_PREPARE: "prepare", planner.STAGE_AUX: "auxiliary",
                       planner.STAGE_LP: "linearProbe", planner.STAGE_TARGET: "target",
                       planner.STAGE_AVERAGE: "average"}


def _is_gpu(resource: str) -> bool:
    """An accelerator resource (nvidia.com/gpu, amd.com/gpu, ...)."""
    return resource.endswith("/gpu")


def stage_resources(tp: Any, stage: str) -> dict:
    """The container resources of one stage's pods: `template.stageResources.<stage>` when
    given; otherwise the template's resources, except that the data preparation and the averaging
    (which never train) take no GPU and the linear probe (one process, one device) at most one,
    so that they never hold the GPUs the fine-tunings wait for."""
    own = tp.stage_resources.get(STAGE_RESOURCE_KEYS.get(stage, ""))
    if own is not None:
        return _plain(own)
    out = _plain(tp.resources) if tp.resources else {}
    for kind in ("requests", "limits"):
        section = out.get(kind)
        if not isinstance(section, dict):
            continue
        for name in [n for n in section if _is_gpu(n)]:
            if stage in (planner.STAGE_PREPARE, planner.STAGE_AVERAGE):
                del section[name]
            elif stage == planner.STAGE_LP and str(section[name]).isdigit() and int(section[name]) > 1:
                section[name] = 1
        if not section:
            del out[kind]
    return out


def _device(resources: Mapping, template_resources: Mapping) -> str | None:
    """RATATOUILLE_DEVICE for a pod: cuda when it asks for a GPU, cpu when the template did
    and this stage was left without one, unset (the trainer's auto) otherwise."""
    def gpus(res: Mapping) -> bool:
        return any(_is_gpu(n) and str(v) not in ("0", "")
                   for kind in ("requests", "limits") for n, v in (res.get(kind) or {}).items())
    if gpus(resources):
        return "cuda"
    return "cpu" if gpus(template_resources) else None


def pod_failure_policy() -> dict:
    """The trainer's bad input (exit 2) fails the Job at once: another pod would fail the same
    way. A disruption (preemption, eviction, a drained node) is not the trainer's failure and
    does not consume backoffLimit. (A podFailurePolicy needs restartPolicy Never.)"""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                              "values": [EXIT_BAD_INPUT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts/lists (Mappings and tuples from the frozen spec)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def slim_job(job: Mapping) -> dict:
    """What the operator keeps of a child Job: its identity, labels, its own annotations, whether
    it is suspended, and its status. A Job's pod template (the job description, the user's pod
    annotations, tolerations...) can be hundreds of KB and is never read back, so the operator's
    memory grows with the number of Jobs, not with their size."""
    meta = job.get("metadata") or {}
    kept_meta = {k: meta[k] for k in ("name", "namespace", "uid", "labels", "creationTimestamp",
                                      "deletionTimestamp", "resourceVersion") if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("ratatouille.dev/")}
    if annotations:
        kept_meta["annotations"] = annotations
    spec = job.get("spec") or {}
    return {"metadata": kept_meta, "spec": {"suspend": spec.get("suspend")} if "suspend" in spec else {},
            "status": job.get("status") or {}}


def parse_job(job: Mapping) -> planner.ObservedJob | None:
    """A batch/v1 Job (dict) -> ObservedJob, or None when it is not one of ours."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    stage = labels.get(planner.LABEL_STAGE)
    member = (meta.get("annotations") or {}).get(ANNOTATION_MEMBER) or labels.get(planner.LABEL_MEMBER)
    attempt_text = labels.get(planner.LABEL_ATTEMPT)
    name = meta.get("name")
    if not (name and stage and member and attempt_text) or planner.LABEL_RUN_UID not in labels:
        return None
    try:
        attempt = int(attempt_text)
    except (TypeError, ValueError):
        return None
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []
                  if isinstance(c, Mapping) and c.get("status") == "True"}
    start = parse_time(status.get("startTime"))
    finish = None
    reason = None
    if "Complete" in conditions:
        state = planner.SUCCEEDED
        finish = parse_time(status.get("completionTime")) or parse_time(conditions["Complete"].get("lastTransitionTime"))
    elif "Failed" in conditions:
        state = planner.FAILED
        finish = parse_time(conditions["Failed"].get("lastTransitionTime"))
        reason = conditions["Failed"].get("reason") or "Failed"
    elif "Suspended" in conditions or spec.get("suspend"):
        state = planner.SUSPENDED
        reason = (conditions.get("Suspended") or {}).get("reason")
    else:
        # `active` counts pending and running pods; `ready` (when reported) only running ones.
        ready = status.get("ready")
        active = status.get("active") or 0
        running = (ready or 0) > 0 if ready is not None else active > 0
        state = planner.ACTIVE if running else planner.PENDING
    return planner.ObservedJob(name=name, stage=stage, member=str(member), attempt=attempt, state=state,
                               start_time=start, finish_time=finish, reason=reason,
                               held=(meta.get("annotations") or {}).get(ANNOTATION_HELD) == "true",
                               queued=bool(labels.get(planner.LABEL_KUEUE_QUEUE)))
