"""The planner: one pure function from (run, spec, observed child Jobs, now) to (actions, status).

Level-based, like kubernetes-sigs/jobset: every call recomputes the whole job graph from what it
is given and walks a short ladder (terminal -> failures -> success -> suspend -> create what is
missing). Child names are deterministic, so "should I create it" is a set-membership test and
planning twice on the same input yields the same actions. The kopf operator and the local
executor are adapters around `plan()`; nothing here reads a clock, touches the network or keeps
state between calls. Pure: stdlib, `spec`, and the trainer's pure `jobdesc`/`hparams` only.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from ratatouille_trainer import hparams as _hparams
from ratatouille_trainer import jobdesc as _jd

from .spec import Augmentation, Auxiliary, RunSpec

# -- vocabulary ----------------------------------------------------------------------------
STAGE_PREPARE = "prepare"
STAGE_AUX = "aux"
STAGE_LP = "linear-probe"
STAGE_TARGET = "target"
STAGE_AVERAGE = "average"
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
_SEED_STRIDE = 1000

# Failure reasons (condition Failed, Events).
REASON_MIN_SUCCEEDED = "MinSucceededNotMet"
REASON_LP_FAILED = "LinearProbeFailed"
REASON_AVG_FAILED = "AveragingFailed"
REASON_DEADLINE = "DeadlineExceeded"
REASON_POD_START_TIMEOUT = "PodStartTimeout"
REASON_CREATE_REJECTED = "CreateRejected"
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
    #: message of a pod that does not start, the API server's answer to a refused create.
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


# -- names ----------------------------------------------------------------------------------
_NOT_DNS = re.compile(r"[^a-z0-9-]")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]")


def _hash6(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _dns(text: str) -> str:
    return _NOT_DNS.sub("-", text.lower()).strip("-")


def job_name(run_name: str, stage: str, member: str, attempt: int) -> str:
    """`<run>-<short>-<member>-a<attempt>`, a lowercase DNS-1123 label of at most 63 characters.

    Longer names keep their stage/member/attempt suffix whole, shorten the run part and insert a
    hash of the full name, so distinct children never collide and the result is deterministic.
    """
    short = SHORT.get(stage, stage)
    full = f"{run_name}-{short}-{member}-a{attempt}"
    name = _dns(full)
    if len(name) <= 63:
        return name
    digest = _hash6(full)
    suffix = "-" + _dns(f"{short}-{member}-a{attempt}")
    room = 63 - len(suffix) - len(digest) - 1
    prefix = _dns(run_name)[:max(room, 0)].rstrip("-")
    if prefix:
        return f"{prefix}-{digest}{suffix}"
    # The member alone is too long: keep what fits, the hash keeps it unique.
    return name[:63 - len(digest) - 1].rstrip("-") + "-" + digest


def label_value(value: str) -> str:
    """A valid label value (<= 63 chars, alphanumeric ends); long values keep a hash suffix."""
    text = _NOT_LABEL.sub("-", str(value))
    if len(text) > 63:
        text = text[:56].rstrip("-._") + "-" + _hash6(str(value))
    return text.strip("-._")


def job_labels(spec: RunSpec, run: RunRef, stage: str, member: str, attempt: int) -> dict[str, str]:
    labels = {
        LABEL_RUN: label_value(run.name),
        LABEL_RUN_UID: label_value(run.uid),
        LABEL_STAGE: stage,
        LABEL_MEMBER: label_value(member),
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    if spec.queue_name:
        labels[LABEL_KUEUE_QUEUE] = spec.queue_name
    return labels


# -- storage keys ----------------------------------------------------------------------------
def run_prefix(spec: RunSpec, run: RunRef) -> str:
    return f"{spec.storage.uri}/{run.namespace}/{run.name}/{run.uid}"


def _auxiliary(spec: RunSpec, aux: Auxiliary | str) -> Auxiliary:
    if isinstance(aux, Auxiliary):
        return aux
    for a in spec.auxiliaries:
        if a.name == aux:
            return a
    raise KeyError(f"no auxiliary named {aux!r}")


def aux_cache_key(spec: RunSpec, aux: Auxiliary | str, k: int) -> str:
    """Identity of one auxiliary fine-tuning, shared by every run in the same storage and
    cache scope (the namespace, on a cluster).

    The material is what determines the fine-tuning: the foundation, the dataset, its split,
    the budgets, the hyperparameters fine-tuning k drew (`aux_hyperparameters`), the pool's
    seed `auxiliaryFinetune.seed` and k. Not the run's `spec.seed` nor the target, so the pool
    is trained once and reused by runs with other seeds and targets. The augmentation is in it
    only when it differs from the default, and the drawn table is only `lr` unless the spec
    names more, so entries trained before either existed keep their keys."""
    a = _auxiliary(spec, aux)
    af = spec.auxiliary_finetune
    material: dict[str, Any] = {
        "foundation": {"model": spec.foundation.model, "weights": spec.foundation.weights,
                       "inputSize": spec.foundation.input_size},
        "dataset": a.dataset,
        "holdoutFraction": AUX_HOLDOUT_FRACTION,
        "auxiliaryFinetune": {"steps": af.steps, "batchSize": af.batch_size,
                              **aux_hyperparameters(spec, a, k)},
        "linearProbe": {"steps": spec.linear_probe.steps, "lr": spec.linear_probe.lr},
        "seed": af.seed,
        "k": int(k),
    }
    if spec.augmentation != Augmentation():
        material["augmentation"] = asdict(_augmentation(spec))
    if spec.aux_cache_scope:
        # Runs of another namespace neither read nor write this entry (a tenant cannot plant a
        # fine-tuning another one then builds on), unless the operator shares the cache.
        material["scope"] = spec.aux_cache_scope
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def aux_cache_uri(spec: RunSpec, key: str) -> str:
    return f"{spec.storage.uri}/cache/aux/{key}"


def aux_member(aux_name: str, k: int) -> str:
    return f"{aux_name}-{k}"


def _split_aux_member(member: str) -> tuple[str, int]:
    name, _, k = member.rpartition("-")
    if not name or not k.isdigit():
        raise ValueError(f"not an auxiliary member name: {member!r}")
    return name, int(k)


def data_cache_uri(spec: RunSpec) -> str:
    """Root of the prepared-dataset cache entries (trainer's prepared.py), shared like cache/aux."""
    return f"{spec.storage.uri}/cache/data"


def prepare_members(spec: RunSpec) -> dict[str, str]:
    """Dataset URI -> prepare member (``target``, ``aux-<name>``), one per distinct dataset;
    empty unless ``spec.dataPreparation.enabled``."""
    if not spec.data_preparation.enabled:
        return {}
    out = {spec.target.dataset: PREPARE_TARGET}
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if not aux.recycled and aux.dataset not in out:
            out[str(aux.dataset)] = f"aux-{aux.name}"
    return out


def _prepared(spec: RunSpec, run: RunRef, dataset: str) -> dict[str, Any]:
    """The job description's data fields that point a consumer at its prepared dataset."""
    member = prepare_members(spec).get(dataset)
    if member is None:
        return {}
    return {"prepared": member_output(spec, run, STAGE_PREPARE, member),
            "memoryBudget": spec.data_preparation.memory_budget}


def member_output(spec: RunSpec, run: RunRef, stage: str, member: str) -> str:
    """Where a member's results live (no trailing slash); aux members live in the shared cache."""
    if stage == STAGE_PREPARE:
        return f"{run_prefix(spec, run)}/prepare/{member}"
    if stage == STAGE_AUX:
        name, k = _split_aux_member(member)
        return aux_cache_uri(spec, aux_cache_key(spec, name, k))
    prefix = run_prefix(spec, run)
    if stage == STAGE_LP:
        return f"{prefix}/linear-probe"
    if stage == STAGE_TARGET:
        return f"{prefix}/target/{member}"
    if stage == STAGE_AVERAGE:
        return f"{prefix}/average"
    raise ValueError(f"unknown stage {stage!r}")


# -- source assignment (docs/algorithm.md, stage 3) ---------------------------------------------
class Source(NamedTuple):
    name: str                      # "foundation" or the auxiliary's name
    auxiliary: Auxiliary | None    # None for the foundation


def initialization_sources(spec: RunSpec) -> list[Source]:
    """The foundation (if included), then the auxiliaries sorted by name."""
    sources = [Source(FOUNDATION, None)] if spec.include_foundation else []
    sources += [Source(a.name, a) for a in sorted(spec.auxiliaries, key=lambda a: a.name)]
    return sources


def _target_source(spec: RunSpec, sources: Sequence[Source], i: int) -> tuple[str, str | None, str | None]:
    if not sources:
        raise ValueError("no initialization source: includeFoundation is false and there are no auxiliaries")
    src = sources[i % len(sources)]
    aux = src.auxiliary
    if aux is None:
        return FOUNDATION, None, None
    if aux.recycled:
        return aux.name, aux.weights, None
    # Several fine-tunings of one auxiliary: each is used in turn, so all are used once before
    # any is used twice.
    k = (i // len(sources)) % aux.runs
    key = aux_cache_key(spec, aux, k)
    return aux_member(aux.name, k), f"{aux_cache_uri(spec, key)}/model.safetensors", key


def target_source(spec: RunSpec, i: int) -> tuple[str, str | None, str | None]:
    """(source name, featurizer weights URI or None for the foundation, aux cache key or None)."""
    return _target_source(spec, initialization_sources(spec), i)


# -- job descriptions -------------------------------------------------------------------------
def _hparam_table(spec: RunSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    table = dict(_hparams.DEFAULT_TABLE)
    for name, hp in spec.finetune.hyperparameters.items():
        table[name] = (hp.default, tuple(hp.choices))
    return table


def target_hyperparameters(spec: RunSpec, i: int) -> dict[str, str]:
    return _hparams.draw_all(spec.seed, i, _hparam_table(spec))


def aux_hyperparameters(spec: RunSpec, aux: Auxiliary | str, k: int) -> dict[str, str]:
    """The hyperparameters of fine-tuning k of an auxiliary: `lr` (default `auxiliaryFinetune.lr`)
    and every name of `auxiliaryFinetune.hyperparameters`, drawn from (auxiliaryFinetune.seed,
    the auxiliary's dataset, k) only, so every run sharing the pool draws the same."""
    a = _auxiliary(spec, aux)
    af = spec.auxiliary_finetune
    table = {"lr": (af.lr, ())}
    table.update((name, (hp.default, tuple(hp.choices))) for name, hp in af.hyperparameters.items())
    return _hparams.draw_all(af.seed, k, table, _hparams.aux_stream(str(a.dataset)))


def _augmentation(spec: RunSpec) -> _jd.Augmentation:
    return _jd.Augmentation(horizontalFlip=spec.augmentation.horizontal_flip)


def _base(spec: RunSpec, run: RunRef, stage: str, member: str, seed: int, data: _jd.DataRef,
          **kw: Any) -> _jd.JobDescription:
    return _jd.JobDescription(
        stage=stage,
        run=_jd.RunRef(namespace=run.namespace, name=run.name, uid=run.uid),
        member=member,
        output=member_output(spec, run, stage, member),
        seed=seed,
        foundation=_jd.FoundationRef(model=spec.foundation.model, weights=spec.foundation.weights,
                                     inputSize=spec.foundation.input_size),
        data=data,
        storage_endpoint=spec.storage.endpoint,
        augmentation=_augmentation(spec) if stage != STAGE_PREPARE else _jd.Augmentation(),
        **kw,
    )


def _target_data(spec: RunSpec, run: RunRef) -> _jd.DataRef:
    return _jd.DataRef(dataset=spec.target.dataset, testDomains=tuple(spec.target.test_domains),
                       holdoutFraction=spec.target.holdout_fraction, splitSeed=spec.seed,
                       **_prepared(spec, run, spec.target.dataset))


def describe(spec: RunSpec, run: RunRef, stage: str, member: str,
             succeeded_targets: Sequence[int] = (), *, _sources: Sequence[Source] | None = None) -> _jd.JobDescription:
    """The self-contained job description of one member (docs/contract.md, "Job description")."""
    if stage == STAGE_PREPARE:
        dataset = next(d for d, m in prepare_members(spec).items() if m == member)
        return _base(spec, run, stage, member, seed=spec.seed,
                     data=_jd.DataRef(dataset=dataset, testDomains=(), holdoutFraction=AUX_HOLDOUT_FRACTION,
                                      splitSeed=spec.seed, prepared=data_cache_uri(spec)))
    if stage == STAGE_AUX:
        name, k = _split_aux_member(member)
        aux = _auxiliary(spec, name)
        af, lp = spec.auxiliary_finetune, spec.linear_probe
        hp = aux_hyperparameters(spec, aux, k)
        # The pool's seed, not the run's: the fine-tuning is what its cache key says.
        return _base(spec, run, stage, member, seed=af.seed * _SEED_STRIDE + k,
                     data=_jd.DataRef(dataset=str(aux.dataset), testDomains=(),
                                      holdoutFraction=AUX_HOLDOUT_FRACTION, splitSeed=af.seed,
                                      **_prepared(spec, run, str(aux.dataset))),
                     training=_jd.Training(steps=af.steps, batchSize=af.batch_size, lr=hp["lr"],
                                           weightDecay=hp.get("weightDecay", "0"),
                                           dropout=hp.get("dropout", "0"),
                                           evalEvery=spec.finetune.eval_every,
                                           lpSteps=lp.steps, lpLr=lp.lr),
                     hyperparameters=hp)
    if stage == STAGE_LP:
        lp = spec.linear_probe
        return _base(spec, run, stage, member, seed=spec.seed, data=_target_data(spec, run),
                     training=_jd.Training(steps=lp.steps, batchSize=lp.batch_size, lr=lp.lr,
                                           evalEvery=spec.finetune.eval_every,
                                           lpSteps=lp.steps, lpLr=lp.lr))
    sources = initialization_sources(spec) if _sources is None else _sources
    if stage == STAGE_TARGET:
        i = int(member)
        ft = spec.finetune
        source, featurizer, _key = _target_source(spec, sources, i)
        hp = target_hyperparameters(spec, i)
        return _base(spec, run, stage, member, seed=spec.seed * _SEED_STRIDE + i, data=_target_data(spec, run),
                     training=_jd.Training(steps=ft.steps, batchSize=ft.batch_size, lr=hp["lr"],
                                           weightDecay=hp.get("weightDecay", "0"),
                                           dropout=hp.get("dropout", "0"),
                                           # The head-only warm-up exists for auxiliary featurizers
                                           # (docs/algorithm.md, stage 3); from the foundation the LP head
                                           # already matches the featurizer.
                                           headWarmupSteps=0 if source == FOUNDATION else ft.head_warmup_steps,
                                           evalEvery=ft.eval_every,
                                           lpSteps=spec.linear_probe.steps, lpLr=spec.linear_probe.lr),
                     init=_jd.Init(source=source, featurizer=featurizer,
                                   head=f"{run_prefix(spec, run)}/linear-probe/model.safetensors"),
                     hyperparameters=hp)
    if stage == STAGE_AVERAGE:
        members = tuple(
            _jd.MemberRef(member=str(i), uri=member_output(spec, run, STAGE_TARGET, str(i)),
                          source=_target_source(spec, sources, i)[0])
            for i in sorted(succeeded_targets))
        return _base(spec, run, stage, member, seed=spec.seed, data=_target_data(spec, run),
                     members=members, selection=spec.selection)
    raise ValueError(f"unknown stage {stage!r}")


# -- the static job graph (for `ratatouille plan`) ------------------------------------------------
def job_graph(spec: RunSpec, run: RunRef) -> list[dict[str, Any]]:
    """Every member of the run's graph with what it needs: JSON-ready, in creation order."""
    prep = prepare_members(spec)

    def prep_needs(dataset: str | None) -> list[str]:
        return [f"{STAGE_PREPARE}/{prep[dataset]}"] if dataset in prep else []

    nodes: list[dict[str, Any]] = [
        {"stage": STAGE_PREPARE, "member": m, "needs": [], "dataset": d,
         "note": f"{d} at {spec.foundation.input_size} px -> {data_cache_uri(spec)}/<content key>",
         "output": member_output(spec, run, STAGE_PREPARE, m)} for d, m in prep.items()]
    nodes.append({"stage": STAGE_LP, "member": LP_MEMBER, "needs": prep_needs(spec.target.dataset),
                  "output": member_output(spec, run, STAGE_LP, LP_MEMBER)})
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if aux.recycled:
            nodes.append({"stage": STAGE_AUX, "member": aux.name, "needs": [], "job": False,
                          "note": f"recycled weights {aux.weights}: no Job", "output": aux.weights})
            continue
        for k in range(aux.runs):
            m = aux_member(aux.name, k)
            key = aux_cache_key(spec, aux, k)
            hp = aux_hyperparameters(spec, aux, k)
            nodes.append({"stage": STAGE_AUX, "member": m, "needs": prep_needs(aux.dataset), "cacheKey": key,
                          "hyperparameters": hp,
                          "note": f"cache {key}; " + " ".join(f"{n}={v}" for n, v in hp.items()),
                          "output": aux_cache_uri(spec, key)})
    sources = initialization_sources(spec)
    for i in range(spec.finetune.runs):
        source, _f, key = _target_source(spec, sources, i)
        needs = [f"{STAGE_LP}/{LP_MEMBER}"] + ([f"{STAGE_AUX}/{source}"] if key else [])
        hp = target_hyperparameters(spec, i)
        nodes.append({"stage": STAGE_TARGET, "member": str(i), "needs": needs, "source": source,
                      "hyperparameters": hp,
                      "note": f"from {source}; " + " ".join(f"{k}={v}" for k, v in hp.items()),
                      "output": member_output(spec, run, STAGE_TARGET, str(i))})
    nodes.append({"stage": STAGE_AVERAGE, "member": AVERAGE_MEMBER,
                  "needs": [f"{STAGE_TARGET}/*"],
                  "note": f"{spec.selection}, needs >= {spec.failure_policy.min_succeeded} succeeded",
                  "output": member_output(spec, run, STAGE_AVERAGE, AVERAGE_MEMBER)})
    for n in nodes:
        n.setdefault("job", True)
        if n["job"]:
            n["name"] = job_name(run.name, n["stage"], n["member"], 1)
    return nodes


# -- member states ----------------------------------------------------------------------------
# What the graph knows about one member after reading its Jobs.
MISSING = "missing"      # no Job yet
RUNNING = "running"      # latest attempt Pending/Active/Suspended
DONE = "done"            # succeeded (or a cache hit)
RETRY = "retry"          # latest attempt failed, attempts left
DEAD = "dead"            # failed at maxAttempts
BLOCKED = "blocked"      # cannot run: what it needs failed permanently (counts as failed)

_FINISHED = frozenset({DONE, DEAD, BLOCKED})


class _Node:
    __slots__ = ("stage", "member", "state", "latest", "counted", "ready", "source", "cache_key", "index")

    def __init__(self, stage: str, member: str, latest: ObservedJob | None, max_attempts: int):
        self.stage = stage
        self.member = member
        self.latest = latest
        self.counted = True       # part of progress totals (cache hits without a Job are not)
        self.ready = True
        self.source: str | None = None
        self.cache_key: str | None = None
        self.index = 0
        if latest is None:
            self.state = MISSING
        elif latest.state == SUCCEEDED:
            self.state = DONE
        elif latest.state == FAILED:
            # A create the API server refused fails the same way every time.
            self.state = RETRY if latest.attempt < max_attempts and not latest.rejected else DEAD
        else:
            self.state = RUNNING


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(x: Any, digits: int = 3) -> Any:
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, (int, float)):
        return f"{float(x):.{digits}f}"
    return str(x)


def _fmt_tree(x: Any) -> Any:
    """Floats become strings (4 decimals) throughout; bools, ints and strings pass through."""
    if isinstance(x, Mapping):
        return {str(k): _fmt_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_fmt_tree(v) for v in x]
    if isinstance(x, float):
        return f"{x:.4f}"
    return x


def _member_sort_key(member: str) -> tuple:
    return (0, int(member), "") if member.isdigit() else (1, 0, member)


def _graph_key(stage: str, member: str, attempt: int) -> tuple:
    stage_i = STAGES.index(stage) if stage in STAGES else len(STAGES)
    return (stage_i, _member_sort_key(member), attempt)


# -- what the run remembers of its children (status.attempts) --------------------------------------
# Child Jobs may disappear (a TTL, a user, the operator failing an attempt that never started):
# the latest finished attempt of every member is kept in the run's status, so that attempt
# counts, failures and successes survive without the Job objects.
def _short_message(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_STATUS_MESSAGE else text[:MAX_STATUS_MESSAGE - 3] + "..."


def _parse_rfc3339(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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
                               finish_time=_parse_rfc3339(entry.get("finishedAt")) if entry.get("finishedAt") else None,
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


def _attempts_table(jobs: Iterable[ObservedJob], previous_status: Mapping | None) -> dict[str, dict]:
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
                entry["finishedAt"] = _rfc3339(j.finish_time)
            if j.reason:
                entry["reason"] = j.reason
            if j.message:
                entry["message"] = _short_message(j.message)
            if j.rejected:
                entry["rejected"] = True
        table[key] = entry
    return dict(sorted(table.items(), key=lambda kv: _graph_key(*_split_key(kv[0]), 0)))


def _split_key(key: str) -> tuple[str, str]:
    stage, _, member = key.partition("/")
    return stage, member


def _why(j: ObservedJob) -> str:
    """`reason: message` of an attempt, for Events and failure messages."""
    reason = j.reason or "unknown"
    return f"{reason}: {_short_message(j.message)}" if j.message else reason


def _timed_out(jobs: Iterable[ObservedJob], spec: RunSpec, now: float) -> tuple[list[ObservedJob], list[ObservedJob]]:
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


def _family(reason: str | None) -> str | None:
    """Waiting reasons that alternate while one problem lasts count as one (a kubelet says
    ErrImagePull and ImagePullBackOff in turn for an image it cannot pull)."""
    return "ErrImagePull" if reason == "ImagePullBackOff" else reason


def _child_events(run: RunRef, prev: Mapping, jobs: Sequence[ObservedJob], expired: Sequence[ObservedJob]) -> list[Event]:
    """Warning Events for what is new since the previous status: a pod that does not start (its
    waiting reason), an attempt that failed (with the trainer's error), a refused create."""
    prev_jobs = {e.get("name"): e for e in prev.get("jobs") or [] if isinstance(e, Mapping)}
    full = len(prev_jobs) >= MAX_STATUS_JOBS
    expired_names = {j.name for j in expired}
    events = []
    for j in sorted(jobs, key=lambda j: _graph_key(j.stage, j.member, j.attempt)):
        before = prev_jobs.get(j.name)
        if before is None and full:
            continue  # beyond the bounded list: cannot tell whether it is new
        what = f"{j.stage}/{j.member} attempt {j.attempt} (Job {j.name})"
        if j.state == PENDING and j.reason and j.reason not in BENIGN_WAITING:
            if before is None or _family(before.get("reason")) != _family(j.reason):
                events.append(Event("Warning", j.reason, f"{what}: {_short_message(j.message) or j.reason}"))
        elif j.state == FAILED and (before is None or before.get("state") != FAILED):
            if j.rejected:
                events.append(Event("Warning", REASON_CREATE_REJECTED,
                                    f"{j.stage}/{j.member}: the API server refused Job {j.name}: {_why(j)}"))
            elif j.name in expired_names:
                events.append(Event("Warning", REASON_POD_START_TIMEOUT, f"{what} failed: {_why(j)}"))
            else:
                events.append(Event("Warning", "AttemptFailed", f"{what} failed: {_why(j)}"))
    return events


# -- the planner -------------------------------------------------------------------------------
def plan(run: RunRef, spec: RunSpec, observed: Observed, now: float,
         previous_status: Mapping | None = None) -> Plan:
    prev = dict(previous_status or {})
    prev_phase = prev.get("phase")
    fp = spec.failure_policy

    # 1. Index the children once: latest attempt per member decides. The attempts the run
    # remembers stand in for Jobs that are gone; attempts whose pod did not start in time fail.
    jobs, expired = _timed_out(with_remembered(run, observed.jobs, prev), spec, now)
    state_now = {j.name: j.state for j in jobs}
    # Jobs that still exist while their attempt is over for the operator (it did not start in
    # time, now or in an earlier reconcile whose delete is not visible yet): deleted.
    overdue = [o for o in observed.jobs if o.state in IN_FLIGHT and state_now.get(o.name) == FAILED]
    if prev_phase not in TERMINAL_PHASES:
        observed = Observed(jobs=tuple(jobs), cache_hits=observed.cache_hits, member_metrics=observed.member_metrics)
    latest: dict[tuple[str, str], ObservedJob] = {}
    names: set[str] = set()
    in_flight_jobs: list[ObservedJob] = []
    for j in observed.jobs:
        names.add(j.name)
        if j.state in IN_FLIGHT:
            in_flight_jobs.append(j)
        key = (j.stage, j.member)
        cur = latest.get(key)
        if cur is None or j.attempt > cur.attempt:
            latest[key] = j

    if prev_phase in TERMINAL_PHASES:
        return _frozen(run, prev, in_flight_jobs)
    sources = initialization_sources(spec)
    if not sources:
        # validation refuses this; the planner still never crashes on it and creates nothing.
        return _invalid(run, prev, now, "spec.includeFoundation: false with no auxiliaries leaves"
                        " no initialization source for the target fine-tunings")

    # 2. The graph with each member's state.
    nodes: list[_Node] = []
    # Prepared datasets (spec.dataPreparation): one prepare member per dataset still needed (an
    # auxiliary dataset whose fine-tunings are all cached needs none).
    prep = prepare_members(spec)
    needed = {spec.target.dataset} if prep else set()
    for aux in spec.auxiliaries:
        if prep and not aux.recycled and any(aux_cache_key(spec, aux, k) not in observed.cache_hits
                                             for k in range(aux.runs)):
            needed.add(str(aux.dataset))
    prep_nodes: dict[str, _Node] = {}
    for dataset, m in prep.items():
        if dataset in needed or (STAGE_PREPARE, m) in latest:
            prep_nodes[m] = _Node(STAGE_PREPARE, m, latest.get((STAGE_PREPARE, m)), fp.max_attempts)
    nodes += prep_nodes.values()

    def prep_state(dataset: str | None) -> str:
        node = prep_nodes.get(prep.get(dataset or "", ""))
        return DONE if node is None else node.state

    def gate(n: _Node, dataset: str | None) -> None:
        """A member that reads a prepared dataset waits for it, and cannot run if it failed."""
        state = prep_state(dataset)
        n.ready = n.ready and state == DONE
        if n.state == MISSING and state == DEAD:
            n.state = BLOCKED

    lp = _Node(STAGE_LP, LP_MEMBER, latest.get((STAGE_LP, LP_MEMBER)), fp.max_attempts)
    gate(lp, spec.target.dataset)
    nodes.append(lp)
    aux_nodes: list[_Node] = []
    aux_state: dict[str, str] = {}          # aux member -> state (cache hits are DONE)
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if aux.recycled:
            continue
        for k in range(aux.runs):
            m = aux_member(aux.name, k)
            n = _Node(STAGE_AUX, m, latest.get((STAGE_AUX, m)), fp.max_attempts)
            n.cache_key = aux_cache_key(spec, aux, k)
            if n.cache_key in observed.cache_hits:
                n.counted = n.latest is not None
                n.state = DONE
            else:
                gate(n, aux.dataset)
            aux_state[m] = n.state
            aux_nodes.append(n)
    nodes += aux_nodes

    target_nodes: list[_Node] = []
    for i in range(spec.finetune.runs):
        m = str(i)
        n = _Node(STAGE_TARGET, m, latest.get((STAGE_TARGET, m)), fp.max_attempts)
        n.index = i
        source, _featurizer, key = _target_source(spec, sources, i)
        n.source = source
        src_state = aux_state.get(source, DONE) if key else DONE
        n.ready = lp.state == DONE and src_state == DONE
        if n.state == MISSING and (lp.state in (DEAD, BLOCKED) or src_state in (DEAD, BLOCKED)):
            n.state = BLOCKED
        target_nodes.append(n)
    nodes += target_nodes

    succeeded = [n.index for n in target_nodes if n.state == DONE]
    failed_targets = sum(1 for n in target_nodes if n.state in (DEAD, BLOCKED))
    possible = len(target_nodes) - len(succeeded) - failed_targets
    avg = _Node(STAGE_AVERAGE, AVERAGE_MEMBER, latest.get((STAGE_AVERAGE, AVERAGE_MEMBER)), fp.max_attempts)
    avg.ready = possible == 0 and len(succeeded) >= fp.min_succeeded
    nodes.append(avg)

    # 3. Outcome: success first, then failures, then the deadline.
    failure: tuple[str, str] | None = None
    if avg.state == DONE:
        outcome = PHASE_SUCCEEDED
    else:
        outcome = None
        deadline = run.creation_time + spec.active_deadline_seconds if spec.active_deadline_seconds > 0 else None
        target_prep = prep_nodes.get(PREPARE_TARGET)
        if target_prep is not None and target_prep.state == DEAD:
            failure = (REASON_PREPARE_FAILED, f"preparing {spec.target.dataset} failed"
                       f" {target_prep.latest.attempt} attempt(s) (last: {_why(target_prep.latest)});"
                       f" nothing can train without it")
        elif lp.state == DEAD:
            failure = (REASON_LP_FAILED, f"the linear probe failed {lp.latest.attempt} attempt(s)"
                       f" (last: {_why(lp.latest)}); no target fine-tuning can start")
        elif len(succeeded) + possible < fp.min_succeeded:
            failure = (REASON_MIN_SUCCEEDED,
                       f"{len(succeeded)} target fine-tunings succeeded, {failed_targets} failed permanently"
                       f" and {possible} may still succeed: fewer than minSucceeded={fp.min_succeeded}")
        elif avg.state == DEAD:
            failure = (REASON_AVG_FAILED, f"the averaging Job failed {avg.latest.attempt} attempt(s)"
                       f" (last: {_why(avg.latest)})")
        elif deadline is not None and now >= deadline:
            failure = (REASON_DEADLINE, f"the run exceeded activeDeadlineSeconds={spec.active_deadline_seconds}")
        if failure is not None:
            outcome = PHASE_FAILED

    actions: list[CreateJob | DeleteJob | SetSuspend] = []
    events: list[Event] = []
    requeue: float | None = None

    def want_requeue(after: float) -> None:
        nonlocal requeue
        after = max(after, 0.0)
        requeue = after if requeue is None else min(requeue, after)

    for j in overdue:
        actions.append(DeleteJob(j.name, REASON_POD_START_TIMEOUT))
    if outcome == PHASE_FAILED:
        assert failure is not None
        for j in in_flight_jobs:
            actions.append(DeleteJob(j.name, failure[0]))
    elif outcome is None and spec.suspend:
        # Hold every in-flight Job, a queued one waiting for quota too (else Kueue would admit it).
        for j in in_flight_jobs:
            if not j.held or j.state != SUSPENDED:
                actions.append(SetSuspend(j.name, True, j.queued))
    elif outcome is None:
        # Release what the run holds, and only that: a Job suspended by someone else (Kueue
        # waiting for quota, or managing every Job of the namespace) is theirs to start.
        # (Jobs held by an operator older than the `held` annotation: those of a run that was
        # Suspended, when Kueue does not manage them.)
        for j in in_flight_jobs:
            if j.held or (j.state == SUSPENDED and prev_phase == PHASE_SUSPENDED and not j.queued
                          and not spec.queue_name):
                actions.append(SetSuspend(j.name, False, j.queued))
        budget = spec.parallelism - len(in_flight_jobs)
        for n in nodes:
            if n.state not in (MISSING, RETRY) or not n.ready:
                continue
            attempt = 1
            if n.state == RETRY:
                assert n.latest is not None
                attempt = n.latest.attempt + 1
                if n.latest.finish_time is not None:
                    due = n.latest.finish_time + fp.retry_backoff_seconds * 2 ** (n.latest.attempt - 1)
                    if now < due:
                        want_requeue(due - now)
                        continue
            if budget <= 0:
                continue
            name = job_name(run.name, n.stage, n.member, attempt)
            if name in names:
                continue  # never re-create an observed child
            desc = describe(spec, run, n.stage, n.member, succeeded if n.stage == STAGE_AVERAGE else (),
                            _sources=sources)
            actions.append(CreateJob(name=name, stage=n.stage, member=n.member, attempt=attempt,
                                     labels=job_labels(spec, run, n.stage, n.member, attempt),
                                     description=desc))
            budget -= 1
            if attempt > 1:
                assert n.latest is not None
                events.append(Event("Warning", "Retrying",
                                    f"{n.stage}/{n.member} attempt {n.latest.attempt} failed"
                                    f" ({_why(n.latest)}): starting attempt {attempt}"
                                    f" of {fp.max_attempts}"))
    if outcome is None and spec.active_deadline_seconds > 0:
        want_requeue(run.creation_time + spec.active_deadline_seconds - now)
    if outcome is None and fp.pod_start_timeout_seconds > 0:
        for j in in_flight_jobs:
            if j.state == PENDING and j.pending_since is not None:
                want_requeue(j.pending_since + fp.pod_start_timeout_seconds - now)

    # 4. Phase and status.
    aux_lp = [lp] + aux_nodes + list(prep_nodes.values())
    if outcome is not None:
        phase = outcome
    elif spec.suspend:
        phase = PHASE_SUSPENDED
    elif all(n.latest is None for n in nodes):
        phase = PHASE_PENDING
    elif possible == 0:
        phase = PHASE_AVERAGING
    elif any(n.state not in _FINISHED for n in aux_lp):
        phase = PHASE_AUX
    else:
        phase = PHASE_TARGET

    status = _status(run, spec, observed, now, prev, phase, failure, nodes, lp, aux_nodes,
                     target_nodes, avg, succeeded)
    events = _child_events(run, prev, observed.jobs, expired) + events
    events += _phase_events(spec, prev, prev_phase, phase, failure, status, observed)
    return Plan(actions=tuple(actions), status=status, events=tuple(events),
                requeue_after=requeue if outcome is None else None)


def _frozen(run: RunRef, prev: dict, in_flight_jobs: Iterable[ObservedJob]) -> Plan:
    """A finished run keeps its status; a failed one still makes sure no child keeps running."""
    status = json.loads(json.dumps(prev))
    status["observedGeneration"] = run.generation
    actions: tuple = ()
    if prev.get("phase") == PHASE_FAILED:
        reason = next((c.get("reason") for c in prev.get("conditions") or []
                       if c.get("type") == "Failed" and c.get("status") == "True"), None) or "RunFailed"
        actions = tuple(DeleteJob(j.name, reason) for j in in_flight_jobs)
    return Plan(actions=actions, status=status, events=(), requeue_after=None)


def _invalid(run: RunRef, prev: Mapping, now: float, message: str) -> Plan:
    prev_conds = {c.get("type"): c for c in prev.get("conditions") or [] if isinstance(c, Mapping)}
    accepted = _condition(prev_conds, "Accepted", False, "InvalidSpec", message, now, run.generation)
    status = {"observedGeneration": run.generation, "phase": prev.get("phase") or PHASE_PENDING,
              "conditions": [accepted]}
    was_invalid = (prev_conds.get("Accepted") or {}).get("reason") == "InvalidSpec"
    events = () if was_invalid else (Event("Warning", "InvalidSpec", message),)
    return Plan(actions=(), status=status, events=events, requeue_after=None)


def _stage_counts(nodes: Sequence[_Node]) -> dict[str, int]:
    counted = [n for n in nodes if n.counted]
    return {
        "total": len(counted),
        "active": sum(1 for n in counted if n.state == RUNNING),
        "succeeded": sum(1 for n in counted if n.state == DONE),
        "failed": sum(1 for n in counted if n.state in (DEAD, BLOCKED)),
    }


def _condition(prev_conds: Mapping[str, Mapping], ctype: str, value: bool, reason: str, message: str,
               now: float, generation: int) -> dict:
    status = "True" if value else "False"
    old = prev_conds.get(ctype)
    ltt = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": ctype, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": ltt or _rfc3339(now), "observedGeneration": generation}


_STATE_PRIORITY = {ACTIVE: 0, PENDING: 1, SUSPENDED: 2, FAILED: 3, SUCCEEDED: 4}


def _jobs_list(spec: RunSpec, observed: Observed, latest_names: set[str]) -> list[dict]:
    """The most relevant children (running first, then failures, then successes, older attempts
    last), at most MAX_STATUS_JOBS, shown in graph order."""
    ranked = sorted(observed.jobs, key=lambda j: (
        _STATE_PRIORITY.get(j.state, 5) + (0 if j.name in latest_names else 10),
        _graph_key(j.stage, j.member, j.attempt)))
    chosen = sorted(ranked[:MAX_STATUS_JOBS], key=lambda j: _graph_key(j.stage, j.member, j.attempt))
    out = []
    for j in chosen:
        entry: dict[str, Any] = {"name": j.name, "stage": j.stage, "member": j.member,
                                 "attempt": j.attempt, "state": j.state}
        if j.state == SUCCEEDED:
            metrics = observed.member_metrics.get(f"{j.stage}/{j.member}") or {}
            if isinstance(metrics.get("valAccuracy"), (int, float)):
                entry["valAccuracy"] = _fmt(metrics["valAccuracy"])
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
        if message and (j.state == FAILED or reason == "SuspendedExternally"
                        or (j.state == PENDING and j.reason not in BENIGN_WAITING)):
            entry["message"] = _short_message(message)
        out.append(entry)
    return out


def _result(spec: RunSpec, run: RunRef, observed: Observed, succeeded: Sequence[int]) -> dict:
    metrics = observed.member_metrics.get(f"{STAGE_AVERAGE}/{AVERAGE_MEMBER}") or {}
    prefix = run_prefix(spec, run)
    selected = metrics.get("selected")
    members = metrics.get("members")
    if isinstance(selected, (list, tuple)):
        count = len(selected)
    elif isinstance(members, int) and not isinstance(members, bool):
        count = members
    elif isinstance(members, (list, tuple)) and spec.selection == "uniform":
        count = len(members)
    else:
        count = len(succeeded)
    result: dict[str, Any] = {"model": f"{prefix}/average/model.safetensors",
                              "selection": str(metrics.get("selection") or spec.selection),
                              "members": count}
    if metrics.get("sha256"):
        result["sha256"] = str(metrics["sha256"])
    if isinstance(metrics.get("valAccuracy"), (int, float)):
        result["valAccuracy"] = _fmt(metrics["valAccuracy"])
    if isinstance(metrics.get("testAccuracy"), Mapping):
        result["testAccuracy"] = {str(d): _fmt(a) for d, a in metrics["testAccuracy"].items()}
    best = metrics.get("bestSingle")
    if not isinstance(best, Mapping):
        # Fall back to the members' own metrics: best by validation, as the paper selects.
        cands = [(observed.member_metrics.get(f"{STAGE_TARGET}/{i}") or {}, i) for i in succeeded]
        cands = [(m, i) for m, i in cands if isinstance(m.get("valAccuracy"), (int, float))]
        if cands:
            m, i = max(cands, key=lambda c: (c[0]["valAccuracy"], -c[1]))
            best = {"member": str(i), "valAccuracy": m["valAccuracy"], "testAccuracy": m.get("testAccuracy") or {}}
    if isinstance(best, Mapping):
        b: dict[str, Any] = {"member": str(best.get("member", ""))}
        if best.get("valAccuracy") is not None:
            b["valAccuracy"] = _fmt(best["valAccuracy"])
        if isinstance(best.get("testAccuracy"), Mapping):
            b["testAccuracy"] = {str(d): _fmt(a) for d, a in best["testAccuracy"].items()}
        result["bestSingle"] = b
    diagnostics = _diagnostics(metrics)
    if diagnostics:
        result["diagnostics"] = diagnostics
    return result


# The average's diagnostics (trainer/ratatouille_trainer/diagnostics.py) copied to
# status.result.diagnostics, floats as 4-decimal strings; lists that grow with the number of
# members stay in metrics.json only, so the status stays small for 500 members.
_DIAGNOSTIC_KEYS = ("uniform", "interpolation", "excludedAtChance", "sources", "ensemble", "convergence",
                    "diagnosticWarnings")
_DIAGNOSTIC_DROP = {"convergence": ("bestAtLastMembers",)}


def _diagnostics(metrics: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    for k in _DIAGNOSTIC_KEYS:
        v = metrics.get(k)
        if not v:
            continue
        if isinstance(v, Mapping) and k in _DIAGNOSTIC_DROP:
            v = {kk: vv for kk, vv in v.items() if kk not in _DIAGNOSTIC_DROP[k]}
        out["warnings" if k == "diagnosticWarnings" else k] = _fmt_tree(v)
    return out


def _status(run: RunRef, spec: RunSpec, observed: Observed, now: float, prev: Mapping, phase: str,
            failure: tuple[str, str] | None, nodes: Sequence[_Node], lp: _Node, aux_nodes: Sequence[_Node],
            target_nodes: Sequence[_Node], avg: _Node, succeeded: Sequence[int]) -> dict:
    counted = [n for n in nodes if n.counted]
    finished = sum(1 for n in counted if n.state in _FINISHED)
    stages = {"auxiliary": _stage_counts(aux_nodes), "linearProbe": _stage_counts([lp]),
              "target": _stage_counts(target_nodes), "averaging": _stage_counts([avg])}
    progress = f"{finished}/{len(counted)}"
    prev_conds = {c.get("type"): c for c in prev.get("conditions") or [] if isinstance(c, Mapping)}
    gen = run.generation
    suspended = phase == PHASE_SUSPENDED
    conditions = [
        _condition(prev_conds, "Accepted", True, "SpecValid", "the spec is valid", now, gen),
        _condition(prev_conds, "Suspended", suspended,
                   "Suspended" if suspended else "NotSuspended",
                   "spec.suspend is true: child Jobs are suspended" if suspended else "", now, gen),
        _condition(prev_conds, "Complete", phase == PHASE_SUCCEEDED,
                   "Succeeded" if phase == PHASE_SUCCEEDED else phase,
                   (f"averaged model at {run_prefix(spec, run)}/average/model.safetensors"
                    if phase == PHASE_SUCCEEDED else f"{progress} child Jobs finished"), now, gen),
        _condition(prev_conds, "Failed", failure is not None,
                   failure[0] if failure else "NoFailure", failure[1] if failure else "", now, gen),
    ]
    collapse = _collapse_condition(prev_conds, observed, now, gen) if phase == PHASE_SUCCEEDED else None
    if collapse is not None:
        conditions.append(collapse)
    rejected = [n.latest for n in nodes if n.latest is not None and n.latest.rejected]
    if rejected:
        conditions.append(_condition(prev_conds, "JobsRejected", True, REASON_CREATE_REJECTED,
                                     "; ".join(f"{j.stage}/{j.member}: {_why(j)}" for j in rejected[:5])
                                     + (f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""), now, gen))
    latest_names = {n.latest.name for n in nodes if n.latest is not None}
    status: dict[str, Any] = {
        "observedGeneration": gen,
        "phase": phase,
        "progress": progress,
        "conditions": conditions,
        "stages": stages,
        "jobs": _jobs_list(spec, observed, latest_names),
        "attempts": _attempts_table(observed.jobs, prev),
        "storagePrefix": run_prefix(spec, run),
    }
    if phase == PHASE_SUCCEEDED:
        status["result"] = _result(spec, run, observed, succeeded)
    return status


def _collapse_condition(prev_conds: Mapping[str, Mapping], observed: Observed, now: float,
                        generation: int) -> dict | None:
    """`AveragingCollapsed`: True when the average stage reported that the uniform average of the
    members scores clearly below their mean on validation (no linear mode connectivity); False
    when it reported no collapse; absent when the average wrote no such diagnostic."""
    metrics = observed.member_metrics.get(f"{STAGE_AVERAGE}/{AVERAGE_MEMBER}") or {}
    uniform = metrics.get("uniform")
    if not isinstance(uniform, Mapping) or not isinstance(uniform.get("collapse"), bool):
        return None
    numbers = (f"uniform average validation {_fmt(uniform.get('valAccuracy'))}, members' mean"
               f" {_fmt(uniform.get('membersMeanVal'))}, best member {_fmt(uniform.get('membersBestVal'))}")
    if uniform["collapse"]:
        return _condition(prev_conds, "AveragingCollapsed", True, "UniformAverageBelowMembers",
                          f"{numbers}: the members are not linearly mode connected (lower the learning"
                          f" rates or use greedy selection)", now, generation)
    return _condition(prev_conds, "AveragingCollapsed", False, "NoCollapse", numbers, now, generation)


_PHASE_EVENT = {
    PHASE_PENDING: ("Accepted", "run accepted; creating the auxiliary and linear-probe Jobs"),
    PHASE_AUX: ("AuxiliaryStage", "auxiliary fine-tunings and the linear probe are running"),
    PHASE_TARGET: ("TargetStage", "target fine-tunings are running"),
    PHASE_AVERAGING: ("Averaging", "all target fine-tunings finished; averaging"),
    PHASE_SUCCEEDED: ("Succeeded", "averaged model published"),
    PHASE_SUSPENDED: ("Suspended", "run suspended: child Jobs are suspended"),
}


def _phase_events(spec: RunSpec, prev: Mapping, prev_phase: str | None, phase: str,
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
                                f" accuracy at chance level ({_fmt_tree(avg_metrics.get('chanceLevel'))}): {names}"))
        uniform = avg_metrics.get("uniform")
        if isinstance(uniform, Mapping) and uniform.get("collapse") is True:
            events.append(Event("Warning", "AveragingCollapse",
                                "the uniform average scores below its members: they are not linearly"
                                " mode connected (lower the learning rates or use greedy selection)"))
    return events
