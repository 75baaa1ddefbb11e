"""One CRD file is the source (crds/ratatouilleruns.ratatouille.dev.yaml); the copies the Python
package and the Helm chart need are made by `make crds` and must not drift from it."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "crds" / "ratatouilleruns.ratatouille.dev.yaml"
COPIES = [ROOT / "operator" / "ratatouille_operator" / "crd.yaml",
          ROOT / "charts" / "ratatouille" / "files" / "ratatouilleruns.ratatouille.dev.yaml"]


@pytest.mark.parametrize("copy", COPIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_copy_is_the_source(copy):
    assert copy.read_bytes() == SOURCE.read_bytes(), f"{copy.relative_to(ROOT)} differs from {SOURCE.name}: run `make crds`"


def test_make_crds_writes_the_copies(tmp_path):
    """`make crds` in a scratch tree turns a stale copy back into the source."""
    for rel in ("Makefile", SOURCE.relative_to(ROOT), *(c.relative_to(ROOT) for c in COPIES)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes((ROOT / rel).read_bytes())
    stale = tmp_path / COPIES[1].relative_to(ROOT)
    stale.write_text("stale\n")
    subprocess.run(["make", "-s", "crds"], cwd=tmp_path, check=True, capture_output=True)
    assert all((tmp_path / c.relative_to(ROOT)).read_bytes() == SOURCE.read_bytes() for c in COPIES)
