"""Storage: one suite over file:// and s3:// (moto), plus fault injection and error mapping."""
from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest

from ratatouille_contract.layout import join
from ratatouille_trainer import storage as st
from ratatouille_trainer.storage import (NotFound, RetryPolicy, StorageError, TransientStorageError,
                                         open_storage, split_uri)
from tests.faultproxy import FaultProxy

MiB = 1024 * 1024
FAST_RETRY = dict(attempts=8, base_delay=0.005, max_delay=0.05)


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def store(storage_root):
    root, endpoint = storage_root
    return open_storage(root, endpoint, retry=RetryPolicy(**FAST_RETRY)), root


# ------------------------------------------------------------------------------ URIs, helpers


def test_split_uri_and_join(tmp_path, monkeypatch):
    assert split_uri("s3://bucket/a/b/") == ("s3", "bucket", "a/b")
    assert split_uri("s3://bucket") == ("s3", "bucket", "")
    assert split_uri("file:///abs/p") == ("file", "/", "abs/p")
    assert split_uri("/abs/p") == ("file", "/", "abs/p")
    monkeypatch.chdir(tmp_path)
    assert split_uri("rel/x") == ("file", "/", str(tmp_path / "rel" / "x").lstrip("/"))
    assert join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert join("s3://b", "k") == "s3://b/k"
    assert join("file:///", "tmp", "a") == "file:///tmp/a"
    assert join("data", "x") == "data/x"
    for bad in ("gs://b/k", "s3:///k", "file://otherhost/x", ""):
        with pytest.raises(StorageError):
            split_uri(bad)


def test_open_storage_picks_backend_and_endpoint(monkeypatch, tmp_path):
    assert isinstance(open_storage(str(tmp_path)), st.LocalStorage)
    assert isinstance(open_storage(tmp_path.as_uri()), st.LocalStorage)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("RATATOUILLE_S3_ENDPOINT", "http://env-endpoint:9000")
    s3 = open_storage("s3://bucket/prefix")
    assert isinstance(s3, st.S3Storage) and s3.endpoint == "http://env-endpoint:9000"
    assert open_storage("s3://b", "http://explicit:1").endpoint == "http://explicit:1"
    with pytest.raises(StorageError, match="unsupported scheme"):
        open_storage("ftp://host/x")


def test_local_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RATATOUILLE_CACHE_DIR", str(tmp_path / "c"))
    assert st.local_cache_dir() == tmp_path / "c"
    assert st.cache_dir_for("s3://b/data/set").parent == tmp_path / "c" / "sync"
    assert st.cache_dir_for("s3://b/data/set") != st.cache_dir_for("s3://b/data/other")
    monkeypatch.delenv("RATATOUILLE_CACHE_DIR")
    assert st.local_cache_dir() == st.Path.home() / ".cache" / "ratatouille"


def test_credentials_from_mounted_secret_dir(moto_server, monkeypatch, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("shh\n")
    monkeypatch.setenv("RATATOUILLE_CREDENTIALS_DIR", str(secret))
    s3 = open_storage("s3://bucket", moto_server)
    creds = s3.client._request_signer._credentials.get_frozen_credentials()
    assert (creds.access_key, creds.secret_key) == ("from-secret", "shh")
    assert s3.client.meta.region_name == "us-east-1"


def test_credentials_from_shared_credentials_file(moto_server, monkeypatch, tmp_path):
    creds_file = tmp_path / "credentials"
    creds_file.write_text("[default]\naws_access_key_id = from-file\naws_secret_access_key = k\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds_file))
    s3 = open_storage("s3://bucket", moto_server)
    assert s3.client._request_signer._credentials.get_frozen_credentials().access_key == "from-file"


def test_truncated_response_headers_are_transient():
    # a 2xx answer whose header block was cut off must not parse as an empty success
    with pytest.raises(st._MalformedResponse):
        st._reject_unframed_response({"status_code": 200, "headers": {}})
    st._reject_unframed_response({"status_code": 200, "headers": {"content-length": "0"}})
    st._reject_unframed_response({"status_code": 204, "headers": {}})
    st._reject_unframed_response({"status_code": 404, "headers": {}})
    assert st._is_transient(st._MalformedResponse("cut"))


# ------------------------------------------------------------------------ suite, both backends


def test_write_read_exists_size(store):
    s, root = store
    uri = join(root, "a", "blob.bin")
    assert not s.exists(uri)
    s.write_bytes(uri, b"hello")
    assert s.exists(uri)
    assert s.read_bytes(uri) == b"hello"
    assert s.size(uri) == 5
    token = s.etag_or_mtime(uri)
    s.write_bytes(uri, b"hello, world")
    assert s.read_bytes(uri) == b"hello, world"
    assert s.etag_or_mtime(uri) != token
    assert s.sha256_of(uri) == hashlib.sha256(b"hello, world").hexdigest()
    # atomic local writes leave no temporary files behind
    assert s.list(root) == [uri]


def test_json_roundtrip_and_invalid(store):
    s, root = store
    uri = join(root, "m", "metrics.json")
    s.write_json(uri, {"valAccuracy": 0.5, "curve": [{"step": 1}]})
    assert s.read_json(uri) == {"valAccuracy": 0.5, "curve": [{"step": 1}]}
    bad = join(root, "m", "bad.json")
    s.write_bytes(bad, b"{not json")
    with pytest.raises(StorageError, match="invalid JSON") as info:
        s.read_json(bad)
    assert bad in str(info.value)


def test_list_recursive_and_delete_prefix(store):
    s, root = store
    for key in ("a/x", "a/b/y", "a/b/c/z", "ab/sibling"):
        s.write_bytes(join(root, key), key.encode())
    assert s.list(join(root, "a")) == [join(root, k) for k in ("a/b/c/z", "a/b/y", "a/x")]
    assert len(s.list(root)) == 4
    assert s.list(join(root, "nothing-here")) == []
    assert s.delete_prefix(join(root, "a")) == 3
    assert s.list(join(root, "a")) == []
    assert s.exists(join(root, "ab/sibling")), "a sibling sharing the string prefix survives"


def test_upload_download_multipart(store, tmp_path):
    s, root = store
    data = _payload(9 * MiB + 123, seed=1)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = join(root, "weights", "model.safetensors")
    s.upload(src, uri)
    assert s.size(uri) == len(data)
    assert s.sha256_of(uri) == hashlib.sha256(data).hexdigest()
    if uri.startswith("s3://"):
        assert s.etag_or_mtime(uri).endswith("-2"), "above 8 MiB goes multipart (2 parts)"
    dst = tmp_path / "out" / "copy.bin"
    assert s.download(uri, dst) == str(dst)
    assert dst.read_bytes() == data
    assert not [p for p in dst.parent.iterdir() if p.name != "copy.bin"], "no temp files left"


def test_sync_saves_its_manifest_by_time_not_per_object_count(store, tmp_path, monkeypatch):
    """The manifest is rewritten whole: saving it every k objects made a 100,000-image sync
    quadratic (gigabytes of JSON written and fsynced). Progress is saved every
    SYNC_PROGRESS_EVERY_S seconds, and a sync stopped part way keeps what it saved."""
    s, root = store
    if not root.startswith("s3://"):
        pytest.skip("a local dataset is used in place: nothing is synced")
    prefix = join(root, "datasets", "many")
    for i in range(120):
        s.write_bytes(join(prefix, f"c/{i:03d}.png"), bytes([i]) * 10)
    writes = []
    real = st._write_manifest
    monkeypatch.setattr(st, "_write_manifest", lambda *a: (writes.append(len(a[2])), real(*a)))
    s.sync_to_local(prefix, tmp_path / "a")
    assert writes == [120]  # once, at the end (the old code: at 50, 100 and the end)

    writes.clear()
    monkeypatch.setattr(st, "SYNC_PROGRESS_EVERY_S", 0.0)  # save after every copy
    fetch, copies = s._fetch, []
    lock = threading.Lock()

    def fail_at_the_fifth(uri, local, size, etag):
        with lock:
            n = len(copies)
            copies.append(uri)
        if n == 4:
            raise st.StorageError("connection lost")
        return fetch(uri, local, size, etag)
    monkeypatch.setattr(s, "_fetch", fail_at_the_fifth)
    with pytest.raises(st.StorageError, match="connection lost"):
        s.sync_to_local(prefix, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / st.SYNC_MANIFEST).read_text())["objects"]
    failed = copies[4].rpartition("many/")[2]
    # what landed is recorded (the fetches already running finish), the failed one is not,
    # and the fetches not yet started were dropped
    assert failed not in saved and 4 <= len(saved) < 120
    assert all((tmp_path / "b" / rel).read_bytes() == bytes([int(rel[2:5])]) * 10 for rel in saved)
    assert len(copies) < 120
    # the next sync fetches only what is missing
    monkeypatch.setattr(s, "_fetch", fetch)
    again = s.sync_to_local_stats(prefix, tmp_path / "b")
    assert (again.copied, again.skipped) == (120 - len(saved), len(saved))


def test_sync_fetches_small_objects_in_one_request_each(store, tmp_path, monkeypatch):
    """A dataset is many small objects: one GET each (pinned to the listed ETag), several at a
    time, instead of a HEAD and a transfer each; an object replaced after the listing fails."""
    s, root = store
    if not root.startswith("s3://"):
        pytest.skip("a local dataset is used in place: nothing is synced")
    prefix = join(root, "datasets", "small")
    for i in range(40):
        s.write_bytes(join(prefix, f"d/c/{i:02d}.png"), bytes([i]) * (100 + i))
    calls = []
    real = s.client._make_api_call
    monkeypatch.setattr(s.client, "_make_api_call", lambda op, params: (calls.append(op), real(op, params))[1])
    stats = s.sync_to_local_stats(prefix, tmp_path / "a")
    assert stats.copied == 40
    assert sorted(set(calls)) == ["GetObject", "ListObjectsV2"] and calls.count("GetObject") == 40
    assert all((tmp_path / "a" / f"d/c/{i:02d}.png").read_bytes() == bytes([i]) * (100 + i) for i in range(40))
    assert (os.stat(tmp_path / "a" / "d/c/00.png").st_mode & 0o777) == st.new_file_mode()  # not mkstemp's 0600
    listed = s.entries(prefix)
    s.write_bytes(join(prefix, "d/c/07.png"), b"x" * 107)      # same size, other content
    with pytest.raises(StorageError, match="07.png") as err:
        s._fetch(join(prefix, "d/c/07.png"), str(tmp_path / "x.png"), listed[7][1], listed[7][2])
    assert not isinstance(err.value, TransientStorageError) and not (tmp_path / "x.png").exists()


def test_sync_to_local_skips_unchanged(store, tmp_path):
    s, root = store
    prefix = join(root, "datasets", "digits")
    files = {"train/0.npy": b"a" * 100, "train/1.npy": b"b" * 200, "meta.json": b"{}"}
    for rel, body in files.items():
        s.write_bytes(join(prefix, rel), body)
    local = tmp_path / "dl"
    first = s.sync_to_local_stats(prefix, local)
    for rel, body in files.items():
        assert (st.Path(first.local_dir) / rel).read_bytes() == body
    second = s.sync_to_local_stats(prefix, local)
    assert second.copied == 0 and second.skipped == 3
    assert s.sync_to_local(prefix, local) == first.local_dir
    if prefix.startswith("s3://"):
        assert first.copied == 3 and first.local_dir == str(local)
        # same size, new content: the recorded ETag tells the sync to copy it again
        s.write_bytes(join(prefix, "train/0.npy"), b"c" * 100)
        third = s.sync_to_local_stats(prefix, local)
        assert (third.copied, third.skipped) == (1, 2)
        assert (local / "train/0.npy").read_bytes() == b"c" * 100
    else:
        assert first.local_dir == st._local_path(prefix)  # local data is used in place
    with pytest.raises(NotFound):
        s.sync_to_local(join(root, "datasets", "missing"), tmp_path / "dl2")


def test_mark_done_is_written_last(store):
    s, root = store
    prefix = join(root, "ns", "run", "uid", "target", "0")
    assert not s.is_done(prefix)
    with pytest.raises(StorageError, match="model.safetensors"):
        s.mark_done(prefix, {"member": "0"}, require=["model.safetensors", "metrics.json"])
    assert not s.is_done(prefix), "DONE is not written for missing work"
    s.write_bytes(join(prefix, "model.safetensors"), b"weights")
    s.write_json(join(prefix, "metrics.json"), {"valAccuracy": 1.0})
    assert not s.is_done(prefix)
    done = s.mark_done(prefix, {"member": "0"}, require=["model.safetensors", "metrics.json"])
    assert done == join(prefix, "DONE") and s.is_done(prefix)
    assert s.read_done(prefix)["member"] == "0"


def test_not_found_names_the_uri(store, tmp_path):
    s, root = store
    missing = join(root, "no", "such", "object.bin")
    assert not s.exists(missing)
    for call in (lambda: s.read_bytes(missing), lambda: s.size(missing),
                 lambda: s.sha256_of(missing), lambda: s.read_json(missing),
                 lambda: s.download(missing, tmp_path / "x.bin")):
        with pytest.raises(NotFound) as info:
            call()
        assert missing in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(NotFound, match="nope.bin"):
        s.upload(tmp_path / "nope.bin", join(root, "up.bin"))
    assert s.read_done(join(root, "no")) is None


def test_reads_uris_of_the_other_scheme(store, tmp_path):
    s, root = store
    local = tmp_path / "foundation.safetensors"
    local.write_bytes(b"local weights")
    assert s.read_bytes(local.as_uri()) == b"local weights"
    assert s.read_bytes(str(local)) == b"local weights"
    assert s.sha256_of(local.as_uri()) == hashlib.sha256(b"local weights").hexdigest()


# ------------------------------------------------------------------- error mapping and retries


def test_s3_non_transient_errors_are_not_retried(moto_server):
    s = open_storage("s3://no-such-bucket-xyz", moto_server, retry=RetryPolicy(**FAST_RETRY))
    with pytest.raises(StorageError) as info:
        s.write_bytes("s3://no-such-bucket-xyz/k", b"x")
    assert "s3://no-such-bucket-xyz/k" in str(info.value)
    assert "does not exist" in str(info.value)
    assert not isinstance(info.value, TransientStorageError)
    assert s.retries == 0


def test_transient_classification():
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert st._is_transient(client_error("SlowDown", 503))
    assert st._is_transient(client_error("InternalError", 500))
    assert st._is_transient(client_error("RequestTimeout", 400))
    assert not st._is_transient(client_error("NoSuchKey", 404))
    assert not st._is_transient(client_error("AccessDenied", 403))
    assert st._is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert st._is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert st._is_transient(ConnectionResetError())
    assert not st._is_transient(ValueError("bug"))
    try:  # boto3 wraps upload ClientErrors without `from`; the context still decides
        try:
            raise client_error("SlowDown", 503)
        except ClientError as e:
            raise S3UploadFailedError(f"Failed: {e}")
    except S3UploadFailedError as wrapped:
        assert st._is_transient(wrapped)
    err = st._s3_error("s3://b/k", "read", client_error("AccessDenied", 403))
    assert str(err).startswith("s3://b/k: access denied")


def test_retry_backoff_is_bounded_and_jittered():
    from botocore.exceptions import ConnectionClosedError

    slept = []
    policy = RetryPolicy(attempts=4, base_delay=0.1, max_delay=0.25, sleep=slept.append,
                         rng=random.Random(3))
    s = st.S3Storage("s3://b", endpoint="http://unused", retry=policy)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionClosedError(endpoint_url="http://unused")
        return "ok"

    assert s._call("read", "s3://b/k", flaky) == "ok"
    assert len(calls) == 3 and s.retries == 2 and len(slept) == 2
    assert 0 <= slept[0] <= 0.1 and 0 <= slept[1] <= 0.2

    def always():
        raise ConnectionClosedError(endpoint_url="http://unused")

    with pytest.raises(TransientStorageError, match=r"s3://b/k: read failed after 4 attempts"):
        s._call("read", "s3://b/k", always)
    assert all(d <= 0.25 for d in slept)


# --------------------------------------------------------------------------- fault injection


def _faulty_storage(bucket: str, endpoint: str, **retry) -> st.Storage:
    # botocore_attempts=1: botocore gives up at once, so our own retry layer does the work
    return open_storage(bucket, endpoint, retry=RetryPolicy(**{**FAST_RETRY, **retry}),
                        botocore_attempts=1, multipart_threshold=5 * MiB,
                        multipart_chunksize=5 * MiB, max_concurrency=2,
                        connect_timeout=5, read_timeout=15)


def test_transfers_survive_dropped_connections(s3_bucket, moto_server, tmp_path):
    direct = open_storage(s3_bucket, moto_server)
    data = _payload(11 * MiB + 7, seed=2)
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    prefix = join(s3_bucket, "run", "target", "0")
    with FaultProxy(moto_server, drop_first=4, mode="mixed") as proxy:
        s = _faulty_storage(s3_bucket, proxy.endpoint)
        s.upload(src, join(prefix, "model.safetensors"))
        after_upload = proxy.dropped
        assert after_upload == 4
        # the object is complete, checked over a connection the proxy does not touch
        assert direct.sha256_of(join(prefix, "model.safetensors")) == hashlib.sha256(data).hexdigest()

        proxy.configure(drop_first=3, mode="mixed")
        s2 = _faulty_storage(s3_bucket, proxy.endpoint)  # fresh client: new connections
        s2.write_json(join(prefix, "metrics.json"), {"valAccuracy": 0.75, "sha256": "abc"})
        assert s2.read_json(join(prefix, "metrics.json"))["valAccuracy"] == 0.75
        out = tmp_path / "back.bin"
        s2.download(join(prefix, "model.safetensors"), out)
        assert out.read_bytes() == data

        proxy.configure(drop_every=2, mode="response")
        s3 = _faulty_storage(s3_bucket, proxy.endpoint)
        for i in range(4):
            s3.write_bytes(join(prefix, f"checkpoint/{i}"), _payload(64 * 1024, seed=i))
        s3.mark_done(prefix, {"member": "0"}, require=["model.safetensors", "metrics.json"])
        assert s3.is_done(prefix)

        assert proxy.dropped >= 7 and proxy.connections > proxy.dropped
        assert all(proxy.dropped_by_mode[m] > 0 for m in ("accept", "request", "response"))
        assert s.retries > 0 and s2.retries > 0
    for i in range(4):
        assert direct.read_bytes(join(prefix, f"checkpoint/{i}")) == _payload(64 * 1024, seed=i)
    assert direct.read_json(join(prefix, "metrics.json")) == {"valAccuracy": 0.75, "sha256": "abc"}


def test_exhausted_retries_raise_and_leave_no_done(s3_bucket, moto_server, tmp_path):
    direct = open_storage(s3_bucket, moto_server)
    src = tmp_path / "model.safetensors"
    src.write_bytes(_payload(6 * MiB, seed=5))
    prefix = join(s3_bucket, "run", "average")
    with FaultProxy(moto_server, drop_every=1, mode="mixed") as proxy:
        s = _faulty_storage(s3_bucket, proxy.endpoint, attempts=3)
        with pytest.raises(TransientStorageError) as info:
            # a stage's final steps: weights, then the completion marker
            s.upload(src, join(prefix, "model.safetensors"))
            s.mark_done(prefix, {"member": "average"})
        assert join(prefix, "model.safetensors") in str(info.value)
        assert "after 3 attempts" in str(info.value)
        assert proxy.dropped >= 3
    assert not direct.is_done(prefix)
    assert not direct.exists(join(prefix, "model.safetensors"))
    assert direct.list(prefix) == []


def test_atomic_write_honours_the_umask(tmp_path):
    """metrics.json, DONE and lineage go through atomic_write: 0666 & ~umask, not mkstemp's 0600."""
    import os

    from ratatouille_trainer.storage import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "metrics.json"), lambda fh: fh.write(b"{}"))
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o640
