"""Streaming averaging, greedy selection, safe weight files and provenance (tiny, CPU)."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ratatouille_trainer.averaging import (
    AveragingError,
    RunningSum,
    UnsafeWeightsError,
    average_files,
    greedy_select,
    interpolate,
    uniform_average,
)
from ratatouille_trainer.weights import (
    load_safetensors_bytes,
    load_safetensors_file,
    refuse_pickle,
    save_state_dict,
    sha256_file,
)
from ratatouille_trainer.provenance import lineage_json, model_card, write_lineage


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def make_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "featurizer.conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "featurizer.bn.running_mean": torch.randn(4, generator=g),
        "featurizer.bn.num_batches_tracked": torch.tensor(100 + seed, dtype=torch.int64),
        "featurizer.half": torch.randn(5, 2, generator=g).to(torch.float16),
        "featurizer.bf16": torch.randn(3, 3, generator=g).to(torch.bfloat16),
        "featurizer.mask": torch.tensor([True, seed % 2 == 0]),
        "head.weight": torch.randn(10, 64, generator=g),
        "head.bias": torch.randn(10, generator=g),
    }


class CountingLoader:
    """A loader that counts its calls and returns a fresh copy each time."""

    def __init__(self, state):
        self.state = state
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {k: v.clone() for k, v in self.state.items()}


def expected_mean(states):
    out = {}
    for k, t0 in states[0].items():
        if t0.is_floating_point():
            s = sum(s[k].to(torch.float64) for s in states)
            out[k] = (s / len(states)).to(t0.dtype)
        else:
            out[k] = t0.clone()
    return out


# --------------------------------------------------------------------------------------------
# uniform
# --------------------------------------------------------------------------------------------

def test_uniform_is_arithmetic_mean_and_keeps_dtypes():
    states = [make_state(s) for s in range(4)]
    loaders = [CountingLoader(s) for s in states]
    avg, count = uniform_average((f"target-{i}", ld) for i, ld in enumerate(loaders))
    assert count == 4
    assert [ld.calls for ld in loaders] == [1, 1, 1, 1]
    assert set(avg) == set(states[0])
    for k, t in avg.items():
        assert t.dtype == states[0][k].dtype, k
        assert t.shape == states[0][k].shape, k
    stacked = torch.stack([s["head.weight"].double() for s in states]).mean(0)
    assert torch.allclose(avg["head.weight"].double(), stacked, atol=1e-6, rtol=0)
    assert (avg["head.weight"].double() - stacked).abs().max() < 1e-6
    # low-precision tensors: the float64 mean rounded once to their own dtype
    exp = expected_mean(states)
    assert torch.equal(avg["featurizer.half"], exp["featurizer.half"])
    assert torch.equal(avg["featurizer.bf16"], exp["featurizer.bf16"])
    # integer and bool buffers come from the first member, not summed
    assert avg["featurizer.bn.num_batches_tracked"].item() == 100
    assert avg["featurizer.bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(avg["featurizer.mask"], states[0]["featurizer.mask"])


@pytest.mark.parametrize("n", [1, 3, 7])
def test_average_of_identical_members_is_exact(n):
    state = make_state(11)
    avg, count = uniform_average((f"m{i}", CountingLoader(state)) for i in range(n))
    assert count == n
    for k, t in state.items():
        assert torch.equal(avg[k], t), k
        assert avg[k].dtype == t.dtype


def test_real_module_average_loads_back():
    def net(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
        m.train()
        with torch.no_grad():
            for _ in range(seed + 1):  # different running stats and num_batches_tracked
                m(torch.randn(2, 3, 6, 6))
        return m

    mods = [net(s) for s in range(3)]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in mods]
    assert states[0]["1.num_batches_tracked"].item() == 1
    assert states[2]["1.num_batches_tracked"].item() == 3
    avg, count = uniform_average((f"t{i}", (lambda s=s: s)) for i, s in enumerate(states))
    assert count == 3
    fresh = net(7)
    fresh.load_state_dict(avg, strict=True)
    for k, v in fresh.state_dict().items():
        if v.is_floating_point():
            ref = torch.stack([s[k] for s in states]).double().mean(0)
            assert (v.double() - ref).abs().max() < 1e-6, k
    assert fresh.state_dict()["1.num_batches_tracked"].item() == 1


def test_running_sum_mean_with_equals_add_then_mean():
    a, b = make_state(1), make_state(2)
    rs = RunningSum()
    rs.add("a", a)
    cand = rs.mean_with("b", b)
    assert rs.count == 1
    before = rs.mean()
    rs.add("b", b)
    assert rs.count == 2
    mean = rs.mean()
    for k in a:
        assert torch.equal(cand[k], mean[k]), k
    for k in a:  # mean_with left the sum as it was: the mean of a alone is a
        assert torch.equal(before[k], a[k]), k
    # mean() returns fresh tensors: changing them does not change the sum
    for t in mean.values():
        t.zero_() if t.dtype != torch.bool else t.fill_(False)
    again = rs.mean()
    assert again["featurizer.bn.num_batches_tracked"].item() == 101
    assert torch.equal(again["featurizer.mask"], a["featurizer.mask"])
    assert torch.equal(again["head.bias"], cand["head.bias"])


def test_add_keeps_no_reference_to_input():
    state = make_state(3)
    state["extra64"] = torch.randn(3, dtype=torch.float64)
    rs = RunningSum()
    rs.add("m0", state)
    before = rs.mean()
    for t in state.values():  # mutate the caller's tensors in place
        t.zero_() if t.dtype != torch.bool else t.fill_(False)
    after = rs.mean()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def test_shape_mismatch_names_member_and_tensor():
    good = {"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}
    bad = {"head.weight": torch.zeros(10, 96), "head.bias": torch.zeros(10)}
    with pytest.raises(AveragingError) as e:
        uniform_average([("target-0", lambda: good), ("target-3", lambda: bad)])
    assert str(e.value) == ("member 'target-3': tensor 'head.weight' has shape (10, 96), "
                            "expected (10, 64)")


@pytest.mark.parametrize("mutate, words", [
    (lambda s: s.pop("head.bias"), ["'target-1'", "'head.bias'", "missing"]),
    (lambda s: s.__setitem__("head.extra", torch.zeros(2)), ["'target-1'", "'head.extra'"]),
    (lambda s: s["head.weight"].__setitem__((0, 0), float("nan")),
     ["'target-1'", "'head.weight'", "NaN"]),
    (lambda s: s["featurizer.half"].__setitem__((1, 1), float("inf")),
     ["'target-1'", "'featurizer.half'", "Inf"]),
    (lambda s: s.__setitem__("head.bias", s["head.bias"].double()),
     ["'target-1'", "'head.bias'", "dtype"]),
])
def test_bad_member_is_refused_and_sum_unchanged(mutate, words):
    rs = RunningSum()
    first = make_state(0)
    rs.add("target-0", first)
    bad = make_state(1)
    mutate(bad)
    with pytest.raises(AveragingError) as e:
        rs.add("target-1", bad)
    for w in words:
        assert w in str(e.value)
    # greedy's candidate (mean_with) refuses it too, the finiteness test fused into its pass
    with pytest.raises(AveragingError) as e2:
        rs.mean_with("target-1", bad)
    assert str(e2.value) == str(e.value)
    assert rs.count == 1
    mean = rs.mean()
    for k in first:
        assert torch.equal(mean[k], first[k]), k


def test_nan_in_first_member_is_refused():
    s = make_state(0)
    s["head.bias"][3] = float("nan")
    with pytest.raises(AveragingError, match="member 'm': tensor 'head.bias' contains NaN"):
        uniform_average([("m", lambda: s)])


def test_no_members():
    with pytest.raises(AveragingError):
        uniform_average([])
    with pytest.raises(AveragingError):
        greedy_select([], lambda sd: 1.0)


# --------------------------------------------------------------------------------------------
# greedy
# --------------------------------------------------------------------------------------------

XS = torch.arange(10, dtype=torch.float64)      # fixed data: x = 0..9
YS = XS >= 5                                      # label 1 iff x >= 5


def threshold_state(tau: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        # fixed linear model: predict 1 iff 1.0 * x + bias > 0, i.e. x > tau
        "head.bias": torch.tensor([-tau], dtype=torch.float32),
        "featurizer.half": torch.randn(3, generator=g).to(torch.float16),
        "featurizer.bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def linear_accuracy(sd) -> float:
    pred = XS + sd["head.bias"].double()[0] > 0
    return float((pred == YS).double().mean())


def test_greedy_hand_computed_example():
    # thresholds and their own accuracies (error = |floor(tau) - 4| points of 10):
    #   A 4.9 -> 1.0   B 5.5 -> 0.9   C 3.2 -> 0.9   D 7.5 -> 0.7   E 1.5 -> 0.7
    taus = {"A": 4.9, "B": 5.5, "C": 3.2, "D": 7.5, "E": 1.5}
    loaders = {n: CountingLoader(threshold_state(t, i)) for i, (n, t) in enumerate(taus.items())}
    own = {n: linear_accuracy(threshold_state(t)) for n, t in taus.items()}
    assert own == {"A": 1.0, "B": 0.9, "C": 0.9, "D": 0.7, "E": 0.7}
    # given in a scrambled order: sorting (desc accuracy, ties by name) happens inside
    ranked = [(n, loaders[n], own[n]) for n in ["E", "C", "D", "A", "B"]]
    res = greedy_select(ranked, linear_accuracy)
    # A kept (1.0); B: mean 5.2 -> 0.9 < 1.0 dropped; C: mean 4.05 -> 1.0 >= 1.0 kept;
    # D: (4.9+3.2+7.5)/3 = 5.2 -> 0.9 dropped; E: (4.9+3.2+1.5)/3 = 3.2 -> 0.9 dropped.
    assert res.selected == ["A", "C"]
    assert [tuple(s) for s in res.trace] == [
        ("A", 1.0, True), ("B", 0.9, False), ("C", 1.0, True),
        ("D", 0.9, False), ("E", 0.9, False)]
    assert res.val_accuracy == 1.0
    assert abs(-res.state_dict["head.bias"].item() - (4.9 + 3.2) / 2) < 1e-6
    assert res.state_dict["featurizer.bn.num_batches_tracked"].item() == 0  # A's (first kept)
    assert {n: ld.calls for n, ld in loaders.items()} == {n: 1 for n in taus}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_never_below_best_single(seed):
    g = torch.Generator().manual_seed(100 + seed)
    xs = torch.randn(64, 4, generator=g)
    ys = xs @ torch.tensor([1.0, -2.0, 0.5, 1.5]) > 0

    def evaluate(sd):
        return float(((xs @ sd["w"] + sd["b"] > 0) == ys).float().mean())

    members = []
    for i in range(6):
        sd = {"w": torch.tensor([1.0, -2.0, 0.5, 1.5]) + 1.5 * torch.randn(4, generator=g),
              "b": 0.5 * torch.randn(1, generator=g)}
        members.append((f"m{i}", CountingLoader(sd), evaluate(sd)))
    res = greedy_select(members, evaluate)
    best_single = max(acc for _, _, acc in members)
    assert res.val_accuracy >= best_single
    assert evaluate(res.state_dict) == res.val_accuracy
    assert res.trace[0].kept and res.trace[0].candidate_acc == best_single
    assert all(ld.calls == 1 for _, ld, _ in members)
    kept_accs = [s.candidate_acc for s in res.trace if s.kept]
    assert kept_accs == sorted(kept_accs)  # best-so-far never decreases


# --------------------------------------------------------------------------------------------
# memory: at most one member alive at a time, however many are averaged
# --------------------------------------------------------------------------------------------

class TrackingLoaders:
    def __init__(self, n):
        self.refs: list[list[weakref.ref]] = []
        self.max_alive_at_load = 0
        self.n = n

    def alive(self):
        gc.collect()
        return sum(1 for refs in self.refs if any(r() is not None for r in refs))

    def loader(self, i):
        def load():
            # members loaded before this one must all be gone by now
            self.max_alive_at_load = max(self.max_alive_at_load, self.alive())
            s = make_state(i)
            s["float64.buffer"] = torch.randn(8, dtype=torch.float64)
            self.refs.append([weakref.ref(t) for t in s.values()])
            return s
        return load

    def members(self):
        return [(f"m{i}", self.loader(i)) for i in range(self.n)]


@pytest.mark.parametrize("n", [2, 12])
def test_uniform_holds_one_member_at_a_time(n):
    tr = TrackingLoaders(n)
    avg, count = uniform_average(tr.members())
    assert count == n and len(tr.refs) == n
    assert tr.max_alive_at_load == 0
    assert tr.alive() == 0  # nothing of any member is retained by the result either


@pytest.mark.parametrize("n", [2, 12])
def test_greedy_holds_one_member_at_a_time(n):
    tr = TrackingLoaders(n)
    calls = []

    def evaluate(sd):
        calls.append(1)
        return 0.5  # always ties: every member kept

    res = greedy_select([(name, ld, 0.5) for name, ld in tr.members()], evaluate)
    assert len(res.selected) == n and len(calls) == n and len(tr.refs) == n
    assert tr.max_alive_at_load == 0
    assert tr.alive() == 0


def test_running_sum_size_does_not_grow():
    import tracemalloc  # numpy reports its buffers to it: the float64 sums are traced

    from ratatouille_trainer import averaging

    def held_by_the_engine() -> int:
        # Only what averaging.py allocated and still holds: other threads of the test session
        # (clients, prefetchers of earlier tests) allocate too, and must not count.
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, averaging.__file__)])
        return sum(stat.size for stat in snap.statistics("filename"))

    rs = RunningSum()
    sizes = []
    tracemalloc.start()
    try:
        for i in range(6):
            rs.add(f"m{i}", make_state(i))
            gc.collect()
            sizes.append(held_by_the_engine())
    finally:
        tracemalloc.stop()
    assert sizes[0] >= 8 * sum(t.numel() for t in make_state(0).values() if t.is_floating_point())
    assert max(sizes[1:]) - sizes[0] < 4096  # nothing per member beyond the first


# --------------------------------------------------------------------------------------------
# interpolation
# --------------------------------------------------------------------------------------------

def test_interpolate_endpoints_and_midpoint():
    a, b = make_state(1), make_state(2)
    at0, at1, mid = interpolate(a, b, 0.0), interpolate(a, b, 1.0), interpolate(a, b, 0.5)
    for k in a:
        assert torch.equal(at0[k], a[k]), k
        if a[k].is_floating_point():
            assert torch.equal(at1[k], b[k]), k
        else:
            assert torch.equal(at1[k], a[k]), k  # integer buffers from a
    exp = expected_mean([a, b])
    for k in a:
        assert torch.equal(mid[k], exp[k]), k
    b_bad = dict(b, **{"head.bias": torch.zeros(11)})
    with pytest.raises(AveragingError, match="'head.bias'"):
        interpolate(a, b_bad, 0.5)


# --------------------------------------------------------------------------------------------
# files: safetensors only, atomic writes
# --------------------------------------------------------------------------------------------

def test_refuse_pickle(tmp_path):
    payload = pickle.dumps({"head.weight": [1.0, 2.0]})  # written, never loaded
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(payload)
    with pytest.raises(UnsafeWeightsError, match="pickle") as e:
        refuse_pickle(disguised)
    assert "\n" not in str(e.value)
    with pytest.raises(UnsafeWeightsError):
        load_safetensors_file(disguised)
    for suffix in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        with pytest.raises(UnsafeWeightsError):
            refuse_pickle(f"s3://bucket/run/model{suffix}")
    zipped = tmp_path / "weights.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(UnsafeWeightsError, match="zip"):
        refuse_pickle(zipped)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_safetensors_bytes(payload, "s3://b/x/model.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.arange(3.0)}, str(good))
    refuse_pickle(good)  # accepted
    refuse_pickle("file://" + str(good))
    assert torch.equal(load_safetensors_file(good)["x"], torch.arange(3.0))
    assert torch.equal(load_safetensors_bytes(good.read_bytes())["x"], torch.arange(3.0))


def _write_members(tmp_path, n, seed0=0):
    paths = []
    for i in range(n):
        p = tmp_path / f"m{i}.safetensors"
        save_file(make_state(seed0 + i), str(p))
        paths.append(p)
    return paths


def test_average_files_roundtrip(tmp_path):
    paths = _write_members(tmp_path, 3)
    out = tmp_path / "out" / "avg.safetensors"
    summary = average_files(out, paths)
    assert summary["count"] == 3
    assert summary["tensors"] == len(make_state(0))
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() == sha256_file(out)
    got = load_safetensors_file(out)
    exp = expected_mean([make_state(i) for i in range(3)])
    for k in exp:
        assert torch.equal(got[k], exp[k]), k
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ratatouille.averaged"] == "3"
    assert sorted(os.listdir(out.parent)) == ["avg.safetensors"]


def test_average_files_leaves_nothing_on_error(tmp_path):
    paths = _write_members(tmp_path, 2)
    odd = tmp_path / "odd.safetensors"
    s = make_state(5)
    s["head.weight"] = torch.zeros(10, 96)
    save_file(s, str(odd))
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    with pytest.raises(AveragingError, match="'head.weight' has shape \\(10, 96\\)"):
        average_files(out, paths + [odd])
    assert os.listdir(out.parent) == []
    pkl = tmp_path / "legacy.pt"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeWeightsError):
        average_files(out, paths + [pkl])
    assert os.listdir(out.parent) == []
    # an existing output is left untouched by a failed run
    out.write_bytes(b"previous")
    with pytest.raises(AveragingError):
        average_files(out, paths + [odd])
    assert out.read_bytes() == b"previous"
    assert os.listdir(out.parent) == ["avg.safetensors"]


def test_save_state_dict_shared_and_noncontiguous(tmp_path):
    w = torch.randn(4, 3)
    state = {"a": w, "tied": w, "t": w.t(), "slice": w[1:3], "n": torch.tensor(3)}
    out = tmp_path / "s.safetensors"
    save_state_dict(state, out, {"stage": "average"})
    got = load_safetensors_file(out)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["stage"] == "average"
    with pytest.raises(TypeError):
        save_state_dict(state, tmp_path / "bad.safetensors", {"n": 3})
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]
    # header sanity: 8-byte little-endian length then '{'
    head = out.read_bytes()[:9]
    assert struct.unpack("<Q", head[:8])[0] > 0 and head[8:9] == b"{"


# --------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------

def _lineage_inputs():
    members = [
        {"member": "10", "uri": "file:///s/ns/r/u/target/10", "sha256": "c" * 64,
         "source": "pacs-0", "hyperparameters": {"lr": "1e-05", "weightDecay": "0.0001",
                                                  "dropout": "0.1"},
         "valAccuracy": 0.80, "testAccuracy": {"sketch": 0.70}},
        {"member": "0", "uri": "file:///s/ns/r/u/target/0", "sha256": "a" * 64,
         "source": "foundation", "hyperparameters": {"lr": "5e-05", "weightDecay": "0",
                                                      "dropout": "0"},
         "valAccuracy": 0.85, "testAccuracy": {"sketch": 0.72}},
        {"member": "2", "uri": "file:///s/ns/r/u/target/2", "sha256": "b" * 64,
         "source": "pacs-1", "hyperparameters": {"lr": "3e-05", "weightDecay": "1e-06",
                                                  "dropout": "0.5"},
         "valAccuracy": 0.83, "testAccuracy": {"sketch": 0.75}},
    ]
    result = {"sha256": "d" * 64, "selection": "greedy", "selected": ["0", "2"],
              "uri": "file:///s/ns/r/u/average/model.safetensors",
              "valAccuracy": 0.88, "testAccuracy": {"sketch": 0.78},
              "run": {"namespace": "ns", "name": "pacs-run", "uid": "u"},
              "foundation": {"model": "resnet50", "weights": "s3://w/resnet50.safetensors"},
              "data": {"dataset": "s3://d/pacs", "testDomains": ["sketch"]}}
    return members, result


def test_write_lineage_content_and_determinism():
    members, result = _lineage_inputs()
    lin = write_lineage(members, result)
    assert [m["member"] for m in lin["members"]] == ["0", "2", "10"]  # natural order
    by = {m["member"]: m for m in lin["members"]}
    assert by["0"]["selected"] and by["2"]["selected"] and not by["10"]["selected"]
    for m in lin["members"]:
        for key in ("member", "uri", "sha256", "source", "hyperparameters", "valAccuracy",
                    "testAccuracy", "selected", "init"):
            assert key in m, key
    assert by["10"]["source"] == "pacs-0" and by["10"]["init"]["source"] == "pacs-0"
    assert lin["result"]["sha256"] == "d" * 64
    assert lin["result"]["membersAveraged"] == 2
    assert lin["selection"] == "greedy"
    assert lin["run"]["uid"] == "u"
    assert lin["bestSingle"]["member"] == "0" and lin["bestSingle"]["valAccuracy"] == 0.85
    # deterministic and independent of input order
    again = write_lineage(list(reversed(members)), dict(result))
    assert lineage_json(lin) == lineage_json(again)
    assert json.loads(lineage_json(lin)) == lin
    with pytest.raises(ValueError, match="uri"):
        write_lineage([{"member": "0"}], result)
    with pytest.raises(ValueError, match="unknown member"):
        write_lineage(members, dict(result, selected=["0", "99"]))


def test_model_card():
    members, result = _lineage_inputs()
    card = model_card(write_lineage(members, result))
    assert card == model_card(write_lineage(members, result))
    assert card.startswith("# pacs-run: Model Ratatouille average of 2 fine-tuned members")
    assert "`resnet50`" in card
    assert "| Members averaged | 2 of 3 |" in card
    assert "Greedy" in card
    assert "load_file(\"model.safetensors\")" in card
    assert "| this model (greedy, 2 members) | 88.00 | 78.00 |" in card
    assert "| best single member (`0`) | 85.00 | 72.00 |" in card
    assert "| `10` | no | pacs-0 | 1e-05 | 0.0001 | 0.1 | 80.00 | 70.00 | `cccccccccccc` |" in card
    assert "d" * 64 in card
