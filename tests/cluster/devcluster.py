"""`make dev-cluster`: the upstream control plane, the node agent, an S3 endpoint (moto) and
Prometheus on loopback, with the chart installed by Helm, so the operator can be tried as on a
cluster without one. It prints the exports for kubectl and blocks until Ctrl-C, then stops
everything it started.

    python -m tests.cluster.devcluster [--dir .dev-cluster] [--demo-data .demo/data]
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .s3 import CREDENTIALS_SECRET, upload_demo_assets

ACCESS_KEY, SECRET_KEY = "dev-access-key", "dev-secret-key"


def start_prometheus(workdir: Path, operator_port: int, pod_targets: Path) -> tuple[subprocess.Popen | None, str]:
    """Debian's prometheus scraping the operator and the training pods (file_sd kept by the node
    agent); (None, reason) when it is not installed."""
    from .controlplane import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        return None, "prometheus is not installed (apt-get install prometheus): not started"
    port = free_port()
    cfg = workdir / "prometheus.yml"
    cfg.write_text(json.dumps({
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {"job_name": "ratatouille-operator", "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
            {"job_name": "ratatouille-trainers", "file_sd_configs": [{"files": [str(pod_targets)],
                                                                      "refresh_interval": "5s"}]}]}))
    log = open(workdir / "prometheus.log", "ab")
    proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    from tests.operator.harness import IMAGE, ChartOperator, Cluster

    parser = argparse.ArgumentParser(prog="make dev-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=".dev-cluster", help="working directory (kubeconfig, logs, data)")
    parser.add_argument("--demo-data", help="upload this demo data (from `make demo`) to s3://ratatouille/")
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    cluster = Cluster(workdir, agent_options={"metrics_ports": True,
                                              "metrics_pod_selector": {"app.kubernetes.io/name": "ratatouille"}})
    cluster.s3.access_key, cluster.s3.secret_key = ACCESS_KEY, SECRET_KEY
    prometheus = None
    try:
        print("starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built by "
              "scripts/k8s/build.sh), the node agent and S3...", flush=True)
        cluster.start()
        cluster.namespace("default")
        op = ChartOperator(cluster, interval=5)
        op.install()
        lines = [f"control plane up ({cluster.cp.startup_seconds:.1f} s); operator installed by helm "
                 f"(release {op.release} in {op.namespace})",
                 f"S3 (moto) at {cluster.s3.endpoint}, bucket ratatouille; Secret default/{CREDENTIALS_SECRET}"]
        if args.demo_data:
            if not Path(args.demo_data).is_dir():
                raise SystemExit(f"--demo-data {args.demo_data}: no such directory (run `make demo` first)")
            for uri in upload_demo_assets(cluster.s3.client(), args.demo_data):
                lines.append(f"uploaded {uri}")
        prometheus, where = start_prometheus(workdir, op.metrics_port, cluster.controller.metrics_sd_file)
        lines.append(f"Prometheus at {where}" if prometheus else where)
        lines += ["", "In another shell:",
                  f"  export KUBECONFIG={cluster.kubeconfig} PATH={cluster.cp.bin}:$PATH",
                  "  kubectl apply -f crds/examples/operator-demo.yaml",
                  "  kubectl get rrun -w",
                  "  kubectl wait --for=condition=Complete rrun/operator-demo --timeout=15m",
                  "  kubectl get jobs,pods,events",
                  f"Pods run as processes of this machine (image {IMAGE}); their logs are in {workdir}/node/logs.",
                  "Ctrl-C stops everything."]
        print("\n".join(lines), flush=True)
        while not stop.is_set():
            stop.wait(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the dev cluster", flush=True)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(15)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
