"""Policy: what the run does about its graph, one rule per function (the way jobset keeps one
policy per file).

- `timed_out`: failurePolicy.podStartTimeoutSeconds turns a pod that does not start into a
  failed attempt;
- `outcome`: success, or the first failure of the ladder (data preparation, linear probe,
  minSucceeded, averaging, activeDeadlineSeconds);
- `suspend_actions`: `spec.suspend` holds every in-flight Job, and releases only what it held;
- `create_actions`: what is missing or may retry is created, within `parallelism` (the budget),
  after failurePolicy.retryBackoffSeconds doubling per attempt, never twice;
- `timers`: when to plan again (backoff, deadline, pod start timeout).
Pure: standard library, `spec` and the other planning steps.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

from ..spec import RunSpec
from .describe import describe
from .graph import DEAD, DONE, MISSING, RETRY, Children, Graph, Node, Source
from .naming import job_labels, job_name
from .vocabulary import (FAILED, PENDING, PHASE_FAILED, PHASE_SUCCEEDED, PHASE_SUSPENDED, PREPARE_TARGET,
                         REASON_AVG_FAILED, REASON_DEADLINE, REASON_LP_FAILED, REASON_MIN_SUCCEEDED,
                         REASON_POD_START_TIMEOUT, REASON_PREPARE_FAILED, STAGE_AVERAGE, SUSPENDED,
                         CreateJob, Event, ObservedJob, RunRef, SetSuspend, why)


def timed_out(jobs: Iterable[ObservedJob], spec: RunSpec, now: float) -> tuple[list[ObservedJob], list[ObservedJob]]:
    """Pending attempts past failurePolicy.podStartTimeoutSeconds become Failed ones (returned
    second, as they were seen); the rest pass through."""
    timeout = spec.failure_policy.pod_start_timeout_seconds
    kept, expired = [], []
    for j in jobs:
        if (timeout > 0 and j.state == PENDING and j.pending_since is not None
                and now - j.pending_since >= timeout):
            expired.append(j)
            detail = f"the pod did not start within podStartTimeoutSeconds={timeout}"
            kept.append(ObservedJob(name=j.name, stage=j.stage, member=j.member, attempt=j.attempt, state=FAILED,
                                    start_time=j.start_time, finish_time=now,
                                    reason=j.reason or REASON_POD_START_TIMEOUT,
                                    message=f"{detail}: {j.message}" if j.message else detail))
        else:
            kept.append(j)
    return kept, expired


def failure(run: RunRef, spec: RunSpec, graph: Graph, now: float) -> tuple[str, str] | None:
    """(reason, message) of the first failure of the ladder, or None while the run can go on."""
    fp = spec.failure_policy
    prep, lp, avg = graph.prep.get(PREPARE_TARGET), graph.lp, graph.avg
    succeeded, possible = len(graph.succeeded), graph.possible
    if prep is not None and prep.state == DEAD:
        return (REASON_PREPARE_FAILED, f"preparing {spec.target.dataset} failed {prep.latest.attempt}"
                f" attempt(s) (last: {why(prep.latest)}); nothing can train without it")
    if lp.state == DEAD:
        return (REASON_LP_FAILED, f"the linear probe failed {lp.latest.attempt} attempt(s)"
                f" (last: {why(lp.latest)}); no target fine-tuning can start")
    if succeeded + possible < fp.min_succeeded:
        return (REASON_MIN_SUCCEEDED,
                f"{succeeded} target fine-tunings succeeded, {graph.failed_targets} failed permanently"
                f" and {possible} may still succeed: fewer than minSucceeded={fp.min_succeeded}")
    if avg.state == DEAD:
        return (REASON_AVG_FAILED, f"the averaging Job failed {avg.latest.attempt} attempt(s)"
                f" (last: {why(avg.latest)})")
    if spec.active_deadline_seconds > 0 and now >= run.creation_time + spec.active_deadline_seconds:
        return (REASON_DEADLINE, f"the run exceeded activeDeadlineSeconds={spec.active_deadline_seconds}")
    return None


def outcome(run: RunRef, spec: RunSpec, graph: Graph, now: float) -> tuple[str | None, tuple[str, str] | None]:
    """(Succeeded | Failed | None while running, the failure's (reason, message) or None):
    success first, then failures, then the deadline."""
    if graph.avg.state == DONE:
        return PHASE_SUCCEEDED, None
    failed = failure(run, spec, graph, now)
    return (PHASE_FAILED if failed else None), failed


def suspend_actions(spec: RunSpec, in_flight: Sequence[ObservedJob], prev_phase: str | None) -> list[SetSuspend]:
    """`spec.suspend`: hold every in-flight Job, a queued one waiting for quota too (else Kueue
    would admit it). Otherwise release what the run holds, and only that: a Job suspended by
    someone else (Kueue waiting for quota, or managing every Job of the namespace) is theirs to
    start. (Jobs held by an operator older than the `held` annotation: those of a run that was
    Suspended, when Kueue does not manage them.)"""
    if spec.suspend:
        return [SetSuspend(j.name, True, j.queued) for j in in_flight if not j.held or j.state != SUSPENDED]
    return [SetSuspend(j.name, False, j.queued) for j in in_flight
            if j.held or (j.state == SUSPENDED and prev_phase == PHASE_SUSPENDED and not j.queued
                          and not spec.queue_name)]


def retry_due(node: Node, spec: RunSpec) -> float | None:
    """When a failed member's next attempt may start: retryBackoffSeconds doubling per failed
    attempt after its finish (None: at once, its finish time is not known)."""
    last = node.latest
    if last is None or last.finish_time is None:
        return None
    return last.finish_time + spec.failure_policy.retry_backoff_seconds * 2 ** (last.attempt - 1)


class Creation(NamedTuple):
    actions: list[CreateJob]
    events: list[Event]
    waits: list[float]      # seconds until a backoff ends


def create_actions(run: RunRef, spec: RunSpec, graph: Graph, children: Children, sources: Sequence[Source],
                   now: float) -> Creation:
    """Create what is missing or may retry and is ready, in graph order, at most `parallelism`
    in flight; a retry waits out its backoff; an observed child is never re-created."""
    out = Creation([], [], [])
    budget = spec.parallelism - len(children.in_flight)
    for n in graph.nodes:
        if n.state not in (MISSING, RETRY) or not n.ready:
            continue
        attempt = 1 if n.state == MISSING else n.latest.attempt + 1
        due = retry_due(n, spec) if n.state == RETRY else None
        if due is not None and now < due:
            out.waits.append(due - now)
            continue
        name = job_name(run.name, n.stage, n.member, attempt)
        if budget <= 0 or name in children.names:
            continue
        desc = describe(spec, run, n.stage, n.member, graph.succeeded if n.stage == STAGE_AVERAGE else (),
                        _sources=sources)
        out.actions.append(CreateJob(name=name, stage=n.stage, member=n.member, attempt=attempt,
                                     labels=job_labels(spec, run, n.stage, n.member, attempt), description=desc))
        budget -= 1
        if attempt > 1:
            out.events.append(Event("Warning", "Retrying",
                                    f"{n.stage}/{n.member} attempt {n.latest.attempt} failed ({why(n.latest)}):"
                                    f" starting attempt {attempt} of {spec.failure_policy.max_attempts}"))
    return out


def timers(run: RunRef, spec: RunSpec, in_flight: Iterable[ObservedJob], now: float) -> list[float]:
    """Seconds until the deadline and until each pending pod's start timeout."""
    waits = []
    if spec.active_deadline_seconds > 0:
        waits.append(run.creation_time + spec.active_deadline_seconds - now)
    timeout = spec.failure_policy.pod_start_timeout_seconds
    if timeout > 0:
        waits += [j.pending_since + timeout - now for j in in_flight
                  if j.state == PENDING and j.pending_since is not None]
    return waits


def requeue_after(waits: Iterable[float]) -> float | None:
    """The soonest of the waits (never negative), None when there is none."""
    waits = [max(w, 0.0) for w in waits]
    return min(waits) if waits else None
