"""The operator's policy (issue 12, "who may run what"): a platform team narrows the images,
tolerations and priority classes a run may ask for; a run asking for anything else fails at once
with reason NotAllowed naming the field, before any Job exists, and a fixed spec proceeds."""
from __future__ import annotations

import pytest

from ratatouille_operator.policy import Policy, PolicyError
from tests.operator.test_manifests import make_spec

POLICY = Policy(images=("registry.example.com/ml/*",), toleration_keys=("nvidia.com/gpu",),
                priority_classes=("batch-low",))
DEFAULT = "ghcr.io/ratatouille-dev/ratatouille:0.1.0"


@pytest.mark.parametrize("template, field", [
    ({}, None),
    ({"image": "registry.example.com/ml/trainer:2"}, None),
    ({"image": DEFAULT}, None),  # the operator's own trainer image
    ({"image": "docker.io/evil/miner:latest"}, "spec.template.image"),
    ({"image": "registry.example.com/other/trainer:2"}, "spec.template.image"),
    ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}, None),
    ({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"},
                      {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
     "spec.template.tolerations[1]"),
    ({"tolerations": [{"operator": "Exists"}]}, "spec.template.tolerations[0]"),
    ({"priorityClassName": "batch-low"}, None),
    ({"priorityClassName": "system-cluster-critical"}, "spec.template.priorityClassName"),
])
def test_the_policy_allows_what_it_lists_and_names_the_first_field_it_does_not(template, field):
    spec = make_spec(template=template)
    if field is None:
        POLICY.check(spec, DEFAULT)
        return
    with pytest.raises(PolicyError) as err:
        POLICY.check(spec, DEFAULT)
    assert err.value.field == field and "not allowed by the operator's policy" in str(err.value)


def test_an_unset_policy_allows_anything_and_a_star_allows_keyless_tolerations():
    anything = make_spec(template={"image": "docker.io/x/y:1", "priorityClassName": "p",
                                   "tolerations": [{"operator": "Exists"}]})
    Policy().check(anything, DEFAULT)
    Policy(toleration_keys=("*",)).check(anything, DEFAULT)
    assert Policy.from_env({"RATATOUILLE_ALLOWED_IMAGES": " a/*, b/c:1 ,",
                            "RATATOUILLE_ALLOWED_PRIORITY_CLASSES": "low"}) == \
        Policy(images=("a/*", "b/c:1"), priority_classes=("low",))


def test_a_run_the_policy_refuses_gets_no_job_and_a_fixed_one_proceeds(k8s, api):
    pytest.importorskip("kubernetes")
    from ratatouille_operator.reconciler import Reconciler, Settings, StorageView
    from tests.operator.harness import IMAGE, JOBS, RUNS, run_manifest
    from tests.operator.test_reconciler import run_events

    rec = Reconciler(api, Settings(default_image=IMAGE, policy=Policy(images=("registry.example.com/ml/*",))),
                     storage_view=StorageView(None))
    body = k8s.create(RUNS, run_manifest("r", dataset="s3://ratatouille/datasets/target", runs=1,
                                         extra_spec={"template": {"image": "docker.io/evil/miner:latest"}}))
    assert rec.reconcile(body).phase == "Failed"
    run = k8s.get(RUNS, "default", "r")
    accepted = next(c for c in run["status"]["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "NotAllowed")
    assert accepted["message"].startswith("spec.template.image: 'docker.io/evil/miner:latest' is not allowed")
    rec.reconcile(k8s.get(RUNS, "default", "r"))
    assert run_events(k8s) == ["NotAllowed"] and k8s.list(JOBS, "default") == []
    fixed = k8s.patch(RUNS, "default", "r", {"spec": {"template": {"image": "registry.example.com/ml/trainer:2"}}})
    assert rec.reconcile(fixed).created == ["r-lp-0-a1"]
    assert k8s.get(JOBS, "default", "r-lp-0-a1")["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/ml/trainer:2"


def test_the_chart_passes_the_policy_to_the_operator():
    from tests.chart import helmutil as H

    docs = H.render_chart({"policy": {"allowedImages": ["registry.example.com/ml/*", "ghcr.io/team/*"],
                                "allowedPriorityClasses": ["batch-low"]}})
    env = {e["name"]: e.get("value") for e in H.one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RATATOUILLE_ALLOWED_IMAGES"] == "registry.example.com/ml/*,ghcr.io/team/*"
    assert env["RATATOUILLE_ALLOWED_PRIORITY_CLASSES"] == "batch-low"
    assert "RATATOUILLE_ALLOWED_TOLERATION_KEYS" not in env
    defaults = {e["name"] for e in H.one(H.render_chart({}), "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not any(n.startswith("RATATOUILLE_ALLOWED_") for n in defaults)
