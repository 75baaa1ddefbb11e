"""Fixtures shared by the operator tests that talk to the emulated Kubernetes API directly."""
from __future__ import annotations

import pytest


@pytest.fixture()
def k8s():
    """The kmock-based emulator serving the project's CRD, on loopback."""
    pytest.importorskip("kmock")
    from ratatouille_operator.emulator import Emulator
    from tests.operator.harness import CRD

    with Emulator(crds=[CRD]) as emulator:
        yield emulator


@pytest.fixture()
def api(k8s, tmp_path):
    """A kubernetes ApiClient for the emulator (through a kubeconfig file, as a user has)."""
    kubernetes = pytest.importorskip("kubernetes")
    path = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    return kubernetes.config.new_client_from_config(config_file=str(path))
