"""Shared test fixtures: the one S3 endpoint (moto's server on loopback, started by
tests/cluster/s3.py) and storage roots for both backends, so storage-using suites run once against
`file://` and once against `s3://`; the control plane and the images for the slow suites."""
from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_S3_ENV_CLEARED = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "RATATOUILLE_S3_ENDPOINT",
                   "RATATOUILLE_CREDENTIALS_DIR", "AWS_SHARED_CREDENTIALS_FILE")


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """The session's moto S3 server (tests/cluster/s3.py, the one the cluster harness starts
    too), with dummy AWS credentials in the environment and no buckets."""
    from tests.cluster.s3 import MotoS3

    mp = pytest.MonkeyPatch()
    for name, value in _S3_ENV.items():
        mp.setenv(name, value)
    for name in _S3_ENV_CLEARED:
        mp.delenv(name, raising=False)
    server = MotoS3((), log_path=tmp_path_factory.mktemp("moto") / "moto_server.log",
                    access_key=_S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=_S3_ENV["AWS_SECRET_ACCESS_KEY"],
                    die_with_parent=True)
    try:
        try:
            server.__enter__()
        except RuntimeError as err:
            pytest.fail(f"{err} (install the test extras, moto[s3,server])")
        yield server
    finally:
        server.__exit__()
        mp.undo()


@pytest.fixture(scope="session")
def moto_server(moto):
    """The moto S3 server's endpoint URL."""
    return moto.endpoint


@pytest.fixture
def s3_bucket(moto):
    """A fresh, uniquely named bucket on the moto server; yields `s3://<bucket>`."""
    name = f"rt-{uuid.uuid4().hex[:16]}"
    moto.client().create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(params=["file", "s3"])
def storage_root(request, tmp_path):
    """`(root_uri, endpoint)` for each backend: a `file://` directory, or an S3 bucket prefix."""
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        yield root.as_uri(), None
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield f"{bucket}/store", request.getfixturevalue("moto_server")


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory):
    """The upstream control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler
    built from their Go modules by scripts/k8s/build.sh), the node agent and moto S3, started
    once for the session; tests/operator/harness.py says what it offers."""
    pytest.importorskip("kubernetes")
    from tests.operator.harness import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("k8s"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def built_images():
    """Both images of the Dockerfile, built with podman (cached by build.sh's layers)."""
    from tests.cluster.images import ImagesUnavailable, build

    try:
        return build()
    except ImagesUnavailable as err:
        pytest.skip(str(err))
