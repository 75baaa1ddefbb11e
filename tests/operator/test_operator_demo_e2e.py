"""crds/examples/operator-demo.yaml on the upstream control plane: the demo data in S3, the chart
installed by Helm, and the example applied with plain `kubectl apply -f` (its step budgets shrunk
for CI in a copy of the file, nothing else changed); the node agent runs every trainer pod in the
trainer image built from the Dockerfile (podman: its non-root user, a read-only root, the pod's
emptyDir and termination log mounted); `kubectl wait --for=condition=Complete` returns once it
Succeeded, and `kubectl get rrun` / `kubectl get events` / `kubectl explain` work as on a
cluster."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.cluster.images import CONTAINERS_CONF, TRAINER
from tests.cluster.s3 import upload_demo_assets
from tests.operator.harness import IMAGE, REPO, cluster, operator_process  # noqa: F401

pytest.importorskip("kopf")
pytest.importorskip("timm")
pytestmark = pytest.mark.slow

SHRINK = {"linearProbe": {"steps": 6, "batchSize": 8}, "auxiliaryFinetune": {"steps": 6, "batchSize": 8},
          "finetune": {"runs": 3, "steps": 6, "batchSize": 4, "headWarmupSteps": 2, "evalEvery": 3}}


def test_operator_demo_reaches_succeeded_with_plain_kubectl_apply(cluster, operator_process, built_images,
                                                                 tmp_path):
    agent = cluster.controller
    agent.containers, agent.containers_conf = {IMAGE: TRAINER}, str(CONTAINERS_CONF)
    data = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "ratatouille_trainer.demo_data", "--out", str(data), "--data-only",
                    "--per-domain", "30"], check=True, capture_output=True, timeout=300)
    upload_demo_assets(cluster.s3.client(), data, foundation=REPO / "crds/examples/quickstart-foundation.safetensors")
    ns = cluster.namespace("demo")
    manifest = yaml.safe_load((REPO / "crds/examples/operator-demo.yaml").read_text())
    for key, value in SHRINK.items():
        manifest["spec"][key].update(value)
    manifest["spec"]["failurePolicy"]["minSucceeded"] = 2
    path = tmp_path / "operator-demo.yaml"
    path.write_text(json.dumps(manifest, indent=1))  # JSON is YAML; PyYAML would unquote "1e-4"

    cluster.kubectl("apply", "-n", ns, "-f", str(path))  # no --validate=false
    wait = cluster.kubectl("wait", "-n", ns, "--for=condition=Complete", "--timeout=600s", "rrun/operator-demo",
                           check=False, timeout=660)
    run = cluster.run(ns, "operator-demo")
    assert wait.returncode == 0, (wait.stderr, (run or {}).get("status"), operator_process.log_tail())
    assert run["status"]["phase"] == "Succeeded"
    assert run["status"]["result"]["model"].startswith("s3://ratatouille/runs/demo/operator-demo/")
    # Every trainer pod ran in the image, none as a process of this machine.
    in_image = {k for k in agent.runtime_starts if k.startswith(f"{ns}/")}
    assert {f"{ns}/{j['metadata']['name']}" for j in cluster.jobs(ns, "operator-demo")} == in_image
    assert not any(k.startswith(f"{ns}/") and k not in agent.runtime_starts for k in agent.processes)

    rows = cluster.kubectl("get", "rrun", "-n", ns).stdout.splitlines()
    assert rows[0].split()[:4] == ["NAME", "PHASE", "PROGRESS", "COMPLETE"] and rows[1].split()[1] == "Succeeded"
    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector",
                             "involvedObject.kind=RatatouilleRun").stdout
    assert events.splitlines()[0].split()[:4] == ["LAST", "SEEN", "TYPE", "REASON"]
    assert "Succeeded" in events and "ratatouillerun/operator-demo" in events
    explain = cluster.kubectl("explain", "rrun.spec.finetune.runs").stdout
    assert "FIELD: runs <integer>" in explain
