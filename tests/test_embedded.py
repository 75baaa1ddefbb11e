"""Embedded mode end to end: `ratatouille run | validate | plan` as a user runs them.

Real trainer processes on tiny image data written by the tests; storage is a local folder.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.trainer.util import write_dataset, write_foundation

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
INVALID = sorted((ROOT / "tests" / "operator" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))

# Shrinks any example to seconds: tiny budgets, never the structure of the run.
SHRINK = [
    "spec.linearProbe.steps=6", "spec.linearProbe.batchSize=4",
    "spec.auxiliaryFinetune.steps=6", "spec.auxiliaryFinetune.batchSize=4",
    "spec.finetune.steps=6", "spec.finetune.batchSize=4", "spec.finetune.headWarmupSteps=2",
    "spec.finetune.evalEvery=3", "spec.parallelism=2",
]


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RATATOUILLE_DEVICE="cpu")
    return e


def ratatouille(*args, cwd=ROOT, timeout=600, check=False) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ratatouille"), *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ratatouille {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny target (3 domains), one auxiliary dataset, a foundation and a recycled fine-tuning."""
    root = tmp_path_factory.mktemp("world")
    write_dataset(root / "target", domains=("d0", "d1", "d2"), per_class=8, seed=1)
    write_dataset(root / "aux", domains=("a0", "a1"), classes=("p", "q"), per_class=8, seed=2)
    write_foundation(root / "foundation.safetensors", with_head=False)
    write_foundation(root / "community.safetensors", seed=7, prefix="featurizer.", with_head=False)
    return root


def manifest(world: Path, storage: Path, name="tiny", **spec_overrides) -> dict:
    spec = {
        "foundation": {"model": "test_resnet", "weights": str(world / "foundation.safetensors"), "inputSize": 32},
        "target": {"dataset": str(world / "target"), "testDomains": ["d2"]},
        "auxiliaries": [
            {"name": "shapes", "dataset": str(world / "aux")},
            {"name": "community", "weights": str(world / "community.safetensors")},
        ],
        "linearProbe": {"steps": 6, "batchSize": 4, "lr": "1e-2"},
        "auxiliaryFinetune": {"steps": 6, "batchSize": 4, "lr": "1e-3"},
        "finetune": {"runs": 4, "steps": 8, "batchSize": 4, "headWarmupSteps": 2, "evalEvery": 4},
        "averaging": {"selection": "greedy"},
        "storage": {"uri": storage.as_uri()},
        "parallelism": 2,
        "failurePolicy": {"minSucceeded": 2},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
            "metadata": {"name": name}, "spec": spec}


def write_manifest(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def run_status(storage: Path) -> dict:
    (status_file,) = storage.glob("default/*/*/status.json")
    return json.loads(status_file.read_text())


def load_model(uri: str):
    from safetensors.torch import load_file

    return load_file(uri.removeprefix("file://"))


# -- validate and plan --------------------------------------------------------------------------
@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_exits_2_with_one_line_naming_the_field(path):
    expected_field = path.read_text().splitlines()[0].split("expect:", 1)[1].strip()
    proc = ratatouille("validate", path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected_field in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    # `run` refuses it the same way, before anything runs
    proc = ratatouille("run", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and expected_field in proc.stderr


def test_at_least_ten_invalid_manifests():
    assert len(INVALID) >= 10


def test_missing_manifest_and_bad_override_exit_2():
    proc = ratatouille("run", "no-such-file.yaml")
    assert proc.returncode == 2 and "no-such-file.yaml" in proc.stderr and "Traceback" not in proc.stderr
    proc = ratatouille("validate", ROOT / "crds/examples/quickstart.yaml", "--set", "spec.finetune.runs=-1")
    assert proc.returncode == 2 and "spec.finetune.runs" in proc.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_validate(path):
    proc = ratatouille("validate", path)
    assert proc.returncode == 0, proc.stderr
    assert "valid RatatouilleRun" in proc.stdout


def test_plan_prints_the_job_graph(world, tmp_path):
    path = write_manifest(tmp_path / "run.yaml", manifest(world, tmp_path / "store"))
    proc = ratatouille("plan", path, "-o", "json", check=True)
    graph = json.loads(proc.stdout)
    stages = [(n["stage"], n["member"]) for n in graph if n["job"]]
    # one trained auxiliary (the recycled one is listed but needs no Job), the LP, 4 targets, the average
    assert stages.count(("aux", "shapes-0")) == 1
    assert not any(m.startswith("community") for s, m in stages if s == "aux")
    assert any(n["member"] == "community" and not n["job"] for n in graph)
    assert sum(1 for s, _ in stages if s == "target") == 4
    assert stages[-1] == ("average", "0")
    assert not (tmp_path / "store").exists(), "plan must not run or write anything"


# -- run -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_succeeds_with_results_table_and_lineage(world, tmp_path):
    store = tmp_path / "store"
    path = write_manifest(tmp_path / "run.yaml", manifest(world, store))
    proc = ratatouille("run", path, "--workdir", tmp_path / "work", check=True)
    assert "Succeeded" in proc.stdout
    assert "averaged (greedy)" in proc.stdout and "best single" in proc.stdout and "test:d2" in proc.stdout
    # the averaging diagnostics under the table (gain, ensemble, per-source table)
    assert "gain " in proc.stdout and "functional ensemble val" in proc.stdout and "init source" in proc.stdout
    status = run_status(store)["status"]
    assert status["phase"] == "Succeeded"
    result = status["result"]
    model = Path(result["model"].removeprefix("file://"))
    prefix = model.parent.parent
    lineage = json.loads((model.parent / "lineage.json").read_text())
    assert (model.parent / "DONE").exists() and (model.parent / "model-card.md").exists()
    assert "## Averaging diagnostics" in (model.parent / "model-card.md").read_text()
    assert {"uniform", "sources", "ensemble", "convergence"} <= set(result["diagnostics"])
    # every target member is in the lineage with its source; the recycled featurizer was used
    sources = {m["member"]: m["source"] for m in lineage["members"]}
    assert len(sources) == 4 and "community" in set(sources.values()) and "foundation" in set(sources.values())
    assert 1 <= result["members"] <= 4
    # greedy never does worse on validation than its best single member
    assert float(result["valAccuracy"]) >= float(result["bestSingle"]["valAccuracy"]) - 1e-9
    # re-running the same manifest finds everything done and starts nothing
    again = ratatouille("run", path, "--workdir", tmp_path / "work2", check=True)
    assert "started" not in again.stdout and "Succeeded" in again.stdout
    assert sorted(p.name for p in (prefix / "target").iterdir()) == ["0", "1", "2", "3"]


@pytest.mark.slow
def test_second_run_reuses_the_auxiliary_cache_until_its_data_changes(world, tmp_path):
    store = tmp_path / "store"
    aux = tmp_path / "aux"
    shutil.copytree(world / "aux", aux)
    auxiliaries = [{"name": "shapes", "dataset": str(aux)}]
    finetune = {"steps": 4, "batchSize": 4, "headWarmupSteps": 1, "evalEvery": 2}
    first = write_manifest(tmp_path / "a.yaml", manifest(world, store, name="first", auxiliaries=auxiliaries,
                                                         finetune={"runs": 2, **finetune},
                                                         failurePolicy={"minSucceeded": 1}))
    out = ratatouille("run", first, "--workdir", tmp_path / "w1", check=True).stdout
    assert "started  aux/shapes-0" in out
    second = manifest(world, store, name="second", seed=0, auxiliaries=auxiliaries,
                      finetune={"runs": 3, **finetune}, failurePolicy={"minSucceeded": 1})
    out = ratatouille("run", write_manifest(tmp_path / "b.yaml", second), "--workdir", tmp_path / "w2", check=True).stdout
    assert "aux/shapes-0" not in out, "the auxiliary fine-tuning must come from the cache"
    assert "Succeeded" in out
    # The same URI with other content: the cached fine-tuning is not reused (issue 12).
    one = next(iter(sorted(aux.glob("a0/p/*"))))
    shutil.copy(one, one.with_name("added" + one.suffix))
    second["metadata"]["name"] = "third"
    out = ratatouille("run", write_manifest(tmp_path / "c.yaml", second), "--workdir", tmp_path / "w3", check=True).stdout
    assert "started  aux/shapes-0" in out and "Succeeded" in out
    retrained = [ln for ln in out.splitlines() if "AuxiliaryRetrained: aux/shapes-0" in ln]
    assert len(retrained) == 1 and "changed since it was trained" in retrained[0], out


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_members_and_matches_uninterrupted(world, tmp_path):
    doc = manifest(world, tmp_path / "straight")
    doc["spec"]["averaging"] = {"selection": "uniform"}
    doc["spec"]["parallelism"] = 1  # one member at a time: a deterministic kill point
    straight = write_manifest(tmp_path / "straight.yaml", doc)
    ratatouille("run", straight, "--workdir", tmp_path / "w0", check=True)
    reference = run_status(tmp_path / "straight")["status"]["result"]

    doc["spec"]["storage"]["uri"] = (tmp_path / "killed").as_uri()
    killed = write_manifest(tmp_path / "killed.yaml", doc)
    proc = subprocess.Popen([str(BIN / "ratatouille"), "run", str(killed), "--workdir", str(tmp_path / "w1")],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done_before: set[str] = set()
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if "done     target/" in line:
            done_before.add(line.split("done", 1)[1].strip())
        if len(done_before) >= 2:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up
            break
        assert time.monotonic() < deadline, "run never got two targets done"
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)  # the trainer children die with it (PR_SET_PDEATHSIG)

    resumed = ratatouille("run", killed, "--workdir", tmp_path / "w2", check=True).stdout
    started = {line.split("started", 1)[1].split("(")[0].strip() for line in resumed.splitlines() if "started  " in line}
    assert done_before and not (done_before & started), f"finished members were redone: {done_before & started}"
    assert "started  aux/" not in resumed and "started  linear-probe" not in resumed
    result = run_status(tmp_path / "killed")["status"]["result"]
    assert result["members"] == reference["members"] == 4
    a, b = load_model(reference["model"]), load_model(result["model"])
    assert a.keys() == b.keys()
    import torch
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-5), key


@pytest.mark.slow
def test_failing_member_is_retried_then_tolerated(world, tmp_path):
    """A member whose dataset cannot be read fails every attempt; minSucceeded still holds."""
    doc = manifest(world, tmp_path / "store")
    doc["spec"]["failurePolicy"] = {"maxAttempts": 2, "minSucceeded": 5, "retryBackoffSeconds": 0}
    doc["spec"]["finetune"]["runs"] = 4
    path = write_manifest(tmp_path / "run.yaml", doc)
    # The target's test domain exists but one training domain is empty: the data refuses it, so
    # the LP fails every attempt and the run fails with the reason named.
    broken = tmp_path / "broken"
    write_dataset(broken, domains=("d0", "d1", "d2"), per_class=4, seed=3)
    for f in (broken / "d1").rglob("*.png"):
        f.unlink()
    doc["spec"]["target"]["dataset"] = str(broken)
    doc["spec"]["failurePolicy"]["minSucceeded"] = 2
    write_manifest(path, doc)
    proc = ratatouille("run", path, "--workdir", tmp_path / "w")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "attempt 2" in proc.stdout or "(attempt 2)" in proc.stdout
    assert "LinearProbeFailed" in proc.stdout
    assert "d1" in proc.stdout  # the failing member's last log lines name the empty domain
