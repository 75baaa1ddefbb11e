"""The reduced (CI) configuration of benchmarks/domainbed_mini: its mechanics, not an ordering.

One module-scoped run of `run.py --config ci` (about a minute on 2 cores): two RatatouilleRun
manifests (soup and ratatouille groups) executed by `ratatouille run`. The tests then read what
the product wrote to storage and check:
- greedy averaging never ends below the best member on the pooled training-domain validation;
- averaging identical members (`ratatouille average`) returns that member exactly;
- BatchNorm buffers of every fine-tuned network are the foundation's, bit for bit;
- auxiliary images are disjoint from the target images (also under 90-degree rotations);
- the paired design holds: same draws, same linear-probe head, identical foundation members.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "benchmarks" / "domainbed_mini" / "run.py"
BIN = Path(sys.executable).parent
AUXILIARIES = ("glyphs", "rot4", "shapes")

pytestmark = [pytest.mark.slow, pytest.mark.perf]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("domainbed_mini")
    cache, results, manifests = root / "cache", root / "results", root / "manifests"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(RUN_PY), "--config", "ci", "--cache", str(cache),
                           "--results", str(results), "--manifests", str(manifests),
                           "--no-snapshot"],  # test the product code under test, not HEAD's
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((results / "ci.json").read_text())
    return {"root": root, "cache": cache, "results": results, "manifests": manifests, "result": result}


def _prefixes(bench) -> dict[str, Path]:
    out = {}
    for group in ("soup", "rat"):
        base = bench["cache"] / "runs" / "default" / f"dbm-ci-rotated-s0-{group}"
        uids = [p for p in base.iterdir() if p.is_dir()]
        assert len(uids) == 1, uids
        out[group] = uids[0]
    return out


def test_every_method_went_through_ratatouille_run(bench):
    manifests = sorted(p.name for p in bench["manifests"].glob("*.yaml"))
    assert manifests == ["rotated-s0-rat.yaml", "rotated-s0-soup.yaml"]
    for group, prefix in _prefixes(bench).items():
        status = json.loads((prefix / "status.json").read_text())["status"]
        assert status["phase"] == "Succeeded", status
        assert (prefix / "average" / "DONE").exists()
        targets = sorted(int(p.name) for p in (prefix / "target").iterdir() if (p / "DONE").exists())
        assert targets == list(range(4))
        log = (bench["cache"] / "logs" / "ci" / f"dbm-ci-rotated-s0-{group}.log").read_text()
        assert f"RatatouilleRun dbm-ci-rotated-s0-{group} Succeeded" in log
    for aux in AUXILIARIES:  # the ratatouille group's members started from every auxiliary
        sources = {m["source"] for m in bench["result"]["cells"][0]["rat"]["members"]}
        assert f"{aux}-0" in sources


def test_greedy_validation_at_least_best_member(bench):
    for group, prefix in _prefixes(bench).items():
        avg = json.loads((prefix / "average" / "metrics.json").read_text())
        members = avg["membersValAccuracyPooled"]
        assert len(members) == 4
        assert avg["selection"] == "greedy"
        assert avg["valAccuracyPooled"] >= max(members.values()), (group, avg["valAccuracyPooled"], members)
        # the first kept member is the best-ranked one, and every kept step did not lower the score
        kept = [s for s in avg["greedyTrace"] if s["kept"]]
        assert kept and kept[0]["member"] == avg["selected"][0]
        assert all(b["valAccuracy"] >= a["valAccuracy"] for a, b in zip(kept, kept[1:]))


def test_averaging_identical_members_is_the_identity(bench, tmp_path):
    member = _prefixes(bench)["rat"] / "target" / "1" / "model.safetensors"
    out = tmp_path / "avg.safetensors"
    proc = subprocess.run([str(BIN / "ratatouille"), "average", str(out), str(member), str(member), str(member)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(member)), load_file(str(out))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and two different members do not average to either (the check above is not vacuous)
    other = _prefixes(bench)["rat"] / "target" / "2" / "model.safetensors"
    out2 = tmp_path / "avg2.safetensors"
    subprocess.run([str(BIN / "ratatouille"), "average", str(out2), str(member), str(other)], check=True,
                   capture_output=True, timeout=120)
    c = load_file(str(out2))
    assert any(not torch.equal(c[k], a[k]) for k in a if k.startswith("featurizer.") and a[k].is_floating_point())


def test_bn_buffers_unchanged_by_fine_tuning(bench):
    foundation = load_file(str(REPO / bench["result"]["foundation"]["path"])
                           if not Path(bench["result"]["foundation"]["path"]).is_absolute()
                           else bench["result"]["foundation"]["path"])
    bn = [k for k in foundation if k.endswith(("running_mean", "running_var"))]
    assert len(bn) >= 4
    weights = [k for k in foundation if k.endswith(".weight") and foundation[k].dim() == 4]
    files = []
    for prefix in _prefixes(bench).values():
        files += sorted((prefix / "target").glob("*/model.safetensors"))
        files.append(prefix / "average" / "model.safetensors")
    files += sorted((bench["cache"] / "runs" / "cache" / "aux").glob("*/model.safetensors"))
    assert len(files) == 4 + 1 + 4 + 1 + 3
    moved = 0
    for f in files:
        st = load_file(str(f))
        for k in bn:
            assert torch.equal(st["featurizer." + k], foundation[k]), (f, k)
        moved += any(not torch.equal(st["featurizer." + k], foundation[k]) for k in weights)
    assert moved == len(files)  # every network did fine-tune its convolutions


def _gray_hashes(paths, rotations=(0,)) -> set[bytes]:
    out = set()
    for f in paths:
        with Image.open(f) as im:
            a = np.asarray(im.convert("L"))
        for k in rotations:
            out.add(hashlib.sha256(np.ascontiguousarray(np.rot90(a, k)).tobytes()).digest())
    return out


def test_auxiliary_and_target_images_disjoint(bench):
    data = REPO / bench["result"]["data"] if not Path(bench["result"]["data"]).is_absolute() else Path(bench["result"]["data"])
    target_files = sorted((data / "digits").glob("*/*/*.png"))
    assert len(target_files) == 4 * 100
    target = _gray_hashes(target_files, rotations=(0, 1, 2, 3))
    for aux in AUXILIARIES:
        aux_files = sorted((data / aux).glob("*/*/*.png"))
        assert aux_files
        assert not (_gray_hashes(aux_files) & target), aux
    # the detector does see a rotated copy of a target image
    with Image.open(target_files[7]) as im:
        rotated = np.rot90(np.asarray(im.convert("L")), 3)
    assert hashlib.sha256(np.ascontiguousarray(rotated).tobytes()).digest() in target
    assert bench["result"]["disjointness"]["disjoint"] is True


def test_paired_design_and_uniform_recomputation(bench):
    cell = bench["result"]["cells"][0]
    assert cell["pairing"] == {"sameHyperparameters": True, "sameLinearProbe": True,
                               "foundationMembersIdentical": True}
    assert {m["source"] for m in cell["soup"]["members"]} == {"foundation"}
    # the uniform average recomputed by the benchmark is the one the product's diagnostic scored
    for group in ("soup", "rat"):
        g = cell[group]
        assert g["uniform"]["valPooled"] == pytest.approx(g["diagnostics"]["uniform"]["valAccuracy"], abs=1e-9)
        assert len(g["curve"]) == 4 and g["curve"][-1]["test"] == g["uniform"]["test"]
        assert g["bnBuffersUnchanged"] is True
    assert (bench["results"] / "ci.png").stat().st_size > 10_000
