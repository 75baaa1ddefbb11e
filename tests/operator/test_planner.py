"""Planner tests as state-in/state-out tables: (spec, observed Jobs, now, previous status) in,
(actions, status, events, requeue) out. No cluster, no clock, no storage."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import time

import pytest

from ratatouille_operator import planner as P
from ratatouille_operator.spec import RunSpec
from ratatouille_contract import hparams, layout
from ratatouille_contract.jobdesc import JobDescription

RUN = P.RunRef(namespace="team-a", name="office", uid="uid-123", generation=2, creation_time=1000.0)
PREFIX = "s3://bucket/runs/team-a/office/uid-123"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

BASE = {
    "foundation": {"model": "resnet18", "weights": "s3://models/r18.safetensors", "inputSize": 32},
    "target": {"dataset": "s3://data/office", "testDomains": ["art"], "holdoutFraction": "0.25"},
    # Deliberately not sorted by name: sources are sorted (docs/algorithm.md, stage 3).
    "auxiliaries": [
        {"name": "vlcs", "weights": "s3://community/vlcs.safetensors"},
        {"name": "pacs", "dataset": "s3://data/pacs", "runs": 2},
    ],
    "includeFoundation": True,
    "linearProbe": {"steps": 50, "batchSize": 16, "lr": "1e-3"},
    "auxiliaryFinetune": {"steps": 60, "batchSize": 8, "lr": "5e-5"},
    "finetune": {"runs": 6, "steps": 40, "batchSize": 4, "headWarmupSteps": 5, "evalEvery": 10,
                 "hyperparameters": {
                     "lr": {"default": "5e-5", "choices": ["1e-5", "3e-5", "5e-5"]},
                     "weightDecay": {"default": "0", "choices": ["1e-4", "1e-6"]},
                     "dropout": {"default": "0", "choices": ["0", "0.1", "0.5"]}}},
    "averaging": {"selection": "uniform"},
    "seed": 3,
    "storage": {"uri": "s3://bucket/runs", "endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
    "parallelism": 8,
    "failurePolicy": {"backoffLimit": 1, "maxAttempts": 2, "minSucceeded": 2, "retryBackoffSeconds": 10},
}


def make_spec(**changes) -> RunSpec:
    """BASE with top-level keys replaced, and `a__b` meaning spec[a][b]."""
    d = copy.deepcopy(BASE)
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__")
            d[outer][inner] = value
        else:
            d[key] = value
    return RunSpec.from_dict(d)


SPEC = make_spec()


def job(stage: str, member: str, state: str = "Succeeded", attempt: int = 1, finish: float | None = None,
        reason: str | None = None) -> P.ObservedJob:
    return P.ObservedJob(name=P.job_name(RUN.name, stage, member, attempt), stage=stage, member=member,
                         attempt=attempt, state=state, finish_time=finish, reason=reason)


def lp(state="Succeeded", **kw):
    return job("linear-probe", "0", state, **kw)


def aux(member, state="Succeeded", **kw):
    return job("aux", member, state, **kw)


def tgt(i, state="Succeeded", **kw):
    return job("target", str(i), state, **kw)


def observed(*jobs, hits=(), metrics=None) -> P.Observed:
    return P.Observed(jobs=tuple(jobs), cache_hits=frozenset(hits), member_metrics=metrics or {})


def creates(plan: P.Plan) -> list[tuple[str, str, int]]:
    return [(a.stage, a.member, a.attempt) for a in plan.actions if isinstance(a, P.CreateJob)]


def created(plan: P.Plan, stage: str, member: str) -> P.CreateJob:
    return next(a for a in plan.actions if isinstance(a, P.CreateJob) and (a.stage, a.member) == (stage, member))


def cond(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def ready_for_targets(spec=SPEC):
    """LP and both pacs fine-tunings succeeded: every target may start."""
    return [lp(), aux("pacs-0"), aux("pacs-1")]


# -- fresh run ---------------------------------------------------------------------------------
def test_fresh_run_creates_linear_probe_and_trained_auxiliaries_only():
    p = P.plan(RUN, SPEC, observed(), now=1000.0)
    assert creates(p) == [("linear-probe", "0", 1), ("aux", "pacs-0", 1), ("aux", "pacs-1", 1)]
    assert [a.name for a in p.actions] == ["office-lp-0-a1", "office-aux-pacs-0-a1", "office-aux-pacs-1-a1"]
    a = created(p, "aux", "pacs-1")
    assert a.labels == {
        "ratatouille.dev/run": "office", "ratatouille.dev/run-uid": "uid-123",
        "ratatouille.dev/stage": "aux", "ratatouille.dev/member": "pacs-1", "ratatouille.dev/attempt": "1",
        "app.kubernetes.io/managed-by": "ratatouille-operator"}
    d = a.description
    key = P.aux_cache_key(SPEC, "pacs", 1)
    assert d.output == f"s3://bucket/runs/cache/aux/{key}"
    # The auxiliary pool is seeded by auxiliaryFinetune.seed (0), not the run's seed (3): it is
    # shared by runs of every seed.
    assert d.data.dataset == "s3://data/pacs" and d.data.testDomains == () and d.data.splitSeed == 0
    assert (d.training.steps, d.training.batchSize, d.training.lr) == (60, 8, "5e-5")
    assert d.hyperparameters == {"lr": "5e-5"}
    assert (d.training.lpSteps, d.training.lpLr) == (50, "1e-3")
    assert d.seed == 1 and d.storage_endpoint == "http://minio:9000"
    assert d.run.uid == "uid-123" and d.foundation.weights == "s3://models/r18.safetensors"
    l = created(p, "linear-probe", "0").description
    assert l.output == f"{PREFIX}/linear-probe"
    assert l.data.testDomains == ("art",) and l.data.holdoutFraction == 0.25
    assert (l.training.steps, l.training.batchSize, l.training.lr) == (50, 16, "1e-3")
    # The description survives its JSON form (what the container gets).
    assert JobDescription.from_json(d.to_json()) == d

    s = p.status
    assert s["phase"] == "Pending" and s["observedGeneration"] == 2
    assert s["progress"] == "0/10"                     # lp + 2 aux + 6 targets + average
    assert s["stages"]["auxiliary"] == {"total": 2, "active": 0, "succeeded": 0, "failed": 0}
    assert s["storagePrefix"] == PREFIX
    assert cond(s, "Accepted")["status"] == "True"
    assert cond(s, "Complete")["status"] == "False" and cond(s, "Failed")["status"] == "False"
    assert [e.reason for e in p.events] == ["Accepted"]
    assert p.requeue_after is None


def test_kueue_queue_label_is_added_when_queue_name_is_set():
    p = P.plan(RUN, make_spec(queueName="gpu-queue"), observed(), now=1000.0)
    assert all(a.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue" for a in p.actions)
    assert all("kueue.x-k8s.io/queue-name" not in a.labels for a in P.plan(RUN, SPEC, observed(), 1000.0).actions)


# -- parallelism -------------------------------------------------------------------------------
@pytest.mark.parametrize("parallelism, jobs, expected", [
    (1, [], [("linear-probe", "0", 1)]),
    (2, [], [("linear-probe", "0", 1), ("aux", "pacs-0", 1)]),
    # Two in flight (Active, Pending) out of 3: one more, in graph order.
    (3, [lp("Active"), aux("pacs-0", "Pending")], [("aux", "pacs-1", 1)]),
    # Suspended (waiting for quota) Jobs also occupy a slot.
    (3, [lp("Active"), aux("pacs-0", "Suspended"), aux("pacs-1", "Active")], []),
    # Finished Jobs do not count: targets by index, foundation/recycled ones need only the LP.
    (3, [lp(), aux("pacs-0", "Active"), aux("pacs-1", "Active")], [("target", "0", 1)]),
    (4, [lp(), aux("pacs-0", "Active"), aux("pacs-1", "Active")], [("target", "0", 1), ("target", "2", 1)]),
])
def test_partial_creation_under_parallelism(parallelism, jobs, expected):
    p = P.plan(RUN, make_spec(parallelism=parallelism), observed(*jobs), now=2000.0)
    assert creates(p) == expected


def test_targets_wait_for_their_own_source_only():
    # LP done, pacs-0 done, pacs-1 still running: sources are [foundation, pacs, vlcs];
    # targets 1 and 4 use pacs-0 and pacs-1 respectively.
    p = P.plan(RUN, SPEC, observed(lp(), aux("pacs-0"), aux("pacs-1", "Active")), now=2000.0)
    assert creates(p) == [("target", str(i), 1) for i in (0, 1, 2, 3, 5)]
    assert p.status["phase"] == "Auxiliary"
    # Nothing starts before the linear probe succeeds.
    p = P.plan(RUN, SPEC, observed(lp("Active"), aux("pacs-0"), aux("pacs-1")), now=2000.0)
    assert creates(p) == []


def test_target_description():
    p = P.plan(RUN, SPEC, observed(*ready_for_targets()), now=2000.0)
    t0, t1, t2 = (created(p, "target", str(i)).description for i in range(3))
    head = f"{PREFIX}/linear-probe/model.safetensors"
    assert t0.init.source == "foundation" and t0.init.featurizer is None and t0.init.head == head
    assert t0.training.headWarmupSteps == 0          # foundation: the LP head already fits
    key = P.aux_cache_key(SPEC, "pacs", 0)
    assert t1.init.source == "pacs-0"
    assert t1.init.featurizer == f"s3://bucket/runs/cache/aux/{key}/model.safetensors"
    assert t1.training.headWarmupSteps == 5
    assert t2.init.source == "vlcs" and t2.init.featurizer == "s3://community/vlcs.safetensors"
    assert t1.output == f"{PREFIX}/target/1"
    assert (t1.training.steps, t1.training.batchSize, t1.training.evalEvery) == (40, 4, 10)
    assert t1.data.dataset == "s3://data/office" and t1.data.splitSeed == 3
    assert {t0.seed, t1.seed, t2.seed} == {3000, 3001, 3002}


# -- hyperparameters -------------------------------------------------------------------------------
def test_run_zero_takes_defaults_and_others_draw_from_choices():
    p = P.plan(RUN, make_spec(parallelism=20), observed(*ready_for_targets()), now=2000.0)
    d0 = created(p, "target", "0").description
    assert dict(d0.hyperparameters) == {"dropout": "0", "lr": "5e-5", "weightDecay": "0"}
    assert (d0.training.lr, d0.training.weightDecay, d0.training.dropout) == ("5e-5", "0", "0")
    table = {k: (h.default, h.choices) for k, h in SPEC.finetune.hyperparameters.items()}
    draws = []
    for i in range(1, 6):
        d = created(p, "target", str(i)).description
        assert dict(d.hyperparameters) == hparams.draw_all(3, i, table)
        assert d.training.lr == d.hyperparameters["lr"] and d.training.lr in ("1e-5", "3e-5", "5e-5")
        assert d.training.weightDecay in ("1e-4", "1e-6")
        draws.append(tuple(sorted(d.hyperparameters.items())))
    assert len(set(draws)) > 1   # runs differ


# -- source assignment ----------------------------------------------------------------------------
@pytest.mark.parametrize("include_foundation, auxiliaries, expected", [
    # foundation, pacs (3 runs), vlcs (recycled): pacs-0, -1, -2 each used once before any repeats.
    (True, [{"name": "vlcs", "weights": "s3://c/v"}, {"name": "pacs", "dataset": "s3://d/p", "runs": 3}],
     ["foundation", "pacs-0", "vlcs", "foundation", "pacs-1", "vlcs", "foundation", "pacs-2", "vlcs",
      "foundation", "pacs-0"]),
    (False, [{"name": "b", "dataset": "s3://d/b", "runs": 2}, {"name": "a", "dataset": "s3://d/a", "runs": 1}],
     ["a-0", "b-0", "a-0", "b-1", "a-0", "b-0"]),
    (True, [], ["foundation"] * 3),
])
def test_round_robin_source_assignment(include_foundation, auxiliaries, expected):
    spec = make_spec(includeFoundation=include_foundation, auxiliaries=auxiliaries)
    assert [P.target_source(spec, i)[0] for i in range(len(expected))] == expected
    names = [s.name for s in P.initialization_sources(spec)]
    assert names == (["foundation"] if include_foundation else []) + sorted(a["name"] for a in auxiliaries)


def test_target_source_featurizers_and_cache_keys():
    assert P.target_source(SPEC, 0) == ("foundation", None, None)
    name, uri, key = P.target_source(SPEC, 4)
    assert name == "pacs-1" and key == P.aux_cache_key(SPEC, "pacs", 1)
    assert uri == layout.aux_cache_uri(SPEC.storage.uri, key) + "/model.safetensors"
    assert P.target_source(SPEC, 5) == ("vlcs", "s3://community/vlcs.safetensors", None)


def test_aux_cache_key_depends_on_what_the_auxiliary_computes_only():
    k = P.aux_cache_key(SPEC, "pacs", 0)
    assert re.fullmatch(r"[0-9a-f]{16}", k)
    assert k != P.aux_cache_key(SPEC, "pacs", 1)
    # Target-side settings do not change the auxiliary fine-tuning: same key, shared cache.
    other_target = make_spec(target={"dataset": "s3://data/other", "testDomains": ["x"]},
                             finetune={"runs": 2}, storage={"uri": "s3://bucket/runs"})
    assert P.aux_cache_key(other_target, "pacs", 0) == k
    assert P.aux_cache_key(make_spec(seed=4), "pacs", 0) == k  # the pool is shared across run seeds
    for changed in (make_spec(auxiliaryFinetune__seed=1), make_spec(auxiliaryFinetune__steps=61), make_spec(linearProbe__lr="1e-2"),
                    make_spec(foundation__weights="s3://models/other.safetensors"), make_spec(foundation__inputSize=64)):
        assert P.aux_cache_key(changed, "pacs", 0) != k


# -- failures and retries -----------------------------------------------------------------------
@pytest.mark.parametrize("max_attempts, failed_attempt, finish, now, expect_create, expect_requeue", [
    (2, 1, 2000.0, 2005.0, False, 5.0),      # backoff 10 s * 2**0 not yet elapsed
    (2, 1, 2000.0, 2010.0, True, None),      # exactly at the backoff: attempt 2
    (3, 2, 2000.0, 2019.0, False, 1.0),      # second failure: 10 * 2**1 = 20 s
    (3, 2, 2000.0, 2020.0, True, None),      # attempt 3
    (2, 2, 2000.0, 9999.0, False, None),     # attempts exhausted: permanently failed
])
def test_retry_attempt_after_exponential_backoff(max_attempts, failed_attempt, finish, now, expect_create,
                                                 expect_requeue):
    spec = make_spec(failurePolicy={"maxAttempts": max_attempts, "minSucceeded": 2, "retryBackoffSeconds": 10},
                     finetune={"runs": 4}, includeFoundation=True, auxiliaries=[])
    older = [tgt(3, "Failed", attempt=a, finish=finish - 100) for a in range(1, failed_attempt)]
    jobs = [lp(), tgt(0), tgt(1), tgt(2, "Active"), *older,
            tgt(3, "Failed", attempt=failed_attempt, finish=finish, reason="BackoffLimitExceeded")]
    p = P.plan(RUN, spec, observed(*jobs), now=now)
    if expect_create:
        assert creates(p) == [("target", "3", failed_attempt + 1)]
        a = created(p, "target", "3")
        assert a.name == f"office-target-3-a{failed_attempt + 1}"
        assert a.labels["ratatouille.dev/attempt"] == str(failed_attempt + 1)
        assert any(e.reason == "Retrying" and e.type == "Warning" for e in p.events)
    else:
        assert creates(p) == []
    assert p.requeue_after == expect_requeue
    assert p.status["phase"] == "Target"


def test_failures_under_the_budget_keep_the_run_going():
    # 6 runs, minSucceeded 2: 3 dead, 1 succeeded, 2 still possible -> still Target, no deletes.
    jobs = ready_for_targets() + [tgt(0, "Failed", attempt=2, finish=1.0), tgt(1, "Failed", attempt=2, finish=1.0),
                                  tgt(2, "Failed", attempt=2, finish=1.0), tgt(3), tgt(4, "Active")]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2000.0)
    assert p.status["phase"] == "Target"
    assert creates(p) == [("target", "5", 1)]
    assert not any(isinstance(a, P.DeleteJob) for a in p.actions)
    assert p.status["stages"]["target"] == {"total": 6, "active": 1, "succeeded": 1, "failed": 3}
    assert cond(p.status, "Failed")["status"] == "False"
    assert any(e.reason == "MembersFailed" for e in p.events)


@pytest.mark.parametrize("jobs, hits, reason", [
    # 6 runs, minSucceeded 2: 5 dead -> at most 1 can succeed.
    ([*ready_for_targets(), *(tgt(i, "Failed", attempt=2, finish=1.0) for i in range(5)), tgt(5, "Active")],
     (), "MinSucceededNotMet"),
    # pacs-0 and pacs-1 dead: targets 1, 4 blocked (count as failed) + 0, 2, 3 dead -> only 5 left.
    ([lp(), aux("pacs-0", "Failed", attempt=2, finish=1.0), aux("pacs-1", "Failed", attempt=2, finish=1.0),
      *(tgt(i, "Failed", attempt=2, finish=1.0) for i in (0, 2, 3)), tgt(5, "Active")],
     (), "MinSucceededNotMet"),
    ([lp("Failed", attempt=2, finish=1.0), aux("pacs-0", "Active"), aux("pacs-1")], (), "LinearProbeFailed"),
    ([*ready_for_targets(), *(tgt(i) for i in range(6)), job("average", "0", "Failed", attempt=2, finish=1.0)],
     (), "AveragingFailed"),
])
def test_over_the_budget_fails_the_run_and_deletes_running_children(jobs, hits, reason):
    p = P.plan(RUN, SPEC, observed(*jobs, hits=hits), now=2000.0)
    assert p.status["phase"] == "Failed"
    assert creates(p) == []
    in_flight = sorted(j.name for j in jobs if j.state in ("Pending", "Active", "Suspended"))
    assert sorted(a.name for a in p.actions) == in_flight
    assert all(isinstance(a, P.DeleteJob) and a.reason == reason for a in p.actions)
    f = cond(p.status, "Failed")
    assert (f["status"], f["reason"]) == ("True", reason)
    assert cond(p.status, "Complete")["status"] == "False"
    assert any(e.type == "Warning" and e.reason == reason for e in p.events)
    assert p.requeue_after is None


def test_dead_auxiliary_blocks_only_its_targets_when_the_budget_allows():
    jobs = [lp(), aux("pacs-0", "Failed", attempt=2, finish=1.0), aux("pacs-1")]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2000.0)
    assert p.status["phase"] == "Target"
    assert creates(p) == [("target", str(i), 1) for i in (0, 2, 3, 4, 5)]   # not 1 (pacs-0)
    assert p.status["stages"]["target"]["failed"] == 1
    assert p.status["stages"]["auxiliary"] == {"total": 2, "active": 0, "succeeded": 1, "failed": 1}


def test_failed_run_stays_failed_and_still_stops_children():
    first = P.plan(RUN, SPEC, observed(lp("Failed", attempt=2, finish=1.0), aux("pacs-0", "Active")), now=2000.0)
    assert first.status["phase"] == "Failed"
    # Next reconcile: the deletion has not landed yet; the LP Job even vanished. Still Failed.
    again = P.plan(RUN, SPEC, observed(aux("pacs-0", "Active")), now=2100.0, previous_status=first.status)
    assert again.status["phase"] == "Failed"
    assert again.actions == (P.DeleteJob("office-aux-pacs-0-a1", "LinearProbeFailed"),)
    assert again.events == ()
    assert cond(again.status, "Failed")["lastTransitionTime"] == cond(first.status, "Failed")["lastTransitionTime"]


# -- minSucceeded and averaging ------------------------------------------------------------------------
def test_min_succeeded_met_with_failures_averages_only_the_succeeded_members():
    jobs = ready_for_targets() + [tgt(0), tgt(1, "Failed", attempt=2, finish=1.0), tgt(2), tgt(3),
                                  tgt(4, "Failed", attempt=2, finish=1.0), tgt(5)]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2000.0)
    assert creates(p) == [("average", "0", 1)]
    d = created(p, "average", "0").description
    assert [m.member for m in d.members] == ["0", "2", "3", "5"]
    assert [m.source for m in d.members] == ["foundation", "vlcs", "foundation", "vlcs"]
    assert d.members[1].uri == f"{PREFIX}/target/2"
    assert d.output == f"{PREFIX}/average" and d.selection == "uniform"
    assert p.status["phase"] == "Averaging"


def test_average_waits_for_every_target_to_finish():
    jobs = ready_for_targets() + [tgt(i) for i in range(5)] + [tgt(5, "Failed", attempt=1, finish=1990.0)]
    p = P.plan(RUN, SPEC, observed(*jobs), now=1995.0)   # target 5 may still be retried
    assert creates(p) == [] and p.requeue_after == 5.0
    assert p.status["phase"] == "Target"


AVG_METRICS = {
    "stage": "average", "member": "average", "valAccuracy": 0.87123, "testAccuracy": {"art": 0.7349},
    "sha256": "ab" * 32, "selection": "greedy", "members": ["0", "1", "2", "3", "4", "5"],
    "selected": ["0", "2", "5"],
    "bestSingle": {"member": "2", "valAccuracy": 0.86, "testAccuracy": {"art": 0.7}},
    "uniform": {"valAccuracy": 0.5, "membersMeanVal": 0.8, "membersBestVal": 0.86, "collapse": True},
    "interpolation": {"alphas": [0.0, 0.5, 1.0], "valAccuracy": [0.8, 0.3, 0.81]},
}


def test_all_done_averaging_then_succeeded_with_result():
    spec = make_spec(averaging={"selection": "greedy"})
    jobs = ready_for_targets() + [tgt(i) for i in range(6)]
    metrics = {f"target/{i}": {"valAccuracy": 0.8 + i / 100, "testAccuracy": {"art": 0.6}} for i in range(6)}
    averaging = P.plan(RUN, spec, observed(*jobs, job("average", "0", "Active"), metrics=metrics), now=3000.0)
    assert averaging.status["phase"] == "Averaging" and creates(averaging) == []

    metrics["average/0"] = AVG_METRICS
    done = P.plan(RUN, spec, observed(*jobs, job("average", "0"), metrics=metrics), now=3100.0,
                  previous_status=averaging.status)
    s = done.status
    assert json.loads(json.dumps(s)) == s           # plain JSON, ready for the status subresource
    assert done.actions == () and done.requeue_after is None
    assert s["phase"] == "Succeeded" and s["progress"] == "10/10"
    assert cond(s, "Complete")["status"] == "True" and cond(s, "Failed")["status"] == "False"
    r = s["result"]
    assert r["model"] == f"{PREFIX}/average/model.safetensors"
    assert r["sha256"] == "ab" * 32 and r["selection"] == "greedy" and r["members"] == 3
    assert r["valAccuracy"] == "0.871" and r["testAccuracy"] == {"art": "0.735"}
    assert r["bestSingle"] == {"member": "2", "valAccuracy": "0.860", "testAccuracy": {"art": "0.700"}}
    assert r["diagnostics"]["uniform"] == {"valAccuracy": "0.5000", "membersMeanVal": "0.8000",
                                           "membersBestVal": "0.8600", "collapse": True}
    assert r["diagnostics"]["interpolation"]["valAccuracy"] == ["0.8000", "0.3000", "0.8100"]
    reasons = [(e.type, e.reason) for e in done.events]
    assert ("Normal", "Succeeded") in reasons and ("Warning", "AveragingCollapse") in reasons
    target_entries = [j for j in s["jobs"] if j["stage"] == "target"]
    assert target_entries[2]["valAccuracy"] == "0.820"

    # Terminal: a later reconcile (even past a deadline, even with Jobs gone) changes nothing.
    later = P.plan(RUN, make_spec(activeDeadlineSeconds=10), observed(), now=99999.0, previous_status=s)
    assert later.actions == () and later.events == () and later.requeue_after is None
    assert later.status["phase"] == "Succeeded" and later.status["result"] == r


def test_best_single_falls_back_to_member_metrics():
    jobs = ready_for_targets() + [tgt(i) for i in range(6)] + [job("average", "0")]
    metrics = {f"target/{i}": {"valAccuracy": v, "testAccuracy": {"art": 0.5}}
               for i, v in enumerate([0.7, 0.9, 0.8, 0.9, 0.1, 0.2])}
    metrics["average/0"] = {"valAccuracy": 0.91, "testAccuracy": {"art": 0.6}, "sha256": "00"}
    r = P.plan(RUN, SPEC, observed(*jobs, metrics=metrics), now=3000.0).status["result"]
    assert r["bestSingle"]["member"] == "1" and r["bestSingle"]["valAccuracy"] == "0.900"
    assert r["members"] == 6 and "diagnostics" not in r


# -- suspend / resume ---------------------------------------------------------------------------------
def held(o: P.ObservedJob, held: bool = True, queued: bool = False) -> P.ObservedJob:
    return dataclasses.replace(o, held=held, queued=queued)


def test_suspend_suspends_running_children_and_creates_nothing():
    jobs = [lp(), aux("pacs-0", "Active"), held(aux("pacs-1", "Suspended")), tgt(0, "Pending")]
    p = P.plan(RUN, make_spec(suspend=True), observed(*jobs), now=2000.0)
    assert p.actions == (P.SetSuspend("office-aux-pacs-0-a1", True), P.SetSuspend("office-target-0-a1", True))
    assert p.status["phase"] == "Suspended"
    assert cond(p.status, "Suspended")["status"] == "True"
    assert [e.reason for e in p.events] == ["Suspended"]


def test_suspend_holds_jobs_someone_else_suspended_and_queued_ones_through_kueue():
    # A Job Kueue holds back for quota is held by the run too (else Kueue admits it while the
    # run is suspended); a queued Job is held through Kueue (the action says so).
    jobs = [lp(), held(aux("pacs-0", "Suspended"), False, queued=True), held(aux("pacs-1", "Active"), False, queued=True),
            held(tgt(0, "Active"), True, queued=True)]
    p = P.plan(RUN, make_spec(suspend=True), observed(*jobs), now=2000.0)
    assert p.actions == (P.SetSuspend("office-aux-pacs-0-a1", True, True), P.SetSuspend("office-aux-pacs-1-a1", True, True),
                         P.SetSuspend("office-target-0-a1", True, True))


def test_resume_unsuspends_and_continues():
    suspended = P.plan(RUN, make_spec(suspend=True), observed(lp(), aux("pacs-0", "Active")), now=2000.0)
    jobs = [lp(), held(aux("pacs-0", "Suspended"))]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2100.0, previous_status=suspended.status)
    assert p.actions[0] == P.SetSuspend("office-aux-pacs-0-a1", False)
    # One slot used by the resumed Job; the rest of the graph continues.
    assert creates(p)[:2] == [("aux", "pacs-1", 1), ("target", "0", 1)]
    assert p.status["phase"] == "Auxiliary"
    assert cond(p.status, "Suspended")["status"] == "False"
    assert "Resumed" in [e.reason for e in p.events]
    # A release that did not happen yet (the operator stopped in between) happens on the next plan.
    p = P.plan(RUN, SPEC, observed(*jobs), now=2200.0, previous_status=p.status)
    assert p.actions[0] == P.SetSuspend("office-aux-pacs-0-a1", False)


def test_kueue_jobs_waiting_for_quota_are_left_to_kueue():
    spec = make_spec(queueName="gpu-queue")
    jobs = [held(lp("Suspended"), False, True), held(aux("pacs-0", "Suspended"), False, True)]
    p = P.plan(RUN, spec, observed(*jobs), now=2000.0, previous_status={"phase": "Auxiliary"})
    assert not any(isinstance(a, P.SetSuspend) for a in p.actions)
    assert {j["reason"] for j in p.status["jobs"]} == {"WaitingForQuota"}
    # ... even right after a resume: only what the run holds is released, through Kueue.
    jobs = [held(lp("Suspended"), False, True), held(aux("pacs-0", "Suspended"), True, True)]
    p = P.plan(RUN, spec, observed(*jobs), now=2000.0, previous_status={"phase": "Suspended"})
    assert [a for a in p.actions if isinstance(a, P.SetSuspend)] == [P.SetSuspend("office-aux-pacs-0-a1", False, True)]


def test_jobs_kueue_manages_without_a_queue_name_are_not_fought():
    # Kueue's default LocalQueue queues every Job of the namespace: the run has no queueName, but
    # its Jobs carry Kueue's label, wait suspended, and the operator never unsuspends them.
    jobs = [held(lp("Suspended"), False, queued=True)]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2000.0, previous_status={"phase": "Suspended"})
    assert not any(isinstance(a, P.SetSuspend) for a in p.actions)
    assert p.status["jobs"][0]["reason"] == "WaitingForQuota"
    # Suspended by some other controller, not queued: left alone, and the status says so.
    jobs = [lp("Suspended")]
    p = P.plan(RUN, SPEC, observed(*jobs), now=2000.0, previous_status={"phase": "Auxiliary"})
    assert not any(isinstance(a, P.SetSuspend) for a in p.actions)
    entry = p.status["jobs"][0]
    assert entry["reason"] == "SuspendedExternally" and "another controller" in entry["message"]


# -- deadline ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("now, phase, requeue", [
    (1000.0 + 3000, "Auxiliary", 600.0),
    (1000.0 + 3599, "Auxiliary", 1.0),
    (1000.0 + 3600, "Failed", None),
])
def test_active_deadline(now, phase, requeue):
    spec = make_spec(activeDeadlineSeconds=3600)
    jobs = [lp("Active"), aux("pacs-0", "Active"), aux("pacs-1", "Pending")]
    p = P.plan(RUN, spec, observed(*jobs), now=now)
    assert p.status["phase"] == phase and p.requeue_after == requeue
    if phase == "Failed":
        assert cond(p.status, "Failed")["reason"] == "DeadlineExceeded"
        assert {a.name for a in p.actions} == {j.name for j in jobs}
        assert all(isinstance(a, P.DeleteJob) and a.reason == "DeadlineExceeded" for a in p.actions)
    else:
        assert p.actions == ()


def test_deadline_requeue_is_the_minimum_with_retry_backoff():
    spec = make_spec(activeDeadlineSeconds=1100)   # deadline at t=2100
    jobs = ready_for_targets() + [tgt(0, "Failed", finish=2000.0)]
    assert P.plan(RUN, spec, observed(*jobs), now=2002.0).requeue_after == 8.0      # retry due at 2010
    assert P.plan(RUN, spec, observed(*jobs), now=2095.0).requeue_after == 5.0      # deadline first


# -- auxiliary cache and recycled weights ----------------------------------------------------------------
def test_aux_cache_hit_creates_no_aux_job_and_targets_use_the_cache():
    key0 = P.aux_cache_key(SPEC, "pacs", 0)
    fresh = P.plan(RUN, SPEC, observed(hits={key0}), now=1000.0)
    assert creates(fresh) == [("linear-probe", "0", 1), ("aux", "pacs-1", 1)]
    assert fresh.status["progress"] == "0/9"             # the cached auxiliary is not a child Job
    p = P.plan(RUN, SPEC, observed(lp(), aux("pacs-1", "Active"), hits={key0}), now=2000.0)
    assert ("aux", "pacs-0", 1) not in creates(p)
    t1 = created(p, "target", "1").description
    assert t1.init.featurizer == f"s3://bucket/runs/cache/aux/{key0}/model.safetensors"
    assert ("target", "4", 1) not in creates(p)          # pacs-1 not cached yet


def test_own_aux_job_stays_counted_once_its_cache_entry_appears():
    key0 = P.aux_cache_key(SPEC, "pacs", 0)
    p = P.plan(RUN, SPEC, observed(lp("Active"), aux("pacs-0"), aux("pacs-1", "Active"), hits={key0}), now=2000.0)
    assert p.status["stages"]["auxiliary"] == {"total": 2, "active": 1, "succeeded": 1, "failed": 0}


def test_recycled_weights_need_no_aux_job():
    spec = make_spec(auxiliaries=[{"name": "vlcs", "weights": "s3://community/vlcs.safetensors"}])
    fresh = P.plan(RUN, spec, observed(), now=1000.0)
    assert creates(fresh) == [("linear-probe", "0", 1)]
    assert fresh.status["stages"]["auxiliary"]["total"] == 0
    p = P.plan(RUN, spec, observed(lp()), now=2000.0)
    assert creates(p) == [("target", str(i), 1) for i in range(6)]
    d = created(p, "target", "1").description
    assert (d.init.source, d.init.featurizer) == ("vlcs", "s3://community/vlcs.safetensors")
    assert p.status["phase"] == "Target"


# -- idempotence ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("jobs", [
    [],
    [lp(), aux("pacs-0", "Active")],
    [*ready_for_targets(), tgt(0, "Failed", finish=1500.0), tgt(1)],
])
def test_planning_twice_gives_the_same_actions(jobs):
    a = P.plan(RUN, SPEC, observed(*jobs), now=2000.0)
    b = P.plan(RUN, SPEC, observed(*jobs), now=2000.0)
    assert a.actions == b.actions and a.status == b.status and a.events == b.events
    # Feeding the created Jobs back (Pending): nothing is created again.
    pending = [P.ObservedJob(x.name, x.stage, x.member, x.attempt, "Pending") for x in a.actions
               if isinstance(x, P.CreateJob)]
    c = P.plan(RUN, SPEC, observed(*jobs, *pending), now=2000.0)
    assert not {x.name for x in c.actions if isinstance(x, P.CreateJob)} & {x.name for x in jobs + pending}


def test_simulated_run_creates_every_job_exactly_once():
    """Drive the planner like an adapter would, with some members failing their first attempt."""
    spec = make_spec(parallelism=3, finetune={"runs": 7}, failurePolicy={"minSucceeded": 5, "maxAttempts": 2,
                                                                         "retryBackoffSeconds": 10})
    cluster: dict[str, P.ObservedJob] = {}
    created_names: list[str] = []
    status, now = None, 1000.0
    for _ in range(200):
        p = P.plan(RUN, spec, P.Observed(jobs=tuple(cluster.values())), now=now, previous_status=status)
        status = p.status
        if status["phase"] in ("Succeeded", "Failed"):
            break
        for a in p.actions:
            assert isinstance(a, P.CreateJob)
            created_names.append(a.name)
            cluster[a.name] = P.ObservedJob(a.name, a.stage, a.member, a.attempt, "Active", start_time=now)
        # Every running Job finishes by the next tick; members 2 and 5 fail their first attempt.
        now += 7.0
        for name, j in list(cluster.items()):
            if j.state == "Active":
                fails = j.stage == "target" and j.member in ("2", "5") and j.attempt == 1
                cluster[name] = P.ObservedJob(j.name, j.stage, j.member, j.attempt,
                                              "Failed" if fails else "Succeeded", j.start_time, now)
    assert status["phase"] == "Succeeded"
    assert len(created_names) == len(set(created_names)) == 1 + 2 + 7 + 2 + 1   # + 2 retries
    assert "office-target-2-a2" in created_names and "office-target-5-a2" in created_names
    assert status["progress"] == "11/11"


# -- status details ----------------------------------------------------------------------------------
def test_condition_last_transition_time_is_preserved_while_status_is_unchanged():
    t1, t2 = 1_700_000_000.0, 1_700_000_500.0
    first = P.plan(RUN, SPEC, observed(), now=t1)
    second = P.plan(RUN, SPEC, observed(lp("Active")), now=t2, previous_status=first.status)
    assert cond(second.status, "Accepted")["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert cond(second.status, "Complete")["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert cond(second.status, "Complete")["reason"] == "Auxiliary"       # reason moves, time does not
    suspended = P.plan(RUN, make_spec(suspend=True), observed(lp("Active")), now=t2, previous_status=second.status)
    assert cond(suspended.status, "Suspended")["lastTransitionTime"] == "2023-11-14T22:21:40Z"
    assert cond(suspended.status, "Accepted")["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert all(c["observedGeneration"] == 2 for c in suspended.status["conditions"])
    # No phase change -> no event.
    again = P.plan(RUN, make_spec(suspend=True), observed(lp("Suspended")), now=t2 + 1,
                   previous_status=suspended.status)
    assert again.events == ()


def test_jobs_list_is_bounded_and_running_jobs_come_first():
    spec = make_spec(finetune={"runs": 300}, parallelism=100)
    jobs = ready_for_targets() + [tgt(i) for i in range(250)] + [tgt(i, "Active") for i in range(250, 260)]
    metrics = {"target/3": {"valAccuracy": 0.81234}}
    s = P.plan(RUN, spec, observed(*jobs, metrics=metrics), now=2000.0).status
    assert len(s["jobs"]) == 100
    assert {f"office-target-{i}-a1" for i in range(250, 260)} <= {j["name"] for j in s["jobs"]}
    keys = [(j["stage"], int(j["member"]) if j["member"].isdigit() else j["member"]) for j in s["jobs"]]
    assert [k for k in keys if k[0] == "target"] == sorted(k for k in keys if k[0] == "target")
    assert next(j for j in s["jobs"] if j["member"] == "3")["valAccuracy"] == "0.812"


# -- names ------------------------------------------------------------------------------------------
def test_job_name_short_and_long():
    assert P.job_name("office", "target", "12", 1) == "office-target-12-a1"
    assert P.job_name("office", "linear-probe", "0", 2) == "office-lp-0-a2"
    assert P.job_name("office", "average", "0", 1) == "office-avg-0-a1"
    long_run = "a-very-long-run-name-that-goes-on-and-on-" + "x" * 30
    names = {P.job_name(long_run, "target", str(i), a) for i in range(50) for a in (1, 2)}
    assert len(names) == 100
    for n in names:
        assert len(n) <= 63 and DNS_LABEL.match(n), n
    n = P.job_name(long_run, "target", "7", 2)
    assert n.endswith("-target-7-a2") and n == P.job_name(long_run, "target", "7", 2)
    assert re.search(r"-[0-9a-f]{6}-target-7-a2$", n)
    # Differences beyond the truncation point still give different names (the hash).
    assert P.job_name(long_run + "1", "target", "7", 2) != P.job_name(long_run + "2", "target", "7", 2)
    # An absurd member name still yields a valid name.
    weird = P.job_name("r", "aux", "Some_Aux." + "y" * 80 + "-0", 1)
    assert len(weird) <= 63 and DNS_LABEL.match(weird)


def test_member_outputs():
    assert layout.run_prefix(SPEC.storage.uri, RUN) == PREFIX
    assert P.member_output(SPEC, RUN, "linear-probe", "0") == f"{PREFIX}/linear-probe"
    assert P.member_output(SPEC, RUN, "target", "4") == f"{PREFIX}/target/4"
    assert P.member_output(SPEC, RUN, "average", "0") == f"{PREFIX}/average"
    assert P.member_output(SPEC, RUN, "aux", "pacs-1") == layout.aux_cache_uri(SPEC.storage.uri, P.aux_cache_key(SPEC, "pacs", 1))


def test_job_graph_lists_every_member():
    graph = P.job_graph(SPEC, RUN)
    assert [(n["stage"], n["member"]) for n in graph] == (
        [("linear-probe", "0"), ("aux", "pacs-0"), ("aux", "pacs-1"), ("aux", "vlcs")]
        + [("target", str(i)) for i in range(6)] + [("average", "0")])
    assert graph[4]["needs"] == ["linear-probe/0"] and graph[5]["needs"] == ["linear-probe/0", "aux/pacs-0"]
    assert graph[3]["job"] is False


# -- performance -------------------------------------------------------------------------------------
@pytest.mark.perf
def test_plan_is_fast_for_a_thousand_members():
    spec = make_spec(finetune={"runs": 1000}, parallelism=64)
    jobs = ready_for_targets() + [tgt(i, "Succeeded" if i < 900 else "Active" if i < 960 else "Failed",
                                      finish=1500.0) for i in range(997)]
    obs = observed(*jobs)
    P.plan(RUN, spec, obs, now=2000.0)
    t0 = time.perf_counter()
    p = P.plan(RUN, spec, obs, now=2000.0)
    elapsed = time.perf_counter() - t0
    print(f"\nplan() with 1000 target members and {len(jobs)} observed Jobs: {elapsed * 1000:.1f} ms")
    assert creates(p)[0] == ("target", "960", 2) and len(creates(p)) == 4
    assert elapsed < 1.0


def test_a_spec_without_initialization_sources_is_refused_not_crashed_on():
    spec = make_spec(includeFoundation=False, auxiliaries=[])
    p = P.plan(RUN, spec, observed(), now=1000.0)
    assert p.actions == ()
    accepted = cond(p.status, "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidSpec")
    assert "includeFoundation" in accepted["message"]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "InvalidSpec")]
    assert P.plan(RUN, spec, observed(), now=1001.0, previous_status=p.status).events == ()
