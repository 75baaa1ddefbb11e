"""Runs admitted by the real Kueue controller. A ClusterQueue whose cpu quota holds two of a run's
pods while the run asks for four at once: Kueue suspends the children at creation (its Job
webhook), admits at most two Workloads at a time, and the run still completes; the operator never
fights it: not when the run is suspended (its Jobs are held by deactivating their Workloads, the
way Kueue supports), and not when Kueue queues a run that has no `queueName` (a namespace's
`default` LocalQueue queues every Job in it)."""
from __future__ import annotations

import contextlib
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


def _running_targets(cluster, ns: str, run: str = "queued") -> set[str]:
    return {n for n in cluster.controller.running() if n.startswith(f"{run}-target-")}


def _queues(cluster, ns: str, cluster_queue: str, local_queue: str, cpu: str = "1") -> None:
    """A ClusterQueue with `cpu` of quota for `ns` only, and a LocalQueue in `ns` pointing to it."""
    queues = [
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cluster_queue},
         "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}, "resourceGroups": [{
             "coveredResources": ["cpu"],
             "flavors": [{"name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": cpu}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": local_queue, "namespace": ns},
         "spec": {"clusterQueue": cluster_queue}},
    ]
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(q) for q in queues))


def _workloads(cluster, ns: str) -> list[dict]:
    return json.loads(cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", ns, "-o", "json").stdout)["items"]


def _admitted(workload: dict) -> bool:
    return any(c["type"] == "Admitted" and c["status"] == "True"
               for c in (workload.get("status") or {}).get("conditions") or [])


def _target_jobs(cluster, ns: str, run: str) -> list[dict]:
    return [j for j in cluster.jobs(ns, run) if j["metadata"]["labels"].get("ratatouille.dev/stage") == "target"]


@contextlib.contextmanager
def _targets_held(cluster, ns: str):
    """Pods of `ns` end at once, except target pods, which run until released."""
    agent = cluster.controller
    agent.instant = lambda pod: pod["metadata"]["namespace"] == ns
    agent.hold = lambda pod: pod["metadata"]["namespace"] == ns and \
        pod["metadata"]["labels"].get("ratatouille.dev/stage") == "target"
    try:
        yield agent
    finally:
        agent.reset()
        agent.release(lambda pod: pod["metadata"]["namespace"] == ns)


def _release_and_succeed(cluster, ns: str, run: str, operator) -> None:
    cluster.controller.hold = None
    cluster.controller.release(lambda pod: pod["metadata"]["namespace"] == ns)
    body = cluster.wait_phase(ns, run, ("Succeeded", "Failed"), timeout=180, operator=operator)
    assert body["status"]["phase"] == "Succeeded", json.dumps(body["status"], indent=1)


_CPU = {"template": {"resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}}}


def test_kueue_admits_within_quota_and_the_run_completes(cluster, operator_process, kueue):
    ns = cluster.namespace("e2e-kueue")
    _queues(cluster, ns, "team", "team-queue")
    with _targets_held(cluster, ns):
        cluster.apply(run_manifest("queued", dataset="s3://ratatouille/datasets/target", runs=4, parallelism=4,
                                   extra_spec={"queueName": "team-queue", **_CPU}), ns)
        # Four target Jobs exist, two are admitted (500m each against a quota of 1 cpu).
        cluster.wait_for(lambda: len(_running_targets(cluster, ns)) == 2, 120, "two admitted targets",
                         operator_process)
        assert len(_target_jobs(cluster, ns, "queued")) == 4
        for _ in range(10):  # and it stays so: nobody unsuspends what Kueue holds back
            assert len(_running_targets(cluster, ns)) <= 2
            suspended = [j for j in cluster.jobs(ns, "queued") if j["spec"].get("suspend")]
            assert len(suspended) == 2, [j["metadata"]["name"] for j in suspended]
            time.sleep(0.5)
        assert len([w for w in _workloads(cluster, ns) if _admitted(w) and "target" in w["metadata"]["name"]]) == 2
        _release_and_succeed(cluster, ns, "queued", operator_process)


def test_suspending_a_queued_run_deactivates_its_workloads_and_resume_readmits(cluster, operator_process, kueue):
    ns = cluster.namespace("e2e-kueue-hold")
    _queues(cluster, ns, "hold", "team-queue")
    with _targets_held(cluster, ns) as agent:
        cluster.apply(run_manifest("held", dataset="s3://ratatouille/datasets/target", runs=2, parallelism=2,
                                   extra_spec={"queueName": "team-queue", **_CPU}), ns)
        cluster.wait_for(lambda: len(_running_targets(cluster, ns, "held")) == 2, 120, "two admitted targets",
                         operator_process)
        names = sorted(j["metadata"]["name"] for j in _target_jobs(cluster, ns, "held"))
        starts = {n: agent.starts.get(f"{ns}/{n}") for n in names}
        cluster.kubectl("patch", "rrun", "held", "-n", ns, "--type", "merge", "-p", '{"spec": {"suspend": true}}')

        def held() -> bool:
            wls = [w for w in _workloads(cluster, ns) if "target" in w["metadata"]["name"]]
            return (len(wls) == 2 and all(w["spec"].get("active") is False for w in wls)
                    and all(j["spec"].get("suspend") for j in _target_jobs(cluster, ns, "held"))
                    and not _running_targets(cluster, ns, "held"))
        cluster.wait_for(held, 60, "the targets' Workloads deactivated and their Jobs suspended by Kueue",
                         operator_process)
        assert cluster.wait_phase(ns, "held", ("Suspended",), timeout=30)["status"]["phase"] == "Suspended"
        for _ in range(12):  # and it stays so: no one restarts what the run holds
            assert held() and {n: agent.starts.get(f"{ns}/{n}") for n in names} == starts
            time.sleep(0.5)
        assert all(j["metadata"]["annotations"].get("ratatouille.dev/held") == "true"
                   for j in _target_jobs(cluster, ns, "held"))

        cluster.kubectl("patch", "rrun", "held", "-n", ns, "--type", "merge", "-p", '{"spec": {"suspend": false}}')
        cluster.wait_for(lambda: len(_running_targets(cluster, ns, "held")) == 2, 120, "the targets readmitted",
                         operator_process)
        assert all(w["spec"].get("active", True) for w in _workloads(cluster, ns))
        assert not any(j["metadata"].get("annotations", {}).get("ratatouille.dev/held")
                       for j in _target_jobs(cluster, ns, "held"))
        _release_and_succeed(cluster, ns, "held", operator_process)


def test_a_run_without_queue_name_that_kueue_queues_is_not_fought(cluster, operator_process, kueue):
    # A LocalQueue named `default` makes Kueue queue every Job of the namespace (LocalQueueDefaulting).
    ns = cluster.namespace("e2e-kueue-default")
    _queues(cluster, ns, "everything", "default")
    since = len(cluster.audit())
    with _targets_held(cluster, ns) as agent:
        cluster.apply(run_manifest("plain", dataset="s3://ratatouille/datasets/target", runs=4, parallelism=4,
                                   extra_spec=_CPU), ns)
        cluster.wait_for(lambda: len(_running_targets(cluster, ns, "plain")) == 2, 120, "two admitted targets",
                         operator_process)
        assert len(_target_jobs(cluster, ns, "plain")) == 4
        for _ in range(10):
            assert len(_running_targets(cluster, ns, "plain")) <= 2
            time.sleep(0.5)
        waiting = [j for j in _target_jobs(cluster, ns, "plain") if j["spec"].get("suspend")]
        assert len(waiting) == 2 and all(j["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == "default"
                                         for j in waiting)

        def reasons() -> dict:
            return {e["name"]: e.get("reason") for e in (cluster.run(ns, "plain").get("status") or {}).get("jobs") or []}
        cluster.wait_for(lambda: all(reasons().get(j["metadata"]["name"]) == "WaitingForQuota" for j in waiting),
                         30, "the waiting Jobs reported as WaitingForQuota", operator_process, detail=lambda: str(reasons()))
        # The operator never touched a Job after creating it: no patch that could unsuspend one.
        patches = [e for e in cluster.audit()[since:]
                   if (e.get("user") or {}).get("username") == operator_process.service_account
                   and e.get("verb") == "patch" and (e.get("objectRef") or {}).get("resource") == "jobs"]
        assert patches == []
        assert all(agent.starts.get(f"{ns}/{j['metadata']['name']}", 0) <= 1 for j in _target_jobs(cluster, ns, "plain"))
        _release_and_succeed(cluster, ns, "plain", operator_process)
