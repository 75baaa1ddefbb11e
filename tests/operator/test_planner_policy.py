"""Policy (planning/policy.py) as tables, one rule each: the pod start timeout, the outcome ladder
(preparation, linear probe, minSucceeded, averaging, deadline), suspend and release, retries with
backoff, the parallelism budget, and when to plan again."""
from __future__ import annotations

import dataclasses

import pytest

from ratatouille_operator.planning import graph as G
from ratatouille_operator.planning import policy as Pol
from ratatouille_operator.planning.vocabulary import ObservedJob

from .test_planner import RUN, SPEC, aux, job, lp, make_spec, tgt

READY = (lp(), aux("pacs-0"), aux("pacs-1"))


def graph_of(jobs, spec=SPEC) -> G.Graph:
    return G.build_graph(spec, G.index_children(jobs).latest, frozenset(), G.initialization_sources(spec))


def pending(name="p", since=None, **kw) -> ObservedJob:
    return ObservedJob(name=name, stage="target", member="0", attempt=1, state="Pending", pending_since=since, **kw)


@pytest.mark.parametrize("timeout, since, now, failed", [
    (0, 0.0, 10_000.0, False),         # no timeout
    (300, None, 10_000.0, False),      # not known since when: no timeout
    (300, 1000.0, 1299.0, False),
    (300, 1000.0, 1300.0, True),
])
def test_pod_start_timeout(timeout, since, now, failed):
    spec = make_spec(failurePolicy={"maxAttempts": 2, "minSucceeded": 1, "podStartTimeoutSeconds": timeout})
    kept, expired = Pol.timed_out([pending(since=since, reason="ErrImagePull")], spec, now)
    assert (kept[0].state == "Failed", len(expired) == 1) == (failed, failed)
    if failed:
        assert kept[0].reason == "ErrImagePull" and "podStartTimeoutSeconds=300" in kept[0].message


@pytest.mark.parametrize("jobs, now, outcome, reason", [
    ((), 1000.0, None, None),
    (READY + tuple(tgt(i) for i in range(6)) + (job("average", "0"),), 1000.0, "Succeeded", None),
    ((lp("Failed", attempt=2),), 1000.0, "Failed", "LinearProbeFailed"),
    # 5 of 6 targets failed for good: fewer than minSucceeded=2 may succeed
    (READY + tuple(tgt(i, "Failed", attempt=2) for i in range(5)), 1000.0, "Failed", "MinSucceededNotMet"),
    (READY + tuple(tgt(i, "Failed", attempt=2) for i in range(4)), 1000.0, None, None),
    (READY + tuple(tgt(i) for i in range(6)) + (job("average", "0", "Failed", attempt=2),), 1000.0,
     "Failed", "AveragingFailed"),
])
def test_outcome(jobs, now, outcome, reason):
    got, failure = Pol.outcome(RUN, SPEC, graph_of(jobs), now)
    assert (got, failure[0] if failure else None) == (outcome, reason)


@pytest.mark.parametrize("deadline, now, reason", [
    (0, 10**9, None), (600, 1599.0, None), (600, 1600.0, "DeadlineExceeded")])   # created at 1000
def test_the_deadline_is_the_last_rung(deadline, now, reason):
    spec = make_spec(activeDeadlineSeconds=deadline)
    assert (Pol.failure(RUN, spec, graph_of((), spec), now) or (None,))[0] == reason


def test_success_wins_over_the_deadline():
    spec = make_spec(activeDeadlineSeconds=1)
    done = READY + tuple(tgt(i) for i in range(6)) + (job("average", "0"),)
    assert Pol.outcome(RUN, spec, graph_of(done, spec), 10**9) == ("Succeeded", None)


def flight(name, state="Active", held=False, queued=False):
    return dataclasses.replace(pending(name), state=state, held=held, queued=queued)


@pytest.mark.parametrize("suspend, job_, prev_phase, queue, expected", [
    (True, flight("a"), None, None, [("a", True)]),                                    # hold
    (True, flight("a", "Suspended", held=True), None, None, []),                       # already held
    (True, flight("a", "Suspended", queued=True), None, None, [("a", True)]),          # Kueue's: hold too
    (False, flight("a", "Suspended", held=True), None, None, [("a", False)]),          # release ours
    (False, flight("a", "Suspended"), None, None, []),                                 # someone else's
    (False, flight("a", "Suspended"), "Suspended", None, [("a", False)]),              # held before `held`
    (False, flight("a", "Suspended"), "Suspended", "q", []),                           # ... unless Kueue's
    (False, flight("a"), None, None, []),
])
def test_suspend_and_release(suspend, job_, prev_phase, queue, expected):
    spec = make_spec(suspend=suspend, **({"queueName": queue} if queue else {}))
    got = Pol.suspend_actions(spec, [job_], prev_phase)
    assert [(a.name, a.suspend) for a in got] == expected


@pytest.mark.parametrize("finish, attempt, backoff, due", [
    (None, 1, 10, None),          # finish unknown: at once
    (2000.0, 1, 10, 2010.0),
    (2000.0, 2, 10, 2020.0),      # doubling per failed attempt
    (2000.0, 3, 0, 2000.0),
])
def test_retry_due(finish, attempt, backoff, due):
    spec = make_spec(failurePolicy={"maxAttempts": 5, "minSucceeded": 1, "retryBackoffSeconds": backoff})
    node = G.Node("target", "0", tgt(0, "Failed", attempt=attempt, finish=finish), max_attempts=5)
    assert Pol.retry_due(node, spec) == due


@pytest.mark.parametrize("parallelism, in_flight, created", [(8, 0, 3), (2, 0, 2), (3, 2, 1), (2, 2, 0)])
def test_the_parallelism_budget(parallelism, in_flight, created):
    spec = make_spec(parallelism=parallelism)
    running = tuple(flight(f"x{i}") for i in range(in_flight))
    children = G.Children({}, frozenset(), running)
    got = Pol.create_actions(RUN, spec, graph_of((), spec), children, G.initialization_sources(spec), 1000.0)
    assert len(got.actions) == created


@pytest.mark.parametrize("now, creates, waits", [
    (1005.0, [], [5.0]),                         # failed at 1000, backoff 10: wait
    (1010.0, [("target", "0", 2)], []),          # due: attempt 2, with a Retrying Event
])
def test_a_retry_waits_out_its_backoff(now, creates, waits):
    jobs = READY + (tgt(0, "Failed", attempt=1, finish=1000.0),)
    children = G.index_children(jobs)
    graph = graph_of(jobs)
    got = Pol.create_actions(RUN, SPEC, graph, children, G.initialization_sources(SPEC), now)
    assert [(a.stage, a.member, a.attempt) for a in got.actions if a.stage == "target" and a.member == "0"] == creates
    assert got.waits == waits
    assert [e.reason for e in got.events] == (["Retrying"] if creates else [])


def test_an_observed_child_is_never_created_again():
    jobs = READY
    children = dataclasses.replace(G.index_children(jobs), names=frozenset({"office-target-0-a1"}))
    got = Pol.create_actions(RUN, SPEC, graph_of(jobs), children, G.initialization_sources(SPEC), 1000.0)
    assert "office-target-0-a1" not in [a.name for a in got.actions] and len(got.actions) == 5


@pytest.mark.parametrize("deadline, timeout, since, now, waits", [
    (0, 0, 1000.0, 1100.0, []),
    (600, 0, None, 1100.0, [500.0]),
    (0, 300, 1000.0, 1100.0, [200.0]),
    (600, 300, None, 1100.0, [500.0]),           # a pending pod not known since when: no timer
])
def test_timers(deadline, timeout, since, now, waits):
    spec = make_spec(activeDeadlineSeconds=deadline,
                     failurePolicy={"maxAttempts": 2, "minSucceeded": 1, "podStartTimeoutSeconds": timeout})
    assert Pol.timers(RUN, spec, [pending(since=since)], now) == waits


@pytest.mark.parametrize("waits, expected", [([], None), ([5.0, 2.0], 2.0), ([-3.0, 2.0], 0.0)])
def test_requeue_after_the_soonest_wait(waits, expected):
    assert Pol.requeue_after(waits) == expected
