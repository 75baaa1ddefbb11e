"""The sync of a dataset of many small objects from S3 (moto), before and after 1 GET each in
parallel, side by side in one run.

    .venv/bin/python benchmarks/bench_sync.py [--images 5000] [--rounds 3] [--out results/sync.json]

``--images`` generated 32 px PNGs in moto S3; each round syncs them into an empty folder three
ways, in rotating order: ``before`` (what a sync did until the change: one object at a time, a
HEAD then boto3's managed transfer, :meth:`S3Storage._download`), ``one-worker`` (the new path,
``RATATOUILLE_SYNC_WORKERS=1``: one GET each) and ``parallel`` (the default 8 workers). Wall
seconds and HTTP requests (counted at botocore), medians over rounds. moto runs on the same
machine, so the parallel figure here is bounded by its CPU, not by network round trips.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_prepared import generate  # noqa: E402
from benchmarks.common import S3_ENV, MotoServer, finish, machine, median  # noqa: E402


def sync_before(s, prefix: str, local: str) -> None:
    from ratatouille_contract.layout import join
    from ratatouille_trainer.storage import _ensure_parent

    for rel, _size, _etag in s._walk(prefix):
        s._download(join(prefix, rel), _ensure_parent(os.path.join(local, rel)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    m = machine()
    results: dict = {"machine": m, "images": args.images, "rounds": args.rounds, "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    try:
        with MotoServer() as moto:
            import boto3
            import botocore.client
            from ratatouille_trainer.storage import open_storage

            os.environ.update(S3_ENV, AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key)
            boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            S3_ENV.update(AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key)
            generate(moto.endpoint, "bench", "small", args.images, 32)
            prefix = "s3://bench/small"
            n_http = [0]
            real = botocore.client.BaseClient._make_api_call

            def counted(self, name, params):
                n_http[0] += 1
                return real(self, name, params)
            botocore.client.BaseClient._make_api_call = counted
            ways = ["before", "one-worker", "parallel"]
            for r in range(args.rounds):
                for way in ways[r % 3:] + ways[:r % 3]:
                    local = work / f"{way}-{r}"
                    os.environ["RATATOUILLE_SYNC_WORKERS"] = "1" if way == "one-worker" else "8"
                    s = open_storage(prefix, moto.endpoint)
                    n_http[0] = 0
                    t = time.perf_counter()
                    if way == "before":
                        sync_before(s, prefix, str(local))
                    else:
                        s.sync_to_local(prefix, local)
                    results["runs"].setdefault(way, []).append(
                        {"seconds": time.perf_counter() - t, "requests": n_http[0]})
                    shutil.rmtree(local)
                    print(f"round {r} {way}: {results['runs'][way][-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    secs = {w: median(x["seconds"] for x in xs) for w, xs in results["runs"].items()}
    results["medianSeconds"] = secs
    results["requests"] = {w: xs[0]["requests"] for w, xs in results["runs"].items()}
    results["speedup"] = {w: secs["before"] / secs[w] for w in secs}
    return finish("bench_sync", results, m, args.out)


if __name__ == "__main__":
    sys.exit(main())
