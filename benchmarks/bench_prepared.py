"""Prepared datasets vs per-Job decoding, side by side in one run (issue 14's figures).

    .venv/bin/python benchmarks/bench_prepared.py --images 100000 [--size 32] [--bounded-images 5000]
        [--rounds 5] [--skip-decode] [--out results/prepared.json]

A generated DomainBed-layout dataset of ``--images`` small PNGs (4 domains x 10 classes) in a
local S3 (moto). Each "Job" is a fresh worker process with an empty local cache, as a new pod:
- decode: what every Job does today: list + one GET per image + decode (``load_dataset``);
- prepared: the second and later Jobs of a run: read ``prepared.json``, the index and the shards
  (``load_prepared``), after one prepare Job (timed separately);
each up to its first training batch (sampler + augmentation), with the S3 requests it made.
Then peak RSS of a worker streaming 30 batches from a prepared dataset above its memory budget,
at 1x and 4x the images (``--bounded-images``, default ``--images``: the 4x dataset is generated
and prepared too, so at 100,000 images that part alone is 400,000 more; with a quarter of
``--images``, the dataset above is the 4x one); and data steps per second,
TrainStream (in memory) vs WindowStream, ``--rounds`` times in ABBA order (medians reported);
``--skip-decode`` measures only this bounded part. With ``--out``, the figures measured so far are written
after every phase (``"partial"`` names the last phase done), so a run stopped for time keeps them.
"""
from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import PY, S3_ENV, MotoServer, bench_env, finish, machine, run_child  # noqa: E402

DOMAINS, CLASSES = 4, 10


def generate(endpoint: str, bucket: str, prefix: str, n: int, size: int) -> None:
    """n random-coloured PNGs of size x size uploaded with 16 threads."""
    import boto3
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"]})
    rng = np.random.default_rng(0)

    def put(i: int) -> None:
        d, c = i % DOMAINS, (i // DOMAINS) % CLASSES
        arr = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 4 + 40 * c % 200).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"{prefix}/d{d}/c{c:02d}/{i:07d}.png", Body=buf.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


WORKER = r'''
import json, os, sys, time
t0 = time.perf_counter()
mode, uri, endpoint, size, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 1
from ratatouille_trainer import storage as st
calls = {}
orig = st.S3Storage._call
def counted(self, op, uri_, fn):
    calls[op] = calls.get(op, 0) + 1
    return orig(self, op, uri_, fn)
st.S3Storage._call = counted
import botocore.client
n_http = [0]
orig_api = botocore.client.BaseClient._make_api_call
def api(self, name, params):
    n_http[0] += 1
    return orig_api(self, name, params)
botocore.client.BaseClient._make_api_call = api
from ratatouille_trainer.data import load_dataset, train_transform
from ratatouille_trainer.prepared import load_prepared, prepare_dataset, train_stream
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
if mode == "decode":
    ds = load_dataset(uri, size, test_domains=("d3",), endpoint=endpoint)
elif mode == "prepare":
    s = st.open_storage(uri, endpoint)
    info = prepare_dataset(uri, size, sys.argv[7], storage=s, endpoint=endpoint)
    print(json.dumps({"seconds": time.perf_counter() - t1, "requests": n_http[0], "info": info})); sys.exit()
else:
    ds = load_prepared(uri, test_domains=("d3",), endpoint=endpoint, budget=budget)
stream = train_stream(ds, 32, 0)
t_steps = time.perf_counter()
for _ in range(steps):
    x, y = stream.next_raw()
    train_transform(x, stream.aug_gen)
t_end = time.perf_counter()
print(json.dumps({"toFirstStep": (t_steps - t1) + (t_end - t_steps) / steps, "load": t_steps - t1,
                  "stepsPerSecond": steps / (t_end - t_steps), "requests": n_http[0], "calls": calls,
                  "streamed": bool(getattr(ds, "window_bytes", None)), "import": t_import,
                  "images": sum(len(d) for d in ds.domains)}))
'''


def first_step_part(results: dict, job, data: str, cache: str, done) -> str:
    """Today's per-Job decode against a second Job on the prepared entry; returns the entry."""
    decode, decode_rss = job("decode", data)
    results["decodeJob"] = {**decode, "peakRss": decode_rss}
    done("decode Job")
    prep, _ = job("prepare", data, 0, 1, cache)
    entry = prep["info"]["entry"]
    results["prepareJob"] = {"seconds": prep["seconds"], "requests": prep["requests"],
                             "shards": prep["info"]["shards"]}
    done("prepare Job")
    second, second_rss = job("prepared", entry)
    results["preparedJob"] = {**second, "peakRss": second_rss}
    results["firstStepSpeedup"] = decode["toFirstStep"] / second["toFirstStep"]
    done("prepared Job")
    return entry


def bounded_part(job, small_entry: str, big_entry: str, budget: int, rounds: int) -> dict:
    """Peak RSS streaming 200 batches at 1x and 4x above the budget, and data steps per second
    streamed vs in memory at 1x: ``rounds`` pairs in ABBA order (the machine's load drifts, and
    the later of two back-to-back runs was often the faster), medians and per-round ratios."""
    import statistics

    x1, x4, mem = [], [], []
    for r in range(rounds):
        pair = [("x1", small_entry, budget, x1), ("mem", small_entry, 8 << 30, mem)]
        for _, entry, b, into in (pair if r % 2 == 0 else pair[::-1]):
            fig, rss = job("prepared", entry, b, 200)
            into.append({**fig, "peakRss": rss})
        fig, rss = job("prepared", big_entry, budget, 200)
        x4.append({**fig, "peakRss": rss})

    def med(xs: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in xs)
    return {"budget": budget, "rounds": rounds, "x1": x1, "x4": x4, "inMemory": mem,
            "rssRatio": med(x4, "peakRss") / med(x1, "peakRss"),
            "stepsPerSecondRatio": med(x1, "stepsPerSecond") / med(mem, "stepsPerSecond"),
            "stepsPerSecondRatioPerRound": [a["stepsPerSecond"] / b["stepsPerSecond"] for a, b in zip(x1, mem)],
            "x4StepsPerSecondRatio": med(x4, "stepsPerSecond") / med(mem, "stepsPerSecond")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--bounded-images", type=int, help="images of the 1x dataset of the RSS-flat part")
    ap.add_argument("--rounds", type=int, default=1, help="streamed / in-memory pairs of the steps-per-second "
                    "part, in alternating order (ABBA); medians are reported")
    ap.add_argument("--skip-decode", action="store_true", help="only the bounded part (RSS flat, steps per "
                    "second): no per-Job decode and no second-Job comparison")
    ap.add_argument("--out")
    args = ap.parse_args()
    bounded_images = args.bounded_images or args.images
    m = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-prepared-"))
    atexit.register(shutil.rmtree, work, True)  # the Jobs' caches: hundreds of MB at 100,000 images
    worker = work / "worker.py"
    worker.write_text(WORKER)
    results: dict = {"machine": m, "images": args.images, "size": args.size, "boundedImages": bounded_images}
    t_start = time.perf_counter()

    def done(phase: str) -> None:
        """Progress on stderr, and the figures so far in --out."""
        results["partial"] = phase
        print(f"[{time.perf_counter() - t_start:7.1f} s, load {os.getloadavg()[0]:.2f}] {phase}",
              file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    with MotoServer() as moto:
        ep = moto.endpoint
        env_base = dict(S3_ENV, AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key)
        import boto3

        boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=moto.access_key,
                     aws_secret_access_key=moto.secret_key).create_bucket(Bucket="bench")
        S3_ENV.update(AWS_ACCESS_KEY_ID=moto.access_key, AWS_SECRET_ACCESS_KEY=moto.secret_key)
        t = time.perf_counter()
        generate(ep, "bench", "small", args.images, args.size)
        results["generateSeconds"] = time.perf_counter() - t
        done("generated")

        def job(mode: str, uri: str, budget: int = 8 << 30, steps: int = 1, *extra: str) -> tuple[dict, int]:
            env = bench_env(**env_base, RATATOUILLE_CACHE_DIR=tempfile.mkdtemp(dir=work), OMP_NUM_THREADS="1",
                            RATATOUILLE_SHARD_BYTES=str(64 << 20))
            return run_child([PY, str(worker), mode, uri, ep, str(args.size), str(budget), str(steps), *extra], env=env)

        data = "s3://bench/small"
        cache = "s3://bench/cache/data"
        if args.skip_decode:
            entry = job("prepare", data, 0, 1, cache)[0]["info"]["entry"]
        else:
            entry = first_step_part(results, job, data, cache, done)
        # RSS flat above the budget: 1x and 4x the images (the larger one is the small one 4 times)
        row = 3 * args.size * args.size
        budget = max(1 << 20, int(bounded_images * 0.75 * row / 4))   # the 1x training split is 4x the budget
        if bounded_images == args.images:
            small_entry = entry
        else:
            generate(ep, "bench", "bounded", bounded_images, args.size)
            small_entry = job("prepare", "s3://bench/bounded", 0, 1, cache)[0]["info"]["entry"]
        if 4 * bounded_images == args.images:
            big_entry = entry  # the dataset above is the 4x one
        else:
            generate(ep, "bench", "large", 4 * bounded_images, args.size)
            big_entry = job("prepare", "s3://bench/large", 0, 1, cache)[0]["info"]["entry"]
        done("1x and 4x datasets prepared")
        results["bounded"] = bounded_part(job, small_entry, big_entry, budget, args.rounds)
        results.pop("partial", None)
    return finish("bench_prepared", results, m, args.out)


if __name__ == "__main__":
    sys.exit(main())
