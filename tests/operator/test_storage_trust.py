"""The operator is no confused deputy: it presents its own storage credentials only to the
endpoints it is configured with, never to a run's spec.storage.endpoint of the tenant's choosing,
and keeps one storage client per endpoint in a bounded cache."""
from __future__ import annotations

import http.server
import threading

import pytest

from ratatouille_operator.reconciler import Reconciler, Settings, StorageView

pytest.importorskip("kubernetes")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def _answer(self):
        self.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        body = b"<Error><Code>NoSuchKey</Code></Error>"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture()
def tenant_endpoint():
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()


def _open(uri, endpoint):
    from ratatouille_trainer.storage import open_storage

    return open_storage(uri, endpoint=endpoint)


def test_no_request_reaches_an_endpoint_the_operator_was_not_configured_with(k8s, api, tenant_endpoint,
                                                                             monkeypatch):
    from tests.operator.harness import IMAGE, run_manifest

    endpoint, seen = tenant_endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATOROWNKEY00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    manifest = run_manifest("deputy", dataset="s3://tenant/datasets/target", runs=1,
                            aux=[{"name": "shapes", "dataset": "s3://tenant/datasets/aux"}])
    manifest["spec"]["storage"]["endpoint"] = endpoint
    body = k8s.create("ratatouille.dev/v1alpha1/ratatouilleruns", manifest)
    view = StorageView(_open, trusted_endpoints=["http://minio.storage:9000"])
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=view)
    result = rec.reconcile(body)
    # Nothing was asked of the tenant's endpoint (so no cache hit could be faked there either):
    # the auxiliary Job is created and its trainer finds any cached result itself.
    assert seen == []
    assert "deputy-aux-shapes-0-a1" in result.created
    assert view.trusts("http://minio.storage:9000/") and not view.trusts(endpoint)


def test_a_trusted_endpoint_is_read_with_one_client_however_many_buckets(tenant_endpoint, monkeypatch):
    endpoint, seen = tenant_endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOPERATOROWNKEY00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    opened = []

    def counting_open(uri, ep):
        opened.append((uri, ep))
        return _open(uri, ep)

    view = StorageView(counting_open, trusted_endpoints=[endpoint])
    for i in range(40):
        assert view.metrics(f"s3://bucket-{i}/runs/r/target/0", endpoint) is None
    assert len(opened) == 1  # one client for the endpoint, not one per bucket
    assert len(seen) >= 40 and all("AKIAOPERATOROWNKEY00" in auth for _, _, auth in seen)
    # Endpoints beyond the cap evict the least recently used client.
    many = StorageView(lambda uri, ep: object(), trusted_endpoints=None)
    for i in range(StorageView.MAX_CLIENTS + 4):
        many._client("s3://b/x", f"http://e{i}")
    assert len(many._clients) == StorageView.MAX_CLIENTS


def test_a_finished_run_costs_no_storage_read_and_no_pod_list(k8s, api, monkeypatch):
    """What an operator restart does for every finished run: reconcile it once. That must not
    read storage or list pods (a cluster keeps thousands of finished runs)."""
    from tests.operator.harness import IMAGE, run_manifest

    body = k8s.create("ratatouille.dev/v1alpha1/ratatouilleruns",
                      run_manifest("done", dataset="s3://ratatouille/datasets/target", runs=1,
                                   aux=[{"name": "shapes", "dataset": "s3://ratatouille/datasets/aux"}]))
    opened = []
    view = StorageView(lambda uri, ep: opened.append(uri) or (_ for _ in ()).throw(AssertionError("read")))
    rec = Reconciler(api, Settings(default_image=IMAGE), storage_view=view)
    first = rec.reconcile(body)
    # Unfinished: its auxiliary Job is created without a look at the cache (the trainer finds
    # a complete, current entry itself), so nothing was read here either.
    assert "done-aux-shapes-0-a1" in first.created and opened == []
    status = {"phase": "Succeeded", "observedGeneration": 1, "progress": "4/4",
              "result": {"model": "s3://ratatouille/runs/x/average/model.safetensors", "members": 1}}
    k8s.patch("ratatouille.dev/v1alpha1/ratatouilleruns", "default", "done/status", {"status": status})
    opened.clear()
    pod_lists = k8s.count("list", "v1/pods")
    rec2 = Reconciler(api, Settings(default_image=IMAGE), storage_view=view)  # a restarted operator
    result = rec2.reconcile(k8s.get("ratatouille.dev/v1alpha1/ratatouilleruns", "default", "done"))
    assert result.phase == "Succeeded" and result.created == []
    assert opened == [] and k8s.count("list", "v1/pods") == pod_lists
