"""The auxiliary cache is per namespace on a cluster (issue 12: "sharing the cache between
namespaces is a choice the platform team makes, not the default"): a run reuses only entries
written by runs of its own namespace, unless the operator's setting shares them."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from ratatouille_operator import planner as P
from tests.operator.test_planner import make_spec


def test_the_scope_is_part_of_the_key_and_no_scope_keeps_the_embedded_keys():
    spec = make_spec()
    plain = P.aux_cache_key(spec, "pacs", 0)
    team_a = P.aux_cache_key(dataclasses.replace(spec, aux_cache_scope="team-a"), "pacs", 0)
    team_b = P.aux_cache_key(dataclasses.replace(spec, aux_cache_scope="team-b"), "pacs", 0)
    assert len({plain, team_a, team_b}) == 3
    assert team_a == P.aux_cache_key(dataclasses.replace(spec, aux_cache_scope="team-a"), "pacs", 0)


def _aux_cache_uri(k8s, namespace: str) -> str:
    from tests.operator.harness import JOBS

    job = k8s.get(JOBS, namespace, "twin-aux-shapes-0-a1")
    command = json.dumps(job["spec"]["template"]["spec"]["containers"][0]["command"])
    return re.search(r"cache/aux/[0-9a-f]{16}", command).group(0)


@pytest.mark.parametrize("shared", [False, True])
def test_runs_of_two_namespaces_share_aux_entries_only_when_the_operator_says_so(k8s, api, shared):
    pytest.importorskip("kubernetes")
    from ratatouille_operator.reconciler import Reconciler, Settings, StorageView
    from tests.operator.harness import IMAGE, RUNS, run_manifest

    rec = Reconciler(api, Settings(default_image=IMAGE, shared_aux_cache=shared), storage_view=StorageView(None))
    manifest = run_manifest("twin", dataset="s3://ratatouille/datasets/target", runs=1, include_foundation=False,
                            aux=[{"name": "shapes", "dataset": "s3://ratatouille/datasets/aux"}])
    uris = []
    for ns in ("team-a", "team-b"):
        body = k8s.create(RUNS, manifest, namespace=ns)
        assert "twin-aux-shapes-0-a1" in rec.reconcile(body).created
        uris.append(_aux_cache_uri(k8s, ns))
    assert (uris[0] == uris[1]) is shared
