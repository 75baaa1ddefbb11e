"""The chart grants every API call the operator makes, and nothing it never makes.

`tests/operator/rbac_expected.json` is the set of (verb, group/resource[/sub]) requests the real
operator process may send; the end-to-end tests assert that every request it sent to the
API server (read from the server's audit log) is in it, and that the server refused none. Here each is checked against the rendered RBAC, cluster-wide and namespaced.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chart import helmutil

EXPECTED = json.loads((Path(__file__).resolve().parents[1] / "operator" / "rbac_expected.json").read_text())
CLUSTER_SCOPED = {"namespaces", "customresourcedefinitions"}


def split(resource: str) -> tuple[str, str]:
    parts = resource.split("/")
    if parts[0] in ("ratatouille.dev", "batch", "events.k8s.io", "apiextensions.k8s.io", "kueue.x-k8s.io"):
        return parts[0], "/".join(parts[1:])
    return "", resource


@pytest.mark.parametrize("verb,resource", [tuple(e) for e in EXPECTED], ids=[f"{v}-{r}" for v, r in EXPECTED])
def test_cluster_wide_chart_grants_every_operator_request(verb, resource):
    group, res = split(resource)
    assert helmutil.is_granted(group, res, verb), f"{verb} {resource} is not granted"


@pytest.mark.parametrize("verb,resource", [tuple(e) for e in EXPECTED], ids=[f"{v}-{r}" for v, r in EXPECTED])
def test_namespaced_chart_grants_every_operator_request_in_its_namespaces(verb, resource):
    values = {"watchNamespaces": ["team-a", "team-b"]}
    group, res = split(resource)
    if res in CLUSTER_SCOPED:
        # kopf lists namespaces only to resolve patterns; with exact names it needs none, but
        # the CRD list/watch for discovery is always cluster-scoped.
        if res == "customresourcedefinitions":
            assert helmutil.is_granted(group, res, verb, values=values)
        return
    for ns in values["watchNamespaces"]:
        assert helmutil.is_granted(group, res, verb, namespace=ns, values=values), f"{verb} {resource} in {ns}"
    assert not helmutil.is_granted(group, res, verb, namespace="elsewhere", values=values) or res == "customresourcedefinitions"


def test_chart_grants_nothing_beyond_what_the_operator_uses():
    allowed = {split(r) + (v,) for v, r in EXPECTED}
    for scope, grants in helmutil.operator_grants().items():
        extra = {g for g in grants if g not in allowed}
        # runs/finalizers update is needed for blockOwnerDeletion on the owner references we set
        extra.discard(("ratatouille.dev", "ratatouilleruns/finalizers", "update"))
        assert not extra, f"granted but never used ({scope}): {sorted(extra)}"
