"""The fast paths of the averaging engine (issue 7): its streaming drivers (files, and S3 with a
prefetch thread) and RunningSum give exactly the results of the plain paths, read every member
once, and keep refusing bad input. Fast, no timing assertions."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ratatouille_trainer import averaging
from ratatouille_trainer.averaging import (AveragingError, RunningSum, UnsafeWeightsError,
                                           average_files, average_uris, uniform_average)
from ratatouille_contract.layout import join
from ratatouille_trainer.storage import open_storage


def make_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "featurizer.conv.weight": torch.randn(8, 3, 3, 3, generator=g) * scale,
        "featurizer.bn.running_mean": torch.randn(8, generator=g),
        "featurizer.bn.num_batches_tracked": torch.tensor(100 + seed, dtype=torch.int64),
        "featurizer.half": (torch.randn(5, 7, generator=g) * 3).to(torch.float16),
        "featurizer.bf16": (torch.randn(33, 3, generator=g) * 5).to(torch.bfloat16),
        "featurizer.f64": torch.randn(6, generator=g, dtype=torch.float64),
        "featurizer.mask": torch.tensor([True, seed % 2 == 0]),
        "featurizer.empty": torch.zeros(0, 4),
        "head.weight": torch.randn(10, 300, generator=g),
        "head.bias": torch.randn(10, generator=g),
    }


def running_sum_mean(states):
    rs = RunningSum()
    for i, s in enumerate(states):
        rs.add(f"m{i}", s)
    return rs.mean()


def write_members(tmp_path, states, prefix="m"):
    paths = []
    for i, s in enumerate(states):
        p = tmp_path / f"{prefix}{i}.safetensors"
        save_file(s, str(p))
        paths.append(p)
    return paths


def write_safetensors_reordered(path, state):
    """A valid safetensors file whose tensors are laid out in reverse name order (another writer's
    layout): offsets differ from the library's, content is the same."""
    header, blobs, pos = {}, [], 0
    for key in sorted(state, reverse=True):
        t = state[key].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.bool: "BOOL"}[t.dtype]
        header[key] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def assert_same(got, exp):
    assert set(got) == set(exp)
    for k in exp:
        assert got[k].dtype == exp[k].dtype, k
        assert torch.equal(got[k], exp[k]), k


# --------------------------------------------------------------------------- streaming, files

def test_streaming_files_bit_identical_to_running_sum(tmp_path):
    states = [make_state(s, scale=10.0 ** (s % 3)) for s in range(7)]
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    summary = average_files(out, paths, {"note": "x"})
    assert summary["count"] == 7 and summary["tensors"] == len(states[0])
    assert_same(load_file(str(out)), running_sum_mean(states))
    assert summary["parameters"] == sum(t.numel() for t in states[0].values())


@pytest.mark.parametrize("block_elems", [1, 7, 500, 1 << 22])
def test_blocks_and_small_pieces_still_match(tmp_path, block_elems):
    # 64-byte pieces split every larger tensor; tiny blocks cut tensors across blocks and put
    # several tensors (and the integer buffers) in one block
    states = [make_state(s) for s in range(3)]
    paths = write_members(tmp_path, states)
    summary = average_uris(str(tmp_path / "avg.safetensors"), [str(p) for p in paths],
                           piece_bytes=64, block_elems=block_elems)
    floats = sum(t.numel() for t in states[0].values() if t.is_floating_point())
    # memory: one block, not the model
    assert summary["accumulatorBytes"] == 8 * min(block_elems, floats)
    assert summary["bytesRead"] <= sum(p.stat().st_size for p in paths)
    assert_same(load_file(str(tmp_path / "avg.safetensors")), running_sum_mean(states))
    # the file is the same whatever the block size
    whole = average_uris(str(tmp_path / "whole.safetensors"), [str(p) for p in paths])
    assert whole["blocks"] == 1 and whole["accumulatorBytes"] == 8 * floats
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "avg.safetensors").read_bytes()


@pytest.mark.parametrize("total, block", [(23_500_000, 4 << 20), (100, 4 << 20), (10, 1), (3374, 500),
                                          (8 << 20, 4 << 20)])
def test_block_sizes_cover_everything_and_end_small(total, block):
    sizes = averaging._block_sizes(total, block)
    assert sum(sizes) == total and all(0 < x <= block for x in sizes)
    if total > block:  # what is left once the last byte is in: an eighth of a block at most
        assert sizes[-1] <= max(1, block // 8)


def test_negative_zeros_keep_their_sign_as_in_running_sum(tmp_path):
    # the sum starts from the first member's values (not from +0.0), as RunningSum's does
    states = [{"w": torch.tensor([-0.0, 1.0, -0.0]), "h": torch.tensor([-0.0], dtype=torch.float16)}
              for _ in range(3)]
    states[1]["w"][2] = 0.0
    paths = write_members(tmp_path, states)
    average_files(tmp_path / "avg.safetensors", paths)
    got, exp = load_file(str(tmp_path / "avg.safetensors")), running_sum_mean(states)
    for k in exp:
        assert got[k].view(torch.int16 if k == "h" else torch.int32).tolist() == \
            exp[k].view(torch.int16 if k == "h" else torch.int32).tolist(), k
    assert torch.signbit(got["w"]).tolist() == [True, False, False]


def test_members_with_another_tensor_layout(tmp_path):
    states = [make_state(s) for s in range(3)]
    paths = write_members(tmp_path, states[:2])
    odd = tmp_path / "reordered.safetensors"
    write_safetensors_reordered(odd, states[2])
    out = tmp_path / "avg.safetensors"
    average_files(out, [*paths, odd])
    assert_same(load_file(str(out)), running_sum_mean(states))


def test_bf16_rounding_matches_torch():
    # the engine's cast of a mean (here a sum of one, divided by 1) is torch's: ties to even,
    # huge and subnormal values, float64 -> float32 -> bfloat16 / float16
    x = np.array([1.0, 1.00390625, 1.005859375, 1.0029296875, -2.5e-3, 3.3e38, 1e-40],
                 dtype=np.float64)
    for tag, dtype, n in (("BF16", torch.bfloat16, 7), ("F16", torch.float16, 5)):
        out = np.empty(n, dtype=averaging._STORED[tag])
        averaging._mean_into(x[:n], 1.0, tag, out)
        theirs = torch.from_numpy(x[:n]).to(dtype)
        want = theirs.view(torch.int16).numpy().view(np.uint16) if tag == "BF16" else theirs.numpy()
        assert out.tolist() == want.tolist(), tag


@pytest.mark.parametrize("key, value", [("head.weight", float("nan")),
                                        ("featurizer.half", float("inf")),
                                        ("featurizer.bf16", float("-inf"))])
def test_non_finite_member_named_and_nothing_written(tmp_path, key, value):
    states = [make_state(s) for s in range(3)]
    bad = states[2]
    flat = bad[key].view(-1)
    flat[flat.numel() - 1] = value  # the last element: found in the last piece
    paths = write_members(tmp_path, states)
    out = tmp_path / "out" / "avg.safetensors"
    with pytest.raises(AveragingError) as e:
        average_files(out, paths)
    assert str(e.value) == f"member {str(paths[2])!r}: tensor {key!r} contains NaN or Inf"
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_large_finite_values_are_not_refused(tmp_path):
    # a float32 sum of these overflows: the exact test must clear them
    states = [{"w": torch.full((1000,), 3e38)}, {"w": torch.full((1000,), -3e38)}]
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    average_files(out, paths)
    assert torch.equal(load_file(str(out))["w"], torch.zeros(1000))
    rs = RunningSum()
    rs.add("m0", {"w": torch.full((1 << 19,), 3e38)})  # more than one kernel piece
    t = torch.full((1 << 19,), 3e38)
    t[-1] = float("inf")
    with pytest.raises(AveragingError, match="'m1': tensor 'w' contains NaN or Inf"):
        rs.add("m1", {"w": t})


def _corrupt(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_corrupt_files_are_refused(tmp_path):
    good = write_members(tmp_path, [make_state(0)])[0]
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    cases = {
        "truncated.safetensors": raw[:-5],
        "trailing.safetensors": raw + b"\0" * 8,
        "hugeheader.safetensors": struct.pack("<Q", 1 << 40) + raw[8:],
    }
    # two tensors claiming the same bytes
    k1, k2 = "head.bias", "featurizer.bn.running_mean"
    overlap = dict(header)
    overlap[k1] = dict(header[k1], data_offsets=header[k2]["data_offsets"][:])
    overlap[k1]["shape"] = header[k2]["shape"]
    h = json.dumps(overlap).encode()
    cases["overlap.safetensors"] = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    # offsets that disagree with the shape
    wrong = dict(header)
    wrong[k1] = dict(header[k1], shape=[11])
    h = json.dumps(wrong).encode()
    cases["shape.safetensors"] = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    for name, data in cases.items():
        bad = _corrupt(tmp_path, name, data)
        with pytest.raises(UnsafeWeightsError) as e:
            average_files(tmp_path / "avg.safetensors", [good, bad])
        assert name in str(e.value), name
        assert "\n" not in str(e.value)
    assert not (tmp_path / "avg.safetensors").exists()


def test_streaming_module_needs_no_torch():
    code = ("import sys, ratatouille_trainer.averaging as s, ratatouille_trainer.weights, "
            "ratatouille_trainer.storage; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(s.PIECE)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(averaging.PIECE)


# ------------------------------------------------------------------------------ streaming, S3

def _upload_members(tmp_path, bucket, endpoint, states):
    store = open_storage(bucket, endpoint)
    paths = write_members(tmp_path, states)
    uris = []
    for i, p in enumerate(paths):
        uri = join(bucket, "run", "target", str(i), "model.safetensors")
        store.upload(p, uri)
        uris.append(uri)
    return store, paths, uris


def test_s3_prefetch_reads_each_member_once_and_matches_files(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(5)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    out = tmp_path / "from-s3.safetensors"
    summary = averaging.average_uris(str(out), uris, endpoint=moto_server)
    assert summary["count"] == 5
    # one GET per member (its header read from the front), every byte fetched once
    assert summary["gets"] == 5 and summary["blocks"] == 1
    # (members after the first skip their integer/bool tensors, here the last bytes of the file)
    assert 0 <= sum(p.stat().st_size for p in paths) - summary["bytesTransferred"] <= 4 * 16
    local = tmp_path / "from-files.safetensors"
    average_files(local, paths)
    assert out.read_bytes() == local.read_bytes()     # same bytes, so the same sha256
    assert_same(load_file(str(out)), running_sum_mean(states))
    # the public wrapper, writing back to S3
    res = average_uris(join(s3_bucket, "avg", "model.safetensors"), uris, endpoint=moto_server)
    assert res["sha256"] == summary["sha256"]
    assert store.read_bytes(join(s3_bucket, "avg", "model.safetensors")) == local.read_bytes()


def _recording_client(s3, *, break_after=None, break_key=None):
    """Wrap the client's get_object: record every call; the body of the first GET of
    ``break_key`` breaks after ``break_after`` bytes."""
    client = s3.client
    real_get = client.get_object
    calls = []

    class Breaking:
        def __init__(self, body, after):
            self.body, self.left = body, after

        def read(self, n=-1):
            if self.left <= 0:
                raise ConnectionError("connection reset by peer (test)")
            data = self.body.read(min(n, self.left) if n and n > 0 else self.left)
            self.left -= len(data)
            return data

        def close(self):
            self.body.close()

    def get_object(**kw):
        calls.append(dict(kw))
        resp = real_get(**kw)
        if kw["Key"] == break_key and break_after is not None \
                and sum(c["Key"] == break_key for c in calls) == 1:
            resp["Body"] = Breaking(resp["Body"], break_after)
        return resp

    client.get_object = get_object
    return calls


def _range(call):
    a, b = call["Range"][len("bytes="):].split("-")
    return int(a), int(b) + 1


def test_s3_blocks_one_get_per_member_each_byte_once(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(4)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    s3 = open_storage(s3_bucket, moto_server)
    calls = _recording_client(s3)
    # blocks of 500 elements: every member is read in several blocks, through its one GET
    summary = averaging.average_uris(str(tmp_path / "avg.safetensors"), uris, storage=s3,
                                     block_elems=500)
    assert summary["blocks"] > 4
    local = tmp_path / "from-files.safetensors"
    average_files(local, paths)
    assert (tmp_path / "avg.safetensors").read_bytes() == local.read_bytes()
    assert len(calls) == summary["gets"] == 4 and not any("Range" in c for c in calls)
    assert summary["bytesTransferred"] <= sum(p.stat().st_size for p in paths)


@pytest.mark.parametrize("piece", [12, 1000])
def test_s3_pieces_that_split_elements_are_copied_across_buffers(tmp_path, s3_bucket, moto_server, piece):
    # prefetched buffers of 12 or 1000 bytes: float64/bf16/fp16 elements straddle buffers (the
    # copying path), the rest is read in place from the buffers
    states = [make_state(s) for s in range(3)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    out = tmp_path / "avg.safetensors"
    averaging.average_uris(str(out), uris, endpoint=moto_server, piece_bytes=piece, block_elems=300)
    local = tmp_path / "from-files.safetensors"
    average_files(local, paths)
    assert out.read_bytes() == local.read_bytes()


def test_s3_reordered_member_and_few_open_streams_use_ranged_gets(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(4)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states[:3])
    odd = tmp_path / "reordered.safetensors"
    write_safetensors_reordered(odd, states[3])
    uris.append(join(s3_bucket, "run", "target", "odd", "model.safetensors"))
    store.upload(odd, uris[-1])
    s3 = open_storage(s3_bucket, moto_server)
    calls = _recording_client(s3)
    summary = averaging.average_uris(None, uris, storage=s3, block_elems=500, max_streams=2)
    exp = running_sum_mean(states)
    got = summary["average"].mean_arrays()
    for k in ("head.weight", "featurizer.conv.weight", "featurizer.half", "featurizer.f64"):
        assert np.array_equal(got[k], exp[k].numpy()), k
    ranged = [c for c in calls if "Range" in c]
    assert ranged and all(c.get("IfMatch") for c in ranged)  # pinned to the header's version
    assert summary["gets"] == len(calls) > 4


def test_s3_prefetch_resumes_a_broken_transfer(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(3)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    from ratatouille_trainer.storage import RetryPolicy

    s3 = open_storage(s3_bucket, moto_server, retry=RetryPolicy(attempts=3, base_delay=0.0))
    key1 = "run/target/1/model.safetensors"
    calls = _recording_client(s3, break_after=3000, break_key=key1)  # past the header
    summary = averaging.average_uris(None, uris, storage=s3)
    assert s3.retries == 1
    mine = [c for c in calls if c["Key"] == key1]
    assert len(mine) == 2 and "Range" not in mine[0]
    assert _range(mine[1]) == (3000, paths[1].stat().st_size) and mine[1]["IfMatch"]
    got = summary["average"].mean_arrays()
    exp = running_sum_mean(states)
    for k in ("head.weight", "featurizer.conv.weight", "featurizer.half", "featurizer.f64"):
        assert np.array_equal(got[k], exp[k].numpy()), k
    assert got["featurizer.bf16"].tolist() == exp["featurizer.bf16"].view(torch.int16).numpy().view(np.uint16).tolist()


def test_s3_member_replaced_during_the_average_is_refused(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(3)]
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    s3 = open_storage(s3_bucket, moto_server)
    calls = _recording_client(s3, break_after=3000, break_key="run/target/2/model.safetensors")
    real_member = averaging._s3_member

    def member_then_replace(storage, uri):
        got = real_member(storage, uri)
        if uri == uris[2]:  # another writer replaces it after its header was read
            store.upload(paths[0], uri)
        return got

    out = tmp_path / "avg.safetensors"
    import unittest.mock
    with unittest.mock.patch.object(averaging, "_s3_member", member_then_replace):
        # the broken transfer is resumed with a ranged GET pinned to the first ETag: refused
        with pytest.raises(Exception, match="PreconditionFailed|Precondition"):
            averaging.average_uris(str(out), uris, storage=s3)
    assert not out.exists()
    assert [c for c in calls if c["Key"].endswith("2/model.safetensors")][-1]["IfMatch"]


@pytest.mark.parametrize("bad", ["missing", "shape", "pickle-content"])
def test_s3_bad_later_member_fails_cleanly(tmp_path, s3_bucket, moto_server, bad):
    # a later member's header arrives while the blocks are under way: its problem is reported
    # (naming it), nothing is written, and no thread or open body is left behind
    import threading

    states = [make_state(s) for s in range(4)]
    if bad == "shape":
        states[3]["head.bias"] = torch.zeros(11)
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    if bad == "missing":
        store.delete(uris[3])
    if bad == "pickle-content":
        b, k = store._object_bk(uris[3])
        store.client.put_object(Bucket=b, Key=k, Body=b"\x80\x04\x95" + b"\0" * 64)
    before = set(threading.enumerate())
    out = tmp_path / "avg.safetensors"
    with pytest.raises(Exception) as e:
        averaging.average_uris(str(out), uris, endpoint=moto_server, block_elems=500)
    assert uris[3] in str(e.value)
    assert {"missing": "not found", "shape": "has shape (11,)", "pickle-content": "pickle"}[bad] in str(e.value)
    assert not [p.name for p in tmp_path.iterdir() if "avg" in p.name]  # nor a temporary file
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not [t for t in left if t.name.startswith(("ratatouille-s3-prefetch", "ratatouille-head"))]


def test_s3_bad_member_stops_the_prefetch_thread(tmp_path, s3_bucket, moto_server):
    states = [make_state(s) for s in range(4)]
    states[1]["head.bias"][0] = float("nan")
    store, paths, uris = _upload_members(tmp_path, s3_bucket, moto_server, states)
    out = tmp_path / "avg.safetensors"
    with pytest.raises(AveragingError, match="contains NaN or Inf"):
        averaging.average_uris(str(out), uris, endpoint=moto_server)
    assert not out.exists()
    assert not any(t.name == "ratatouille-s3-prefetch" for t in __import__("threading").enumerate())


# ------------------------------------------------------------------------- RunningSum

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_running_sum_is_torch_float64_arithmetic(dtype):
    # more elements than one kernel piece, a non-contiguous member, a scalar and an empty tensor
    g = torch.Generator().manual_seed(3)
    n = averaging.ELEMS + 17
    members = [{"w": (torch.randn(n, generator=g) * 100).to(dtype),
                "t": (torch.randn(20, 30, generator=g) * 7).to(dtype).t(),
                "s": torch.tensor(float(i) + 0.5).to(dtype),
                "e": torch.zeros(0, 3, dtype=dtype)} for i in range(4)]
    rs = RunningSum()
    for i, m in enumerate(members[:3]):
        rs.add(f"m{i}", m)

    def torch_mean(ms):
        return {k: (sum(m[k].to(torch.float64) for m in ms) / len(ms)).to(dtype) for k in ms[0]}

    assert_same(rs.mean(), torch_mean(members[:3]))
    assert_same(rs.mean_with("m3", members[3]), torch_mean(members))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_unsupported_dtypes_are_refused_naming_member_and_tensor(dtype):
    rs = RunningSum()
    with pytest.raises(AveragingError, match=f"member 'm0': tensor 'w' has dtype {dtype}, which is not supported"):
        rs.add("m0", {"w": torch.zeros(3).to(dtype)})


def test_uniform_average_fast_kernels_load_each_member_once():
    states = [make_state(s) for s in range(6)]
    calls = [0] * 6

    def loader(i):
        def load():
            calls[i] += 1
            return {k: v.clone() for k, v in states[i].items()}
        return load

    avg, count = uniform_average((f"m{i}", loader(i)) for i in range(6))
    assert count == 6 and calls == [1] * 6
    exp = {}
    for k, t0 in states[0].items():
        if t0.is_floating_point():
            exp[k] = (sum(s[k].to(torch.float64) for s in states) / 6).to(t0.dtype)
        else:
            exp[k] = t0.clone()
    assert_same(avg, exp)


# ------------------------------------------------------------------------- greedy scratch reuse

def _greedy_members(n=6):
    from ratatouille_trainer.averaging import greedy_select  # noqa: F401

    states = [make_state(s) for s in range(n)]
    return states, [(f"m{i}", (lambda s=s: {k: v.clone() for k, v in s.items()}), 0.9 - i / 100)
                    for i, s in enumerate(states)]


def _score(sd):
    return float(-(sd["head.weight"][:3, :3] - 0.1).abs().sum())


def test_greedy_reuses_candidate_buffers_when_evaluate_keeps_nothing():
    from ratatouille_trainer.averaging import greedy_select

    states, ranked = _greedy_members()
    ptrs = []

    def evaluate(sd):
        ptrs.append(sd["head.weight"].data_ptr())
        return _score(sd)

    res = greedy_select(ranked, evaluate)
    # two buffers for everything: the soup's and the candidate's (a kept candidate becomes the
    # soup, and the old soup's buffer takes the next candidate)
    assert len(ptrs) == len(states) and len(set(ptrs)) == 2
    ref = greedy_select(_greedy_members()[1], lambda sd: _score({k: v.clone() for k, v in sd.items()}))
    assert res.selected == ref.selected and res.trace == ref.trace
    assert_same(res.state_dict, ref.state_dict)


@pytest.mark.parametrize("keep", ["dict", "tensor", "view"])
def test_greedy_never_overwrites_what_evaluate_kept(keep):
    from ratatouille_trainer.averaging import greedy_select

    states, ranked = _greedy_members()
    kept, copies = [], []

    def evaluate(sd):
        item = {"dict": sd, "tensor": sd["head.weight"], "view": sd["head.weight"][1:]}[keep]
        kept.append(item)
        copies.append((item if keep != "dict" else item["head.weight"]).clone())
        return _score(sd)

    res = greedy_select(ranked, evaluate)
    for item, copy in zip(kept, copies):
        now = item if keep != "dict" else item["head.weight"]
        assert torch.equal(now, copy)        # what evaluate kept was never overwritten
    assert len(res.trace) == 6
