"""The planner's vocabulary: stages, Job states, phases, labels, failure reasons, the planner's
inputs (`RunRef`, `ObservedJob`, `Observed`) and outputs (`CreateJob`, `DeleteJob`, `SetSuspend`,
`Event`, `Plan`), and the small formatting helpers every step shares (RFC 3339 time, status
numbers, short messages, graph order). Pure: standard library and the contract's `jobdesc`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from ratatouille_contract import jobdesc as _jd

# -- vocabulary ----------------------------------------------------------------------------
# The stage names are the job description's (one source); here they get the planner's names.
STAGE_PREPARE, STAGE_AUX, STAGE_LP, STAGE_TARGET, STAGE_AVERAGE = _jd.STAGES
STAGES = (STAGE_PREPARE, STAGE_LP, STAGE_AUX, STAGE_TARGET, STAGE_AVERAGE)  # graph (creation) order
SHORT = {STAGE_PREPARE: "prep", STAGE_AUX: "aux", STAGE_LP: "lp", STAGE_TARGET: "target",
         STAGE_AVERAGE: "avg"}
PREPARE_TARGET = "target"
REASON_PREPARE_FAILED = "DataPreparationFailed"
LP_MEMBER = "0"
AVERAGE_MEMBER = "0"
FOUNDATION = "foundation"

PENDING, ACTIVE, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Active", "Succeeded", "Failed", "Suspended"
JOB_STATES = (PENDING, ACTIVE, SUCCEEDED, FAILED, SUSPENDED)
IN_FLIGHT = frozenset({PENDING, ACTIVE, SUSPENDED})

PHASE_PENDING, PHASE_AUX, PHASE_TARGET, PHASE_AVERAGING = "Pending", "Auxiliary", "Target", "Averaging"
PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED = "Succeeded", "Failed", "Suspended"
TERMINAL_PHASES = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})

LABEL_RUN = "ratatouille.dev/run"
LABEL_RUN_UID = "ratatouille.dev/run-uid"
LABEL_STAGE = "ratatouille.dev/stage"
LABEL_MEMBER = "ratatouille.dev/member"
LABEL_ATTEMPT = "ratatouille.dev/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ratatouille-operator"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# Auxiliary fine-tunings are target-agnostic, so they must not depend on the target's split:
# they always hold out the DomainBed default (and the constant is part of the cache key).
AUX_HOLDOUT_FRACTION = 0.2
MAX_STATUS_JOBS = 100
SEED_STRIDE = 1000

# Failure reasons (condition Failed, Events).
REASON_MIN_SUCCEEDED = "MinSucceededNotMet"
REASON_LP_FAILED = "LinearProbeFailed"
REASON_AVG_FAILED = "AveragingFailed"
REASON_DEADLINE = "DeadlineExceeded"
REASON_POD_START_TIMEOUT = "PodStartTimeout"
REASON_CREATE_REJECTED = "CreateRejected"
#: A finished auxiliary cache entry was trained again (its inputs changed, or it did not verify).
REASON_AUX_RETRAINED = "AuxiliaryRetrained"
#: Pod waiting reasons that are only the way to running, not a problem.
BENIGN_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
#: Messages kept in status (a termination message may be 4 KiB).
MAX_STATUS_MESSAGE = 512


# -- inputs and outputs ----------------------------------------------------------------------
@dataclass(frozen=True)
class RunRef:
    """Identity of one RatatouilleRun object (not its spec)."""
    namespace: str
    name: str
    uid: str
    generation: int = 1
    creation_time: float = 0.0  # epoch seconds


@dataclass(frozen=True)
class ObservedJob:
    name: str
    stage: str
    member: str
    attempt: int
    state: str  # Pending | Active | Succeeded | Failed | Suspended
    start_time: float | None = None
    finish_time: float | None = None
    reason: str | None = None
    #: What went wrong, in words: a failed trainer's error (termination message), the waiting
    #: message of a pod that does not start, the API server's answer to a refused create; for a
    #: succeeded auxiliary Job, why its finished cache entry was trained again.
    message: str | None = None
    #: Pending: since when the attempt has had no running pod (its Job started, its latest pod
    #: was created or ended); the podStartTimeoutSeconds clock. None: not known (no timeout).
    pending_since: float | None = None
    #: The API server refused to create the Job (a 4xx): permanent for the member.
    rejected: bool = False
    #: The run holds this Job suspended (the operator suspended it for `spec.suspend`); a
    #: suspended Job that is not held was suspended by someone else (Kueue) and is left to them.
    held: bool = False
    #: Kueue admits this Job (it carries Kueue's queue-name label, set by the operator from
    #: `queueName` or by Kueue's default LocalQueue): suspend and resume go through its Workload.
    queued: bool = False


@dataclass(frozen=True)
class Observed:
    jobs: tuple[ObservedJob, ...] = ()
    cache_hits: frozenset[str] = frozenset()  # aux cache keys known complete and current (local executor)
    member_metrics: Mapping[str, Mapping] = field(default_factory=dict)  # "<stage>/<member>" -> metrics.json


@dataclass(frozen=True)
class CreateJob:
    name: str
    stage: str
    member: str
    attempt: int
    labels: Mapping[str, str]
    description: _jd.JobDescription


@dataclass(frozen=True)
class DeleteJob:
    name: str
    reason: str


@dataclass(frozen=True)
class SetSuspend:
    """Hold (suspend=True) or release one in-flight Job for the run's `spec.suspend`. A queued
    Job is held the way Kueue supports (its Workload deactivated), never by flipping the Job's
    `spec.suspend` under Kueue's feet."""
    name: str
    suspend: bool
    queued: bool = False


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[CreateJob | DeleteJob | SetSuspend, ...]
    status: dict
    events: tuple[Event, ...]
    requeue_after: float | None


# -- shared helpers ---------------------------------------------------------------------------
def format_time(t: float) -> str:
    """Epoch seconds -> RFC 3339 in UTC, to the second (`2026-12-03T22:11:49Z`), as Kubernetes
    writes times. The one formatter of the operator (status, Events, conditions)."""
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float | None:
    """RFC 3339 (as Kubernetes writes it: `Z` or an offset, optional fraction; a `datetime` as
    the client library gives it) -> epoch seconds; a time without a zone is UTC. None for
    nothing or for what is not a time. The one parser of the operator."""
    if not value:
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def fmt(x: Any, digits: int = 3) -> Any:
    """A status number: floats and ints as strings with `digits` decimals."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, (int, float)):
        return f"{float(x):.{digits}f}"
    return str(x)


def fmt_tree(x: Any) -> Any:
    """Floats become strings (4 decimals) throughout; bools, ints and strings pass through."""
    if isinstance(x, Mapping):
        return {str(k): fmt_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [fmt_tree(v) for v in x]
    if isinstance(x, float):
        return f"{x:.4f}"
    return x


def member_sort_key(member: str) -> tuple:
    return (0, int(member), "") if member.isdigit() else (1, 0, member)


def graph_key(stage: str, member: str, attempt: int) -> tuple:
    """Graph (creation) order: stage, then member (numbers numerically), then attempt."""
    stage_i = STAGES.index(stage) if stage in STAGES else len(STAGES)
    return (stage_i, member_sort_key(member), attempt)


def split_key(key: str) -> tuple[str, str]:
    """`<stage>/<member>` -> (stage, member)."""
    stage, _, member = key.partition("/")
    return stage, member


def short_message(text: str | None) -> str | None:
    """One line of at most MAX_STATUS_MESSAGE characters (a termination message may be 4 KiB)."""
    if not text:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_STATUS_MESSAGE else text[:MAX_STATUS_MESSAGE - 3] + "..."


def why(j: ObservedJob) -> str:
    """`reason: message` of an attempt, for Events and failure messages."""
    reason = j.reason or "unknown"
    return f"{reason}: {short_message(j.message)}" if j.message else reason
