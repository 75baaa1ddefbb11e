"""The reduced (CI) configuration of benchmarks/domainbed_mini: its mechanics, not an ordering.

One module-scoped run of `run.py --config ci` (about a minute on 2 cores): two RatatouilleRun
manifests (soup and ratatouille groups) executed by `ratatouille run`. The tests then read what
the product wrote to storage and check:
- greedy averaging never ends below the best member on the pooled training-domain validation;
- averaging identical members (`ratatouille average`) returns that member exactly;
- BatchNorm buffers of every fine-tuned network are the foundation's, bit for bit;
- auxiliary images are disjoint from the target images (also under 90-degree rotations);
- the paired design holds: same draws, same linear-probe head, identical foundation members.

A second module-scoped run, `--config v2-ci` (issue 13's configuration in miniature), checks its
recipe (no flip, auxiliary steps >= target steps, fonts disjoint from the foundation's), that
auxiliary-started members differ from their foundation-started twins, and that another seed reuses
the auxiliary pool (no new cache entry, no auxiliary Job).
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


# ---------------------------------------------------------------------------------------------
# v2 (issue 13): related font-rendered auxiliaries, 2 fine-tunings each, a control group, a pool
# shared across seeds. `--config v2-ci`: one related auxiliary (printed) and the control (shapes),
# 4 + 4 + 2 runs of 20 steps on 60 images per domain.

NOTO = Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf")  # fonts-noto-core: the `printed` auxiliary


@pytest.fixture(scope="module")
def bench_v2(tmp_path_factory):
    if not NOTO.exists():
        pytest.skip("v2 renders its auxiliaries from Debian fonts: run benchmarks/domainbed_mini/setup-v2.sh")
    root = tmp_path_factory.mktemp("domainbed_mini_v2")
    cache, results, manifests = root / "cache", root / "results", root / "manifests"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(RUN_PY), "--config", "v2-ci", "--cache", str(cache),
                           "--results", str(results), "--manifests", str(manifests), "--no-snapshot"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "cache": cache, "manifests": manifests,
            "result": json.loads((results / "v2-ci.json").read_text())}


def _aux_entries(cache: Path) -> dict[str, str]:
    """The auxiliary cache: entry -> sha256 of its model file."""
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((cache / "runs" / "cache" / "aux").glob("*/model.safetensors"))}


def test_v2_manifests_follow_the_recipe(bench_v2):
    import yaml

    names = sorted(p.name for p in bench_v2["manifests"].glob("*.yaml"))
    assert names == ["rotated-s0-ctrl.yaml", "rotated-s0-rat.yaml", "rotated-s0-soup.yaml"]
    for name in names:
        spec = yaml.safe_load((bench_v2["manifests"] / name).read_text())["spec"]
        assert spec["augmentation"] == {"horizontalFlip": False}
        assert "headWarmupSteps" not in spec["finetune"]  # the product's 4% of the steps
        assert spec["auxiliaryFinetune"]["steps"] >= spec["finetune"]["steps"]
        for aux in spec.get("auxiliaries", []):
            assert aux["runs"] >= 2 and Path(aux["dataset"]).name != "digits"
    # 2 fine-tunings of printed and of shapes, each trained once
    assert len(_aux_entries(bench_v2["cache"])) == 4
    fonts = bench_v2["result"]["disjointness"]["fonts"]
    assert fonts["disjoint"] is True and fonts["fontFiles"] > 0 and not fonts["sameFileName"]
    assert bench_v2["result"]["disjointness"]["disjoint"] is True


def test_v2_aux_started_members_differ_from_their_foundation_twins(bench_v2):
    cell = bench_v2["result"]["cells"][0]
    soup = cell["soup"]["members"]
    seen = set()
    for group in ("rat", "ctrl"):
        for a, b in zip(soup, cell[group]["members"]):
            assert a["hyperparameters"] == b["hyperparameters"]
            if b["source"] == "foundation":
                assert a["weightsDigest"] == b["weightsDigest"], (group, b["index"])
            else:
                seen.add(b["source"])
                assert a["weightsDigest"] != b["weightsDigest"], (group, b["index"], b["source"])
    assert seen == {"printed-0", "printed-1", "shapes-0", "shapes-1"}
    assert cell["pairing"]["auxMembersDiffer"] is True and cell["pairing"]["ctrlSameLinearProbe"] is True


def test_v2_auxiliary_pool_is_reused_by_another_seed(bench_v2):
    before = _aux_entries(bench_v2["cache"])
    manifest = bench_v2["manifests"] / "rotated-s0-rat.yaml"
    workdir = bench_v2["root"] / "seed1"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RATATOUILLE_TORCH_THREADS="1")
    proc = subprocess.run([str(BIN / "ratatouille"), "run", str(manifest), "--set", "spec.seed=1",
                           "--set", "metadata.name=dbm-v2ci-rotated-s1-rat", "--quiet", "--workdir", str(workdir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _aux_entries(bench_v2["cache"]) == before  # no new entry, no entry retrained
    logs = [p.name for p in (workdir / "logs").iterdir()]
    assert any("target" in n for n in logs) and not any("-aux-" in n for n in logs), logs
    prefix = next((bench_v2["cache"] / "runs" / "default" / "dbm-v2ci-rotated-s1-rat").iterdir())
    sources = [json.loads((prefix / "target" / str(i) / "metrics.json").read_text())["source"] for i in range(4)]
    assert sources == ["foundation", "printed-0", "foundation", "printed-1"]
