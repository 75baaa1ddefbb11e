"""Issue 7, target 4 (planner part): ``plan()`` for a run with 1,000 target members and 1,000
observed Jobs, under 50 ms.

The observed state is a run in the middle of its target stage: the linear probe and the
auxiliary fine-tunings succeeded, and 1,000 target Jobs exist (600 Succeeded with their metrics,
300 Active, 60 Failed on their last attempt, 40 Pending), plus the status the previous call
returned. ``plan()`` is called repeatedly on that input; the median, p95 and max are reported,
along with two more shapes (no target Job yet: ``parallelism`` = 400 Jobs are created with their
job descriptions; every target Succeeded: the averaging Job is created) and the number of
actions, so the work is visible. (The first two shapes observe 3 and 1,003 Jobs.)

Usage: .venv/bin/python benchmarks/bench_planner.py [--members 1000] [--calls 30] [--out f.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SPEC = {
    "foundation": {"model": "resnet50", "weights": "s3://models/r50.safetensors", "inputSize": 224},
    "target": {"dataset": "s3://data/office", "testDomains": ["art"], "holdoutFraction": "0.2"},
    "auxiliaries": [{"name": "pacs", "dataset": "s3://data/pacs", "runs": 2},
                    {"name": "vlcs", "weights": "s3://community/vlcs.safetensors"}],
    "includeFoundation": True,
    "linearProbe": {"steps": 50, "batchSize": 16, "lr": "1e-3"},
    "auxiliaryFinetune": {"steps": 60, "batchSize": 8, "lr": "5e-5"},
    "finetune": {"runs": 1000, "steps": 5000, "batchSize": 32, "headWarmupSteps": 5,
                 "evalEvery": 300,
                 "hyperparameters": {
                     "lr": {"default": "5e-5", "choices": ["1e-5", "3e-5", "5e-5"]},
                     "weightDecay": {"default": "0", "choices": ["1e-4", "1e-6"]},
                     "dropout": {"default": "0", "choices": ["0", "0.1", "0.5"]}}},
    "averaging": {"selection": "greedy"},
    "seed": 3,
    "storage": {"uri": "s3://bucket/runs", "endpoint": "http://minio:9000",
                "credentialsSecret": "s3-creds"},
    "parallelism": 400,
    "failurePolicy": {"backoffLimit": 1, "maxAttempts": 2, "minSucceeded": 2,
                      "retryBackoffSeconds": 10},
}


def observed_for(P, spec, run, members: int, shape: str):
    jobs = [P.ObservedJob(P.job_name(run.name, P.STAGE_LP, P.LP_MEMBER, 1), P.STAGE_LP,
                          P.LP_MEMBER, 1, P.SUCCEEDED, 1000.0, 1100.0)]
    for aux in ("pacs-0", "pacs-1"):
        jobs.append(P.ObservedJob(P.job_name(run.name, P.STAGE_AUX, aux, 1), P.STAGE_AUX, aux, 1,
                                  P.SUCCEEDED, 1000.0, 1200.0))
    metrics = {}
    if shape == "start-target":  # no target Job yet: the planner creates `parallelism` of them
        return P.Observed(jobs=tuple(jobs), member_metrics=metrics)
    for i in range(members):
        m = str(i)
        if shape == "all-succeeded" or i < 600:
            state, fin = P.SUCCEEDED, 2000.0 + i
            metrics[f"{P.STAGE_TARGET}/{m}"] = {"valAccuracy": 0.5 + (i % 97) / 1000,
                                               "testAccuracy": {"art": 0.4}}
        elif i < 900:
            state, fin = P.ACTIVE, None
        elif i < 960:
            state, fin = P.FAILED, 2500.0
        else:
            state, fin = P.PENDING, None
        attempt = 2 if state == P.FAILED else 1
        jobs.append(P.ObservedJob(P.job_name(run.name, P.STAGE_TARGET, m, attempt), P.STAGE_TARGET,
                                  m, attempt, state, 1500.0, fin,
                                  "BackoffLimitExceeded" if state == P.FAILED else None))
    return P.Observed(jobs=tuple(jobs), member_metrics=metrics)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--out")
    args = ap.parse_args()

    from ratatouille_operator import planner as P
    from ratatouille_operator.spec import RunSpec

    d = dict(SPEC)
    d["finetune"] = dict(SPEC["finetune"], runs=args.members)
    spec = RunSpec.from_dict(d)
    run = P.RunRef(namespace="team-a", name="office", uid="uid-1", generation=1,
                   creation_time=1000.0)
    figures = {"machine_start": common.machine(), "members": args.members, "shapes": {}}
    for shape in ("start-target", "mid-target", "all-succeeded"):
        observed = observed_for(P, spec, run, args.members, shape)
        now = 3000.0
        first_t, prev_plan = common.timed(P.plan, run, spec, observed, now, None)
        prev = prev_plan.status
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            out = P.plan(run, spec, observed, now, prev)
            times.append(time.perf_counter() - t0)
        times.sort()
        figures["shapes"][shape] = {
            "observed_jobs": len(observed.jobs),
            "actions": len(out.actions),
            "creates": sum(1 for a in out.actions if isinstance(a, P.CreateJob)),
            "phase": out.status.get("phase"),
            "first_call_ms": round(first_t * 1000, 2),
            "median_ms": round(common.median(times) * 1000, 2),
            "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 2),
            "max_ms": round(times[-1] * 1000, 2),
            "met": max(first_t, common.median(times)) < 0.050,
        }
        print(f"{shape}: {len(observed.jobs)} jobs, {len(out.actions)} actions, first "
              f"{first_t * 1000:.1f} ms, median {common.median(times) * 1000:.1f} ms", flush=True)
    figures["machine_end"] = common.machine()
    common.emit("bench_planner", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
