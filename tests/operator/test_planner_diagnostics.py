"""The averaging diagnostics in status.result.diagnostics (planner._result) and under the CLI's
results table: copied from the average's metrics.json, floats as strings, per-member lists left
in metrics.json."""
from __future__ import annotations

import json

from ratatouille_operator import planner as P
from ratatouille_operator.cli import results_table

from .test_planner import RUN, SPEC, cond, job, observed, ready_for_targets, tgt

PTS = [{"alpha": a, "valAccuracy": v} for a, v in ((0.0, 0.8), (0.25, 0.7), (0.5, 0.6), (0.75, 0.7), (1.0, 0.9))]
PAIR = {"kind": "twins", "a": "0", "b": "1", "sourceA": "foundation", "sourceB": "shapes-0",
        "hyperparameters": {"lr": "5e-05", "weightDecay": "0", "dropout": "0"},
        "featurizerDistance": 1.25, "points": PTS, "barrier": 0.25}
AVG = {
    "stage": "average", "valAccuracy": 0.6, "testAccuracy": {"art": 0.5}, "selection": "uniform",
    "uniform": {"valAccuracy": 0.6, "membersMeanVal": 0.8, "membersBestVal": 0.9, "gain": -0.2,
                "gapToBest": -0.3, "valImages": 400, "chance": 0.25, "collapseMargin": 0.04,
                "collapseGrade": "partial", "collapse": True},
    "interpolation": {**PAIR, "pairs": [PAIR]},
    "sources": {"foundation": {"members": 3, "meanVal": 0.8, "featurizerRelL2": 0.0, "membersRelL2": 0.05,
                               "leaveOutVal": 0.55, "leaveOutGain": -0.05},
                "shapes-0": {"members": 3, "meanVal": 0.8, "featurizerRelL2": 0.02, "membersRelL2": 0.06,
                             "leaveOutVal": 0.85, "leaveOutGain": 0.25}},
    "ensemble": {"members": 6, "disagreement": 0.125, "valAccuracy": 0.84},
    "convergence": {"members": 6, "bestAtLast": 4, "share": 4 / 6, "warn": True,
                    "bestAtLastMembers": ["0", "1", "2", "3"]},
    "diagnosticWarnings": [
        {"code": "AveragingPartialCollapse", "message": "the uniform average scores 0.2000 below ..."},
        {"code": "SourceBreaksAverage", "message": "leaving out the members from source shapes-0 ..."},
        {"code": "TrainLonger", "message": "4 of 6 members are best at their last evaluation: train longer"
                                           " before averaging"}],
    "membersRelL2": {str(i): 0.05 for i in range(6)},
}


def _done(avg):
    jobs = ready_for_targets() + [tgt(i) for i in range(6)]
    metrics = {f"target/{i}": {"valAccuracy": 0.8, "testAccuracy": {"art": 0.6}} for i in range(6)}
    metrics["average/0"] = avg
    return P.plan(RUN, SPEC, observed(*jobs, job("average", "0"), metrics=metrics), now=3100.0)


def test_status_carries_every_diagnostic_formatted():
    s = _done(AVG).status
    assert json.loads(json.dumps(s)) == s
    d = s["result"]["diagnostics"]
    assert set(d) == {"uniform", "interpolation", "sources", "ensemble", "convergence", "warnings"}
    assert d["uniform"]["gain"] == "-0.2000" and d["uniform"]["gapToBest"] == "-0.3000"
    assert d["uniform"]["collapseGrade"] == "partial" and d["uniform"]["valImages"] == 400
    assert d["sources"]["shapes-0"] == {"members": 3, "meanVal": "0.8000", "featurizerRelL2": "0.0200",
                                        "membersRelL2": "0.0600", "leaveOutVal": "0.8500",
                                        "leaveOutGain": "0.2500"}
    assert d["ensemble"] == {"members": 6, "disagreement": "0.1250", "valAccuracy": "0.8400"}
    # per-member lists stay in metrics.json: the status does not grow with the members
    assert d["convergence"] == {"members": 6, "bestAtLast": 4, "share": "0.6667", "warn": True}
    assert "membersRelL2" not in d
    assert d["interpolation"]["barrier"] == "0.2500" and d["interpolation"]["pairs"][0]["b"] == "1"
    assert [w["code"] for w in d["warnings"]] == ["AveragingPartialCollapse", "SourceBreaksAverage", "TrainLonger"]
    # the older boolean still drives the condition and the event
    assert cond(s, "AveragingCollapsed")["status"] == "True"


def test_cli_table_shows_the_diagnostics_and_warnings():
    text = results_table(_done(AVG).status)
    assert "gain -0.2000, gap to best -0.3000, collapse partial (margin 0.0400 on 400 images)" in text
    assert "functional ensemble val 0.8400, member prediction disagreement 0.1250" in text
    assert "members best at their last evaluation: 4 of 6" in text
    assert "interpolation 0 (foundation) -> 1 (shapes-0), same hyperparameters: barrier 0.2500" in text
    row = next(line for line in text.splitlines() if line.startswith("shapes-0"))
    assert row.split() == ["shapes-0", "3", "0.8000", "0.0200", "0.0600", "0.8500", "+0.2500"]
    assert "WARNING (SourceBreaksAverage): leaving out the members from source shapes-0" in text
    assert "WARNING (TrainLonger)" in text and "train longer" in text


def test_older_metrics_keep_working():
    old = {"stage": "average", "valAccuracy": 0.5, "testAccuracy": {"art": 0.5}, "selection": "uniform",
           "uniform": {"valAccuracy": 0.5, "membersMeanVal": 0.8, "membersBestVal": 0.86, "collapse": True},
           "interpolation": {"a": "0", "b": "1", "points": PTS}}
    s = _done(old).status
    d = s["result"]["diagnostics"]
    assert set(d) == {"uniform", "interpolation"}
    text = results_table(s)
    assert "uniform average val 0.5000 vs members mean 0.8000 / best 0.8600" in text
    assert "WARNING: the uniform average collapsed below its members" in text
    assert "barrier" not in text
    # no diagnostics at all: the table is still there
    s = _done({"stage": "average", "valAccuracy": 0.5, "testAccuracy": {"art": 0.5}}).status
    assert "diagnostics" not in s["result"] and "averaged (uniform)" in results_table(s)


def test_diagnostic_warnings_become_warning_events_once():
    """Issue 13: each diagnostic warning is a Warning Event named by its code, when the run
    succeeds (kubectl describe / get events show why averaging did not help)."""
    events = [(e.type, e.reason) for e in _done(AVG).events]
    assert [r for t, r in events if t == "Warning"] == ["AveragingPartialCollapse", "SourceBreaksAverage",
                                                         "TrainLonger"]
    assert ("Normal", "Succeeded") in events
    msg = next(e.message for e in _done(AVG).events if e.reason == "TrainLonger")
    assert msg.startswith("4 of 6 members are best at their last evaluation")
    # A code that is not an Event reason (metrics come from a pod) is not turned into one; the
    # older collapse flag still warns then.
    odd = dict(AVG, diagnosticWarnings=[{"code": "no such\nreason", "message": "x"}, {"code": "TrainLonger"}])
    assert [e.reason for e in _done(odd).events if e.type == "Warning"] == ["AveragingCollapse"]


def test_a_collapse_without_diagnostics_still_warns():
    old = {"stage": "average", "valAccuracy": 0.5, "selection": "uniform",
           "uniform": {"valAccuracy": 0.5, "membersMeanVal": 0.8, "collapse": True}}
    assert [e.reason for e in _done(old).events if e.type == "Warning"] == ["AveragingCollapse"]
