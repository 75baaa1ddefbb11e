"""Fixtures for the operator tests that drive the Kubernetes adapter (Reconciler) in-process
against the upstream API server: `k8s`, a small object client confined to a fresh namespace per
test, and `api`, a kubernetes ApiClient with the admin's kubeconfig, as a user has it."""
from __future__ import annotations

import itertools
import shlex
from typing import Any, Callable

import pytest

from tests.cluster.controlplane import path_for
from tests.cluster.nodeagent import matches

_counter = itertools.count()


class K8s:
    """create/get/list/patch/delete objects as dicts in this test's namespaces. A namespace the
    test names ("default", "other") is mapped to one of its own, created on first use, so tests
    on the shared cluster never see each other's objects. Job pods wait on a gate (the node
    agent's hold hook) until the test completes or fails them."""

    def __init__(self, cluster, prefix: str):
        self.cluster = cluster
        self.rest = cluster.rest
        self.prefix = prefix
        self.created: list[str] = []
        self._audit_start = len(cluster.audit())

    def ns(self, name: str | None = "default") -> str:
        real = f"{self.prefix}-{name or 'default'}"
        if real not in self.created:
            self.cluster.namespace(real)
            self.created.append(real)
        return real

    def create(self, kind: str, body: dict, namespace: str | None = "default") -> dict:
        return self.rest.create(path_for(kind, self.ns(namespace)), body)

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        return self.rest.get(path_for(kind, self.ns(namespace), name))

    def list(self, kind: str, namespace: str | None = "default", labels: dict | None = None) -> list[dict]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else {}
        items = self.rest.items(path_for(kind, self.ns(namespace)), **query)
        return sorted(items, key=lambda o: int(o["metadata"]["resourceVersion"]))  # creation order

    def patch(self, kind: str, namespace: str | None, name: str, body: dict) -> dict:
        return self.rest.merge_patch(path_for(kind, self.ns(namespace), name), body)

    def count(self, verb: str, kind: str, subresource: str | None = None) -> int:
        """Requests of this verb on this resource in the test's namespaces, from the audit log
        (not counting this client's own)."""
        resource = kind.split("/")[-1]
        n = 0
        for e in self.cluster.audit()[self._audit_start:]:
            ref = e.get("objectRef") or {}
            if (e.get("verb") == verb and e.get("userAgent") != "ratatouille-tests" and ref.get("resource") == resource
                    and ref.get("subresource") == subresource and ref.get("namespace") in self.created):
                n += 1
        return n

    def finish_job(self, name: str, namespace: str = "default", *, message: str | None = None,
                   fail: bool = False, timeout: float = 60) -> dict:
        """Let the Job's held pod end (exit 0, or 1 with fail), optionally writing a termination
        message, and wait for the real Job controller to mark the Job finished."""
        ns = self.ns(namespace)
        agent = self.cluster.controller
        script = f'printf %s {shlex.quote(message or "")} > "$RATATOUILLE_TERMINATION_LOG"; exit {1 if fail else 0}\n'
        mine = lambda pod: pod["metadata"]["namespace"] == ns and matches(name, pod)  # noqa: E731
        self.cluster.wait_for(lambda: agent.release(mine, run=script), timeout, f"a held pod of {ns}/{name}")
        ctype = "Failed" if fail else "Complete"

        def finished():
            job = self.get("batch/v1/jobs", namespace, name)
            return job if any(c["type"] == ctype and c["status"] == "True"
                              for c in (job.get("status") or {}).get("conditions") or []) else None
        return self.cluster.wait_for(finished, timeout, f"Job {ns}/{name} {ctype}")

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1) -> Any:
        return self.cluster.wait_for(predicate, timeout, "a condition", interval=interval)


@pytest.fixture()
def k8s(k8s_cluster, request):
    prefix = f"t{next(_counter)}-" + request.node.name.replace("_", "-")[5:30].strip("-").lower()
    k8s_cluster.install_crd()
    client = K8s(k8s_cluster, prefix.strip("-"))
    agent = k8s_cluster.controller
    held = lambda pod: pod["metadata"]["namespace"].startswith(client.prefix + "-")  # noqa: E731
    agent.hold = held
    agent.instant = held  # a held pod runs no trainer: the test ends it with finish_job()
    try:
        yield client
    finally:
        agent.reset()
        agent.release(held)
        for ns in client.created:
            k8s_cluster.rest.delete(f"/api/v1/namespaces/{ns}")


@pytest.fixture()
def api(k8s_cluster):
    """A kubernetes ApiClient for the control plane (through the admin's kubeconfig file)."""
    return k8s_cluster.cp.api_client()
