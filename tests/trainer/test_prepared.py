"""Prepared datasets: decoded once into cached shards, read by every Job, bit-identical to
decoding in the Job; bounded sampling above the memory budget."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ratatouille_trainer.cli import main as trainer_main
from ratatouille_trainer.data import TrainStream, load_dataset, train_transform
from ratatouille_trainer.prepared import (LazyImages, WindowStream, load_prepared, parse_bytes,
                                          prepare_dataset, train_stream)
from ratatouille_contract.layout import join
from ratatouille_trainer.storage import open_storage

from .util import INPUT, job, write_dataset, write_foundation


@pytest.fixture()
def ds(tmp_path):
    root = write_dataset(tmp_path / "ds", per_class=7, formats=("png", "jpg", "L", "P", "RGBA"))
    (root / "d1" / "square" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _same_dataset(a, b):
    assert a.classes == b.classes and a.domain_names == b.domain_names
    for x, y in zip(a.domains, b.domains):
        assert torch.equal(x.images, y.images), x.name
        assert torch.equal(x.labels, y.labels) and torch.equal(x.in_idx, y.in_idx)
        assert torch.equal(x.out_idx, y.out_idx) and x.skipped == y.skipped


def test_prepared_is_bit_identical_to_decoding_in_the_job(ds, tmp_path):
    store = open_storage(str(tmp_path / "store"))
    cache = str(tmp_path / "store" / "cache" / "data")
    # small shards: several per domain, never spanning two domains
    info = prepare_dataset(str(ds), INPUT, cache, storage=store, shard_bytes=3 * INPUT * INPUT * 5)
    assert not info["reused"] and info["images"] == 63 and info["skippedImages"] == 1
    index = json.loads((tmp_path / "store" / "cache" / "data" / info["key"] / "index.json").read_text())
    assert index["shards"][0]["count"] == 5 and len(index["shards"]) == 15
    assert [d["count"] for d in index["domains"]] == [21, 21, 21]
    assert "square/broken.jpg" in index["domains"][1]["skipped"][0]
    for split_seed, holdout, test in ((0, 0.2, ("d2",)), (5, 0.3, ("d0",))):
        ref = load_dataset(str(ds), INPUT, test_domains=test, holdout_fraction=holdout, split_seed=split_seed)
        got = load_prepared(info["entry"], test_domains=test, holdout_fraction=holdout,
                            split_seed=split_seed, storage=store)
        _same_dataset(ref, got)
        assert got.prepared["key"] == info["key"] and got.prepared["streamed"] is False
        # the same batches and the same augmentation, step after step
        s1, s2 = TrainStream(ref, 4, seed=11), TrainStream(got, 4, seed=11)
        for _ in range(3):
            (x1, y1), (x2, y2) = s1.next_raw(), s2.next_raw()
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert torch.equal(train_transform(x1, s1.aug_gen), train_transform(x2, s2.aug_gen))


def test_cache_key_follows_content_input_size_and_is_reused(ds, tmp_path):
    store = open_storage(str(tmp_path / "store"))
    cache = str(tmp_path / "cache")
    first = prepare_dataset(str(ds), INPUT, cache, storage=store)
    again = prepare_dataset(str(ds), INPUT, cache, storage=store)
    assert again["reused"] and again["key"] == first["key"]
    assert prepare_dataset(str(ds), 16, cache, storage=store)["key"] != first["key"]
    img = ds / "d0" / "circle" / "0.png"
    img.write_bytes(img.read_bytes() + b"\0")                    # same name, new size
    changed = prepare_dataset(str(ds), INPUT, cache, storage=store)
    assert not changed["reused"] and changed["key"] != first["key"]
    os.unlink(ds / "d0" / "circle" / "1.jpg")                   # one file fewer
    fewer = prepare_dataset(str(ds), INPUT, cache, storage=store)
    assert fewer["key"] not in (first["key"], changed["key"])
    assert load_prepared(fewer["entry"], test_domains=("d2",), storage=store).domain("d0").labels.tolist().count(0) == 6


def test_prepared_on_s3_is_fetched_once_and_verified(ds, tmp_path, s3_bucket, moto_server, monkeypatch):
    monkeypatch.setenv("RATATOUILLE_CACHE_DIR", str(tmp_path / "local"))
    s3 = open_storage(s3_bucket, moto_server)
    prefix = join(s3_bucket, "datasets", "shapes")
    for p in sorted(ds.rglob("*.*")):
        s3.upload(str(p), join(prefix, str(p.relative_to(ds))))
    info = prepare_dataset(prefix, INPUT, join(s3_bucket, "cache", "data"), storage=s3, endpoint=moto_server)
    got = load_prepared(info["entry"], test_domains=("d2",), storage=s3)
    _same_dataset(load_dataset(str(ds), INPUT, test_domains=("d2",)), got)
    local = tmp_path / "local" / "data" / info["key"]
    assert sorted(p.name for p in local.glob("*.u8")) == ["shard-00000.u8", "shard-00001.u8", "shard-00002.u8"]
    # a corrupted local copy is not trusted once its marker is gone; a corrupted upstream shard is refused
    s3.write_bytes(join(info["entry"], "shard-00001.u8"), b"\0" * (local / "shard-00001.u8").stat().st_size)
    (local / "shard-00001.u8.verified").unlink()
    with pytest.raises(Exception, match="does not match the sha256"):
        load_prepared(info["entry"], test_domains=("d2",), storage=s3)


def test_above_the_budget_batches_stream_through_bounded_windows(ds, tmp_path):
    store = open_storage(str(tmp_path / "store"))
    info = prepare_dataset(str(ds), INPUT, str(tmp_path / "cache"), storage=store)
    row = 3 * INPUT * INPUT
    budget = 2 * 2 * 8 * row                                      # two windows of 8 images per domain
    got = load_prepared(info["entry"], test_domains=("d2",), storage=store, budget=budget)
    ref = load_prepared(info["entry"], test_domains=("d2",), storage=store)
    assert got.prepared["streamed"] and isinstance(got.domains[0].images, LazyImages)
    assert isinstance(train_stream(ref, 4, 0), TrainStream)
    stream = train_stream(got, 4, seed=3)
    assert isinstance(stream, WindowStream) and stream.window == [8, 8]
    # evaluation reads lazily and sees the same pixels
    for d_ref, d_got in zip(ref.domains, got.domains):
        x, _ = d_got.split("out")
        assert torch.equal(x[0:len(x)], d_ref.split("out")[0])
    # every batch comes from the current window of in-split images; an epoch covers the in-split
    seen = [set(), set()]
    in_sets = [{bytes(ref.domains[k].images[i].numpy()) for i in ref.domains[k].in_idx.tolist()} for k in range(2)]
    state_at_5 = None
    batches = []
    for step in range(20):
        if step == 5:
            state_at_5 = stream.get_state()
        x, y = stream.next_raw()
        batches.append((x, y))
        for k in range(2):
            for img in x[k * 4:(k + 1) * 4]:
                assert bytes(img.numpy()) in in_sets[k]
        for k in range(2):
            seen[k].update(bytes(w.numpy()) for w in stream._current[k].images)
    assert seen[0] == in_sets[0] and seen[1] == in_sets[1]
    # resuming from a checkpointed state draws the same batches
    resumed = train_stream(got, 4, seed=3)
    resumed.set_state(state_at_5)
    for step in range(5, 20):
        x, y = resumed.next_raw()
        assert torch.equal(x, batches[step][0]) and torch.equal(y, batches[step][1])
    stream.close(), resumed.close()


def test_lazy_rows_across_shards_in_any_order_and_a_short_shard_is_an_error(ds, tmp_path):
    store = open_storage(str(tmp_path / "store"))
    row = 3 * INPUT * INPUT
    info = prepare_dataset(str(ds), INPUT, str(tmp_path / "cache"), storage=store, shard_bytes=5 * row)
    ref = load_prepared(info["entry"], test_domains=("d2",), storage=store)
    got = load_prepared(info["entry"], test_domains=("d2",), storage=store, budget=1)
    for d_ref, d_got in zip(ref.domains, got.domains):
        assert len(d_got.images.chunks) > 2                     # the domain spans several shards
        rows = np.random.RandomState(0).permutation(len(d_ref.images))[:len(d_ref.images) - 1]
        rows = np.concatenate([rows, rows[:3]])                 # repeats, across shards, unordered
        assert torch.equal(torch.from_numpy(d_got.images.read_rows(rows)), d_ref.images[torch.from_numpy(rows)])
    lazy = got.domains[0].images
    last = lazy.chunks[-1][0]
    os.truncate(last, os.path.getsize(last) - 1)
    with pytest.raises(Exception, match="shorter than its index"):
        lazy.read_rows(np.array([len(lazy) - 1]))


def test_parse_bytes():
    assert parse_bytes("8Gi") == 8 << 30 and parse_bytes("512Mi") == 512 << 20
    assert parse_bytes("2G") == 2_000_000_000 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


def _run(stage, desc) -> int:
    return trainer_main([stage, "--job-json", json.dumps(desc)])


def test_stages_on_a_prepared_dataset_train_exactly_as_on_the_images(ds, tmp_path):
    w = write_foundation(tmp_path / "f.safetensors", with_head=False)
    prep = job("prepare", tmp_path / "out" / "prepare" / "target", ds, member="target", weights=str(w))
    prep["data"]["prepared"] = str(tmp_path / "out" / "cache" / "data")
    del prep["training"]
    assert _run("prepare", prep) == 0
    pointer = json.loads((tmp_path / "out" / "prepare" / "target" / "prepared.json").read_text())
    assert pointer["reused"] is False
    results = {}
    for name, prepared in (("images", None), ("shards", str(tmp_path / "out" / "prepare" / "target"))):
        d = job("linear-probe", tmp_path / name / "lp", ds, weights=str(w), steps=4, eval_every=2)
        if prepared:
            d["data"]["prepared"] = prepared
        assert _run("linear-probe", d) == 0
        results[name] = json.loads((tmp_path / name / "lp" / "metrics.json").read_text())
    a, b = results["images"], results["shards"]
    assert b["preparedData"]["entry"] == pointer["entry"] and a["preparedData"] is None
    for k in ("valAccuracy", "valAccuracyPerDomain", "testAccuracy", "curve", "bestStep"):
        assert a[k] == b[k], k
    from safetensors.numpy import load_file
    ma, mb = load_file(str(tmp_path / "images" / "lp" / "model.safetensors")), load_file(str(tmp_path / "shards" / "lp" / "model.safetensors"))
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)
