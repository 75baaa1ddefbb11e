"""Operator memory with 20 runs whose specs ask for every maximum the CRD allows (issue 12).

The same test cluster as bench_operator.py (tests/cluster: etcd, kube-apiserver,
kube-controller-manager with the real Job controller, kube-scheduler, the node agent in
``instant`` mode, moto S3; the chart installed by Helm, the operator running as its
Deployment's pod). 20 RatatouilleRuns are created with ``kubectl create`` (``kubectl apply``
would copy each ~0.3 MB run into a last-applied annotation, over the API server's 256 KiB
limit), each asking for the CRD's maxima:

- counts: finetune.runs 500, 16 auxiliaries x 8 runs, parallelism 256, 64 test domains,
  64 choices per hyperparameter, dataPreparation enabled (a prepare Job per dataset),
  failurePolicy at its maxima (backoffLimit 100, maxAttempts 10, minSucceeded 500, ...),
- lengths: the 40-character run name, 1024-character URIs (foundation weights, target and
  auxiliary datasets, storage), a 2048-character endpoint, 255-character domain names,
  30-character auxiliary names, 64-character numbers, a 1024-character image, 253-character
  Secret / PriorityClass / RuntimeClass / pull-Secret names, 64 nodeSelector entries and
  tolerations, 32 resource requests and limits, 32 pod labels, 32 pod annotations.

What the cluster must have for such a run to schedule is created first (node labels for the
nodeSelector, the extended resources, the PriorityClass, the RuntimeClass, the Secret, the
image known to the node agent). Pod annotations: the CRD allowed 64 values of 4,096 characters,
which no object can carry (the API server refuses annotations over 256 KiB), so the first
measurements used 64 x 4,000; the CRD now allows 32 x 1,024, which this uses (a server-side dry
run checks that a pod takes them).
``affinity`` has no bound in the CRD (any object up to the 3 MiB request); a one-term
nodeAffinity is used.

While the operator plans and creates Jobs, the operator process's RSS (VmRSS, VmHWM from
/proc) is sampled every 0.5 s, its /metrics (Jobs created and present, reconcile histogram)
every 5 s. The benchmark stops when every run has finished, after ``--duration`` seconds, or
when a safety limit is reached (operator RSS above ``--rss-cap-mib``, or the machine's
MemAvailable below ``--min-available-mib``: this is a shared machine). The node agent does not
enforce memory limits, so the operator is not OOM-killed here at the chart's 512Mi; the report
compares its RSS with that limit.

etcd is started with a 16 GiB backend quota (monkeypatched here, the test cluster's default
is etcd's 2 GiB): each Job and pod is ~0.3 MB at these maxima.

Usage: .venv/bin/python benchmarks/bench_operator_maxima.py [--runs 20] [--duration 600]
       [--small-strings] [--out f.json] [--keep-log f.log]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402
from bench_operator import proc_cpu_seconds, stop_cluster  # noqa: E402

MIB = 1 << 20
N_EXTENDED = 29  # + cpu, memory, ephemeral-storage = 32 requests and limits

# The CRD's podAnnotations maximum (32 values of 1,024 characters since the operator-memory fix;
# 64 of 4,096 before, which no object could carry).
POD_ANNOTATIONS, ANNOTATION_CHARS = 32, 1024


def pad(prefix: str, n: int, fill: str = "a") -> str:
    return prefix + fill * (n - len(prefix))


def dns_subdomain(n: int, tag: str = "x") -> str:
    """A DNS subdomain of exactly n characters (labels of at most 63)."""
    out = tag
    while len(out) < n:
        room = n - len(out) - 1
        if room <= 0:
            out += "z"
            break
        out += "." + "z" * min(63, room)
    return out[:n]


def number(value: str, n: int) -> str:
    """A decimal number written with n characters (trailing zeros after the point)."""
    if "." not in value:
        value += "."
    return pad(value, n, "0")


def _segments(n: int, width: int = 100, ch: str = "p") -> str:
    """n characters of path: segments of `width` characters joined by '/'."""
    segs, left = [], n
    while left > width + 1:
        segs.append(ch * width)
        left -= width + 1
    segs.append(ch * left)
    return "/".join(segs)


def uri(tag: str, n: int, suffix: str = "") -> str:
    """An s3:// URI of exactly n characters."""
    base = f"s3://ratatouille/{tag}/"
    return base + _segments(n - len(base) - len(suffix)) + suffix


def long_image() -> str:
    """A 1024-character image reference a runtime's parser would accept (the node agent's)."""
    head, tail = "registry.example.com:5000/", ":" + "t" * 128 + "@sha256:" + "0" * 64
    image = head + _segments(1024 - len(head) - len(tail), ch="r") + tail
    assert len(image) == 1024, len(image)
    return image


def label_key(i: int, prefix_chars: int = 200) -> str:
    return f"{dns_subdomain(prefix_chars, f'k{i:02d}')}/{pad(f'n{i:02d}-', 63)}"


class Names:
    """Everything the cluster must hold for a maxima run to schedule and run."""

    def __init__(self, annotation_chars: int, small: bool):
        self.small = small
        self.image = long_image()
        self.secret = dns_subdomain(253, "s3-credentials")
        self.priority_class = dns_subdomain(253, "prio")
        self.runtime_class = dns_subdomain(253, "rc")
        self.node_labels = {label_key(i): pad(f"v{i:02d}", 63) for i in range(64)}
        self.extended = [f"example.com/{pad(f'r{i:02d}-', 40)}" for i in range(N_EXTENDED)]
        self.annotation_chars = annotation_chars


def maxima_manifest(name: str, names: Names, seed_offset: int = 0) -> dict:
    """A RatatouilleRun at the CRD's maxima (lengths shortened with --small-strings)."""
    small = names.small
    L = (lambda n: min(n, 24)) if small else (lambda n: n)  # noqa: E731
    aux = [{"name": pad(f"aux{j:02d}-", 30 if not small else 8), "dataset": uri(f"aux{j:02d}", L(1024)),
            "runs": 8} for j in range(16)]
    hp = {
        "lr": {"default": number("0.0001", L(64)),
               "choices": [number(f"0.{j + 1:04d}", L(64)) for j in range(64)]},
        "weightDecay": {"default": number("0.0001", L(64)),
                        "choices": [number(f"0.{j:04d}", L(64)) for j in range(64)]},
        "dropout": {"default": number("0.1", L(64)),
                    "choices": [number(f"0.{j:04d}", L(64)) for j in range(64)]},
    }
    template = {
        "image": names.image,
        "resources": {
            "requests": {"cpu": "1m", "memory": "1Mi", "ephemeral-storage": "1Mi",
                         **{r: "1" for r in names.extended}},
            "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi",
                       **{r: "1" for r in names.extended}},
        },
        "nodeSelector": dict(names.node_labels),
        "tolerations": [{"key": label_key(i), "operator": "Equal", "value": pad(f"t{i:02d}", 63),
                         "effect": "NoSchedule"} for i in range(64)],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]}]}}},
        "priorityClassName": names.priority_class,
        "runtimeClassName": names.runtime_class,
        "imagePullSecrets": [dns_subdomain(253, f"pull{j:02d}") for j in range(16)],
        "podAnnotations": {f"example.com/a{j:02d}": pad(f"{j:02d}", names.annotation_chars if not small else 16)
                           for j in range(POD_ANNOTATIONS)},
        "podLabels": {f"example.com/{pad(f'l{j:02d}-', 63)}": pad(f"v{j:02d}", 63) for j in range(32)},
        "scratchSize": pad("", 30, "0") + "1G",
    }
    spec = {
        "foundation": {"model": pad("test_resnet.", 128, "x") if not small else "test_resnet",
                       "weights": uri("foundation", L(1024), ".safetensors"), "inputSize": 4096},
        "target": {"dataset": uri("target", L(1024)),
                   "testDomains": [pad(f"d{j:02d}-", 255 if not small else 8) for j in range(64)],
                   "holdoutFraction": number("0.2", L(64))},
        "auxiliaries": aux,
        "includeFoundation": True,
        "linearProbe": {"steps": 10_000_000, "batchSize": 65536, "lr": number("0.001", L(64))},
        "auxiliaryFinetune": {"steps": 10_000_000, "batchSize": 65536, "lr": number("0.00005", L(64))},
        "finetune": {"runs": 500, "steps": 10_000_000, "batchSize": 65536, "headWarmupSteps": 9_999_999,
                     "evalEvery": 10_000_000, "hyperparameters": hp},
        "averaging": {"selection": "greedy"},
        "seed": 2147483647 - seed_offset,
        "storage": {"uri": uri("runs", L(1024)),
                    "endpoint": pad("http://s3.", 2048 if not small else 32, "e"),
                    "credentialsSecret": names.secret},
        "template": template,
        "parallelism": 256,
        "failurePolicy": {"backoffLimit": 100, "maxAttempts": 10, "minSucceeded": 500,
                          "retryBackoffSeconds": 86400, "podStartTimeoutSeconds": 86400},
        "suspend": False,
        "queueName": pad("q", 63),
        "activeDeadlineSeconds": 315360000,
        "dataPreparation": {"enabled": True, "memoryBudget": pad("", 30, "0") + "8G"},
    }
    return {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
            "metadata": {"name": name}, "spec": spec}


def run_names(n: int) -> list[str]:
    return [pad("max", 36, "m") + f"-{i:03d}" for i in range(n)]  # 40 characters: the CRD's maximum


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(url: str) -> dict:
    """Jobs created / present, reconcile count, sum and buckets from the operator's /metrics."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {"created": 0.0, "present": 0.0, "rec_count": 0.0, "rec_sum": 0.0, "buckets": {},
           "errors": 0.0}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+|\+Inf|NaN)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "ratatouille_child_jobs_created_total":
            out["created"] += value
        elif name == "ratatouille_child_jobs":
            out["present"] += value
        elif name == "ratatouille_reconcile_errors_total":
            out["errors"] += value
        elif name == "ratatouille_reconcile_duration_seconds_count":
            out["rec_count"] += value
        elif name == "ratatouille_reconcile_duration_seconds_sum":
            out["rec_sum"] += value
        elif name == "ratatouille_reconcile_duration_seconds_bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)
            out["buckets"][le] = out["buckets"].get(le, 0.0) + value
    return out


def bucket_quantile(buckets: dict[str, float], q: float) -> str | None:
    """The upper bound of the histogram bucket holding quantile q (cumulative buckets)."""
    items = sorted(((float("inf") if k == "+Inf" else float(k)), v) for k, v in buckets.items())
    if not items or items[-1][1] == 0:
        return None
    want = q * items[-1][1]
    for le, v in items:
        if v >= want:
            return "+Inf" if le == float("inf") else f"<= {le:g} s"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--duration", type=float, default=600, help="stop after this many seconds")
    ap.add_argument("--rss-cap-mib", type=float, default=3072, help="stop when the operator's RSS passes this")
    ap.add_argument("--min-available-mib", type=float, default=5120,
                    help="stop when the machine's MemAvailable falls below this")
    ap.add_argument("--annotation-chars", type=int, default=ANNOTATION_CHARS)
    ap.add_argument("--small-strings", action="store_true",
                    help="the same counts with short strings (separates count from size)")
    ap.add_argument("--interval", type=float, default=2.0, help="operator reconcile interval")
    ap.add_argument("--out")
    ap.add_argument("--keep-log")
    ap.add_argument("--print-manifest", action="store_true", help="print one run's manifest and exit")
    args = ap.parse_args()

    names = Names(args.annotation_chars, args.small_strings)
    manifests = [maxima_manifest(n, names, i) for i, n in enumerate(run_names(args.runs))]
    if args.print_manifest:
        print(json.dumps(manifests[0]))
        return 0

    from tests.cluster import controlplane
    from tests.operator.harness import IMAGE_USER, ChartOperator, Cluster

    spawn = controlplane.ControlPlane._spawn

    def _spawn(self, name, argv):
        if name == "etcd":
            argv = [*argv, "--quota-backend-bytes", str(16 << 30)]
        return spawn(self, name, argv)

    controlplane.ControlPlane._spawn = _spawn

    figures: dict = {"machine_start": common.machine(), "runs": args.runs,
                     "small_strings": args.small_strings,
                     "run_manifest_bytes": len(json.dumps(manifests[0])),
                     "chart_memory_limit_mib": 512, "chart_memory_request_mib": 256}
    capacity = {"cpu": "100000", "memory": "100000Gi", "pods": "20000", "ephemeral-storage": "100000Pi",
                "nvidia.com/gpu": "8", **{r: "1000000" for r in names.extended}}
    tmp = Path(tempfile.mkdtemp(prefix="h2-bench-maxima-"))
    from tests.operator.harness import IMAGE

    cluster = Cluster(tmp, agent_options={"capacity": capacity, "images": (IMAGE, names.image),
                                          "image_users": {IMAGE: IMAGE_USER, names.image: IMAGE_USER}})
    samples: list[tuple[float, int, int]] = []  # (t, VmRSS, VmHWM)
    metrics_samples: list[dict] = []
    stop = threading.Event()
    op = None
    try:
        cluster.start()
        ctl = cluster.controller
        ctl.instant = True
        ctl.parallel = None
        rest = cluster.rest
        node = ctl.node
        rest.merge_patch(f"/api/v1/nodes/{node}", {"metadata": {"labels": names.node_labels}})
        rest.create("/apis/scheduling.k8s.io/v1/priorityclasses",
                    {"metadata": {"name": names.priority_class}, "value": 1000})
        rest.create("/apis/node.k8s.io/v1/runtimeclasses",
                    {"metadata": {"name": names.runtime_class}, "handler": "runc"})
        op = ChartOperator(cluster, interval=args.interval)
        op.install()
        ns = cluster.namespace("bench")
        from tests.operator.harness import ACCESS_KEY, SECRET_KEY
        cluster.create_secret(ns, names.secret, {"AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                                 "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        # The CRD's podAnnotations maximum: does the API server take a pod carrying it?
        probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "annotation-probe",
            "annotations": {f"example.com/a{j:02d}": pad(f"{j:02d}", ANNOTATION_CHARS)
                            for j in range(POD_ANNOTATIONS)}},
            "spec": {"containers": [{"name": "c", "image": IMAGE}]}}
        proc = cluster.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(probe),
                               check=False)
        figures["crd_max_annotations_dry_run"] = (proc.stderr or proc.stdout).strip()[:400]
        print(f"{POD_ANNOTATIONS} x {ANNOTATION_CHARS}-character pod annotations, server-side dry run:",
              figures["crd_max_annotations_dry_run"], flush=True)

        pid = next(t.container.proc.pid for t in ctl.pods.values()
                   if t.container and t.container.proc and op._is_mine(t.pod))
        cp_pids = {n: p.pid for n, p in cluster.cp.procs.items()}
        figures["rss_at_start_mib"] = round(proc_status(pid).get("VmRSS", 0) / MIB, 1)
        figures["hwm_at_start_mib"] = round(proc_status(pid).get("VmHWM", 0) / MIB, 1)
        print(f"operator pid {pid}: RSS at start {figures['rss_at_start_mib']} MiB", flush=True)
        cpu0 = proc_cpu_seconds(pid)
        m0 = scrape(op.metrics_url)
        t0 = time.monotonic()

        def sampler():
            while not stop.is_set():
                st = proc_status(pid)
                if st:
                    samples.append((time.monotonic() - t0, st.get("VmRSS", 0), st.get("VmHWM", 0)))
                stop.wait(0.5)

        threading.Thread(target=sampler, daemon=True).start()
        text = "\n---\n".join(json.dumps(m) for m in manifests)
        proc = cluster.kubectl("create", "-n", ns, "-f", "-", input=text, check=False)
        figures["create_s"] = round(time.monotonic() - t0, 2)
        figures["create_output"] = (proc.stdout + proc.stderr).strip()[-600:]
        print(f"kubectl create ({figures['create_s']} s): {figures['create_output'][-300:]}", flush=True)
        reason = "duration"
        peak_cp: dict[str, int] = {}
        min_avail = mem_available()
        phases: dict[str, str] = {}
        while True:
            time.sleep(5)
            now = time.monotonic() - t0
            try:
                m = scrape(op.metrics_url)
            except OSError as exc:
                m = None
                print(f"[{now:6.0f}s] metrics unreadable: {exc!r}", flush=True)
            st = proc_status(pid)
            for n, p in cp_pids.items():
                peak_cp[n] = max(peak_cp.get(n, 0), proc_status(p).get("VmRSS", 0))
            avail = mem_available()
            min_avail = min(min_avail, avail)
            try:
                items = rest.items(f"/apis/ratatouille.dev/v1alpha1/namespaces/{ns}/ratatouilleruns")
                phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") or "" for i in items}
            except Exception as exc:  # noqa: BLE001 - a slow list under load: keep sampling
                print(f"[{now:6.0f}s] run list failed: {exc!r}", flush=True)
            if m is not None:
                rec = m["rec_count"] - m0["rec_count"]
                metrics_samples.append({"t": round(now, 1), "rss_mib": round(st.get("VmRSS", 0) / MIB, 1),
                                        "jobs_created": int(m["created"] - m0["created"]),
                                        "jobs_present": int(m["present"]), "reconciles": int(rec),
                                        "reconcile_errors": int(m["errors"] - m0["errors"]),
                                        "mean_reconcile_s": round((m["rec_sum"] - m0["rec_sum"]) / rec, 3) if rec else None,
                                        "mem_available_mib": round(avail / MIB),
                                        "phases": sorted(set(phases.values()))})
                print(f"[{now:6.0f}s] RSS {st.get('VmRSS', 0) / MIB:7.1f} MiB (peak {st.get('VmHWM', 0) / MIB:7.1f}),"
                      f" Jobs created {metrics_samples[-1]['jobs_created']}, present {metrics_samples[-1]['jobs_present']},"
                      f" reconciles {int(rec)} (mean {metrics_samples[-1]['mean_reconcile_s']} s),"
                      f" errors {metrics_samples[-1]['reconcile_errors']}, MemAvailable {avail / MIB:.0f} MiB,"
                      f" phases {metrics_samples[-1]['phases']}", flush=True)
            if phases and len(phases) == args.runs and all(p in ("Succeeded", "Failed") for p in phases.values()):
                reason = "all runs finished"
                break
            if st.get("VmRSS", 0) > args.rss_cap_mib * MIB:
                reason = f"operator RSS above the {args.rss_cap_mib:.0f} MiB safety cap"
                break
            if avail < args.min_available_mib * MIB:
                reason = f"MemAvailable below {args.min_available_mib:.0f} MiB"
                break
            if now > args.duration:
                break
            if not st:
                reason = "the operator process is gone"
                break
        stop.set()
        elapsed = time.monotonic() - t0
        cpu = proc_cpu_seconds(pid) if proc_status(pid) else float("nan")
        m = scrape(op.metrics_url)
        rec = m["rec_count"] - m0["rec_count"]
        buckets = {k: v - m0["buckets"].get(k, 0.0) for k, v in m["buckets"].items()}
        peak = max((s[2] for s in samples), default=0)
        rss_series = [(round(t, 1), round(r / MIB, 1)) for t, r, _ in samples]
        figures.update({
            "stopped_because": reason,
            "elapsed_s": round(elapsed, 1),
            "peak_rss_mib": round(peak / MIB, 1),
            "peak_rss_over_chart_limit": round(peak / (512 * MIB), 2),
            "rss_at_end_mib": rss_series[-1][1] if rss_series else None,
            "first_over_512mib_s": next((t for t, r in rss_series if r > 512), None),
            "jobs_created": int(m["created"] - m0["created"]),
            "jobs_present_at_end": int(m["present"]),
            "reconciles": int(rec),
            "reconcile_errors": int(m["errors"] - m0["errors"]),
            "mean_reconcile_s": round((m["rec_sum"] - m0["rec_sum"]) / rec, 4) if rec else None,
            "reconcile_p50_bucket": bucket_quantile(buckets, 0.5),
            "reconcile_p99_bucket": bucket_quantile(buckets, 0.99),
            "reconcile_buckets": buckets,
            "operator_cpu_s": round(cpu - cpu0, 1),
            "phases_at_end": phases,
            "control_plane_peak_rss_mib": {n: round(v / MIB) for n, v in peak_cp.items()},
            "min_mem_available_mib": round(min_avail / MIB),
            "metrics_samples": metrics_samples,
            "rss_series_mib": rss_series[::4],
        })
        jobs = figures["jobs_created"]
        if jobs:
            figures["rss_growth_per_job_kib"] = round((peak - figures["rss_at_start_mib"] * MIB) / jobs / 1024, 1)
    finally:
        stop.set()
        stop_cluster(cluster, op, tmp, args.keep_log)
    figures["machine_end"] = common.machine()
    common.emit("bench_operator_maxima", figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
