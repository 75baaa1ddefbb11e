"""The layers stay apart: a pure planner, an operator without torch, a trainer without kopf.

Checked two ways: the imports written in each module (AST), and what importing a module really
pulls into a fresh interpreter.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "operator" / "ratatouille_operator"
TRAINER = ROOT / "trainer" / "ratatouille_trainer"

PURE = ["spec", "validation", "planner", "manifests"]
PURE_TRAINER = ["jobdesc", "hparams"]
ML = {"torch", "timm", "torchvision", "safetensors"}
K8S = {"kopf", "kubernetes", "kmock"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_write_no_forbidden_imports(name):
    roots = imported_roots(OPERATOR / f"{name}.py")
    assert not roots & (ML | K8S | {"boto3", "botocore"}), roots & (ML | K8S | {"boto3"})


@pytest.mark.parametrize("name", PURE)
def test_pure_modules_load_nothing_heavy(name):
    loaded = loaded_after_import(f"ratatouille_operator.{name}")
    assert not loaded & (ML | K8S | {"boto3", "botocore"})


@pytest.mark.parametrize("name", PURE_TRAINER)
def test_trainer_contract_modules_are_pure(name):
    assert not loaded_after_import(f"ratatouille_trainer.{name}") & (ML | K8S | {"boto3"})


def test_operator_never_imports_torch_or_timm():
    for path in OPERATOR.glob("*.py"):
        assert not imported_roots(path) & ML, f"{path.name} imports {imported_roots(path) & ML}"
    # the operator process itself: its main module and what the reconciler touches
    assert not loaded_after_import("ratatouille_operator.main") & ML


def test_trainer_never_imports_kubernetes():
    for path in TRAINER.glob("*.py"):
        assert not imported_roots(path) & K8S, f"{path.name} imports {imported_roots(path) & K8S}"


def test_no_package_named_operator_shadows_the_standard_library():
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter")
