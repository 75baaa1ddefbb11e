"""spec.template's pod additions (issue 11): imagePullSecrets, runtimeClassName, pod labels and
annotations, a bounded scratch volume with its ephemeral-storage request, and no service-account
token in trainer pods; rendered (pure) and accepted and run on the upstream control plane."""
from __future__ import annotations

import dataclasses
import uuid

import pytest

from ratatouille_operator import manifests as M
from tests.operator.test_manifests import RUN, first_create, make_spec

TEMPLATE = {"imagePullSecrets": ["regcred"], "podAnnotations": {"example.com/team": "vision"},
            "podLabels": {"team": "vision", "ratatouille.dev/stage": "mine"}, "scratchSize": "20Gi",
            "resources": {"requests": {"cpu": "1"}}}


def pod_spec_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def test_the_pod_template_additions_are_rendered_and_the_operators_labels_win():
    spec = make_spec(template={**TEMPLATE, "runtimeClassName": "gvisor"})
    job = M.render_job(RUN, spec, first_create(spec), default_image="img")
    pod = pod_spec_of(job)
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["runtimeClassName"] == "gvisor"
    assert pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "1", "ephemeral-storage": "20Gi"}}
    meta = job["spec"]["template"]["metadata"]
    assert meta["annotations"] == {"example.com/team": "vision"}
    assert meta["labels"]["team"] == "vision" and meta["labels"]["ratatouille.dev/stage"] == "aux"
    # Without them: an unbounded emptyDir, no extra fields, still no token.
    plain = pod_spec_of(M.render_job(RUN, make_spec(), first_create(make_spec()), default_image="img"))
    assert plain["volumes"] == [{"name": "tmp", "emptyDir": {}}] and plain["automountServiceAccountToken"] is False
    assert not {"imagePullSecrets", "runtimeClassName"} & set(plain)


def test_the_api_server_takes_the_additions_and_the_pod_runs_without_a_token(k8s, api):
    pytest.importorskip("kubernetes")
    from tests.operator.harness import JOBS, PODS, RUNS, run_manifest
    from tests.operator.test_reconciler_failures import reconciler

    handler = f"rc-{uuid.uuid4().hex[:8]}"
    k8s.rest.create("/apis/node.k8s.io/v1/runtimeclasses",
                    {"metadata": {"name": handler}, "handler": "runc"})
    try:
        manifest = run_manifest("r", dataset="s3://ratatouille/datasets/target", runs=1,
                                extra_spec={"template": {**TEMPLATE, "runtimeClassName": handler}})
        rec = reconciler(api)
        rec.reconcile(k8s.create(RUNS, manifest))
        job = k8s.get(JOBS, "default", "r-lp-0-a1")
        assert pod_spec_of(job)["runtimeClassName"] == handler
        k8s.wait_for(lambda: (k8s.get(JOBS, "default", "r-lp-0-a1").get("status") or {}).get("ready") == 1, 60)
        pod = k8s.list(PODS, labels={"job-name": "r-lp-0-a1"})[0]
        assert pod["metadata"]["labels"]["team"] == "vision"
        assert pod["metadata"]["annotations"]["example.com/team"] == "vision"
        assert pod["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "20Gi"}
        # No token volume was mounted, and the node gave the container no credentials for the API.
        assert not any("projected" in v for v in pod["spec"]["volumes"])
        env = k8s.cluster.controller.env_of("r-lp-0-a1")
        assert env.get("RATATOUILLE_STAGE") == "linear-probe" and "KUBECONFIG" not in env
    finally:
        k8s.rest.delete(f"/apis/node.k8s.io/v1/runtimeclasses/{handler}")


def _resources_and_device(job: dict) -> tuple[dict | None, str | None]:
    container = pod_spec_of(job)["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return container.get("resources"), env.get("RATATOUILLE_DEVICE")


def test_stages_that_do_not_train_do_not_hold_the_training_gpus():
    from ratatouille_operator import planner as P

    gpus = {"requests": {"cpu": "4", "nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": "2", "memory": "16Gi"}}
    spec = make_spec(template={"resources": gpus})
    action = first_create(spec)
    by_stage = {stage: _resources_and_device(M.render_job(RUN, spec, dataclasses.replace(action, stage=stage),
                                                          default_image="img"))
                for stage in (P.STAGE_PREPARE, P.STAGE_AUX, P.STAGE_LP, P.STAGE_TARGET, P.STAGE_AVERAGE)}
    # Fine-tunings take the template's GPUs and must find CUDA (else exit 2, not CPU training).
    assert by_stage[P.STAGE_TARGET] == by_stage[P.STAGE_AUX] == (gpus, "cuda")
    # The linear probe is one process on one device; preparation and averaging never train.
    assert by_stage[P.STAGE_LP] == ({"requests": {"cpu": "4", "nvidia.com/gpu": 1},
                                     "limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}}, "cuda")
    for stage in (P.STAGE_PREPARE, P.STAGE_AVERAGE):
        assert by_stage[stage] == ({"requests": {"cpu": "4"}, "limits": {"memory": "16Gi"}}, "cpu")
    # A stage given its own resources takes exactly those.
    spec = make_spec(template={"resources": gpus, "stageResources": {"average": {"limits": {"nvidia.com/gpu": 1}},
                                                                       "target": {"requests": {"cpu": "1"}}}})
    assert _resources_and_device(M.render_job(RUN, spec, dataclasses.replace(action, stage=P.STAGE_AVERAGE),
                                              default_image="img")) == ({"limits": {"nvidia.com/gpu": 1}}, "cuda")
    assert _resources_and_device(M.render_job(RUN, spec, dataclasses.replace(action, stage=P.STAGE_TARGET),
                                              default_image="img")) == ({"requests": {"cpu": "1"}}, "cpu")
    # No GPU anywhere: the trainer picks its device itself (RATATOUILLE_DEVICE unset).
    assert _resources_and_device(M.render_job(RUN, make_spec(), action, default_image="img"))[1] is None


def test_the_local_executor_keeps_the_machines_own_device_setting():
    from ratatouille_operator.executor import local_command

    spec = make_spec(template={"resources": {"limits": {"nvidia.com/gpu": 1}}})
    job = M.render_job(RUN, spec, first_create(spec), default_image="img")
    assert local_command(job, {"PATH": "/bin"})[1].get("RATATOUILLE_DEVICE") is None
    assert local_command(job, {"RATATOUILLE_DEVICE": "cpu"})[1]["RATATOUILLE_DEVICE"] == "cpu"
