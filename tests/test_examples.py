"""Every manifest in crds/examples/ runs end to end through `ratatouille run` (shrunk), and the
reference manifest (the paper's full-scale protocol) validates."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))
SHRINK = [
    "spec.linearProbe.steps=6", "spec.auxiliaryFinetune.steps=6", "spec.finetune.steps=6",
    "spec.finetune.batchSize=4", "spec.linearProbe.batchSize=8", "spec.auxiliaryFinetune.batchSize=8",
    "spec.finetune.headWarmupSteps=2", "spec.finetune.evalEvery=3", "spec.finetune.runs=3",
    "spec.failurePolicy.minSucceeded=2", "spec.parallelism=2",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A small copy of the demo world: `.demo/data` plus the shipped foundation."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "ratatouille_trainer.demo_data", "--out", str(root / ".demo" / "data"),
                    "--data-only", "--per-domain", "30"], check=True, capture_output=True, timeout=300)
    (root / "crds" / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "crds/examples/quickstart-foundation.safetensors", root / "crds/examples/")
    return root


def run_example(path: Path, cwd: Path, extra: list[str], env: dict) -> subprocess.CompletedProcess:
    sets = [a for s in SHRINK + extra for a in ("--set", s)]
    return subprocess.run([str(BIN / "ratatouille"), "run", str(path), *sets, "--workdir", str(cwd / "work")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES} == {"quickstart.yaml", "operator-demo.yaml"}


@pytest.mark.slow
def test_quickstart_example_runs(demo_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = run_example(ROOT / "crds/examples/quickstart.yaml", demo_dir,
                       [f"spec.storage.uri={(tmp_path / 'runs').as_uri()}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "Succeeded" in proc.stdout and "test:rotated" in proc.stdout


@pytest.mark.slow
def test_operator_demo_example_runs_against_s3(demo_dir, tmp_path, moto_server):
    import boto3

    from tests.cluster.s3 import upload_demo_assets

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    if "ratatouille" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="ratatouille")
    uploaded = upload_demo_assets(s3, demo_dir / ".demo" / "data",
                                  foundation=demo_dir / "crds/examples/quickstart-foundation.safetensors")
    assert "s3://ratatouille/datasets/digits" in uploaded
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # moto fixture put dummy AWS keys in os.environ
    proc = run_example(ROOT / "crds/examples/operator-demo.yaml", tmp_path,
                       [f"spec.storage.endpoint={moto_server}"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "s3://ratatouille/runs/default/operator-demo/" in proc.stdout
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ratatouille", Prefix="runs/default/operator-demo/")["Contents"]]
    assert any(k.endswith("average/DONE") for k in keys) and any(k.endswith("average/lineage.json") for k in keys)


def test_reference_manifest_validates():
    proc = subprocess.run([str(BIN / "ratatouille"), "validate", str(ROOT / "crds/reference/full.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


PAPER = sorted((ROOT / "crds" / "examples" / "paper").glob("*.yaml"))
PAPER_DOMAINS = {"pacs": 4, "vlcs": 4, "officehome": 4, "terraincognita": 4, "domainnet": 6}


def test_paper_recipes_validate_and_plan_as_the_paper_runs_them():
    """One RatatouilleRun per DomainBed dataset (docs/algorithm.md): ResNet-50 at 224, the other four
    datasets as auxiliaries, 20 target runs round-robin over 5 initializations, 5000 steps
    (15000 on DomainNet), prepared datasets; `ratatouille plan` shows the whole graph."""
    import yaml

    from ratatouille_operator import planner as P
    from ratatouille_operator.validation import validate_manifest

    assert {p.stem for p in PAPER} == set(PAPER_DOMAINS)
    datasets = {yaml.safe_load(p.read_text())["spec"]["target"]["dataset"] for p in PAPER}
    for path in PAPER:
        run = validate_manifest(yaml.safe_load(path.read_text()))
        spec = run.spec
        assert (spec.foundation.model, spec.foundation.input_size) == ("resnet50", 224)
        steps = 15000 if path.stem == "domainnet" else 5000
        assert spec.finetune.steps == spec.linear_probe.steps == steps and spec.finetune.batch_size == 32
        assert spec.finetune.runs == 20 and spec.include_foundation and spec.data_preparation.enabled
        assert {a.dataset for a in spec.auxiliaries} == datasets - {spec.target.dataset}
        hp = spec.finetune.hyperparameters
        assert hp["lr"].choices == ("1e-5", "3e-5", "5e-5") and hp["dropout"].choices == ("0", "0.1", "0.5")
        assert hp["weightDecay"].choices == ("1e-4", "1e-6")
        ref = P.RunRef(namespace="ml", name=run.name, uid="uid")
        graph = P.job_graph(spec, ref)
        stages = [n["stage"] for n in graph]
        assert stages.count("prepare") == 5 and stages.count("aux") == 4 and stages.count("target") == 20
        sources = [n["source"] for n in graph if n["stage"] == "target"]
        assert all(sources.count(s) == 4 for s in set(sources)) and len(set(sources)) == 5
        proc = subprocess.run([str(BIN / "ratatouille"), "plan", str(path), "-o", "json"],
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert proc.returncode == 0, proc.stderr
