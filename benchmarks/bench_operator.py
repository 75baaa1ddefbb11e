"""Issue 7, target 4 (operator part): 20 concurrent runs of 50 members against the emulator.

The emulated cluster of the operator's end-to-end tests (kmock API emulator with the project's
CRD, moto S3, the stand-in Job controller in ``instant`` mode: every Job completes as soon as
it exists, no process) and the REAL operator as a subprocess (``ratatouille operator -A``).
20 RatatouilleRuns of 50 target members each (foundation only, uniform averaging) are created
back to back; the benchmark waits until all of them are Succeeded and reports:

- the time from the last run's creation to its first Job existing (target: under 2 s), and the
  same latency for every run (median and max: each run's creation to its first Job's create at
  the API),
- the time until all runs Succeeded, and the Jobs created,
- the operator's CPU seconds (utime + stime from /proc) per reconcile (handler invocations from
  its ``ratatouille_reconcile_duration_seconds`` histogram), and the reconcile durations, also
  per handler (run_changed, job_changed, resync).

Usage: .venv/bin/python benchmarks/bench_operator.py [--runs 20] [--members 50] [--out f.json]
       [--keep-log operator.log]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def reconcile_stats(url: str) -> dict[str, tuple[float, float]]:
    """handler -> (invocations, seconds), from the operator's /metrics."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = re.match(r'ratatouille_reconcile_duration_seconds_(count|sum)\{handler="([^"]*)"[^}]*\} ([0-9.e+-]+)', line)
        if m:
            slot = out.setdefault(m.group(2), [0.0, 0.0])
            slot[0 if m.group(1) == "count" else 1] += float(m.group(3))
    return {h: (c, t) for h, (c, t) in out.items()}


def _total(stats: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return sum(c for c, _ in stats.values()), sum(t for _, t in stats.values())


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--members", type=int, default=50)
    ap.add_argument("--parallelism", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--interval", type=float, default=2.0, help="operator reconcile interval")
    ap.add_argument("--out")
    ap.add_argument("--keep-log", help="copy the operator's log here")
    args = ap.parse_args()

    from ratatouille_operator.emulator import JOBS
    from tests.operator.harness import RUNS, Cluster, OperatorProcess, run_manifest

    figures = {"machine_start": common.machine(), "runs": args.runs, "members": args.members}
    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster = Cluster(tmp)
    cluster.start()
    op = None
    try:
        ctl = cluster.controller
        ctl.instant = True
        ctl.parallel = None
        op = OperatorProcess(cluster, ["-A"], interval=args.interval)
        op.start()
        ns = cluster.namespace("bench")
        # Each run's first Job, timed where the API stores it (every client's create goes there).
        first_job: dict[str, float] = {}
        core = cluster.emulator._core
        original_create = core.create

        def timed_create(rd, namespace, body, *a, **kw):
            obj = original_create(rd, namespace, body, *a, **kw)
            if rd.key == JOBS and not kw.get("dry_run"):
                run = ((obj.get("metadata") or {}).get("labels") or {}).get("ratatouille.dev/run")
                first_job.setdefault(run, time.monotonic())
            return obj

        core.create = timed_create
        cpu0 = proc_cpu_seconds(op.proc.pid)
        stats0 = reconcile_stats(op.metrics_url)
        t_start = time.monotonic()
        names = [f"scale-{i:02d}" for i in range(args.runs)]
        created_at: dict[str, float] = {}
        for name in names:
            body = run_manifest(name, dataset="s3://ratatouille/datasets/target", runs=args.members,
                                parallelism=args.parallelism, min_succeeded=1)
            body["metadata"]["namespace"] = ns
            cluster.emulator.create(RUNS, body, ns)
            created_at[name] = time.monotonic()
        t_last = time.monotonic()
        last = names[-1]
        cluster.wait_for(lambda: last in first_job, 60, f"the first Job of {last}", op)
        first_job_latency = first_job[last] - t_last
        print(f"created {args.runs} runs in {t_last - t_start:.2f} s; first Job of the last run "
              f"after {first_job_latency:.2f} s", flush=True)

        def all_done():
            phases = [((cluster.run(ns, n) or {}).get("status") or {}).get("phase") for n in names]
            return all(p in ("Succeeded", "Failed") for p in phases) and phases

        phases = cluster.wait_for(all_done, args.timeout, "every run to finish", op)
        t_done = time.monotonic() - t_start
        cpu = proc_cpu_seconds(op.proc.pid) - cpu0
        stats = reconcile_stats(op.metrics_url)
        rec0, dur0 = _total(stats0)
        rec, dur = _total(stats)
        reconciles = rec - rec0
        per_handler = {}
        for h, (c, t) in sorted(stats.items()):
            c0, t0 = stats0.get(h, (0.0, 0.0))
            if c - c0:
                per_handler[h] = {"reconciles": int(c - c0), "mean_s": round((t - t0) / (c - c0), 4)}
        latencies = [first_job[n] - created_at[n] for n in names if n in first_job]
        jobs = sum(len(cluster.jobs(ns, n)) for n in names)
        figures.update({
            "all_succeeded": all(p == "Succeeded" for p in phases),
            "phases": sorted(set(phases)),
            "create_all_runs_s": round(t_last - t_start, 3),
            "last_run_first_job_s": round(first_job_latency, 3),
            "first_job_s": {"median": round(common.median(latencies), 3),
                            "p90": round(_percentile(latencies, 0.9), 3),
                            "max": round(max(latencies), 3),
                            "per_run": [round(x, 3) for x in latencies]},
            "all_finished_s": round(t_done, 2),
            "jobs_created": jobs,
            "operator_cpu_s": round(cpu, 2),
            "reconciles": int(reconciles),
            "cpu_s_per_reconcile": round(cpu / reconciles, 4) if reconciles else None,
            # Per Job created too: coalescing Job events changes how many reconciles there are.
            "cpu_ms_per_job": round(1000 * cpu / jobs, 2) if jobs else None,
            "mean_reconcile_s": round((dur - dur0) / reconciles, 4) if reconciles else None,
            "per_handler": per_handler,
            "target": "all Succeeded; last run's first Job < 2 s",
        })
        figures["met"] = figures["all_succeeded"] and first_job_latency < 2.0
    finally:
        if op is not None:
            op.stop()
            if args.keep_log:
                shutil.copyfile(op.log_path, args.keep_log)
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["machine_end"] = common.machine()
    common.emit("bench_operator", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
