"""Averaging diagnostics: why an average helps or not (pure math, no I/O).

The average stage (``stages.run_average``) feeds these from the one streaming pass it already
makes over the members (each member is read once and evaluated once on the pooled
training-domain validation split); nothing here reads storage or runs a model. Every number and
its rule, as written to the average's ``metrics.json``:

* ``uniform``: ``gain`` = uniform average's pooled validation minus the members' mean,
  ``gapToBest`` = uniform minus the best member (negative: below it). ``collapseGrade`` is
  ``none``, ``partial`` or ``collapsed``: the drop (members' mean minus uniform) counts only when
  it exceeds ``collapseMargin`` = max(0.02, two binomial standard errors of an accuracy at the
  members' mean on the ``valImages`` pooled validation images), so a small validation set does
  not cry wolf; it is ``collapsed`` when the uniform average also kept less than half of the
  members' mean gain over chance (``(uniform - chance) < (mean - chance) / 2``), else
  ``partial``. ``collapse`` (the older boolean, read by the status condition) is ``grade !=
  "none"``.
* ``sources``: per initialization source, ``members``, ``meanVal`` (pooled), ``featurizerRelL2``
  (how far the source's featurizer is from the foundation's: ``||w_s - w_0|| / ||w_0||`` over
  the featurizer's parameters; 0 for the foundation), ``membersRelL2`` (the same for its members'
  kept featurizers, mean over members), and ``leaveOutVal``: the pooled validation of the uniform
  average of every member *not* from this source (``leaveOutGain`` = that minus the uniform's).
  A source whose removal raises the uniform average by more than ``collapseMargin`` breaks the
  average: warning ``SourceBreaksAverage`` names it (the largest such gain).
* ``ensemble``: ``disagreement``, the mean over validation images and over pairs of members of
  "the two predict different classes" (0: identical predictions; 1: every pair differs
  everywhere), from per-image vote counts ``(m^2 - sum_k c_k^2) / (m (m - 1))``; and
  ``valAccuracy``, the functional ensemble's pooled validation (argmax of the members' mean
  softmax), both from the predictions of the existing pass.
* ``convergence``: ``share`` of members whose best checkpoint is their last evaluation (their
  validation was still rising when training stopped); above one half, warning ``TrainLonger``.
* ``interpolation``: the accuracy barrier along the straight line between two members ``a`` and
  ``b``: ``max over alpha of [(1 - alpha) acc(a) + alpha acc(b) - acc((1 - alpha) a + alpha b)]``
  (0 at the ends; positive: a dip, the two are not linearly connected), at alpha 0, .25, .5, .75,
  1. Pairs are *twins*: same hyperparameters, different initialization sources (up to 3 pairs,
  one per pair of sources, foundation twins first), so the barrier measures the initialization,
  not the learning rate. Without twins (a soup: one source), the pair is the best-ranked member
  and the member farthest from it (featurizer L2; at least half the diameter of the members).
  The top-level fields describe the pair with the largest barrier; ``pairs`` lists them all.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

MIN_COLLAPSE_DROP = 0.02      # below two points, a drop is never called a collapse
COLLAPSE_Z = 2.0              # standard errors of an accuracy the drop must exceed
TRAIN_LONGER_SHARE = 0.5      # more than this share of members best at their last evaluation
MAX_TWIN_PAIRS = 3
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------- gain and collapse

def collapse_margin(members_mean: float, n_images: int) -> float:
    """The drop below the members' mean that counts: max(MIN_COLLAPSE_DROP, COLLAPSE_Z binomial
    standard errors of an accuracy ``members_mean`` measured on ``n_images`` images)."""
    p = min(max(float(members_mean), 0.0), 1.0)
    if n_images <= 0:
        return 1.0
    return max(MIN_COLLAPSE_DROP, COLLAPSE_Z * math.sqrt(p * (1.0 - p) / n_images))


def uniform_diagnostic(uniform_val: float, member_vals: Sequence[float], n_images: int,
                       chance: float) -> dict:
    """The ``uniform`` block: gain, gap to the best member, graded collapse (module doc)."""
    vals = [float(v) for v in member_vals]
    if not vals:
        raise ValueError("no member validation accuracies")
    mean, best = sum(vals) / len(vals), max(vals)
    margin = collapse_margin(mean, n_images)
    drop = mean - uniform_val
    if drop <= margin:
        grade = "none"
    elif (uniform_val - chance) < (mean - chance) / 2.0:
        grade = "collapsed"
    else:
        grade = "partial"
    return {"valAccuracy": uniform_val, "membersMeanVal": mean, "membersBestVal": best,
            "gain": uniform_val - mean, "gapToBest": uniform_val - best,
            "valImages": int(n_images), "chance": chance, "collapseMargin": margin,
            "collapseGrade": grade, "collapse": grade != "none"}


# ----------------------------------------------------------------------- weights: distances

@torch.no_grad()
def l2_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    s = 0.0
    for n in names:
        s += float(((a[n].double() - b[n].double()) ** 2).sum())
    return math.sqrt(s)


@torch.no_grad()
def relative_l2(state: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                names: Sequence[str]) -> float | None:
    """``||state - ref|| / ||ref||`` over ``names`` (None when ``ref`` is all zeros)."""
    norm = math.sqrt(sum(float((ref[n].double() ** 2).sum()) for n in names))
    if norm == 0.0:
        return None
    return l2_distance(state, ref, names) / norm


# ------------------------------------------------------------- ensemble and disagreement

class VoteTally:
    """Per validation image: how many members predicted each class, and the sum of their
    softmax probabilities. ``add`` takes one member's probabilities [N, C] (the same images in
    the same order every time)."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.labels = labels.detach().to("cpu", torch.long)
        n = int(self.labels.shape[0])
        self.votes = torch.zeros(n, num_classes, dtype=torch.float64)
        self.prob_sum = torch.zeros(n, num_classes, dtype=torch.float64)
        self.members = 0

    @torch.no_grad()
    def add(self, probs: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        probs = probs.detach().to("cpu", torch.float64)
        if probs.shape != self.votes.shape:
            raise ValueError(f"probabilities of shape {tuple(probs.shape)}, expected {tuple(self.votes.shape)}")
        pred = probs.argmax(1) if predictions is None else predictions.detach().to("cpu", torch.long)
        self.votes[torch.arange(pred.shape[0]), pred] += 1.0
        self.prob_sum += probs
        self.members += 1

    def disagreement(self) -> float | None:
        """Mean over images and over pairs of members of "the pair predicts different classes"."""
        m = self.members
        if m < 2 or self.votes.shape[0] == 0:
            return None
        same = (self.votes * (self.votes - 1.0)).sum(1)  # ordered pairs that agree
        return float((1.0 - same / (m * (m - 1))).mean())

    def ensemble_accuracy(self) -> float | None:
        if self.members == 0 or self.votes.shape[0] == 0:
            return None
        return float((self.prob_sum.argmax(1) == self.labels).double().mean())

    def as_dict(self) -> dict:
        return {"members": self.members, "disagreement": self.disagreement(),
                "valAccuracy": self.ensemble_accuracy()}


# -------------------------------------------------------------------------------- convergence

def best_is_last(metrics: Mapping[str, Any]) -> bool | None:
    """Whether a member's kept (best) checkpoint is its last evaluation (None: unknown)."""
    best = metrics.get("bestStep")
    if isinstance(best, bool) or not isinstance(best, int):
        return None
    steps = [p.get("step") for p in metrics.get("curve") or [] if isinstance(p, Mapping)
             and p.get("valAccuracy") is not None and isinstance(p.get("step"), int)]
    if steps:
        return best >= max(steps)
    total = metrics.get("steps")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return best >= total - 1
    return None


def convergence(members_metrics: Mapping[str, Mapping[str, Any]]) -> dict:
    """Share of members best at their last evaluation; ``warn`` above TRAIN_LONGER_SHARE."""
    known = {n: best_is_last(m) for n, m in members_metrics.items()}
    judged = sorted(n for n, v in known.items() if v is not None)
    last = sorted(n for n in judged if known[n])
    share = len(last) / len(judged) if judged else None
    return {"members": len(judged), "bestAtLast": len(last), "share": share,
            "warn": share is not None and share > TRAIN_LONGER_SHARE, "bestAtLastMembers": last}


# ------------------------------------------------------------------------ leave one source out

class SourceSums:
    """Per initialization source, the float32 sum of its members' floating tensors (for the
    leave-one-source-out averages; one model-sized buffer per source, only kept when there
    are two sources or more)."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.counts: dict[str, int] = {}

    @torch.no_grad()
    def add(self, source: str, state: Mapping[str, torch.Tensor]) -> None:
        acc = self.sums.get(source)
        if acc is None:
            self.sums[source] = {k: t.detach().to("cpu", torch.float32, copy=True)
                                 for k, t in state.items() if t.is_floating_point()}
        else:
            for k, t in acc.items():
                t.add_(state[k].detach().to("cpu", torch.float32))
        self.counts[source] = self.counts.get(source, 0) + 1

    @torch.no_grad()
    def mean_without(self, source: str, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The uniform average of every member not from ``source`` (dtypes and non-floating
        buffers from ``like``, e.g. the uniform average); None when no member is left."""
        rest = [s for s in self.sums if s != source]
        n = sum(self.counts[s] for s in rest)
        if n == 0:
            return None
        out: dict[str, torch.Tensor] = {}
        for k, ref in like.items():
            if ref.is_floating_point():
                acc = sum(self.sums[s][k].double() for s in rest)
                out[k] = (acc / n).to(ref.dtype)
            else:
                out[k] = ref.clone()
        return out


def source_table(sources: Mapping[str, str], member_vals: Mapping[str, float],
                 members_rel_l2: Mapping[str, float | None], featurizer_rel_l2: Mapping[str, float | None],
                 leave_out_val: Mapping[str, float | None], uniform_val: float) -> dict[str, dict]:
    """``sources`` maps member -> its source; the rest are per member / per source numbers."""
    out: dict[str, dict] = {}
    for src in sorted(set(sources.values())):
        names = sorted(n for n, s in sources.items() if s == src)
        vals = [member_vals[n] for n in names if n in member_vals]
        dists = [d for d in (members_rel_l2.get(n) for n in names) if d is not None]
        loo = leave_out_val.get(src)
        out[src] = {"members": len(names),
                    "meanVal": sum(vals) / len(vals) if vals else None,
                    "featurizerRelL2": featurizer_rel_l2.get(src),
                    "membersRelL2": sum(dists) / len(dists) if dists else None,
                    "leaveOutVal": loo,
                    "leaveOutGain": (loo - uniform_val) if loo is not None else None}
    return out


def breaking_source(table: Mapping[str, Mapping[str, Any]], margin: float) -> str | None:
    """The source whose removal raises the uniform average's validation the most, when that
    gain exceeds ``margin``; else None."""
    best, best_gain = None, margin
    for src in sorted(table):
        g = _finite(table[src].get("leaveOutGain"))
        if g is not None and g > best_gain:
            best, best_gain = src, g
    return best


# ------------------------------------------------------------------------------- interpolation

def barrier(points: Sequence[Mapping[str, float]]) -> float:
    """max over alpha of the linear mix of the ends' accuracies minus the interpolated model's;
    ``points`` are ``{alpha, valAccuracy}`` including alpha 0 and 1."""
    pts = sorted(points, key=lambda p: p["alpha"])
    a0, a1 = pts[0]["valAccuracy"], pts[-1]["valAccuracy"]
    if pts[0]["alpha"] != 0.0 or pts[-1]["alpha"] != 1.0:
        raise ValueError("the points must include alpha 0 and 1")
    return max((1.0 - p["alpha"]) * a0 + p["alpha"] * a1 - p["valAccuracy"] for p in pts)


def _hp_key(hp: Any) -> tuple | None:
    if not isinstance(hp, Mapping):
        return None
    key = []
    for k in ("lr", "weightDecay", "dropout"):
        v = hp.get(k)
        try:
            key.append(float(v))
        except (TypeError, ValueError):
            return None
    return tuple(key)


def twin_pairs(ranked: Sequence[str], sources: Mapping[str, str],
               hyperparameters: Mapping[str, Any], limit: int = MAX_TWIN_PAIRS) -> list[tuple[str, str]]:
    """Pairs of members with the same (lr, weight decay, dropout) and different sources: at most
    one pair per (unordered) pair of sources, foundation pairs first, then by rank (``ranked``:
    best first); ``a`` is the better-ranked of the two, except that a foundation member is ``a``."""
    pos = {n: i for i, n in enumerate(ranked)}
    cands = []
    for i, a in enumerate(ranked):
        ka = _hp_key(hyperparameters.get(a))
        if ka is None:
            continue
        for b in ranked[i + 1:]:
            if sources.get(a) == sources.get(b) or _hp_key(hyperparameters.get(b)) != ka:
                continue
            x, y = (b, a) if sources.get(b) == "foundation" else (a, b)
            found = "foundation" in (sources.get(a), sources.get(b))
            cands.append((0 if found else 1, pos[a] + pos[b], pos[a], x, y))
    cands.sort()
    out, seen = [], set()
    for *_, x, y in cands:
        key = frozenset((sources.get(x), sources.get(y)))
        if key in seen:
            continue
        seen.add(key)
        out.append((x, y))
        if len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------------------------- warnings

def warnings(uniform: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]] | None,
             conv: Mapping[str, Any] | None, interpolation: Mapping[str, Any] | None) -> list[dict]:
    """``[{code, message}]``: what a user should act on, each with its numbers."""
    out: list[dict] = []
    grade = uniform.get("collapseGrade")
    if grade in ("partial", "collapsed"):
        out.append({"code": "AveragingCollapsed" if grade == "collapsed" else "AveragingPartialCollapse",
                    "message": f"the uniform average scores {uniform['membersMeanVal'] - uniform['valAccuracy']:.4f}"
                               f" below the members' mean on validation (margin {uniform['collapseMargin']:.4f}"
                               f" for {uniform['valImages']} images): {grade}; the members are not"
                               " linearly mode connected (lower the learning rates or use greedy selection)"})
    if sources and len(sources) > 1:
        src = breaking_source(sources, float(uniform.get("collapseMargin") or 0.0))
        if src is not None:
            out.append({"code": "SourceBreaksAverage",
                        "message": f"leaving out the members from source {src} raises the uniform"
                                   f" average's validation by {sources[src]['leaveOutGain']:.4f}:"
                                   f" its members are not linearly connected to the others"})
    if conv and conv.get("warn"):
        out.append({"code": "TrainLonger",
                    "message": f"{conv['bestAtLast']} of {conv['members']} members are best at their last"
                               " evaluation: train longer before averaging"})
    return out
