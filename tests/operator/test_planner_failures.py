"""Planner tables for the failure paths (issue 11): pods that never start (podStartTimeoutSeconds),
creates the API server refused, attempts remembered in status.attempts when their Jobs are gone,
and the Warning Events that say why. Pure: what the adapter saw comes in as ObservedJob fields."""
from __future__ import annotations

import dataclasses

from ratatouille_operator import planner as P
from tests.operator.test_planner import RUN, SPEC, aux, cond, creates, lp, make_spec, observed, tgt

NOW = 10_000.0
PULL = 'Back-off pulling image "nope:1"'


def pending_lp(since: float, reason: str | None = "ImagePullBackOff", message: str | None = PULL, attempt: int = 1):
    return dataclasses.replace(lp("Pending", attempt=attempt), reason=reason, message=message, pending_since=since)


def deletes(plan: P.Plan) -> list[tuple[str, str]]:
    return [(a.name, a.reason) for a in plan.actions if isinstance(a, P.DeleteJob)]


def warnings(plan: P.Plan) -> list[str]:
    return [e.reason for e in plan.events if e.type == "Warning"]


def test_a_pending_pod_with_a_waiting_reason_is_shown_and_said_once_per_problem():
    first = P.plan(RUN, SPEC, observed(pending_lp(NOW - 5, "ErrImagePull", "pull access denied")), NOW)
    entry = first.status["jobs"][0]
    assert (entry["state"], entry["reason"], entry["message"]) == ("Pending", "ErrImagePull", "pull access denied")
    assert warnings(first) == ["ErrImagePull"]
    # The kubelet alternates ErrImagePull and ImagePullBackOff: one problem, no new Event.
    again = P.plan(RUN, SPEC, observed(pending_lp(NOW - 5)), NOW + 1, previous_status=first.status)
    assert warnings(again) == []
    # A different reason is news.
    other = P.plan(RUN, SPEC, observed(pending_lp(NOW - 5, "CreateContainerConfigError", 'secret "s" not found')),
                   NOW + 2, previous_status=again.status)
    assert warnings(other) == ["CreateContainerConfigError"]
    # A pod on its way (ContainerCreating) is no problem: no message, no Event.
    benign = P.plan(RUN, SPEC, observed(pending_lp(NOW - 5, "ContainerCreating", "")), NOW)
    assert warnings(benign) == [] and "message" not in benign.status["jobs"][0]


def test_a_pod_that_does_not_start_in_time_fails_its_attempt_and_the_next_one_starts():
    timeout = SPEC.failure_policy.pod_start_timeout_seconds
    assert timeout == 300  # the default
    waiting = P.plan(RUN, SPEC, observed(pending_lp(NOW - timeout + 20)), NOW)
    assert deletes(waiting) == [] and waiting.requeue_after == 20
    late = P.plan(RUN, SPEC, observed(pending_lp(NOW - timeout), *[aux("pacs-0"), aux("pacs-1")]), NOW,
                  previous_status=waiting.status)
    assert deletes(late) == [("office-lp-0-a1", "PodStartTimeout")]
    entry = late.status["attempts"]["linear-probe/0"]
    assert (entry["attempt"], entry["state"], entry["reason"]) == (1, "Failed", "ImagePullBackOff")
    assert entry["message"].startswith("the pod did not start within podStartTimeoutSeconds=300: Back-off")
    assert "PodStartTimeout" in warnings(late)
    # It counts as a failed attempt: the next one after retryBackoffSeconds (10), the Job gone.
    assert creates(late) == [] and late.requeue_after == 10
    retry = P.plan(RUN, SPEC, observed(aux("pacs-0"), aux("pacs-1")), NOW + 10, previous_status=late.status)
    assert creates(retry) == [("linear-probe", "0", 2)] and "Retrying" in warnings(retry)


def test_the_last_attempt_timing_out_fails_the_run_with_the_pods_reason():
    spec = make_spec(failurePolicy={"maxAttempts": 1, "minSucceeded": 1, "podStartTimeoutSeconds": 60})
    p = P.plan(RUN, spec, observed(pending_lp(NOW - 61, "Unschedulable", "0/1 nodes are available")), NOW)
    assert p.status["phase"] == "Failed"
    failed = cond(p.status, "Failed")
    assert failed["reason"] == "LinearProbeFailed" and "Unschedulable" in failed["message"]
    assert "0/1 nodes are available" in failed["message"]
    assert deletes(p) == [("office-lp-0-a1", "PodStartTimeout")]


def test_zero_means_no_pod_start_timeout():
    spec = make_spec(failurePolicy={"maxAttempts": 2, "minSucceeded": 1, "podStartTimeoutSeconds": 0})
    p = P.plan(RUN, spec, observed(pending_lp(NOW - 100_000)), NOW)
    assert deletes(p) == [] and p.status["phase"] != "Failed"


def test_a_timed_out_attempt_still_seen_in_flight_stays_failed_and_is_deleted_again():
    late = P.plan(RUN, SPEC, observed(pending_lp(NOW - 400)), NOW)
    # The next reconcile still sees the Job (its deletion is not visible yet), now a fresher pod.
    again = P.plan(RUN, SPEC, observed(pending_lp(NOW)), NOW + 1, previous_status=late.status)
    assert deletes(again) == [("office-lp-0-a1", "PodStartTimeout")]
    assert again.status["attempts"]["linear-probe/0"]["state"] == "Failed"


def test_a_refused_create_fails_the_member_at_once_with_a_condition_and_no_retry():
    refused = dataclasses.replace(lp("Failed", finish=NOW), reason="Invalid", rejected=True,
                                  message="spec.template.spec.containers[0].resources.requests: Invalid value")
    p = P.plan(RUN, SPEC, observed(refused, aux("pacs-0"), aux("pacs-1")), NOW)
    assert creates(p) == []  # maxAttempts is 2, but the server would refuse it again
    assert p.status["phase"] == "Failed" and cond(p.status, "Failed")["reason"] == "LinearProbeFailed"
    rejected = cond(p.status, "JobsRejected")
    assert rejected["status"] == "True" and "Invalid value" in rejected["message"]
    assert "CreateRejected" in warnings(p)
    assert p.status["attempts"]["linear-probe/0"]["rejected"] is True


def test_remembered_attempts_stand_in_for_jobs_that_are_gone():
    first = P.plan(RUN, SPEC, observed(lp(), aux("pacs-0"), aux("pacs-1"), tgt(0, "Failed", finish=NOW - 100)), NOW)
    assert first.status["attempts"]["linear-probe/0"] == {"attempt": 1, "state": "Succeeded"}
    assert ("target", "0", 2) in creates(first)
    # Every finished Job was deleted (a TTL); target/0 attempt 2 runs.
    running = tgt(0, "Active", attempt=2)
    again = P.plan(RUN, SPEC, observed(running), NOW + 1, previous_status=first.status)
    assert ("linear-probe", "0", 1) not in creates(again) and ("target", "0", 1) not in creates(again)
    assert not any(c[:2] in {("aux", "pacs-0"), ("aux", "pacs-1"), ("target", "0")} for c in creates(again))
    assert again.status["progress"] == first.status["progress"]
    assert again.status["attempts"]["target/0"]["attempt"] == 1
    # Attempt 2 fails and is deleted too: the budget (maxAttempts=2) is spent, target/0 is dead.
    gone = P.plan(RUN, SPEC, observed(tgt(0, "Failed", attempt=2, finish=NOW + 2)), NOW + 3,
                  previous_status=again.status)
    assert gone.status["attempts"]["target/0"]["attempt"] == 2
    final = P.plan(RUN, SPEC, observed(), NOW + 4, previous_status=gone.status)
    assert final.status["stages"]["target"]["failed"] == 1
    assert ("target", "0", 1) not in creates(final) and ("target", "0", 3) not in creates(final)
