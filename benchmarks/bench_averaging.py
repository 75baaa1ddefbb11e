"""Issue 7, target 1: uniform averaging of N ResNet-50-sized fp32 members, N in {4, 16, 32}.

Writes N random members with the state-dict layout of timm ``resnet50`` (``num_classes=0``:
23.5 M float32 parameters and BN buffers, ~94 MB each, int64 ``num_batches_tracked`` included)
to a temporary folder (deleted at the end), then runs every configuration in a fresh
subprocess, so that each one's peak RSS (``wait4`` rusage, and the worker's own VmHWM) is its
own. Configurations are alternated and repeated; medians are reported.

Local files (page cache warm):
  bare     a bare 10-line numpy float64 running sum (safetensors.numpy.load_file per member)
  ours     ``averaging.average_files`` (what ``ratatouille average`` runs), mean in memory
  ours+w   the same, writing the output file (fsync) with its sha256 — end to end
  naive    load all members, stack, mean (the reference's approach)
  torch    ``averaging.uniform_average`` (RunningSum on torch tensors: the stage's path)
From a moto S3 server on loopback (same boto3 client as the product):
  dl       download only: get_object and read every byte, nothing else
  dlfile   download only, with the client's download_file (multipart, 4 threads) to disk
  serial   stream-and-add without the prefetch thread (no overlap)
  ours     ``averaging.average_uris`` (prefetch thread: download overlaps the arithmetic)

Usage: .venv/bin/python benchmarks/bench_averaging.py [--n 4 16 32] [--repeat 3]
       [--s3-n 4 16] [--skip-local] [--skip-s3] [--out figures.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# ----------------------------------------------------------------------------------- workers


def _digest(mean: dict) -> str:
    """sha256 over the float tensors of a mean (sorted keys), to compare results exactly."""
    import numpy as np

    h = hashlib.sha256()
    for k in sorted(mean):
        v = mean[k]
        if v.dtype.kind == "f":
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).reshape(-1).view(np.uint8).data)
    return h.hexdigest()[:16]


def worker(mode: str, paths: list[str], extra: dict) -> dict:
    base_rss = None
    import numpy as np  # noqa: F401  (imports are not timed)

    if mode in ("bare", "naive"):
        from safetensors.numpy import load_file
    if mode.startswith("ours") or mode.startswith("s3"):
        from ratatouille_trainer import averaging, storage  # noqa: F401
    if mode == "torch":
        import torch  # noqa: F401  (the engine imports it when first given tensors: not timed)

        from ratatouille_trainer.averaging import uniform_average
        from ratatouille_trainer.weights import load_safetensors_file
    if mode.startswith("s3"):
        from ratatouille_trainer.storage import open_storage
        os.environ.update(common.S3_ENV)
        store = open_storage(paths[0], endpoint=extra["endpoint"])
        client = store.client  # the product's client (same config and hooks)
        client.list_buckets()  # connection and credentials set up outside the timing
    base_rss = common.vm("VmRSS")
    digest = None
    cpu0 = common.cpu_seconds()
    t0 = time.perf_counter()
    n = len(paths)

    if mode == "bare":
        # ---- the bare 10-line numpy float64 running sum
        acc = None
        for p in paths:
            sd = load_file(p)
            if acc is None:
                acc = {k: v.astype(np.float64) for k, v in sd.items() if v.dtype.kind == "f"}
            else:
                for k in acc:
                    acc[k] += sd[k]
            del sd
        mean = {k: (v / n).astype(np.float32) for k, v in acc.items()}
        # ----
        wall = time.perf_counter() - t0
        digest = _digest(mean)
    elif mode == "naive":
        sds = [load_file(p) for p in paths]
        mean = {k: np.stack([sd[k] for sd in sds]).mean(0, dtype=np.float64).astype(np.float32)
                for k in sds[0] if sds[0][k].dtype.kind == "f"}
        wall = time.perf_counter() - t0
        digest = _digest(mean)
    elif mode == "ours":
        sa = averaging.average_files(None, paths, block_elems=extra["block_elems"])["average"]
        mean = sa.mean_arrays()
        wall = time.perf_counter() - t0
        digest = _digest(mean)
    elif mode == "ours+w":
        out = extra["out"]
        sha = averaging.average_files(out, paths, block_elems=extra["block_elems"])["sha256"]
        wall = time.perf_counter() - t0
        os.unlink(out)
        digest = sha[:16]
    elif mode == "torch":
        mean, _count = uniform_average((p, (lambda p=p: load_safetensors_file(p))) for p in paths)
        wall = time.perf_counter() - t0
        digest = _digest({k: v.numpy() for k, v in mean.items() if v.is_floating_point()})
    elif mode == "s3dl":
        total = 0
        buf = bytearray(averaging.PIECE)
        for uri in paths:
            _, bucket, key = storage.split_uri(uri)
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            while True:
                chunk = body.read(averaging.PIECE)
                if not chunk:
                    break
                total += len(chunk)
            body.close()
        wall = time.perf_counter() - t0
        del buf
        digest = str(total)
    elif mode == "s3dlfile":
        scratch = tempfile.mkdtemp(prefix="bench-dl-")
        total = 0
        for i, uri in enumerate(paths):
            local = os.path.join(scratch, f"m{i}")
            store.download(uri, local)
            total += os.path.getsize(local)
            os.unlink(local)
        wall = time.perf_counter() - t0
        shutil.rmtree(scratch)
        digest = str(total)
    elif mode == "s3serial":
        # the same blocks from the same one GET per member, read when the engine needs them
        # (no prefetch thread, so no overlap of download and arithmetic)
        members = [averaging._s3_member(store, uri) for uri in paths]
        streams = [m.stream for m in members]

        class Range:
            def __init__(self, st, left):
                self.st, self.left = st, left

            def readinto(self, mv):
                k = self.st.readinto(mv[:min(len(mv), self.left)]) if self.left else 0
                self.left -= k
                return k

            def close(self):
                pass

        def opener(mi, start, end, member):
            st = streams[mi]
            scratch = memoryview(bytearray(1 << 20))
            while st.pos < start:  # a small gap: read and drop
                st.readinto(scratch[:min(len(scratch), start - st.pos)])
            return Range(st, end - start)

        sa = averaging.StreamingAverage(members, opener, block_elems=extra["block_elems"],
                                        gap=averaging.PIECE)
        mean = sa.compute()
        for st in streams:
            st.close()
        wall = time.perf_counter() - t0
        digest = _digest(mean)
    elif mode == "s3ours":
        summary = averaging.average_uris(None, paths, storage=store, block_elems=extra["block_elems"])
        mean = summary["average"].mean_arrays()
        wall = time.perf_counter() - t0
        digest = _digest(mean)
    elif mode == "s3ours+w":
        summary = averaging.average_uris(extra["out"], paths, storage=store,
                                         block_elems=extra["block_elems"])
        wall = time.perf_counter() - t0
        os.unlink(extra["out"])
        digest = summary["sha256"][:16]
    elif mode == "write":
        folder = Path(extra["folder"])
        made, size = write_members(folder, extra["n"])
        if extra.get("endpoint"):
            import boto3
            from botocore.config import Config
            client = boto3.client("s3", endpoint_url=extra["endpoint"], region_name="us-east-1",
                                  config=Config(s3={"addressing_style": "path"}))
            client.create_bucket(Bucket="bench")
            for i, p in enumerate(made[:extra["s3_n"]]):
                client.upload_file(p, "bench", f"run/target/{i}/model.safetensors")
        return {"paths": made, "member_bytes": size}
    else:
        raise SystemExit(f"unknown mode {mode}")
    return {"mode": mode, "n": n, "wall": wall, "cpu": common.cpu_seconds() - cpu0,
            "digest": digest, "rss_base": base_rss, "hwm": common.vm("VmHWM")}


# ------------------------------------------------------------------------------ orchestration

def write_members(folder: Path, n: int, seed: int = 0) -> tuple[list[str], int]:
    """N random members with resnet50's (num_classes=0) state-dict layout."""
    import numpy as np
    import timm
    from safetensors.numpy import save_file

    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    del model
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sd = {}
        for k, shape, dt in layout:
            if dt == "torch.int64":
                sd[k] = np.array(1000 + i, dtype=np.int64).reshape(shape)
            else:
                sd[k] = (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)
        p = folder / f"member-{i:02d}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    return paths, os.path.getsize(paths[0])


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass


def run_mode(mode: str, paths: list[str], extra: dict, env: dict) -> dict:
    argv = [common.PY, __file__, "--worker", mode, "--extra", json.dumps(extra), "--", *paths]
    res, peak = common.run_child(argv, env=env)
    # the worker's own VmHWM: its peak since exec (wait4's ru_maxrss would also count the
    # parent's pages at fork time); both are recorded
    res["peak_rss"] = res["hwm"]
    res["peak_rss_wait4"] = peak
    return res


def summarise(results: list[dict], member_bytes: int) -> dict:
    out: dict = {}
    for r in results:
        key = (r["mode"], r["n"])
        out.setdefault(key, []).append(r)
    table = {}
    for (mode, n), rs in out.items():
        table[f"{mode}@{n}"] = {
            "mode": mode, "n": n, "runs": len(rs),
            "wall_s": round(common.median([r["wall"] for r in rs]), 4),
            "walls": [round(r["wall"], 4) for r in rs],
            "peak_rss_mb": round(max(r["peak_rss"] for r in rs) / 1e6, 1),
            "peak_rss_wait4_mb": round(max(r["peak_rss_wait4"] for r in rs) / 1e6, 1),
            "cpu_s": round(common.median([r["cpu"] for r in rs]), 4),
            "peak_rss_x_member": round(max(r["peak_rss"] for r in rs) / member_bytes, 2),
            "rss_after_imports_mb": round(common.median([r["rss_base"] for r in rs]) / 1e6, 1),
            "peak_above_imports_x_member": round(
                max(r["hwm"] - r["rss_base"] for r in rs) / member_bytes, 2),
            "digests": sorted({r["digest"] for r in rs}),
        }
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker")
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--s3-n", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-max-n", type=int, default=32)
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--skip-s3", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--block-mb", type=float, default=None,
                    help="float64 accumulator per block in MiB (default: the product's, "
                         "averaging.BLOCK_ELEMS x 8 bytes)")
    ap.add_argument("--dir", help="where to write the members (default: a temp dir, deleted)")
    ap.add_argument("--out")
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.paths, json.loads(args.extra))))
        return 0

    env = common.bench_env(**common.S3_ENV)
    figures: dict = {"machine_start": common.machine(), "member_bytes": None, "local": {}, "s3": {},
                     "block_elems": block_elems(args)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-avg-", dir=args.dir))
    moto = common.MotoServer() if not args.skip_s3 else None
    try:
        if moto is not None:
            moto.__enter__()
        nmax = max(args.n + (args.s3_n if moto is not None else []))
        t0 = time.perf_counter()
        made, _ = common.run_child(
            [common.PY, __file__, "--worker", "write", "--extra", json.dumps({
                "folder": str(tmp), "n": nmax, "s3_n": max(args.s3_n),
                "endpoint": moto.endpoint if moto is not None else None})], env=env)
        paths, member_bytes = made["paths"], made["member_bytes"]
        figures["member_bytes"] = member_bytes
        print(f"wrote {nmax} members of {member_bytes / 1e6:.1f} MB"
              f"{' and uploaded them to moto' if moto else ''} in "
              f"{time.perf_counter() - t0:.1f} s ({tmp})", flush=True)
        if not args.skip_local:
            figures["local"] = bench_local(paths, member_bytes, args, env, tmp)
            figures["machine_after_local"] = common.machine()
        if moto is not None:
            uris = [f"s3://bench/run/target/{i}/model.safetensors" for i in range(max(args.s3_n))]
            figures["s3"] = bench_s3(uris, member_bytes, args, env, tmp, moto.endpoint)
            figures["machine_after_s3"] = common.machine()
    finally:
        if moto is not None:
            moto.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
    common.emit("bench_averaging", figures, args.out)
    return 0


def block_elems(args) -> int:
    if args.block_mb is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trainer"))
        from ratatouille_trainer.averaging import BLOCK_ELEMS
        return BLOCK_ELEMS
    return int(args.block_mb * (1 << 20)) // 8


def _paired(results: list[dict], mode: str, ref: str, n: int) -> float:
    """Median of ours/ref over the runs made back to back (same load)."""
    ours = [r["wall"] for r in results if r["mode"] == mode and r["n"] == n]
    refs = [r["wall"] for r in results if r["mode"] == ref and r["n"] == n]
    return round(common.median([a / b for a, b in zip(ours, refs)]), 3)


def bench_local(paths: list[str], member_bytes: int, args, env: dict, tmp: Path) -> dict:
    results = []
    for n in args.n:
        sub = paths[:n]
        warm(sub)
        modes = ["bare", "ours", "ours+w"] + ([] if args.skip_torch else ["torch"])
        for r in range(args.repeat):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                res = run_mode(mode, sub, {"out": str(tmp / "out.safetensors"),
                                           "block_elems": block_elems(args)}, env)
                results.append(res)
                print(f"local n={n} {mode:7s} {res['wall']:.3f} s  cpu {res['cpu']:.3f} s  "
                      f"peak {res['peak_rss'] / 1e6:.0f} MB", flush=True)
        if n <= args.naive_max_n:
            res = run_mode("naive", sub, {}, env)
            results.append(res)
            print(f"local n={n} naive   {res['wall']:.3f} s  peak {res['peak_rss'] / 1e6:.0f} MB",
                  flush=True)
    table = summarise(results, member_bytes)
    for n in args.n:
        b, o = table[f"bare@{n}"], table[f"ours@{n}"]
        o["ratio_vs_bare"] = round(o["wall_s"] / b["wall_s"], 3)
        o["ratio_vs_bare_paired_median"] = _paired(results, "ours", "bare", n)
        o["same_result_as_bare"] = o["digests"] == b["digests"]
        table[f"ours+w@{n}"]["ratio_vs_bare"] = round(table[f"ours+w@{n}"]["wall_s"] / b["wall_s"], 3)
        if f"torch@{n}" in table:
            table[f"torch@{n}"]["ratio_vs_bare"] = round(table[f"torch@{n}"]["wall_s"] / b["wall_s"], 3)
            table[f"torch@{n}"]["same_result_as_bare"] = table[f"torch@{n}"]["digests"] == b["digests"]
        if f"naive@{n}" in table:
            table[f"naive@{n}"]["ratio_vs_ours"] = round(table[f"naive@{n}"]["wall_s"] / o["wall_s"], 2)
    return table


def bench_s3(uris: list[str], member_bytes: int, args, env: dict, tmp: Path, endpoint: str) -> dict:
    results = []
    for n in args.s3_n:
        modes = ["s3dl", "s3ours", "s3serial", "s3ours+w", "s3dlfile"]
        for r in range(args.repeat):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                res = run_mode(mode, uris[:n], {"endpoint": endpoint, "block_elems": block_elems(args),
                                                "out": str(tmp / "out.safetensors")}, env)
                results.append(res)
                print(f"s3 n={n} {mode:9s} {res['wall']:.3f} s  cpu {res['cpu']:.3f} s  "
                      f"peak {res['peak_rss'] / 1e6:.0f} MB", flush=True)
    table = summarise(results, member_bytes)
    for n in args.s3_n:
        dl, o = table[f"s3dl@{n}"], table[f"s3ours@{n}"]
        o["ratio_vs_download"] = round(o["wall_s"] / dl["wall_s"], 3)
        o["ratio_vs_download_paired_median"] = _paired(results, "s3ours", "s3dl", n)
        o["ratio_vs_download_file"] = round(o["wall_s"] / table[f"s3dlfile@{n}"]["wall_s"], 3)
        o["download_mb_per_s"] = round(n * member_bytes / dl["wall_s"] / 1e6, 1)
        for m in ("s3serial", "s3ours+w", "s3dlfile"):
            table[f"{m}@{n}"]["ratio_vs_download"] = round(table[f"{m}@{n}"]["wall_s"] / dl["wall_s"], 3)
        table[f"s3serial@{n}"]["ratio_vs_download_paired_median"] = _paired(results, "s3serial", "s3dl", n)
    return table


if __name__ == "__main__":
    sys.exit(main())
