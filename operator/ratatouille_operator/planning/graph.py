"""The graph: which members the run has, what each needs, and in which state each is.

Initialization sources (docs/algorithm.md, stage 3: target i starts from source i mod (M+1)), the
static graph `ratatouille plan` prints (`job_graph`), and the live graph the planner walks
(`build_graph`): the latest attempt of every member decides its state, a member waits for what
it needs and is BLOCKED when that failed permanently. Pure: standard library, `spec`, `naming`, the contract's `layout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from ratatouille_contract import layout

from ..spec import Auxiliary, RunSpec
from .naming import (AuxEntry, aux_entries, aux_entry, aux_hyperparameters, job_name, member_output,
                     prepare_members, target_hyperparameters)
from .vocabulary import (AVERAGE_MEMBER, FAILED, FOUNDATION, IN_FLIGHT, LP_MEMBER, STAGE_AUX, STAGE_AVERAGE,
                         STAGE_LP, STAGE_PREPARE, STAGE_TARGET, SUCCEEDED, ObservedJob, RunRef)

#: Why a spec without an initialization source is invalid: validation refuses it with this
#: message, and the planner, handed one anyway, reports it and creates nothing.
NO_SOURCE = "no initialization source: includeFoundation is false and there are no auxiliaries"


def has_source(include_foundation: bool, auxiliaries: Sequence[Any]) -> bool:
    """Whether the target fine-tunings have something to start from (the one rule; validation
    applies it to the manifest, the planner to the parsed spec)."""
    return bool(include_foundation or auxiliaries)


# -- source assignment (docs/algorithm.md, stage 3) ---------------------------------------------
class Source(NamedTuple):
    name: str                      # "foundation" or the auxiliary's name
    auxiliary: Auxiliary | None    # None for the foundation


def initialization_sources(spec: RunSpec) -> list[Source]:
    """The foundation (if included), then the auxiliaries sorted by name."""
    sources = [Source(FOUNDATION, None)] if spec.include_foundation else []
    sources += [Source(a.name, a) for a in sorted(spec.auxiliaries, key=lambda a: a.name)]
    return sources


def source_of(spec: RunSpec, sources: Sequence[Source], i: int) -> tuple[str, str | None, str | None]:
    """`target_source` with the sources computed once by the caller."""
    if not sources:
        raise ValueError(NO_SOURCE)
    aux = sources[i % len(sources)].auxiliary
    if aux is None:
        return FOUNDATION, None, None
    if aux.recycled:
        return aux.name, aux.weights, None
    # Several fine-tunings of one auxiliary: each is used in turn, so all are used once before
    # any is used twice.
    entry = aux_entry(spec, aux, (i // len(sources)) % aux.runs)
    return entry.member, layout.model_uri(entry.uri), entry.key


def target_source(spec: RunSpec, i: int) -> tuple[str, str | None, str | None]:
    """(source name, featurizer weights URI or None for the foundation, aux cache key or None)."""
    return source_of(spec, initialization_sources(spec), i)


# -- the static job graph (for `ratatouille plan`) ------------------------------------------------
def job_graph(spec: RunSpec, run: RunRef) -> list[dict[str, Any]]:
    """Every member of the run's graph with what it needs: JSON-ready, in creation order."""
    prep = prepare_members(spec)

    def prep_needs(dataset: str | None) -> list[str]:
        return [f"{STAGE_PREPARE}/{prep[dataset]}"] if dataset in prep else []

    nodes: list[dict[str, Any]] = [
        {"stage": STAGE_PREPARE, "member": m, "needs": [], "dataset": d,
         "note": f"{d} at {spec.foundation.input_size} px -> {layout.data_cache_uri(spec.storage.uri)}/<content key>",
         "output": member_output(spec, run, STAGE_PREPARE, m)} for d, m in prep.items()]
    nodes.append({"stage": STAGE_LP, "member": LP_MEMBER, "needs": prep_needs(spec.target.dataset),
                  "output": member_output(spec, run, STAGE_LP, LP_MEMBER)})
    entries = aux_entries(spec)
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if aux.recycled:
            nodes.append({"stage": STAGE_AUX, "member": aux.name, "needs": [], "job": False,
                          "note": f"recycled weights {aux.weights}: no Job", "output": aux.weights})
        for e in (e for e in entries if e.auxiliary is aux):
            hp = aux_hyperparameters(spec, aux, e.k)
            nodes.append({"stage": STAGE_AUX, "member": e.member, "needs": prep_needs(aux.dataset),
                          "cacheKey": e.key, "hyperparameters": hp,
                          "note": f"cache {e.key}; " + " ".join(f"{n}={v}" for n, v in hp.items()),
                          "output": e.uri})
    sources = initialization_sources(spec)
    for i in range(spec.finetune.runs):
        source, _f, key = source_of(spec, sources, i)
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


# -- the children as observed ------------------------------------------------------------------
@dataclass(frozen=True)
class Children:
    """The run's observed Jobs, indexed once."""
    latest: Mapping[tuple[str, str], ObservedJob]   # (stage, member) -> its latest attempt
    names: frozenset[str]                           # every observed Job's name
    in_flight: tuple[ObservedJob, ...]              # Pending, Active or Suspended


def index_children(jobs: Iterable[ObservedJob]) -> Children:
    latest: dict[tuple[str, str], ObservedJob] = {}
    names, in_flight = set(), []
    for j in jobs:
        names.add(j.name)
        if j.state in IN_FLIGHT:
            in_flight.append(j)
        cur = latest.get((j.stage, j.member))
        if cur is None or j.attempt > cur.attempt:
            latest[(j.stage, j.member)] = j
    return Children(latest, frozenset(names), tuple(in_flight))


# -- member states ----------------------------------------------------------------------------
# What the graph knows about one member after reading its Jobs.
MISSING = "missing"      # no Job yet
RUNNING = "running"      # latest attempt Pending/Active/Suspended
DONE = "done"            # succeeded (or a cache hit)
RETRY = "retry"          # latest attempt failed, attempts left
DEAD = "dead"            # failed at maxAttempts
BLOCKED = "blocked"      # cannot run: what it needs failed permanently (counts as failed)

FINISHED = frozenset({DONE, DEAD, BLOCKED})


def member_state(latest: ObservedJob | None, max_attempts: int) -> str:
    """The state of a member from its latest attempt (before what it needs is considered)."""
    if latest is None:
        return MISSING
    if latest.state == SUCCEEDED:
        return DONE
    if latest.state == FAILED:
        # A create the API server refused fails the same way every time.
        return RETRY if latest.attempt < max_attempts and not latest.rejected else DEAD
    return RUNNING


class Node:
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
        self.state = member_state(latest, max_attempts)

    def needs(self, state: str) -> None:
        """This member waits for something in `state`, and cannot run if it failed for good."""
        self.ready = self.ready and state == DONE
        if self.state == MISSING and state in (DEAD, BLOCKED):
            self.state = BLOCKED


@dataclass
class Graph:
    """The live graph, in creation order: prepare, linear probe, auxiliaries, targets, average."""
    prep: dict[str, Node]        # prepare member -> node (the datasets still needed, or seen)
    lp: Node
    aux: list[Node]
    targets: list[Node]
    avg: Node

    @property
    def nodes(self) -> list[Node]:
        return [*self.prep.values(), self.lp, *self.aux, *self.targets, self.avg]

    @property
    def succeeded(self) -> list[int]:
        return [n.index for n in self.targets if n.state == DONE]

    @property
    def failed_targets(self) -> int:
        return sum(1 for n in self.targets if n.state in (DEAD, BLOCKED))

    @property
    def possible(self) -> int:
        """Targets that have not finished and may still succeed."""
        return len(self.targets) - len(self.succeeded) - self.failed_targets


def _prepare_nodes(spec: RunSpec, entries: Sequence[AuxEntry], latest: Mapping, cache_hits: frozenset[str]
                   ) -> dict[str, Node]:
    """Prepared datasets (spec.dataPreparation): one prepare member per dataset still needed (an
    auxiliary dataset whose fine-tunings are all cached needs none), or already seen."""
    prep = prepare_members(spec)
    needed = {spec.target.dataset} if prep else set()
    needed |= {str(e.auxiliary.dataset) for e in entries if prep and e.key not in cache_hits}
    return {m: Node(STAGE_PREPARE, m, latest.get((STAGE_PREPARE, m)), spec.failure_policy.max_attempts)
            for dataset, m in prep.items() if dataset in needed or (STAGE_PREPARE, m) in latest}


def _prep_state(spec: RunSpec, prep_nodes: Mapping[str, Node], dataset: str | None) -> str:
    """The state of the prepared dataset a member reads (DONE when it reads none)."""
    node = prep_nodes.get(prepare_members(spec).get(dataset or "", ""))
    return DONE if node is None else node.state


def _aux_nodes(spec: RunSpec, entries: Sequence[AuxEntry], latest: Mapping, cache_hits: frozenset[str],
               prep_nodes: Mapping[str, Node]) -> list[Node]:
    out = []
    for e in entries:
        n = Node(STAGE_AUX, e.member, latest.get((STAGE_AUX, e.member)), spec.failure_policy.max_attempts)
        n.cache_key = e.key
        if e.key in cache_hits:
            n.counted = n.latest is not None
            n.state = DONE
        else:
            n.needs(_prep_state(spec, prep_nodes, e.auxiliary.dataset))
        out.append(n)
    return out


def _target_nodes(spec: RunSpec, sources: Sequence[Source], latest: Mapping, lp: Node,
                  aux_nodes: Sequence[Node]) -> list[Node]:
    aux_state = {n.member: n.state for n in aux_nodes}   # cache hits are DONE
    out = []
    for i in range(spec.finetune.runs):
        n = Node(STAGE_TARGET, str(i), latest.get((STAGE_TARGET, str(i))), spec.failure_policy.max_attempts)
        n.index = i
        n.source, _featurizer, key = source_of(spec, sources, i)
        n.needs(lp.state)
        n.needs(aux_state.get(n.source, DONE) if key else DONE)
        out.append(n)
    return out


def build_graph(spec: RunSpec, latest: Mapping[tuple[str, str], ObservedJob], cache_hits: frozenset[str],
                sources: Sequence[Source]) -> Graph:
    """Every member with its state and readiness; the average is ready once no target may still
    succeed and at least minSucceeded did."""
    entries = aux_entries(spec)
    fp = spec.failure_policy
    prep_nodes = _prepare_nodes(spec, entries, latest, cache_hits)
    lp = Node(STAGE_LP, LP_MEMBER, latest.get((STAGE_LP, LP_MEMBER)), fp.max_attempts)
    lp.needs(_prep_state(spec, prep_nodes, spec.target.dataset))
    aux_nodes = _aux_nodes(spec, entries, latest, cache_hits, prep_nodes)
    targets = _target_nodes(spec, sources, latest, lp, aux_nodes)
    avg = Node(STAGE_AVERAGE, AVERAGE_MEMBER, latest.get((STAGE_AVERAGE, AVERAGE_MEMBER)), fp.max_attempts)
    graph = Graph(prep_nodes, lp, aux_nodes, targets, avg)
    avg.ready = graph.possible == 0 and len(graph.succeeded) >= fp.min_succeeded
    return graph
