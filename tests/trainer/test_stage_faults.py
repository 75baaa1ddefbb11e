"""A trainer stage whose storage connections keep dropping still completes, with outputs
identical to a run on a clean connection, and never leaves a member looking complete early."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from ratatouille_trainer.storage import open_storage
from tests.faultproxy import FaultProxy
from tests.trainer.util import dumps, env, job, write_dataset, write_foundation

BIN = Path(sys.executable).parent


def run_stage(stage: str, desc: dict, extra_env: dict) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env)
    return subprocess.run([str(BIN / "ratatouille-trainer"), stage, "--job-json", dumps(desc)],
                          env=e, capture_output=True, text=True, timeout=300)


def digest(store, uri: str) -> str:
    return hashlib.sha256(store.read_bytes(uri)).hexdigest()


def test_linear_probe_through_a_dropping_proxy_matches_a_clean_run(tmp_path, moto_server, s3_bucket):
    data = write_dataset(tmp_path / "data", per_class=6)
    foundation = write_foundation(tmp_path / "foundation.safetensors", with_head=False)
    store = open_storage(s3_bucket, endpoint=moto_server)
    # the dataset and the foundation come from S3 too, so reads go through the proxy as well
    for path in data.rglob("*.png"):
        store.upload(str(path), f"{s3_bucket}/data/{path.relative_to(data).as_posix()}")
    store.upload(str(foundation), f"{s3_bucket}/foundation.safetensors")

    def desc(out: str, endpoint: str) -> dict:
        d = job("linear-probe", f"{s3_bucket}/{out}", f"{s3_bucket}/data", steps=8, eval_every=4,
                weights=f"{s3_bucket}/foundation.safetensors")
        d["storage"] = {"endpoint": endpoint}
        return d

    clean = run_stage("linear-probe", desc("clean", moto_server),
                      {"RATATOUILLE_CACHE_DIR": str(tmp_path / "cache-clean")})
    assert clean.returncode == 0, clean.stderr
    with FaultProxy(moto_server, drop_every=3, mode="mixed") as proxy:
        faulty = run_stage("linear-probe", desc("faulty", proxy.endpoint),
                           {"RATATOUILLE_CACHE_DIR": str(tmp_path / "cache-faulty"),
                            "RATATOUILLE_STORAGE_ATTEMPTS": "12", "AWS_MAX_ATTEMPTS": "1"})
        dropped = proxy.dropped
    assert faulty.returncode == 0, faulty.stderr
    assert dropped >= 5, "the proxy must really have dropped connections"
    assert store.is_done(f"{s3_bucket}/faulty")
    clean_metrics = store.read_json(f"{s3_bucket}/clean/metrics.json")
    faulty_metrics = store.read_json(f"{s3_bucket}/faulty/metrics.json")
    # identical bytes, not only equal tensors: the header is canonical (sorted) in every process
    assert faulty_metrics["sha256"] == clean_metrics["sha256"], "the trained model differs"
    assert digest(store, f"{s3_bucket}/faulty/model.safetensors") == faulty_metrics["sha256"], "upload corrupted"
    assert digest(store, f"{s3_bucket}/clean/model.safetensors") == clean_metrics["sha256"]
    assert faulty_metrics["valAccuracy"] == clean_metrics["valAccuracy"]


def test_storage_that_never_recovers_fails_the_stage_without_done(tmp_path, moto_server, s3_bucket):
    data = write_dataset(tmp_path / "data", per_class=4)
    d = job("linear-probe", f"{s3_bucket}/broken", str(data), steps=4, eval_every=2)
    with FaultProxy(moto_server, drop_every=1, mode="mixed") as proxy:
        d["storage"] = {"endpoint": proxy.endpoint}
        proc = run_stage("linear-probe", d, {"RATATOUILLE_STORAGE_ATTEMPTS": "2", "AWS_MAX_ATTEMPTS": "1"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "s3://" in proc.stderr
    assert not open_storage(s3_bucket, endpoint=moto_server).is_done(f"{s3_bucket}/broken")
