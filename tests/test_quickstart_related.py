"""benchmarks/quickstart_related.py's pure parts: the spec variants change only what the
comparison allows, and the decision rule (issue 13) says `switch` only when all three of its
conditions hold."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import quickstart_related as qr  # noqa: E402


def base() -> dict:
    return yaml.safe_load((ROOT / "crds/examples/quickstart.yaml").read_text())


def test_variants_change_only_auxiliaries_seed_and_folders():
    b = base()
    for config in qr.CONFIGS:
        v = qr.variant(b, config, 2, "/w/data", "/w/runs/x")
        assert qr.changed_paths(b, v) <= qr.ALLOWED_CHANGES
        assert v["spec"]["seed"] == 2 and v["spec"]["storage"]["uri"] == "/w/runs/x"
        assert v["spec"]["target"]["dataset"] == "/w/data/digits"
        # everything the comparison keeps: foundation, target domains, steps, runs, selection, parallelism
        for key in ("foundation", "finetune", "averaging", "parallelism", "linearProbe", "auxiliaryFinetune"):
            assert v["spec"][key] == b["spec"][key]
    today = qr.variant(b, "today", 0, "/w/data", "/w/runs/t")["spec"]["auxiliaries"]
    assert [a["name"] for a in today] == [a["name"] for a in b["spec"]["auxiliaries"]]
    related = qr.variant(b, "related", 0, "/w/data", "/w/runs/r")["spec"]["auxiliaries"]
    assert related == [{"name": "handwritten", "dataset": "/w/data/handwritten"},
                       {"name": "printed", "dataset": "/w/data/printed"}]
    assert b == base()  # the quickstart itself is not modified


def test_changed_paths_sees_a_change_it_does_not_allow():
    b = base()
    v = qr.variant(b, "related", 0, "/d", "/s")
    v["spec"]["finetune"]["steps"] = 800
    assert ("spec", "finetune", "steps") in qr.changed_paths(b, v) - qr.ALLOWED_CHANGES


def runs(today: list[tuple[float, float]], related: list[tuple[float, float]]) -> dict:
    """(greedy test, best single test) per seed 0, 1, 2."""
    def recs(xs):
        return {str(s): {"greedy": {"test": g}, "bestSingle": {"test": b}} for s, (g, b) in enumerate(xs)}
    return {"today": recs(today), "related": recs(related)}


QUIET_FAST = {"related": {"totalSeconds": 400.0, "quiet": True}}


def test_decide_switches_only_when_a_b_and_c_hold():
    today = [(0.50, 0.50)] * 3
    better = [(0.55, 0.54)] * 3
    assert qr.decide(runs(today, better), QUIET_FAST)["verdict"] == "switch"
    # (a) fails: not higher on average
    assert qr.decide(runs(today, [(0.50, 0.49)] * 3), QUIET_FAST)["verdict"] == "keep"
    # (b) fails: higher, but further below its best member than today
    d = qr.decide(runs(today, [(0.55, 0.58)] * 3), QUIET_FAST)
    assert d["a"]["holds"] and not d["b"]["holds"] and d["verdict"] == "keep"
    # (c) fails: too slow, or not measured on a quiet machine
    assert qr.decide(runs(today, better), {"related": {"totalSeconds": 600.0, "quiet": True}})["verdict"] == "keep"
    assert qr.decide(runs(today, better), {"related": {"totalSeconds": 300.0, "quiet": False}})["verdict"] == "keep"
    # no timing yet, or a seed missing: no verdict
    assert qr.decide(runs(today, better), {})["verdict"] == "incomplete"
    partial = runs(today, better)
    del partial["related"]["2"]
    assert qr.decide(partial, QUIET_FAST)["verdict"] == "incomplete"


def test_decide_compares_means_over_seeds_not_single_seeds():
    today = [(0.50, 0.50), (0.50, 0.50), (0.50, 0.50)]
    # wins 2 of 3 seeds by a little, loses one by a lot: lower mean, so keep
    related = [(0.51, 0.51), (0.51, 0.51), (0.40, 0.40)]
    d = qr.decide(runs(today, related), QUIET_FAST)
    assert not d["a"]["holds"] and d["verdict"] == "keep"
