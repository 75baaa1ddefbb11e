"""The planner: one pure function from (run, spec, observed child Jobs, now) to (actions, status).

Level-based, like kubernetes-sigs/jobset: every call recomputes the whole job graph from what it
is given and walks a short ladder (terminal -> failures -> success -> suspend -> create what is
missing). Child names are deterministic, so "should I create it" is a set-membership test and
planning twice on the same input yields the same actions. The kopf operator and the local
executor are adapters around `plan()`; nothing here reads a clock, touches the network or keeps
state between calls. Pure: stdlib, `spec`, and the contract (`ratatouille_contract`) only.

`plan()` composes the steps of the `planning` package, one decision per module:
`planning.naming` (names, labels, members' outputs, the auxiliary cache entries; the keys
themselves are built by `ratatouille_contract.layout`), `planning.graph`
(sources, members and their states), `planning.describe` (job descriptions),
`planning.policy` (pod start timeout, outcome, suspend, retries with backoff, the parallelism
budget, when to plan again), `planning.status` and `planning.events` (what the run reports).
This module keeps the names the adapters and tests import.
"""
from __future__ import annotations

from typing import Mapping

# The steps, and the names the adapters and tests import from here (re-exported on purpose).
from .planning.describe import describe
from .planning.events import child_events, phase_events
from .planning.graph import (NO_SOURCE, Source, build_graph, has_source, index_children,
                             initialization_sources, job_graph, target_source)
from .planning.naming import (AuxEntry, aux_cache_key, aux_entries, aux_hyperparameters, aux_member, job_labels,
                              job_name, label_value, member_output, prepare_members, target_hyperparameters)
from .planning import policy
from .planning.status import (REASON_INVALID_SPEC, frozen, invalid, phase_of, refused, remembered_jobs,
                              result as _result, status as _status, with_remembered)
from .planning.vocabulary import (  # the vocabulary of the planner's inputs and outputs
    ACTIVE, AUX_HOLDOUT_FRACTION, AVERAGE_MEMBER, BENIGN_WAITING, FAILED, FOUNDATION, IN_FLIGHT, JOB_STATES,
    LABEL_ATTEMPT, LABEL_KUEUE_QUEUE, LABEL_MANAGED_BY, LABEL_MEMBER, LABEL_RUN, LABEL_RUN_UID, LABEL_STAGE,
    LP_MEMBER, MANAGED_BY, MAX_STATUS_JOBS, MAX_STATUS_MESSAGE, PENDING, PHASE_AUX, PHASE_AVERAGING, PHASE_FAILED,
    PHASE_PENDING, PHASE_SUCCEEDED, PHASE_SUSPENDED, PHASE_TARGET, PREPARE_TARGET, REASON_AVG_FAILED,
    REASON_CREATE_REJECTED, REASON_DEADLINE, REASON_LP_FAILED, REASON_MIN_SUCCEEDED, REASON_POD_START_TIMEOUT,
    REASON_PREPARE_FAILED, SHORT, STAGE_AUX, STAGE_AVERAGE, STAGE_LP, STAGE_PREPARE, STAGE_TARGET, STAGES,
    SUCCEEDED, SUSPENDED, TERMINAL_PHASES, CreateJob, DeleteJob, Event, Observed, ObservedJob, Plan, RunRef,
    SetSuspend, format_time, parse_time)
from .spec import RunSpec, SpecError


def plan(run: RunRef, spec: RunSpec, observed: Observed, now: float,
         previous_status: Mapping | None = None) -> Plan:
    prev = dict(previous_status or {})
    prev_phase = prev.get("phase")

    # 1. The children: the attempts the run remembers stand in for Jobs that are gone; attempts
    # whose pod did not start in time fail, and their Jobs (now or from an earlier reconcile
    # whose delete is not visible yet) are deleted.
    jobs, expired = policy.timed_out(with_remembered(run, observed.jobs, prev), spec, now)
    state_now = {j.name: j.state for j in jobs}
    overdue = [o for o in observed.jobs if o.state in IN_FLIGHT and state_now.get(o.name) == FAILED]
    if prev_phase in TERMINAL_PHASES:
        return frozen(run, prev, index_children(observed.jobs).in_flight)
    observed = Observed(jobs=tuple(jobs), cache_hits=observed.cache_hits, member_metrics=observed.member_metrics)
    children = index_children(observed.jobs)
    if not has_source(spec.include_foundation, spec.auxiliaries):
        # validation refuses this; the planner still never crashes on it and creates nothing.
        return invalid(run, prev, now, str(SpecError("spec.includeFoundation", NO_SOURCE)))
    sources = initialization_sources(spec)

    # 2. The graph with each member's state; 3. the outcome and what to do about it.
    graph = build_graph(spec, children.latest, observed.cache_hits, sources)
    outcome, failure = policy.outcome(run, spec, graph, now)
    actions: list = [DeleteJob(j.name, REASON_POD_START_TIMEOUT) for j in overdue]
    events: list = []
    waits = policy.timers(run, spec, children.in_flight, now)
    if failure is not None:
        actions += [DeleteJob(j.name, failure[0]) for j in children.in_flight]
    elif outcome is None:
        actions += policy.suspend_actions(spec, children.in_flight, prev_phase)
    if outcome is None and not spec.suspend:
        created = policy.create_actions(run, spec, graph, children, sources, now)
        actions += created.actions
        events += created.events
        waits += created.waits

    # 4. Phase, status and Events.
    phase = phase_of(spec, graph, outcome)
    status = _status(run, spec, observed, now, prev, phase, failure, graph)
    events = child_events(run, prev, observed.jobs, expired) + events
    events += phase_events(spec, prev, prev_phase, phase, failure, status, observed)
    return Plan(actions=tuple(actions), status=status, events=tuple(events),
                requeue_after=policy.requeue_after(waits) if outcome is None else None)
