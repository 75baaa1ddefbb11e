"""Averaging diagnostics (trainer/ratatouille_trainer/diagnostics.py): each on a constructed case
whose answer is known. The end-to-end numbers of the average stage are in test_stages.py."""
from __future__ import annotations

import math

import pytest
import torch

from ratatouille_trainer import diagnostics as D
from ratatouille_trainer.provenance import model_card, write_lineage


# ------------------------------------------------------------------------ gain and collapse

def test_identical_members_gain_zero_no_collapse():
    u = D.uniform_diagnostic(0.8, [0.8, 0.8, 0.8], n_images=400, chance=0.1)
    assert u["gain"] == pytest.approx(0.0, abs=1e-12) and u["gapToBest"] == pytest.approx(0.0, abs=1e-12)
    assert u["collapseGrade"] == "none" and u["collapse"] is False


def test_gain_and_gap_to_best():
    u = D.uniform_diagnostic(0.85, [0.7, 0.8, 0.9], n_images=1000, chance=0.5)
    assert u["membersMeanVal"] == pytest.approx(0.8) and u["membersBestVal"] == 0.9
    assert u["gain"] == pytest.approx(0.05) and u["gapToBest"] == pytest.approx(-0.05)


def test_collapse_margin_accounts_for_validation_size():
    # two standard errors at p = 0.5: 1/sqrt(n); never below two points
    assert D.collapse_margin(0.5, 100) == pytest.approx(0.1)
    assert D.collapse_margin(0.5, 10_000) == pytest.approx(0.02)
    assert D.collapse_margin(0.5, 1_000_000) == pytest.approx(0.02)
    # the same 6-point drop: noise on 100 images, a partial collapse on 10,000
    assert D.uniform_diagnostic(0.74, [0.8, 0.8], 100, chance=0.1)["collapseGrade"] == "none"
    big = D.uniform_diagnostic(0.74, [0.8, 0.8], 10_000, chance=0.1)
    assert big["collapseGrade"] == "partial" and big["collapse"] is True
    assert big["collapseMargin"] == pytest.approx(max(0.02, 2 * math.sqrt(0.8 * 0.2 / 10_000)))


def test_collapsed_when_half_the_gain_over_chance_is_lost():
    # members 0.8, chance 0.2: gain over chance 0.6; the average keeps 0.25 < 0.3 -> collapsed
    assert D.uniform_diagnostic(0.45, [0.8, 0.8], 1000, chance=0.2)["collapseGrade"] == "collapsed"
    # keeps 0.35 > 0.3 -> partial
    assert D.uniform_diagnostic(0.55, [0.8, 0.8], 1000, chance=0.2)["collapseGrade"] == "partial"


# ------------------------------------------------------------------------ distances

def _state(w):
    return {"featurizer.w": torch.tensor(w, dtype=torch.float32), "head.w": torch.ones(2),
            "featurizer.bn.num_batches_tracked": torch.tensor(3)}


def test_relative_l2_known():
    names = ["featurizer.w"]
    assert D.relative_l2(_state([3.0, 4.0]), _state([3.0, 4.0]), names) == 0.0
    assert D.relative_l2(_state([6.0, 8.0]), _state([3.0, 4.0]), names) == pytest.approx(1.0)
    assert D.l2_distance(_state([0.0, 0.0]), _state([3.0, 4.0]), names) == pytest.approx(5.0)
    assert D.relative_l2(_state([1.0, 1.0]), _state([0.0, 0.0]), names) is None


# ------------------------------------------------------------- ensemble and disagreement

def _onehot(pred, c=3):
    return torch.nn.functional.one_hot(torch.tensor(pred), c).float()


def test_identical_members_disagree_nowhere_and_ensemble_equals_member():
    labels = torch.tensor([0, 1, 2, 0])
    t = D.VoteTally(labels, 3)
    for _ in range(3):
        t.add(_onehot([0, 1, 1, 0]))
    assert t.disagreement() == 0.0
    assert t.ensemble_accuracy() == pytest.approx(0.75)


def test_disagreement_known_counts():
    labels = torch.tensor([0, 0])
    t = D.VoteTally(labels, 3)
    t.add(_onehot([0, 0]))
    t.add(_onehot([1, 0]))
    assert t.disagreement() == pytest.approx(0.5)  # image 0: the one pair differs; image 1: agrees
    t.add(_onehot([2, 0]))
    # image 0: all 3 pairs differ; image 1: none -> 0.5
    assert t.disagreement() == pytest.approx(0.5)
    t2 = D.VoteTally(torch.tensor([0]), 3)
    for p in ([0], [0], [1], [1]):
        t2.add(_onehot(p))
    assert t2.disagreement() == pytest.approx(4 / 6)  # 2x2 split: 4 of the 6 pairs differ
    assert D.VoteTally(labels, 3).disagreement() is None


def test_functional_ensemble_averages_probabilities_not_votes():
    labels = torch.tensor([1])
    t = D.VoteTally(labels, 2)
    t.add(torch.tensor([[0.55, 0.45]]))
    t.add(torch.tensor([[0.55, 0.45]]))
    t.add(torch.tensor([[0.0, 1.0]]))
    assert t.ensemble_accuracy() == 1.0  # mean prob of class 1: 0.63; the majority vote says 0


# --------------------------------------------------------------------------------- convergence

def _curve(best, steps=(0, 2, 4, 6)):
    return {"bestStep": best, "curve": [{"step": s, "valAccuracy": 0.5} for s in steps]}


def test_best_at_last_share_and_train_longer_warning():
    assert D.best_is_last(_curve(6)) is True and D.best_is_last(_curve(4)) is False
    assert D.best_is_last({"bestStep": 9, "steps": 10}) is True  # no curve: the last step
    assert D.best_is_last({}) is None
    half = D.convergence({"a": _curve(6), "b": _curve(2)})
    assert half["share"] == 0.5 and half["warn"] is False  # "above half"
    more = D.convergence({"a": _curve(6), "b": _curve(6), "c": _curve(0), "d": {}})
    assert more["members"] == 3 and more["bestAtLast"] == 2 and more["bestAtLastMembers"] == ["a", "b"]
    assert more["warn"] is True
    u = D.uniform_diagnostic(0.8, [0.8], 100, 0.1)
    assert [w["code"] for w in D.warnings(u, None, more, None)] == ["TrainLonger"]


# ------------------------------------------------------------------ leave one source out

def test_leave_one_source_out_means_and_the_source_that_breaks_the_average():
    sums = D.SourceSums()
    members = {"f0": ("foundation", 1.0), "f1": ("foundation", 3.0), "a0": ("aux", 10.0)}
    for name, (src, v) in members.items():
        sums.add(src, {"featurizer.w": torch.full((2,), v), "n": torch.tensor(7)})
    like = {"featurizer.w": torch.zeros(2), "n": torch.tensor(7)}
    assert torch.equal(sums.mean_without("aux", like)["featurizer.w"], torch.full((2,), 2.0))
    assert torch.equal(sums.mean_without("foundation", like)["featurizer.w"], torch.full((2,), 10.0))
    assert sums.mean_without("aux", like)["n"].dtype == torch.int64

    table = D.source_table({"f0": "foundation", "f1": "foundation", "a0": "aux"},
                           {"f0": 0.8, "f1": 0.9, "a0": 0.7}, {"f0": 0.1, "f1": 0.3, "a0": 0.5},
                           {"foundation": 0.0, "aux": 0.2}, {"foundation": 0.7, "aux": 0.88}, 0.6)
    assert table["foundation"]["members"] == 2 and table["foundation"]["meanVal"] == pytest.approx(0.85)
    assert table["foundation"]["membersRelL2"] == pytest.approx(0.2)
    assert table["aux"]["featurizerRelL2"] == 0.2 and table["aux"]["leaveOutGain"] == pytest.approx(0.28)
    assert D.breaking_source(table, 0.05) == "aux"
    assert D.breaking_source(table, 0.3) is None  # within the noise margin: nobody is named
    u = D.uniform_diagnostic(0.6, [0.8, 0.9, 0.7], 10_000, 0.1)
    codes = [w["code"] for w in D.warnings(u, table, None, None)]
    assert codes == ["AveragingPartialCollapse", "SourceBreaksAverage"]
    assert "source aux" in D.warnings(u, table, None, None)[1]["message"]


# ------------------------------------------------------------------------------- interpolation

def test_barrier_known():
    flat = [{"alpha": a, "valAccuracy": 0.8 + 0.1 * a} for a in D.ALPHAS]
    assert D.barrier(flat) == pytest.approx(0.0)  # on the line between the ends
    dip = [{"alpha": 0.0, "valAccuracy": 0.8}, {"alpha": 0.5, "valAccuracy": 0.5},
           {"alpha": 1.0, "valAccuracy": 0.9}]
    assert D.barrier(dip) == pytest.approx(0.85 - 0.5)
    bump = [{"alpha": 0.0, "valAccuracy": 0.8}, {"alpha": 0.5, "valAccuracy": 0.95},
            {"alpha": 1.0, "valAccuracy": 0.8}]
    assert D.barrier(bump) == 0.0  # the ends bound it from below
    with pytest.raises(ValueError):
        D.barrier(dip[:2])


def test_twin_pairs_same_hyperparameters_different_sources():
    hp = lambda lr: {"lr": lr, "weightDecay": "0", "dropout": "0"}  # noqa: E731
    sources = {"0": "foundation", "1": "a", "2": "b", "3": "a", "4": "foundation", "5": "b"}
    hps = {"0": hp("5e-5"), "1": hp("5e-05"), "2": hp("1e-5"), "3": hp("1e-5"), "4": hp("3e-5"),
           "5": hp("3e-5")}
    ranked = ["1", "3", "0", "2", "5", "4"]
    pairs = D.twin_pairs(ranked, sources, hps)
    # foundation twins first (foundation as a), then the others; one pair per pair of sources
    assert pairs == [("0", "1"), ("4", "5"), ("3", "2")]
    assert D.twin_pairs(ranked, {n: "foundation" for n in sources}, hps) == []  # a soup: none


def test_lineage_and_card_carry_the_diagnostics():
    u = D.uniform_diagnostic(0.6, [0.8, 0.9, 0.7], 10_000, 0.1)
    table = D.source_table({"0": "foundation", "1": "aux"}, {"0": 0.8, "1": 0.7}, {"0": 0.1, "1": 0.2},
                           {"foundation": 0.0, "aux": 0.3}, {"foundation": 0.7, "aux": 0.8}, 0.6)
    pts = [{"alpha": a, "valAccuracy": 0.8} for a in D.ALPHAS]
    interp = {"kind": "twins", "a": "0", "b": "1", "sourceA": "foundation", "sourceB": "aux",
              "featurizerDistance": 1.5, "points": pts, "barrier": 0.0}
    interp["pairs"] = [dict(interp)]
    conv = D.convergence({"0": _curve(6), "1": _curve(6)})
    result = {"sha256": "ab" * 32, "selection": "uniform", "uniform": u, "interpolation": interp,
              "sources": table, "ensemble": {"members": 2, "disagreement": 0.125, "valAccuracy": 0.81},
              "convergence": conv, "diagnosticWarnings": D.warnings(u, table, conv, interp)}
    lineage = write_lineage([{"member": "0", "uri": "u0", "source": "foundation"},
                             {"member": "1", "uri": "u1", "source": "aux"}], result)
    assert lineage["sources"]["aux"]["leaveOutGain"] == pytest.approx(0.2)
    card = model_card(lineage)
    assert "## Averaging diagnostics" in card
    assert "gain over the members' mean -20.00" in card and "gap to the best member -30.00" in card
    assert "collapse: partial" in card
    assert "disagreement 0.1250" in card and "functional ensemble 81.00" in card
    assert "2 of 2 members are best at their last evaluation (train longer before averaging)" in card
    assert "barrier +0.00" in card
    assert "| aux | 1 | 70.00 | 0.3000 | 0.2000 | 80.00 | +20.00 |" in card
    assert "SourceBreaksAverage" in card and "TrainLonger" in card


def test_the_averages_warnings_travel_in_its_termination_summary():
    """On a cluster without operator storage access the Events come from the pod's termination
    message, so the summary carries the warnings."""
    from ratatouille_trainer import stages

    warns = [{"code": "TrainLonger", "message": "3 of 4 members are best at their last evaluation"}]
    assert stages.summary({"stage": "average", "valAccuracy": 0.5, "diagnosticWarnings": warns,
                           "membersRelL2": {"0": 0.1}}) == {"stage": "average", "valAccuracy": 0.5,
                                                            "diagnosticWarnings": warns}
