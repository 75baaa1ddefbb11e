"""Events: what is new since the previous status, as Kubernetes Events (docs/contract.md,
"Events"): a pod that does not start, a failed attempt, a refused create, members that failed
for good, the phase changing, members left out of the average, the averaging diagnostics'
warnings (a collapsed average, a source that breaks it, members that should train longer).
Pure: standard library, `spec` and the other planning steps.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from ..spec import RunSpec
from .vocabulary import (AVERAGE_MEMBER, BENIGN_WAITING, FAILED, MAX_STATUS_JOBS, PENDING, PHASE_AUX,
                         PHASE_AVERAGING, PHASE_FAILED, PHASE_PENDING, PHASE_SUCCEEDED, PHASE_SUSPENDED,
                         PHASE_TARGET, REASON_AUX_RETRAINED, REASON_CREATE_REJECTED, REASON_POD_START_TIMEOUT, STAGE_AUX,
                         STAGE_AVERAGE, SUCCEEDED, Event,
                         Observed, ObservedJob, RunRef, fmt_tree, graph_key, short_message, why)


_REASON = re.compile(r"[A-Z][A-Za-z0-9]{0,63}")


def _family(reason: str | None) -> str | None:
    """Waiting reasons that alternate while one problem lasts count as one (a kubelet says
    ErrImagePull and ImagePullBackOff in turn for an image it cannot pull)."""
    return "ErrImagePull" if reason == "ImagePullBackOff" else reason


def child_events(run: RunRef, prev: Mapping, jobs: Sequence[ObservedJob], expired: Sequence[ObservedJob]) -> list[Event]:
    """Events for what is new since the previous status: a pod that does not start (its waiting
    reason), an attempt that failed (with the trainer's error), a refused create (Warnings); an
    auxiliary cache entry trained again, and why (Normal)."""
    prev_jobs = {e.get("name"): e for e in prev.get("jobs") or [] if isinstance(e, Mapping)}
    full = len(prev_jobs) >= MAX_STATUS_JOBS
    expired_names = {j.name for j in expired}
    events = []
    for j in sorted(jobs, key=lambda j: graph_key(j.stage, j.member, j.attempt)):
        before = prev_jobs.get(j.name)
        if before is None and full:
            continue  # beyond the bounded list: cannot tell whether it is new
        what = f"{j.stage}/{j.member} attempt {j.attempt} (Job {j.name})"
        if j.state == PENDING and j.reason and j.reason not in BENIGN_WAITING:
            if before is None or _family(before.get("reason")) != _family(j.reason):
                events.append(Event("Warning", j.reason, f"{what}: {short_message(j.message) or j.reason}"))
        elif j.state == FAILED and (before is None or before.get("state") != FAILED):
            if j.rejected:
                events.append(Event("Warning", REASON_CREATE_REJECTED,
                                    f"{j.stage}/{j.member}: the API server refused Job {j.name}: {why(j)}"))
            elif j.name in expired_names:
                events.append(Event("Warning", REASON_POD_START_TIMEOUT, f"{what} failed: {why(j)}"))
            else:
                events.append(Event("Warning", "AttemptFailed", f"{what} failed: {why(j)}"))
        elif j.state == SUCCEEDED and j.stage == STAGE_AUX and j.message \
                and (before is None or before.get("state") != SUCCEEDED):
            events.append(Event("Normal", REASON_AUX_RETRAINED,
                                f"{what} trained its cache entry again: {short_message(j.message)}"))
    return events


_PHASE_EVENT = {
    PHASE_PENDING: ("Accepted", "run accepted; creating the auxiliary and linear-probe Jobs"),
    PHASE_AUX: ("AuxiliaryStage", "auxiliary fine-tunings and the linear probe are running"),
    PHASE_TARGET: ("TargetStage", "target fine-tunings are running"),
    PHASE_AVERAGING: ("Averaging", "all target fine-tunings finished; averaging"),
    PHASE_SUCCEEDED: ("Succeeded", "averaged model published"),
    PHASE_SUSPENDED: ("Suspended", "run suspended: child Jobs are suspended"),
}


def phase_events(spec: RunSpec, prev: Mapping, prev_phase: str | None, phase: str,
                 failure: tuple[str, str] | None, status: Mapping, observed: Observed) -> list[Event]:
    events: list[Event] = []
    # Members that failed permanently since the last status (level-based on the counts).
    prev_stages = prev.get("stages") or {}
    for key, label in (("auxiliary", "auxiliary"), ("target", "target")):
        now_failed = status["stages"][key]["failed"]
        before = (prev_stages.get(key) or {}).get("failed", 0) if isinstance(prev_stages, Mapping) else 0
        if now_failed > (before or 0):
            events.append(Event("Warning", "MembersFailed",
                                f"{now_failed - before} {label} member(s) failed permanently"
                                f" ({now_failed} of {status['stages'][key]['total']} so far)"))
    if phase == prev_phase:
        return events
    if prev_phase == PHASE_SUSPENDED:
        events.append(Event("Normal", "Resumed", "run resumed: child Jobs continue"))
    if phase == PHASE_FAILED:
        assert failure is not None
        events.append(Event("Warning", failure[0], failure[1]))
    else:
        reason, message = _PHASE_EVENT[phase]
        if phase == PHASE_SUCCEEDED:
            result = status.get("result") or {}
            message = (f"averaged model ({result.get('selection')}, {result.get('members')} members,"
                       f" val {result.get('valAccuracy', '?')}) at {result.get('model')}")
        events.append(Event("Normal", reason, message))
    if phase == PHASE_SUCCEEDED:
        avg_metrics = observed.member_metrics.get(f"{STAGE_AVERAGE}/{AVERAGE_MEMBER}") or {}
        left_out = avg_metrics.get("excludedAtChance")
        if isinstance(left_out, (list, tuple)) and left_out:
            names = ", ".join(str(x.get("member")) for x in left_out if isinstance(x, Mapping))
            events.append(Event("Warning", "MembersAtChance",
                                f"{len(left_out)} member(s) left out of the average, their validation"
                                f" accuracy at chance level ({fmt_tree(avg_metrics.get('chanceLevel'))}): {names}"))
        warnings = diagnostic_events(avg_metrics)
        uniform = avg_metrics.get("uniform")
        if warnings:
            events += warnings
        elif isinstance(uniform, Mapping) and uniform.get("collapse") is True:  # a trainer without diagnostics
            events.append(Event("Warning", "AveragingCollapse",
                                "the uniform average scores below its members: they are not linearly"
                                " mode connected (lower the learning rates or use greedy selection)"))
    return events


def diagnostic_events(avg_metrics: Mapping) -> list[Event]:
    """One Warning Event per averaging diagnostic warning the average recorded
    (``diagnosticWarnings``: AveragingCollapsed, AveragingPartialCollapse, SourceBreaksAverage,
    TrainLonger), its code as the reason. Codes that are not a CamelCase word are skipped: the
    metrics come from a trainer pod, and an Event reason is a short identifier."""
    out = []
    for w in avg_metrics.get("diagnosticWarnings") or ():
        if not isinstance(w, Mapping):
            continue
        code, message = w.get("code"), short_message(w.get("message"))
        if isinstance(code, str) and _REASON.fullmatch(code) and message:
            out.append(Event("Warning", code, message))
    return out
