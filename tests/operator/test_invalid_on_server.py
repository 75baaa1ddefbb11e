"""Every manifest in tests/operator/invalid/ is refused by plain `kubectl apply` against the
upstream API server (OpenAPI schema, patterns, maxima and the CRD's CEL rules), with a message
that names the field its `# expect:` line names — the same field `ratatouille validate` names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("kubernetes")

INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))


def expected_field(path: Path) -> str:
    m = re.search(r"^# expect: (\S+)", path.read_text(), re.M)
    assert m, f"{path.name} has no '# expect:' line"
    return m.group(1)


@pytest.fixture(scope="module")
def ns(k8s_cluster):
    k8s_cluster.install_crd()
    name = k8s_cluster.namespace("invalid-manifests")
    yield name
    k8s_cluster.rest.delete(f"/api/v1/namespaces/{name}")


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_kubectl_apply_refuses_it_naming_the_field(k8s_cluster, ns, path):
    proc = k8s_cluster.kubectl("apply", "-n", ns, "-f", str(path), check=False)
    assert proc.returncode != 0, f"the API server accepted {path.name}: {proc.stdout}"
    field = expected_field(path)
    words = {field, field.split(".")[-1], re.sub(r"\[\d+\]", "", field).split(".")[-1]}
    assert any(w and w in proc.stderr for w in words) or field in ("apiVersion", "kind", "manifest"), (
        f"{path.name}: expected the error to name {field}: {proc.stderr.strip()}")


ROOT = Path(__file__).resolve().parents[2]
# quickstart.yaml is for `ratatouille run` on one machine: its storage is a local path, which a
# cluster refuses (storage.uri must be s3:// or file://).
EXAMPLES = [p for p in sorted((ROOT / "crds" / "examples").rglob("*.yaml")) if p.name != "quickstart.yaml"] + \
    [ROOT / "crds" / "reference" / "full.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_is_accepted_by_the_server(k8s_cluster, ns, path):
    """The CEL rules refuse nothing valid: every shipped example passes a server-side dry run
    (in the test's namespace instead of the one it names)."""
    import json

    import yaml

    doc = yaml.safe_load(path.read_text())
    doc["metadata"].pop("namespace", None)
    proc = k8s_cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode == 0, f"{path.name}: {proc.stderr.strip()}"
