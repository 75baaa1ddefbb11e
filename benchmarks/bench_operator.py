"""Operator scale on the upstream control plane: 20 concurrent runs of 50 members.

The test cluster of the operator's end-to-end tests (tests/cluster: etcd, kube-apiserver,
kube-controller-manager with the real Job controller, kube-scheduler, the node agent, moto S3),
the chart installed by Helm and the operator running as its Deployment's pod. Trainer processes
are replaced by the node agent's ``instant`` mode: every pod exits 0 as soon as it starts, so the
Jobs complete as fast as the real Job controller marks them. 20 RatatouilleRuns of 50 target
members each (foundation only, uniform averaging) are created back to back with kubectl; the
benchmark waits until all of them are Succeeded and reports:

- the stage-transition latency: from the moment the last Job of a stage is seen Complete to the
  moment the first Job of the next stage is seen created (linear probe -> targets, last target
  -> average), p50 / p99 / max over every run, both times taken by one watch on Jobs (goal: p99
  under 2 s),
- each run's creation to its first Job, the time until all runs Succeeded, the Jobs created,
- the operator's CPU seconds per reconcile (handler invocations from its
  ``ratatouille_reconcile_duration_seconds`` histogram) and per Job.

Usage: .venv/bin/python benchmarks/bench_operator.py [--runs 20] [--members 50] [--out f.json]
"""
from __future__ import annotations

import argparse
import json
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


def stop_cluster(cluster, op, tmp: Path, keep_log: str | None) -> None:
    """Keep the operator's log when asked, stop the cluster, remove its files."""
    if op is not None and keep_log:
        Path(keep_log).write_text(op.log_text())
    cluster.stop()
    shutil.rmtree(tmp, ignore_errors=True)


class JobWatch:
    """One watch on the namespace's Jobs: when each Job was first seen, and first seen Complete."""

    def __init__(self, cluster, namespace: str):
        import threading

        self.cluster, self.namespace = cluster, namespace
        self.created: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.labels: dict[str, dict] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """A raw watch (JSON lines) through the admin's TLS context; resumes after a drop."""
        import json as _json
        import urllib.request as _request

        rest = self.cluster.rest
        rv = ""
        while not self._stop.is_set():
            url = (f"{rest.server}/apis/batch/v1/namespaces/{self.namespace}/jobs?watch=1"
                   f"&allowWatchBookmarks=false&timeoutSeconds=30" + (f"&resourceVersion={rv}" if rv else ""))
            try:
                with _request.urlopen(url, timeout=40, context=rest.context) as rsp:
                    for line in rsp:
                        now = time.monotonic()
                        ev = _json.loads(line)
                        job = ev["object"]
                        if ev["type"] == "ERROR":
                            rv = ""
                            break
                        meta = job["metadata"]
                        rv = meta["resourceVersion"]
                        self.created.setdefault(meta["name"], now)
                        self.labels.setdefault(meta["name"], dict(meta.get("labels") or {}))
                        if any(c["type"] == "Complete" and c["status"] == "True"
                               for c in (job.get("status") or {}).get("conditions") or []):
                            self.completed.setdefault(meta["name"], now)
                        if self._stop.is_set():
                            return
            except Exception as exc:  # noqa: BLE001 - a dropped watch restarts from the last version
                self.errors.append(repr(exc))
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()

    def transitions(self, run: str) -> list[float]:
        """Per stage boundary of one run: next stage's first Job seen minus last Job seen Complete."""
        return [d["latency_s"] for d in self.transition_details(run)]

    def transition_details(self, run: str, t0: float = 0.0) -> list[dict]:
        """The same, with the Jobs at either end and their times (seconds after t0)."""
        by_stage: dict[str, list[str]] = {}
        for name, labels in self.labels.items():
            if labels.get("ratatouille.dev/run") == run:
                by_stage.setdefault(labels.get("ratatouille.dev/stage", ""), []).append(name)
        out = []
        for before, after in (("linear-probe", "target"), ("target", "average")):
            done = [(self.completed[n], n) for n in by_stage.get(before, []) if n in self.completed]
            if done and by_stage.get(after) and len(done) == len(by_stage[before]):
                t_done, last = max(done)
                t_next, first = min((self.created[n], n) for n in by_stage[after])
                out.append({"run": run, "from": before, "to": after, "latency_s": t_next - t_done,
                            "last_complete": last, "last_complete_at_s": round(t_done - t0, 3),
                            "next_created": first, "next_created_at_s": round(t_next - t0, 3)})
        return out


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

    from tests.operator.harness import ChartOperator, Cluster, run_manifest

    figures = {"machine_start": common.machine(), "runs": args.runs, "members": args.members}
    tmp = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cluster = Cluster(tmp, agent_options={"capacity": {"cpu": "4000", "memory": "4000Gi", "pods": "5000"}})
    t_cp = time.monotonic()
    cluster.start()
    figures["control_plane_start_s"] = round(time.monotonic() - t_cp, 2)
    op = watch = None
    try:
        ctl = cluster.controller
        ctl.instant = True
        ctl.parallel = None
        op = ChartOperator(cluster, interval=args.interval)
        op.install()
        ns = cluster.namespace("bench")
        watch = JobWatch(cluster, ns)
        pid = next(t.container.proc.pid for t in ctl.pods.values()
                   if t.container and t.container.proc and op._is_mine(t.pod))
        cpu0 = proc_cpu_seconds(pid)
        stats0 = reconcile_stats(op.metrics_url)
        t_start = time.monotonic()
        t_wall0 = time.time()
        names = [f"scale-{i:02d}" for i in range(args.runs)]
        created_at: dict[str, float] = {}
        manifests = []
        for name in names:
            body = run_manifest(name, dataset="s3://ratatouille/datasets/target", runs=args.members,
                                parallelism=args.parallelism, min_succeeded=1)
            manifests.append(json.dumps(body))
        cluster.kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(manifests))
        for name in names:
            created_at[name] = time.monotonic()
        t_last = time.monotonic()
        first_job = lambda run: min((t for n, t in watch.created.items()  # noqa: E731
                                     if watch.labels[n].get("ratatouille.dev/run") == run), default=None)
        last = names[-1]
        try:
            cluster.wait_for(lambda: first_job(last) is not None, 60, f"the first Job of {last}", op)
        except AssertionError:
            raise AssertionError(f"the Job watch saw nothing; its errors: {watch.errors[-3:]}") from None
        first_job_latency = first_job(last) - t_last
        print(f"created {args.runs} runs in {t_last - t_start:.2f} s; first Job of the last run "
              f"after {first_job_latency:.2f} s", flush=True)

        def all_done():
            phases = [((cluster.run(ns, n) or {}).get("status") or {}).get("phase") for n in names]
            return all(p in ("Succeeded", "Failed") for p in phases) and phases

        phases = cluster.wait_for(all_done, args.timeout, "every run to finish", op)
        t_done = time.monotonic() - t_start
        cpu = proc_cpu_seconds(pid) - cpu0
        stats = reconcile_stats(op.metrics_url)
        rec0, dur0 = _total(stats0)
        rec, dur = _total(stats)
        reconciles = rec - rec0
        per_handler = {}
        for h, (c, t) in sorted(stats.items()):
            c0, t0 = stats0.get(h, (0.0, 0.0))
            if c - c0:
                per_handler[h] = {"reconciles": int(c - c0), "mean_s": round((t - t0) / (c - c0), 4)}
        time.sleep(1)  # the watch's last events
        latencies = [first_job(n) - created_at[n] for n in names if first_job(n) is not None]
        transitions = [x for n in names for x in watch.transitions(n)]
        details = sorted((d for n in names for d in watch.transition_details(n, t_start)),
                         key=lambda d: -d["latency_s"])
        # The server's own times of the slowest transitions' Jobs (1-s resolution), to tell a late
        # watch event from a late operator.
        for d in details[:5]:
            for key in ("last_complete", "next_created"):
                job = cluster.get("batch/v1/jobs", ns, d[key]) or {}
                d[key + "_server"] = {"created": (job.get("metadata") or {}).get("creationTimestamp"),
                                      "completed": (job.get("status") or {}).get("completionTime")}
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
            "stage_transition_s": {"n": len(transitions),
                                   "p50": round(_percentile(transitions, 0.5), 3) if transitions else None,
                                   "p99": round(_percentile(transitions, 0.99), 3) if transitions else None,
                                   "max": round(max(transitions), 3) if transitions else None},
            "target": "all Succeeded; stage-transition latency p99 < 2 s",
            # For joining with the operator's log (wall-clock timestamps): wall time at t_start.
            "t_start_wall": round(t_wall0, 3),
            "slowest_transitions": details[:5],
            "watch_errors": watch.errors[-10:],
            "job_times_s": {n: [round(watch.created[n] - t_start, 3),
                                round(watch.completed[n] - t_start, 3) if n in watch.completed else None]
                            for n in sorted(watch.created)},
        })
        figures["met"] = bool(figures["all_succeeded"] and transitions
                              and figures["stage_transition_s"]["p99"] < 2.0)
    finally:
        if watch is not None:
            watch.stop()
        stop_cluster(cluster, op, tmp, args.keep_log)
    figures["machine_end"] = common.machine()
    common.emit("bench_operator", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
