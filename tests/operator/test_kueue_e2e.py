"""A run with `queueName` admitted by the real Kueue controller: a ClusterQueue whose cpu quota
holds two of the run's pods while the run asks for four at once. Kueue suspends the children at
creation (its Job webhook), admits at most two Workloads at a time, and the run still completes."""
from __future__ import annotations

import json
import time

import pytest

from tests.cluster.kueue import Kueue, KueueUnavailable
from tests.operator.harness import cluster, operator_process, run_manifest  # noqa: F401

pytest.importorskip("kopf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kueue(cluster):
    k = Kueue(cluster.cp, cluster.tmp / "kueue")
    try:
        k.start()
    except KueueUnavailable as err:
        pytest.skip(str(err))
    try:
        yield k
    finally:
        k.stop()


def _running_targets(cluster, ns: str) -> set[str]:
    return {n for n in cluster.controller.running() if n.startswith("queued-target-")}


def test_kueue_admits_within_quota_and_the_run_completes(cluster, operator_process, kueue):
    ns = cluster.namespace("e2e-kueue")
    queues = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "team"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["cpu"],
             "flavors": [{"name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "1"}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "team-queue", "namespace": ns},
         "spec": {"clusterQueue": "team"}},
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(q) for q in queues))
    agent = cluster.controller
    agent.instant = lambda pod: pod["metadata"]["namespace"] == ns
    agent.hold = lambda pod: pod["metadata"]["namespace"] == ns and \
        pod["metadata"]["labels"].get("ratatouille.dev/stage") == "target"
    manifest = run_manifest("queued", dataset="s3://ratatouille/datasets/target", runs=4, parallelism=4,
                            extra_spec={"queueName": "team-queue",
                                        "template": {"resources": {"requests": {"cpu": "500m"},
                                                                   "limits": {"cpu": "500m"}}}})
    cluster.apply(manifest, ns)
    try:
        # Four target Jobs exist, two are admitted (500m each against a quota of 1 cpu).
        cluster.wait_for(lambda: len(_running_targets(cluster, ns)) == 2, 120, "two admitted targets",
                         operator_process)
        assert len([j for j in cluster.jobs(ns, "queued")
                    if j["metadata"]["labels"].get("ratatouille.dev/stage") == "target"]) == 4
        for _ in range(10):  # and it stays so: nobody unsuspends what Kueue holds back
            assert len(_running_targets(cluster, ns)) <= 2
            suspended = [j for j in cluster.jobs(ns, "queued") if j["spec"].get("suspend")]
            assert len(suspended) == 2, [j["metadata"]["name"] for j in suspended]
            time.sleep(0.5)
        workloads = json.loads(cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", ns, "-o", "json").stdout)
        admitted = [w for w in workloads["items"] if any(
            c["type"] == "Admitted" and c["status"] == "True" for c in (w.get("status") or {}).get("conditions") or [])]
        assert len([w for w in admitted if "target" in w["metadata"]["name"]]) == 2
        agent.hold = None
        agent.release(lambda pod: pod["metadata"]["namespace"] == ns)
        run = cluster.wait_phase(ns, "queued", ("Succeeded", "Failed"), timeout=180, operator=operator_process)
        assert run["status"]["phase"] == "Succeeded", json.dumps(run["status"], indent=1)
    finally:
        agent.reset()
        agent.release(lambda pod: pod["metadata"]["namespace"] == ns)
