"""An S3 endpoint on loopback for tests and `make dev-cluster`: moto's server with buckets, and
the demo assets uploaded where crds/examples/operator-demo.yaml expects them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from ratatouille_operator.executor import stop_process

from .controlplane import free_port

CREDENTIALS_SECRET = "s3-credentials"
DEMO_PREFIX = "s3://ratatouille"


def _die_with_parent() -> None:
    """Linux: have the server killed when the process that started it dies (no orphans after a
    killed pytest)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


class MotoS3:
    """`moto_server` (moto[s3,server], beside this interpreter) on a loopback port, with buckets.
    The one S3 server of the tests: the `moto_server` fixture (tests/conftest.py), the operator's
    cluster harness and `make dev-cluster` all start it through this class."""

    def __init__(self, buckets: Iterable[str] = ("ratatouille",), *, port: int = 0,
                 log_path: str | os.PathLike | None = None,
                 access_key: str = "dev-access-key", secret_key: str = "dev-secret-key",
                 die_with_parent: bool = False):
        self.buckets = list(buckets)
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self._log = None
        # preexec_fn is not safe once the starting process has threads: only where asked for
        self.die_with_parent = die_with_parent and sys.platform == "linux"

    def __enter__(self) -> "MotoS3":
        binary = Path(sys.executable).with_name("moto_server")
        if not binary.exists():
            raise RuntimeError(f"{binary} not found: install moto[s3,server]")
        self._log = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if self.die_with_parent else None)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.__exit__()
                raise RuntimeError(f"moto_server exited with {code}" + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"moto_server did not answer on {self.endpoint}")
                time.sleep(0.1)
        client = self.client()
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}))

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None
        if self._log is not None:
            self._log.close()
        self._log = None


def upload_demo_assets(client, data_dir: str | os.PathLike,
                       foundation: str | os.PathLike = "crds/examples/quickstart-foundation.safetensors",
                       prefix: str = "") -> list[str]:
    """Copy the demo datasets and foundation into bucket `ratatouille` where
    crds/examples/operator-demo.yaml expects them: datasets/<name>/... and
    models/quickstart-foundation.safetensors. `client` is a boto3 S3 client."""
    data_dir = Path(data_dir)
    uploaded = []
    for dataset in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for path in sorted(dataset.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), "ratatouille", f"{prefix}datasets/{path.relative_to(data_dir).as_posix()}")
        uploaded.append(f"{DEMO_PREFIX}/{prefix}datasets/{dataset.name}")
    if Path(foundation).is_file():
        client.upload_file(str(foundation), "ratatouille", f"{prefix}models/{Path(foundation).name}")
        uploaded.append(f"{DEMO_PREFIX}/{prefix}models/{Path(foundation).name}")
    return uploaded
