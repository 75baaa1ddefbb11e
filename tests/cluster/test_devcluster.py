"""`make dev-cluster` (python -m tests.cluster.devcluster): it starts, prints exports that work
with kubectl, installs the chart whose operator comes up, and SIGTERM stops everything."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("kopf")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_dev_cluster_prints_working_exports_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tests.cluster.devcluster", "--dir", str(tmp_path / "dev")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops everything" in line for line in out):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(out)
            out.append(line)
            assert time.monotonic() < deadline, "".join(out)
        text = "".join(out)
        m = re.search(r"export KUBECONFIG=(\S+) PATH=(\S+):\$PATH", text)
        assert m, text
        env = dict(os.environ, KUBECONFIG=m.group(1), PATH=f"{m.group(2)}:{os.environ['PATH']}")
        nodes = subprocess.run(["kubectl", "get", "nodes", "--no-headers"], env=env, capture_output=True, text=True)
        assert nodes.returncode == 0 and "Ready" in nodes.stdout, nodes.stderr
        pods = subprocess.run(["kubectl", "get", "pods", "-A", "--no-headers"], env=env, capture_output=True, text=True)
        assert re.search(r"ratatouille-operator-\S+\s+1/1\s+Running", pods.stdout), pods.stdout
        assert "S3 (moto) at http://127.0.0.1:" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest
    assert "stopping the dev cluster" in rest
