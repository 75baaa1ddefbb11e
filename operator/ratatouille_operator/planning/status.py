"""Status: what the run reports (docs/contract.md, "Status"): its phase, the conditions, the
counts per stage, the most relevant children, the attempts it remembers of Jobs that are gone,
and, once it succeeded, the result (the averaged model, its best single member, diagnostics).
Pure: standard library, `spec` and the other planning steps.
"""
from __future__ import annotations

import json
from typing import Any, Collection, Iterable, Mapping, Sequence

from ratatouille_contract import layout
from ratatouille_contract.jobdesc import best_member

from ..spec import RunSpec
from .graph import BLOCKED, DEAD, DONE, FINISHED, RUNNING, Graph, Node
from .naming import job_name, member_output
from .vocabulary import (ACTIVE, AVERAGE_MEMBER, BENIGN_WAITING, FAILED, IN_FLIGHT, MAX_STATUS_JOBS,
                         PENDING, PHASE_AUX, PHASE_AVERAGING, PHASE_FAILED, PHASE_PENDING, PHASE_SUCCEEDED,
                         PHASE_SUSPENDED, PHASE_TARGET, REASON_CREATE_REJECTED, STAGE_AVERAGE, STAGE_TARGET,
                         SUCCEEDED, SUSPENDED, DeleteJob, Event, Observed, ObservedJob, Plan, RunRef, fmt,
                         fmt_tree, format_time, graph_key, parse_time, short_message, split_key, why)

REASON_INVALID_SPEC = "InvalidSpec"


def refused(status: Mapping | None, reasons: Collection[str] = (REASON_INVALID_SPEC,)) -> bool:
    """Whether a status says the spec was refused (Accepted=False for one of `reasons`): the one
    reading of "this run's spec is invalid", for the planner and the reconciler."""
    return any(c.get("type") == "Accepted" and c.get("status") == "False" and c.get("reason") in reasons
               for c in (status or {}).get("conditions") or [] if isinstance(c, Mapping))


def phase_of(spec: RunSpec, graph: Graph, outcome: str | None) -> str:
    """The run's phase: its outcome, else Suspended, Pending (no child yet), Averaging (no target
    may still finish), Auxiliary (a prepare, auxiliary or the linear probe is not finished), Target."""
    if outcome is not None:
        return outcome
    if spec.suspend:
        return PHASE_SUSPENDED
    if all(n.latest is None for n in graph.nodes):
        return PHASE_PENDING
    if graph.possible == 0:
        return PHASE_AVERAGING
    if any(n.state not in FINISHED for n in [graph.lp, *graph.aux, *graph.prep.values()]):
        return PHASE_AUX
    return PHASE_TARGET


def status(run: RunRef, spec: RunSpec, observed: Observed, now: float, prev: Mapping, phase: str,
           failure: tuple[str, str] | None, graph: Graph) -> dict:
    """The whole status of a run that was planned (docs/contract.md, "Status")."""
    counted = [n for n in graph.nodes if n.counted]
    progress = f"{sum(1 for n in counted if n.state in FINISHED)}/{len(counted)}"
    out: dict[str, Any] = {
        "observedGeneration": run.generation,
        "phase": phase,
        "progress": progress,
        "conditions": conditions(run, spec, observed, now, prev, phase, failure, graph, progress),
        "stages": {"auxiliary": stage_counts(graph.aux), "linearProbe": stage_counts([graph.lp]),
                   "target": stage_counts(graph.targets), "averaging": stage_counts([graph.avg])},
        "jobs": jobs_list(spec, observed, {n.latest.name for n in graph.nodes if n.latest is not None}),
        "attempts": attempts_table(observed.jobs, prev),
        "storagePrefix": layout.run_prefix(spec.storage.uri, run),
    }
    if phase == PHASE_SUCCEEDED:
        out["result"] = result(spec, run, observed, graph.succeeded)
    return out


def conditions(run: RunRef, spec: RunSpec, observed: Observed, now: float, prev: Mapping, phase: str,
               failure: tuple[str, str] | None, graph: Graph, progress: str) -> list[dict]:
    """Accepted, Suspended, Complete, Failed; AveragingCollapsed once averaged; JobsRejected."""
    prev_conds = {c.get("type"): c for c in prev.get("conditions") or [] if isinstance(c, Mapping)}
    gen = run.generation
    suspended, succeeded = phase == PHASE_SUSPENDED, phase == PHASE_SUCCEEDED
    out = [
        condition(prev_conds, "Accepted", True, "SpecValid", "the spec is valid", now, gen),
        condition(prev_conds, "Suspended", suspended, "Suspended" if suspended else "NotSuspended",
                  "spec.suspend is true: child Jobs are suspended" if suspended else "", now, gen),
        condition(prev_conds, "Complete", succeeded, "Succeeded" if succeeded else phase,
                  (f"averaged model at {_average_model(spec, run)}"
                   if succeeded else f"{progress} child Jobs finished"), now, gen),
        condition(prev_conds, "Failed", failure is not None,
                  failure[0] if failure else "NoFailure", failure[1] if failure else "", now, gen),
    ]
    collapse = collapse_condition(prev_conds, observed, now, gen) if succeeded else None
    if collapse is not None:
        out.append(collapse)
    rejected = [n.latest for n in graph.nodes if n.latest is not None and n.latest.rejected]
    if rejected:
        out.append(condition(prev_conds, "JobsRejected", True, REASON_CREATE_REJECTED,
                             "; ".join(f"{j.stage}/{j.member}: {why(j)}" for j in rejected[:5])
                             + (f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""), now, gen))
    return out


# -- what the run remembers of its children (status.attempts) --------------------------------------
# Child Jobs may disappear (a TTL, a user, the operator failing an attempt that never started):
# the latest finished attempt of every member is kept in the run's status, so that attempt
# counts, failures and successes survive without the Job objects.

def remembered_jobs(run: RunRef, previous_status: Mapping | None) -> list[ObservedJob]:
    """The finished attempts recorded in a previous status (`status.attempts`), as ObservedJobs."""
    out = []
    table = (previous_status or {}).get("attempts")
    if not isinstance(table, Mapping):
        return out
    for key, entry in table.items():
        stage, _, member = str(key).partition("/")
        if not member or not isinstance(entry, Mapping) or entry.get("state") not in (SUCCEEDED, FAILED):
            continue
        attempt = entry.get("attempt")
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            continue
        out.append(ObservedJob(name=job_name(run.name, stage, member, attempt), stage=stage, member=member,
                               attempt=attempt, state=entry["state"],
                               finish_time=parse_time(entry.get("finishedAt")),
                               reason=entry.get("reason") or None, message=entry.get("message") or None,
                               rejected=bool(entry.get("rejected"))))
    return out


def with_remembered(run: RunRef, jobs: Iterable[ObservedJob], previous_status: Mapping | None) -> list[ObservedJob]:
    """The observed Jobs plus the remembered finished attempts whose Jobs are gone. A remembered
    finished attempt also wins over the same attempt seen in flight (the operator failed it and
    its deletion is not visible yet)."""
    merged = {j.name: j for j in jobs}
    newest: dict[tuple[str, str], int] = {}
    for j in merged.values():
        newest[(j.stage, j.member)] = max(newest.get((j.stage, j.member), 0), j.attempt)
    for r in remembered_jobs(run, previous_status):
        seen = merged.get(r.name)
        if seen is None and newest.get((r.stage, r.member), 0) <= r.attempt:
            merged[r.name] = r
        elif seen is not None and seen.state in IN_FLIGHT:
            merged[r.name] = r
    return list(merged.values())


def attempts_table(jobs: Iterable[ObservedJob], previous_status: Mapping | None) -> dict[str, dict]:
    """status.attempts: the latest finished attempt of every member (and, merged into the stored
    table, every member ever recorded)."""
    table: dict[str, dict] = {}
    old = (previous_status or {}).get("attempts")
    if isinstance(old, Mapping):
        table.update({str(k): dict(v) for k, v in old.items() if isinstance(v, Mapping)})
    for j in jobs:
        if j.state not in (SUCCEEDED, FAILED):
            continue
        key = f"{j.stage}/{j.member}"
        cur = table.get(key)
        if cur is not None and isinstance(cur.get("attempt"), int) and cur["attempt"] > j.attempt:
            continue
        entry: dict[str, Any] = {"attempt": j.attempt, "state": j.state}
        if j.state == FAILED:
            if j.finish_time is not None:
                entry["finishedAt"] = format_time(j.finish_time)
            if j.reason:
                entry["reason"] = j.reason
            if j.message:
                entry["message"] = short_message(j.message)
            if j.rejected:
                entry["rejected"] = True
        table[key] = entry
    return dict(sorted(table.items(), key=lambda kv: graph_key(*split_key(kv[0]), 0)))


def frozen(run: RunRef, prev: dict, in_flight_jobs: Iterable[ObservedJob]) -> Plan:
    """A finished run keeps its status; a failed one still makes sure no child keeps running."""
    status = json.loads(json.dumps(prev))
    status["observedGeneration"] = run.generation
    actions: tuple = ()
    if prev.get("phase") == PHASE_FAILED:
        reason = next((c.get("reason") for c in prev.get("conditions") or []
                       if c.get("type") == "Failed" and c.get("status") == "True"), None) or "RunFailed"
        actions = tuple(DeleteJob(j.name, reason) for j in in_flight_jobs)
    return Plan(actions=actions, status=status, events=(), requeue_after=None)


def invalid(run: RunRef, prev: Mapping, now: float, message: str) -> Plan:
    """The spec cannot be planned: Accepted=False, nothing created; the Warning once."""
    prev_conds = {c.get("type"): c for c in prev.get("conditions") or [] if isinstance(c, Mapping)}
    accepted = condition(prev_conds, "Accepted", False, REASON_INVALID_SPEC, message, now, run.generation)
    status = {"observedGeneration": run.generation, "phase": prev.get("phase") or PHASE_PENDING,
              "conditions": [accepted]}
    events = () if refused(prev) else (Event("Warning", REASON_INVALID_SPEC, message),)
    return Plan(actions=(), status=status, events=events, requeue_after=None)


def stage_counts(nodes: Sequence[Node]) -> dict[str, int]:
    counted = [n for n in nodes if n.counted]
    return {
        "total": len(counted),
        "active": sum(1 for n in counted if n.state == RUNNING),
        "succeeded": sum(1 for n in counted if n.state == DONE),
        "failed": sum(1 for n in counted if n.state in (DEAD, BLOCKED)),
    }


def condition(prev_conds: Mapping[str, Mapping], ctype: str, value: bool, reason: str, message: str,
               now: float, generation: int) -> dict:
    status = "True" if value else "False"
    old = prev_conds.get(ctype)
    ltt = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": ltt or format_time(now), "observedGeneration": generation}


_STATE_PRIORITY = {ACTIVE: 0, PENDING: 1, SUSPENDED: 2, FAILED: 3, SUCCEEDED: 4}


def jobs_list(spec: RunSpec, observed: Observed, latest_names: set[str]) -> list[dict]:
    """The most relevant children (running first, then failures, then successes, older attempts
    last), at most MAX_STATUS_JOBS, shown in graph order."""
    ranked = sorted(observed.jobs, key=lambda j: (
        _STATE_PRIORITY.get(j.state, 5) + (0 if j.name in latest_names else 10),
        graph_key(j.stage, j.member, j.attempt)))
    chosen = sorted(ranked[:MAX_STATUS_JOBS], key=lambda j: graph_key(j.stage, j.member, j.attempt))
    out = []
    for j in chosen:
        entry: dict[str, Any] = {"name": j.name, "stage": j.stage, "member": j.member,
                                 "attempt": j.attempt, "state": j.state}
        if j.state == SUCCEEDED:
            metrics = observed.member_metrics.get(f"{j.stage}/{j.member}") or {}
            if isinstance(metrics.get("valAccuracy"), (int, float)):
                entry["valAccuracy"] = fmt(metrics["valAccuracy"])
        reason = j.reason
        message = j.message
        if j.state == SUSPENDED and not j.held and not spec.suspend:
            if j.queued or spec.queue_name:
                reason = "WaitingForQuota"
            else:
                reason, message = "SuspendedExternally", ("suspended by another controller, not by this"
                                                          " run: the operator leaves it to them")
        if reason:
            entry["reason"] = reason
        if message and (j.state in (FAILED, SUCCEEDED) or reason == "SuspendedExternally"
                        or (j.state == PENDING and j.reason not in BENIGN_WAITING)):
            entry["message"] = short_message(message)
        out.append(entry)
    return out

def _average_model(spec: RunSpec, run: RunRef) -> str:
    return layout.model_uri(member_output(spec, run, STAGE_AVERAGE, AVERAGE_MEMBER))


def result(spec: RunSpec, run: RunRef, observed: Observed, succeeded: Sequence[int]) -> dict:
    """status.result: the averaged model, how many members it has, its accuracies, the best
    single member and the diagnostics."""
    metrics = observed.member_metrics.get(f"{STAGE_AVERAGE}/{AVERAGE_MEMBER}") or {}
    out: dict[str, Any] = {"model": _average_model(spec, run),
                           "selection": str(metrics.get("selection") or spec.selection),
                           "members": _member_count(spec, metrics, succeeded)}
    if metrics.get("sha256"):
        out["sha256"] = str(metrics["sha256"])
    out.update(_accuracies(metrics))
    best = best_single(observed, metrics, succeeded)
    if best is not None:
        out["bestSingle"] = best
    diagnosed = diagnostics(metrics)
    if diagnosed:
        out["diagnostics"] = diagnosed
    return out


def _member_count(spec: RunSpec, metrics: Mapping[str, Any], succeeded: Sequence[int]) -> int:
    selected, members = metrics.get("selected"), metrics.get("members")
    if isinstance(selected, (list, tuple)):
        return len(selected)
    if isinstance(members, int) and not isinstance(members, bool):
        return members
    if isinstance(members, (list, tuple)) and spec.selection == "uniform":
        return len(members)
    return len(succeeded)


def _accuracies(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`valAccuracy` and `testAccuracy` (per domain) of a metrics.json, as status numbers."""
    out: dict[str, Any] = {}
    if isinstance(metrics.get("valAccuracy"), (int, float)):
        out["valAccuracy"] = fmt(metrics["valAccuracy"])
    if isinstance(metrics.get("testAccuracy"), Mapping):
        out["testAccuracy"] = {str(d): fmt(a) for d, a in metrics["testAccuracy"].items()}
    return out


def best_single(observed: Observed, metrics: Mapping[str, Any], succeeded: Sequence[int]) -> dict | None:
    """status.result.bestSingle: what the average stage reported, else the best of the members'
    own metrics (`jobdesc.best_member`: by validation, as the paper selects)."""
    best = metrics.get("bestSingle")
    if not isinstance(best, Mapping):
        own = {str(i): observed.member_metrics.get(f"{STAGE_TARGET}/{i}") or {} for i in succeeded}
        top = best_member({i: m.get("valAccuracy") for i, m in own.items()})
        if top is None:
            return None
        best = {"member": top, "valAccuracy": own[top]["valAccuracy"],
                "testAccuracy": own[top].get("testAccuracy") or {}}
    out: dict[str, Any] = {"member": str(best.get("member", ""))}
    if best.get("valAccuracy") is not None:
        out["valAccuracy"] = fmt(best["valAccuracy"])
    if isinstance(best.get("testAccuracy"), Mapping):
        out["testAccuracy"] = {str(d): fmt(a) for d, a in best["testAccuracy"].items()}
    return out




# The average's diagnostics (trainer/ratatouille_trainer/diagnostics.py) copied to
# status.result.diagnostics, floats as 4-decimal strings; lists that grow with the number of
# members stay in metrics.json only, so the status stays small for 500 members.
_DIAGNOSTIC_KEYS = ("uniform", "interpolation", "excludedAtChance", "sources", "ensemble", "convergence",
                    "diagnosticWarnings")
_DIAGNOSTIC_DROP = {"convergence": ("bestAtLastMembers",)}


def diagnostics(metrics: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    for k in _DIAGNOSTIC_KEYS:
        v = metrics.get(k)
        if not v:
            continue
        if isinstance(v, Mapping) and k in _DIAGNOSTIC_DROP:
            v = {kk: vv for kk, vv in v.items() if kk not in _DIAGNOSTIC_DROP[k]}
        out["warnings" if k == "diagnosticWarnings" else k] = fmt_tree(v)
    return out


def collapse_condition(prev_conds: Mapping[str, Mapping], observed: Observed, now: float,
                       generation: int) -> dict | None:
    """`AveragingCollapsed`: True when the average stage reported that the uniform average of the
    members scores clearly below their mean on validation (no linear mode connectivity); False
    when it reported no collapse; absent when the average wrote no such diagnostic."""
    metrics = observed.member_metrics.get(f"{STAGE_AVERAGE}/{AVERAGE_MEMBER}") or {}
    uniform = metrics.get("uniform")
    if not isinstance(uniform, Mapping) or not isinstance(uniform.get("collapse"), bool):
        return None
    numbers = (f"uniform average validation {fmt(uniform.get('valAccuracy'))}, members' mean"
               f" {fmt(uniform.get('membersMeanVal'))}, best member {fmt(uniform.get('membersBestVal'))}")
    if uniform["collapse"]:
        return condition(prev_conds, "AveragingCollapsed", True, "UniformAverageBelowMembers",
                         f"{numbers}: the members are not linearly mode connected (lower the learning"
                         f" rates or use greedy selection)", now, generation)
    return condition(prev_conds, "AveragingCollapsed", False, "NoCollapse", numbers, now, generation)
