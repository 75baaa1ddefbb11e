"""Issue 7, target 4 (operator part): 20 concurrent runs of 50 members against the emulator.

The emulated cluster of the operator's end-to-end tests (kmock API emulator with the project's
CRD, moto S3, the stand-in Job controller in ``instant`` mode: every Job completes as soon as
it exists, no process) and the REAL operator as a subprocess (``ratatouille operator -A``).
20 RatatouilleRuns of 50 target members each (foundation only, uniform averaging) are created
back to back; the benchmark waits until all of them are Succeeded and reports:

- the time from the last run's creation to its first Job existing (target: under 2 s),
- the time until all runs Succeeded, and the Jobs created,
- the operator's CPU seconds (utime + stime from /proc) per reconcile (handler invocations from
  its ``ratatouille_reconcile_duration_seconds`` histogram), and the reconcile durations.

Usage: .venv/bin/python benchmarks/bench_operator.py [--runs 20] [--members 50] [--out f.json]
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


def reconcile_stats(url: str) -> tuple[float, float]:
    """(invocations, seconds) summed over handlers, from the operator's /metrics."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    count = total = 0.0
    for line in text.splitlines():
        m = re.match(r"ratatouille_reconcile_duration_seconds_(count|sum)\{[^}]*\} ([0-9.e+-]+)", line)
        if m:
            if m.group(1) == "count":
                count += float(m.group(2))
            else:
                total += float(m.group(2))
    return count, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--members", type=int, default=50)
    ap.add_argument("--parallelism", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--interval", type=float, default=2.0, help="operator reconcile interval")
    ap.add_argument("--out")
    args = ap.parse_args()

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
        cpu0 = proc_cpu_seconds(op.proc.pid)
        rec0, dur0 = reconcile_stats(op.metrics_url)
        t_start = time.monotonic()
        names = [f"scale-{i:02d}" for i in range(args.runs)]
        for name in names:
            body = run_manifest(name, dataset="s3://ratatouille/datasets/target", runs=args.members,
                                parallelism=args.parallelism, min_succeeded=1)
            body["metadata"]["namespace"] = ns
            cluster.emulator.create(RUNS, body, ns)
        t_last = time.monotonic()
        last = names[-1]
        cluster.wait_for(lambda: cluster.jobs(ns, last), 60, f"the first Job of {last}", op)
        first_job_latency = time.monotonic() - t_last
        print(f"created {args.runs} runs in {t_last - t_start:.2f} s; first Job of the last run "
              f"after {first_job_latency:.2f} s", flush=True)

        def all_done():
            phases = [((cluster.run(ns, n) or {}).get("status") or {}).get("phase") for n in names]
            return all(p in ("Succeeded", "Failed") for p in phases) and phases

        phases = cluster.wait_for(all_done, args.timeout, "every run to finish", op)
        t_done = time.monotonic() - t_start
        cpu = proc_cpu_seconds(op.proc.pid) - cpu0
        rec, dur = reconcile_stats(op.metrics_url)
        reconciles = rec - rec0
        jobs = sum(len(cluster.jobs(ns, n)) for n in names)
        figures.update({
            "all_succeeded": all(p == "Succeeded" for p in phases),
            "phases": sorted(set(phases)),
            "create_all_runs_s": round(t_last - t_start, 3),
            "last_run_first_job_s": round(first_job_latency, 3),
            "all_finished_s": round(t_done, 2),
            "jobs_created": jobs,
            "operator_cpu_s": round(cpu, 2),
            "reconciles": int(reconciles),
            "cpu_s_per_reconcile": round(cpu / reconciles, 4) if reconciles else None,
            "mean_reconcile_s": round((dur - dur0) / reconciles, 4) if reconciles else None,
            "target": "all Succeeded; last run's first Job < 2 s",
        })
        figures["met"] = figures["all_succeeded"] and first_job_latency < 2.0
    finally:
        if op is not None:
            op.stop()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["machine_end"] = common.machine()
    common.emit("bench_operator", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
