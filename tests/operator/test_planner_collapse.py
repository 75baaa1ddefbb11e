"""The `AveragingCollapsed` status condition: set from the average stage's `uniform` diagnostic."""
from __future__ import annotations

import copy
import json

from ratatouille_operator import planner as P

from .test_planner import RUN, SPEC, cond, job, observed, ready_for_targets, tgt

UNIFORM_COLLAPSED = {"valAccuracy": 0.41, "membersMeanVal": 0.82, "membersBestVal": 0.86, "collapse": True}
UNIFORM_FINE = {"valAccuracy": 0.83, "membersMeanVal": 0.82, "membersBestVal": 0.86, "collapse": False}


def _finish(uniform):
    jobs = ready_for_targets() + [tgt(i) for i in range(6)]
    metrics = {f"target/{i}": {"valAccuracy": 0.8, "testAccuracy": {"art": 0.6}} for i in range(6)}
    averaging = P.plan(RUN, SPEC, observed(*jobs, job("average", "0", "Active"), metrics=metrics), now=3000.0)
    assert "AveragingCollapsed" not in {c["type"] for c in averaging.status["conditions"]}
    avg = {"stage": "average", "valAccuracy": 0.8, "testAccuracy": {"art": 0.6}, "selection": "uniform"}
    if uniform is not None:
        avg["uniform"] = copy.deepcopy(uniform)
    metrics["average/0"] = avg
    return P.plan(RUN, SPEC, observed(*jobs, job("average", "0"), metrics=metrics), now=3100.0,
                  previous_status=averaging.status)


def test_collapse_sets_condition_true_with_numbers_and_warning_event():
    done = _finish(UNIFORM_COLLAPSED)
    s = done.status
    assert s["phase"] == "Succeeded"
    c = cond(s, "AveragingCollapsed")
    assert c["status"] == "True" and c["reason"] == "UniformAverageBelowMembers"
    assert "0.410" in c["message"] and "0.820" in c["message"] and "0.860" in c["message"]
    assert c["observedGeneration"] == RUN.generation and c["lastTransitionTime"].endswith("Z")
    assert ("Warning", "AveragingCollapse") in [(e.type, e.reason) for e in done.events]
    assert json.loads(json.dumps(s)) == s
    # the run itself still succeeded: a collapse is a warning, not a failure
    assert cond(s, "Complete")["status"] == "True" and cond(s, "Failed")["status"] == "False"


def test_no_collapse_sets_condition_false_and_no_warning():
    done = _finish(UNIFORM_FINE)
    c = cond(done.status, "AveragingCollapsed")
    assert c["status"] == "False" and c["reason"] == "NoCollapse" and "0.830" in c["message"]
    assert "AveragingCollapse" not in [e.reason for e in done.events]


def test_no_diagnostic_no_condition():
    done = _finish(None)
    assert done.status["phase"] == "Succeeded"
    assert "AveragingCollapsed" not in {c["type"] for c in done.status["conditions"]}


def test_condition_survives_terminal_reconciles():
    s = _finish(UNIFORM_COLLAPSED).status
    later = P.plan(RUN, SPEC, observed(), now=99999.0, previous_status=s)
    assert cond(later.status, "AveragingCollapsed") == cond(s, "AveragingCollapsed")
