"""spec.template's pod additions (issue 11): imagePullSecrets, runtimeClassName, pod labels and
annotations, a bounded scratch volume with its ephemeral-storage request, and no service-account
token in trainer pods; rendered (pure) and accepted and run on the upstream control plane."""
from __future__ import annotations

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
