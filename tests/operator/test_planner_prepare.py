"""spec.dataPreparation in the planner: one prepare member per dataset, first in the graph,
gating the members that read it; descriptions point them at it. Pure tables, no storage."""
from __future__ import annotations

from ratatouille_operator import planner as P
from ratatouille_contract.jobdesc import JobDescription

from .test_planner import PREFIX, RUN, job, make_spec, observed

PREP = {"enabled": True, "memoryBudget": "2Gi"}
SPEC = make_spec(dataPreparation=PREP)


def creates(p):
    return [(a.stage, a.member) for a in p.actions if isinstance(a, P.CreateJob)]


def test_disabled_by_default_nothing_changes():
    spec = make_spec()
    assert P.prepare_members(spec) == {}
    d = P.describe(spec, RUN, "linear-probe", "0")
    assert d.data.prepared is None and "prepared" not in d.to_dict()["data"]


def test_prepare_members_come_first_and_gate_their_readers():
    p = P.plan(RUN, SPEC, observed(), now=1000.0)
    assert creates(p) == [("prepare", "target"), ("prepare", "aux-pacs")]
    prep = [a for a in p.actions if a.stage == "prepare"][0]
    assert prep.name == "office-prep-target-a1"
    d = prep.description
    assert d.output == f"{PREFIX}/prepare/target"
    assert d.data.dataset == "s3://data/office" and d.data.prepared == "s3://bucket/runs/cache/data"
    assert JobDescription.from_json(d.to_json()) == d
    # the target's prepare is done: the LP may start; the pacs auxiliaries still wait for theirs
    p = P.plan(RUN, SPEC, observed(job("prepare", "target"), job("prepare", "aux-pacs", "Active")), now=1000.0)
    assert creates(p) == [("linear-probe", "0")]
    lp = p.actions[0].description
    assert lp.data.prepared == f"{PREFIX}/prepare/target" and lp.data.memoryBudget == "2Gi"
    p = P.plan(RUN, SPEC, observed(job("prepare", "target"), job("prepare", "aux-pacs"),
                                   job("linear-probe", "0", "Active")), now=1000.0)
    assert creates(p) == [("aux", "pacs-0"), ("aux", "pacs-1")]
    aux = p.actions[0].description
    assert aux.data.prepared == f"{PREFIX}/prepare/aux-pacs"
    assert p.status["progress"] == "2/12"                         # 2 prepare + lp + 2 aux + 6 + avg
    graph = P.job_graph(SPEC, RUN)
    assert [n["member"] for n in graph[:3]] == ["target", "aux-pacs", "0"]
    assert graph[2]["needs"] == ["prepare/target"] and graph[3]["needs"] == ["prepare/aux-pacs"]


def test_cached_auxiliaries_need_no_prepare_and_a_shared_dataset_is_prepared_once():
    keys = frozenset(P.aux_cache_key(SPEC, "pacs", k) for k in range(2))
    p = P.plan(RUN, SPEC, observed(hits=keys), now=1000.0)
    assert creates(p) == [("prepare", "target")]
    same = make_spec(dataPreparation=PREP, auxiliaries=[{"name": "self", "dataset": "s3://data/office"}])
    assert P.prepare_members(same) == {"s3://data/office": "target"}
    p = P.plan(RUN, same, observed(job("prepare", "target")), now=1000.0)
    assert creates(p) == [("linear-probe", "0"), ("aux", "self-0")]
    assert all(a.description.data.prepared == f"{PREFIX}/prepare/target" for a in p.actions)


def test_a_failed_target_prepare_fails_the_run_and_a_failed_aux_prepare_blocks_its_sources():
    p = P.plan(RUN, SPEC, observed(job("prepare", "target", "Failed", attempt=2)), now=1000.0)
    assert p.status["phase"] == "Failed"
    failed = [c for c in p.status["conditions"] if c["type"] == "Failed"][0]
    assert failed["reason"] == "DataPreparationFailed" and "s3://data/office" in failed["message"]
    p = P.plan(RUN, SPEC, observed(job("prepare", "target"), job("prepare", "aux-pacs", "Failed", attempt=2),
                                   job("linear-probe", "0")), now=1000.0)
    assert p.status["phase"] != "Failed"
    made = creates(p)
    assert ("aux", "pacs-0") not in made
    # the targets from the foundation and vlcs still run; those from pacs are blocked (failed)
    assert {m for s, m in made if s == "target"} == {"0", "2", "3", "5"}
    assert p.status["stages"]["target"]["failed"] == 2
