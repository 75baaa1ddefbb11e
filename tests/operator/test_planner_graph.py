"""The graph (planning/graph.py) as tables: sources, a member's state from its latest attempt,
what a member waits for, and the live graph built from observed Jobs."""
from __future__ import annotations

import dataclasses

import pytest

from ratatouille_operator.planning import graph as G

from .test_planner import SPEC, aux, job, lp, make_spec, tgt


@pytest.mark.parametrize("include_foundation, auxiliaries, expected", [
    (True, [], True), (False, ["a"], True), (True, ["a"], True), (False, [], False)])
def test_has_source(include_foundation, auxiliaries, expected):
    assert G.has_source(include_foundation, auxiliaries) is expected


# BASE: foundation, then pacs (trained twice) and vlcs (recycled), by name.
@pytest.mark.parametrize("i, source, trained", [
    (0, "foundation", False), (1, "pacs-0", True), (2, "vlcs", False),
    (3, "foundation", False), (4, "pacs-1", True), (5, "vlcs", False),
    (7, "pacs-0", True),                                   # every fine-tuning once, then again
])
def test_target_sources_take_turns(i, source, trained):
    name, featurizer, key = G.target_source(SPEC, i)
    assert name == source
    assert (key is not None) == trained
    assert (featurizer is None) == (source == "foundation")


def test_without_a_source_there_is_no_assignment():
    spec = make_spec(includeFoundation=False, auxiliaries=[])
    assert G.initialization_sources(spec) == []
    with pytest.raises(ValueError, match=G.NO_SOURCE):
        G.source_of(spec, [], 0)


@pytest.mark.parametrize("state, attempt, rejected, expected", [
    (None, 1, False, G.MISSING),
    ("Pending", 1, False, G.RUNNING),
    ("Active", 1, False, G.RUNNING),
    ("Suspended", 1, False, G.RUNNING),
    ("Succeeded", 1, False, G.DONE),
    ("Failed", 1, False, G.RETRY),
    ("Failed", 2, False, G.DEAD),          # maxAttempts 2
    ("Failed", 1, True, G.DEAD),           # a refused create fails the same way every time
])
def test_member_state(state, attempt, rejected, expected):
    latest = None if state is None else job("target", "0", state, attempt=attempt)
    if rejected:
        latest = dataclasses.replace(latest, rejected=True)
    assert G.member_state(latest, max_attempts=2) == expected


@pytest.mark.parametrize("own, needed, state, ready", [
    (None, G.DONE, G.MISSING, True),
    (None, G.RUNNING, G.MISSING, False),       # waits
    (None, G.RETRY, G.MISSING, False),
    (None, G.DEAD, G.BLOCKED, False),          # cannot run
    (None, G.BLOCKED, G.BLOCKED, False),
    ("Succeeded", G.DEAD, G.DONE, False),      # what finished stays finished
])
def test_a_member_waits_for_what_it_needs(own, needed, state, ready):
    n = G.Node("target", "0", None if own is None else tgt(0, own), max_attempts=2)
    n.needs(needed)
    assert (n.state, n.ready) == (state, ready)


def states(graph: G.Graph) -> dict[str, str]:
    return {f"{n.stage}/{n.member}": n.state for n in graph.nodes}


@pytest.mark.parametrize("jobs, hits, expected, possible, avg_ready", [
    # fresh: every member missing; targets wait for the LP
    ((), (), {"linear-probe/0": G.MISSING, "aux/pacs-0": G.MISSING, "target/1": G.MISSING}, 6, False),
    # a cache hit is DONE without a Job
    ((lp(),), ("pacs-0",), {"aux/pacs-0": G.DONE, "aux/pacs-1": G.MISSING}, 6, False),
    # the LP failed for good: every target is BLOCKED, none may still succeed
    ((lp("Failed", attempt=2),), (), {"linear-probe/0": G.DEAD, "target/0": G.BLOCKED}, 0, False),
    # pacs-1 failed for good: only its target (4) is BLOCKED
    ((lp(), aux("pacs-0"), aux("pacs-1", "Failed", attempt=2)), (),
     {"target/4": G.BLOCKED, "target/1": G.MISSING}, 5, False),
    # every target finished: the average may start
    ((lp(), aux("pacs-0"), aux("pacs-1")) + tuple(tgt(i) for i in range(6)), (),
     {"target/5": G.DONE, "average/0": G.MISSING}, 0, True),
])
def test_build_graph(jobs, hits, expected, possible, avg_ready):
    keys = frozenset(G.aux_entry(SPEC, SPEC.auxiliaries[1], int(h[-1])).key for h in hits)
    graph = G.build_graph(SPEC, G.index_children(jobs).latest, keys, G.initialization_sources(SPEC))
    got = states(graph)
    assert {k: got[k] for k in expected} == expected
    assert (graph.possible, graph.avg.ready) == (possible, avg_ready)


def test_index_children_keeps_the_latest_attempt():
    children = G.index_children([tgt(0, "Failed", attempt=1), tgt(0, "Active", attempt=2), lp()])
    assert children.latest[("target", "0")].attempt == 2
    assert [j.attempt for j in children.in_flight] == [2]
    assert len(children.names) == 3
