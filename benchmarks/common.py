"""Shared helpers for the benchmarks: machine description, timing, per-process peak RSS, moto.

Benchmarks here compare a configuration with its reference *in the same run*, alternating them
and taking medians, because the machine they run on is small and shared (2 cores); absolute
numbers drift with the load, ratios much less. Every report carries the machine and its load.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def machine() -> dict:
    """CPU model, cores, memory and the load averages right now."""
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mib": mem,
            "load": [round(x, 2) for x in load], "python": platform.python_version(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def describe_machine(m: dict | None = None) -> str:
    m = m or machine()
    return (f"{m['cpu']}, {m['cores']} cores, {m['mem_mib'] // 1024} GiB, load "
            f"{m['load'][0]:.2f}/{m['load'][1]:.2f}/{m['load'][2]:.2f} at {m['when']}")


def median(xs) -> float:
    return float(statistics.median(xs))


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def vm(field: str = "VmHWM") -> int:
    """This process's VmHWM / VmRSS (bytes), from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(argv: list[str], env: dict | None = None, timeout: float = 1800) -> tuple[dict, int]:
    """Run a worker process that prints one JSON line last; return (that JSON, peak RSS bytes of
    the child from wait4's rusage, measured from outside)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(ROOT))
    t0 = time.monotonic()
    out = b""
    err = b""
    # wait4 gives this child's own rusage (ru_maxrss in KiB on Linux)
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    open_streams = 2
    while open_streams:
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"{argv} took more than {timeout} s")
        for key, _ in sel.select(timeout=1.0):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
            elif key.fileobj is proc.stdout:
                out += chunk
            else:
                err += chunk
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"{err.decode(errors='replace')[-3000:]}")
    lines = [ln for ln in out.decode().splitlines() if ln.strip()]
    return json.loads(lines[-1]), int(rusage.ru_maxrss) * 1024


def bench_env(**extra) -> dict:
    """The environment for workers: no OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE (they slow a current
    numpy down; set on some of these machines for older OpenBLAS builds), offline hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer"), str(ROOT / "operator"), str(ROOT),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def MotoServer():
    """moto_server on a loopback port for a ``with`` block: the dev cluster's own starter."""
    from tests.cluster.s3 import MotoS3

    return MotoS3(buckets=())


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def emit(title: str, payload: dict, out: str | None) -> None:
    """Print the figures and, when asked, write them as JSON."""
    print(json.dumps(payload, indent=2, default=str))
    if out:
        Path(out).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"{title}: figures written to {out}")


def finish(title: str, payload: dict, before: dict, out: str | None) -> int:
    """Close a benchmark: the machine's state now beside its state at the start, then emit."""
    payload["machineAfter"] = machine()
    print(describe_machine(before))
    emit(title, payload, out)
    return 0
