"""Status and Events (planning/status.py, planning/events.py) as tables: the phase, whether a
status says the spec was refused, RFC 3339 time, the best single member, the stage counts and
the Events of what is new."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ratatouille_operator.planning import events as E
from ratatouille_operator.planning import graph as G
from ratatouille_operator.planning import status as S
from ratatouille_operator.planning.vocabulary import Observed, format_time, parse_time
from ratatouille_contract.jobdesc import best_member

from .test_planner import RUN, SPEC, aux, job, lp, make_spec, tgt

READY = (lp(), aux("pacs-0"), aux("pacs-1"))


def graph_of(jobs, spec=SPEC) -> G.Graph:
    return G.build_graph(spec, G.index_children(jobs).latest, frozenset(), G.initialization_sources(spec))


@pytest.mark.parametrize("jobs, outcome, suspend, phase", [
    ((), "Failed", False, "Failed"),                              # the outcome first
    ((), None, True, "Suspended"),
    ((), None, False, "Pending"),                                 # no child yet
    ((lp("Active"),), None, False, "Auxiliary"),
    (READY, None, False, "Target"),
    (READY + tuple(tgt(i) for i in range(6)), None, False, "Averaging"),
    ((lp("Failed", attempt=2),), None, False, "Averaging"),       # no target may still finish
])
def test_phase(jobs, outcome, suspend, phase):
    spec = make_spec(suspend=suspend)
    assert S.phase_of(spec, graph_of(jobs, spec), outcome) == phase


def accepted(status, reason):
    return {"conditions": [{"type": "Accepted", "status": status, "reason": reason}]}


@pytest.mark.parametrize("status, reasons, expected", [
    (None, ("InvalidSpec",), False),
    ({}, ("InvalidSpec",), False),
    (accepted("True", "SpecValid"), ("InvalidSpec",), False),
    (accepted("False", "InvalidSpec"), ("InvalidSpec",), True),
    (accepted("False", "NotAllowed"), ("InvalidSpec",), False),
    (accepted("False", "NotAllowed"), ("InvalidSpec", "NotAllowed"), True),
    ({"conditions": ["junk", {"type": "Failed", "status": "False", "reason": "InvalidSpec"}]},
     ("InvalidSpec",), False),
])
def test_refused(status, reasons, expected):
    assert S.refused(status, reasons) is expected


@pytest.mark.parametrize("text, epoch", [
    ("2026-12-03T22:11:49Z", 1796335909.0),
    ("2026-12-03T22:11:49.500Z", 1796335909.5),
    ("2026-12-03T23:11:49+01:00", 1796335909.0),
    ("2026-12-03T22:11:49", 1796335909.0),      # no zone: UTC
    ("", None), (None, None), ("yesterday", None),
])
def test_parse_time(text, epoch):
    assert parse_time(text) == epoch


@pytest.mark.parametrize("epoch, text", [(0.0, "1970-01-01T00:00:00Z"), (1796335909.9, "2026-12-03T22:11:49Z")])
def test_format_time_round_trips(epoch, text):
    assert format_time(epoch) == text
    assert parse_time(text) == float(int(epoch))


@pytest.mark.parametrize("scores, best", [
    ({}, None),
    ({"0": None, "1": "n/a"}, None),                  # no number: no candidate
    ({"0": 0.5, "1": 0.7, "2": 0.6}, "1"),
    ({"10": 0.7, "2": 0.7}, "2"),                     # a tie goes to the first in natural order
    ({"1": True, "2": 0.1}, "2"),                     # a bool is not an accuracy
    ({"1": float("nan"), "2": 0.1}, "2"),
])
def test_best_member(scores, best):
    assert best_member(scores) == best


@pytest.mark.parametrize("reported, members, expected", [
    # what the average stage reported wins
    ({"member": "3", "valAccuracy": 0.9}, {"0": 0.95}, {"member": "3", "valAccuracy": "0.900"}),
    # else the best of the members' own metrics
    (None, {"0": 0.5, "1": 0.8}, {"member": "1", "valAccuracy": "0.800", "testAccuracy": {"art": "0.100"}}),
    (None, {}, None),
])
def test_best_single(reported, members, expected):
    metrics = {f"target/{i}": {"valAccuracy": v, "testAccuracy": {"art": 0.1}} for i, v in members.items()}
    observed = Observed(member_metrics=metrics)
    avg = {"bestSingle": reported} if reported else {}
    assert S.best_single(observed, avg, [int(i) for i in members]) == expected


@pytest.mark.parametrize("jobs, counts", [
    ((), {"total": 6, "active": 0, "succeeded": 0, "failed": 0}),
    (READY + (tgt(0, "Active"), tgt(1), tgt(2, "Failed", attempt=2)),
     {"total": 6, "active": 1, "succeeded": 1, "failed": 1}),
    ((lp("Failed", attempt=2),), {"total": 6, "active": 0, "succeeded": 0, "failed": 6}),   # BLOCKED counts
])
def test_stage_counts(jobs, counts):
    assert S.stage_counts(graph_of(jobs).targets) == counts


RETRAINED = replace(aux("pacs-0"), message="the dataset s3://d/pacs changed since it was trained (9 -> 10 objects)")


@pytest.mark.parametrize("before, now, reasons", [
    (None, job("target", "0", "Failed"), ["AttemptFailed"]),
    ({"state": "Failed"}, job("target", "0", "Failed"), []),                  # not new
    (None, job("target", "0", "Pending", reason="ErrImagePull"), ["ErrImagePull"]),
    ({"state": "Pending", "reason": "ErrImagePull"},
     job("target", "0", "Pending", reason="ImagePullBackOff"), []),          # one problem, two names
    (None, job("target", "0", "Pending", reason="ContainerCreating"), []),   # only the way to running
    ({"state": "Active"}, RETRAINED, ["AuxiliaryRetrained"]),                # an aux entry trained again
    ({"state": "Succeeded", "message": "x"}, RETRAINED, []),                   # not new
    ({"state": "Active"}, aux("pacs-0"), []),                                  # trained the first time, or a hit
    ({"state": "Active"}, replace(tgt(0), message="y"), []),                   # only auxiliaries are cached
])
def test_child_events(before, now, reasons):
    prev = {"jobs": [{"name": now.name, **before}]} if before else {}
    assert [e.reason for e in E.child_events(RUN, prev, [now], [])] == reasons


def test_a_retrained_auxiliary_says_why_in_its_event_and_the_status():
    [event] = E.child_events(RUN, {"jobs": [{"name": RETRAINED.name, "state": "Active"}]}, [RETRAINED], [])
    assert event.type == "Normal" and "aux/pacs-0" in event.message and RETRAINED.message in event.message
    [entry] = S.jobs_list(SPEC, Observed(jobs=(RETRAINED,)), {RETRAINED.name})
    assert entry["message"] == RETRAINED.message
