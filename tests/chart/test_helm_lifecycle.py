"""The chart's life cycle with real Helm on the upstream control plane: install, upgrade (a values
change rolls the operator), uninstall (the CRD and the runs are kept), and a second install under
another release name that adopts the kept CRD and serves the old runs again; `kubectl get rrun -w`
follows a run as on a cluster; releases that would watch the same runs are refused."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.operator.harness import CHART, ChartOperator, run_manifest

pytest.importorskip("kopf")
pytestmark = pytest.mark.slow

CRD = "crd/ratatouilleruns.ratatouille.dev"


def test_install_upgrade_uninstall_and_a_second_release(k8s_cluster, tmp_path):
    c = k8s_cluster
    agent = c.controller
    agent.reset()
    ns = c.namespace("lifecycle")
    agent.instant = lambda pod: pod["metadata"]["namespace"] == ns  # no trainer: the control flow only
    first = ChartOperator(c, release="rt-one", namespace="rt-one-system")
    second = ChartOperator(c, release="rt-two", namespace="rt-two-system")
    try:
        first.install()
        assert c.helm("status", "rt-one", "-n", "rt-one-system").returncode == 0

        # kubectl get rrun -w follows the run to Succeeded.
        watch = subprocess.Popen([str(c.cp.kubectl_path), "get", "rrun", "-n", ns, "-w", "--no-headers"],
                                 env={"KUBECONFIG": str(c.kubeconfig), "HOME": str(tmp_path)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            c.apply(run_manifest("before", dataset="s3://ratatouille/datasets/target", runs=1), ns)
            c.wait_phase(ns, "before", "Succeeded", timeout=90, operator=first)
            time.sleep(1)
        finally:
            watch.terminate()
            lines = watch.communicate(timeout=10)[0].splitlines()
        phases = [line.split()[1] for line in lines if line.startswith("before") and len(line.split()) > 1]
        assert "Succeeded" in phases and phases[-1] == "Succeeded", lines

        # helm upgrade with a changed value rolls the operator to a new pod that has it.
        old_uid = first._pod()["metadata"]["uid"]
        first.upgrade({"logLevel": "DEBUG"})
        assert first._pod()["metadata"]["uid"] != old_uid
        assert first.env["RATATOUILLE_LOG_LEVEL"] == "DEBUG"

        # helm uninstall: the operator goes, the CRD and the runs stay (crds.keep).
        first.uninstall()
        c.wait_for(lambda: not c.pods("rt-one-system", first.selector), 60, "the operator pod to go")
        assert c.kubectl("get", CRD).returncode == 0
        assert c.run(ns, "before")["status"]["phase"] == "Succeeded"
        crd = json.loads(c.kubectl("get", CRD, "-o", "json").stdout)
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

        # A second release, under another name: it adopts the kept CRD and serves runs again.
        second.install()
        crd = json.loads(c.kubectl("get", CRD, "-o", "json").stdout)
        assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "rt-two"
        c.apply(run_manifest("after", dataset="s3://ratatouille/datasets/target", runs=1), ns)
        assert c.wait_phase(ns, "after", ("Succeeded", "Failed"), timeout=90,
                            operator=second)["status"]["phase"] == "Succeeded"
        assert not second.refused(), second.refused()
        # The old run is untouched by the new operator: it stays Succeeded with its Jobs.
        assert c.run(ns, "before")["status"]["phase"] == "Succeeded"
    finally:
        first.uninstall()
        second.uninstall()
        agent.reset()


def _try_install(op: ChartOperator):
    """helm install as ChartOperator.install does it, but returning a refusal instead of raising."""
    op.cluster.namespace(op.namespace)
    return op.cluster.helm("upgrade", "--install", "--take-ownership", op.release, str(CHART), "-n", op.namespace,
                           "-f", str(op._values_file()), check=False)


def test_releases_that_would_watch_the_same_runs_are_refused_and_disjoint_ones_work(k8s_cluster):
    c = k8s_cluster
    agent = c.controller
    agent.reset()
    team_a, team_b = c.namespace("guard-a"), c.namespace("guard-b")
    agent.instant = lambda pod: pod["metadata"]["namespace"] in (team_a, team_b)
    namespaced = {"crds": {"install": False}}
    wide = ChartOperator(c, release="rt-wide", namespace="rt-wide-system")
    a = ChartOperator(c, release="rt-team-a", namespace="rt-team-a-system", values={**namespaced, "watchNamespaces": [team_a]})
    b = ChartOperator(c, release="rt-team-b", namespace="rt-team-b-system", values={**namespaced, "watchNamespaces": [team_b]})
    both = ChartOperator(c, release="rt-both", namespace="rt-both-system",
                         values={**namespaced, "watchNamespaces": ["elsewhere", team_b]})
    try:
        wide.install()
        # A namespaced release beside a cluster-wide one: refused by helm, nothing installed.
        proc = _try_install(a)
        assert proc.returncode != 0
        assert ('another Ratatouille operator (release "rt-wide" in namespace "rt-wide-system") already watches'
                f" every namespace, and this release would watch {team_a}") in proc.stderr, proc.stderr
        assert not c.rest.items("/apis/apps/v1/namespaces/rt-team-a-system/deployments")
        wide.uninstall()

        # Namespaced releases with their own namespaces live side by side, each serving its own.
        a.install()
        b.install()
        c.apply(run_manifest("mine", dataset="s3://ratatouille/datasets/target", runs=1), team_b)
        assert c.wait_phase(team_b, "mine", ("Succeeded", "Failed"), timeout=90,
                            operator=b)["status"]["phase"] == "Succeeded"
        creators = {(e.get("user") or {}).get("username") for e in c.audit()
                    if e.get("verb") == "create" and (e.get("objectRef") or {}).get("resource") == "jobs"
                    and (e.get("objectRef") or {}).get("namespace") == team_b}
        assert creators == {b.service_account}
        assert not a.refused() and not b.refused(), (a.refused(), b.refused())

        # One that overlaps either, or a cluster-wide one, is refused.
        proc = _try_install(both)
        assert proc.returncode != 0 and f"already watches namespaces {team_b}" in proc.stderr, proc.stderr
        proc = _try_install(wide)
        assert proc.returncode != 0 and "this release would watch every namespace" in proc.stderr, proc.stderr
    finally:
        for op in (wide, a, b, both):
            op.installed = True
            op.uninstall()
        agent.reset()
