"""An operator started before its CRD exists (a namespaced release installed with
crds.install=false, the CRD applied afterwards, as GitOps setups do) serves runs once the CRD is
there, without a restart."""
from __future__ import annotations

import pytest

from tests.operator.harness import ChartOperator, run_manifest

pytest.importorskip("kopf")
pytestmark = pytest.mark.slow

CRD = "crd/ratatouilleruns.ratatouille.dev"


def test_the_crd_applied_after_the_operator_started_is_served(k8s_cluster):
    c = k8s_cluster
    ns = c.namespace("crd-later")
    c.kubectl("delete", CRD, "--ignore-not-found", "--wait=true", "--timeout=120s")
    op = ChartOperator(c, release="rt-later", namespace="rt-later-system",
                       values={"crds": {"install": False}, "watchNamespaces": [ns]})
    c.controller.instant = lambda pod: pod["metadata"]["namespace"] == ns
    try:
        op.install()  # live without the CRD
        assert c.kubectl("get", CRD, check=False).returncode != 0
        c.install_crd()
        c.apply(run_manifest("late-crd", dataset="s3://ratatouille/datasets/target", runs=1), ns)
        run = c.wait_phase(ns, "late-crd", ("Succeeded", "Failed"), timeout=120, operator=op)
        assert run["status"]["phase"] == "Succeeded"
        # no restart was needed: the operator's container never restarted
        assert op._pod()["status"]["containerStatuses"][0]["restartCount"] == 0
        assert not op.refused(), op.refused()
    finally:
        op.uninstall()
        c.controller.reset()
        c.install_crd()
