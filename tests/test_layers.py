"""The layers stay apart: a pure planner, an operator without torch, a trainer without kopf, and
between them a contract both import that imports neither.

The rules are ARCHITECTURE.md's "Layer rules". Checked two ways: the imports written in each
module (AST, every module under the package, functions' imports included), and what importing a
module really pulls into a fresh interpreter. The AST checker also runs on a planted tree, so a
rule that no longer catches anything fails too.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "operator" / "ratatouille_operator"
TRAINER = ROOT / "trainer" / "ratatouille_trainer"
CONTRACT = ROOT / "trainer" / "ratatouille_contract"
SIDES = {"ratatouille_operator", "ratatouille_trainer"}

PURE = ["spec", "validation", "planner", "planning", "manifests"]  # "planning": a package, every module in it
CONTRACT_MODULES = sorted(p.stem for p in CONTRACT.glob("*.py") if p.stem != "__init__")
ML = {"torch", "timm", "torchvision", "safetensors"}
K8S = {"kopf", "kubernetes", "kmock"}
CLOUD = {"boto3", "botocore"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


class Rule(NamedTuple):
    """Modules ``modules`` (None: all; a name that is a folder: every module under it) of package
    folder ``package`` may not import ``forbidden`` (top-level names); with ``stdlib_only`` they
    may import nothing but the standard library and each other (relative imports of other
    modules of the same rule; with ``modules`` None, any module of the package, by either form)."""
    what: str
    package: str                    # folder under the source root, e.g. "ratatouille_operator"
    modules: tuple[str, ...] | None
    forbidden: frozenset[str] = frozenset()
    stdlib_only: bool = False


RULES = [
    Rule("pure operator modules: no Kubernetes client, no ML, no S3", "ratatouille_operator", tuple(PURE),
         frozenset(ML | K8S | CLOUD)),
    Rule("the operator never imports torch or timm", "ratatouille_operator", None, frozenset(ML)),
    Rule("the trainer never imports Kubernetes nor the operator", "ratatouille_trainer", None,
         frozenset(K8S | {"ratatouille_operator"})),
    Rule("pure operator modules reach the trainer only through the contract", "ratatouille_operator",
         tuple(PURE), frozenset({"ratatouille_trainer"})),
    Rule("the contract imports neither the operator nor the trainer", "ratatouille_contract", None,
         frozenset(SIDES)),
    Rule("the contract is standard library only", "ratatouille_contract", None, stdlib_only=True),
]
SOURCE_ROOTS = {"ratatouille_operator": OPERATOR.parent, "ratatouille_trainer": TRAINER.parent,
                "ratatouille_contract": CONTRACT.parent}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level names of absolute imports, first names of relative imports) written in a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    absolute, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                absolute.add(node.module.split(".")[0])
            elif node.level > 0:
                relative |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return absolute, relative


def violations(root: Path, rule: Rule) -> list[str]:
    """Every ``module: imports X`` under ``root/rule.package`` that breaks ``rule``."""
    package = root / rule.package
    if rule.modules is None:
        paths = sorted(package.rglob("*.py"))
    else:
        paths = [p for m in rule.modules for p in _module_paths(package, m)]
    found = []
    for path in paths:
        absolute, relative = imports(path)
        bad = absolute & rule.forbidden
        if rule.stdlib_only and rule.modules is None:   # the whole package: its own modules are fine
            bad |= absolute - STDLIB - {rule.package}
        elif rule.stdlib_only:
            bad |= absolute - STDLIB
            bad |= {f".{r}" for r in relative - set(rule.modules)}
        if bad:
            found.append(f"{path.relative_to(root)}: imports {', '.join(sorted(bad))}")
    return found


def _module_paths(package: Path, module: str) -> list[Path]:
    """The files of one module of a rule: ``<module>.py``, or every module of the subpackage
    ``<module>/`` (a missing module is an error, not a pass)."""
    folder = package / module
    if folder.is_dir():
        return sorted(folder.rglob("*.py"))
    return [package / f"{module}.py"]


def pure_module_names() -> list[str]:
    """The dotted names of every pure operator module, subpackages' modules included."""
    names = []
    for m in PURE:
        folder = OPERATOR / m
        names += [m] if not folder.is_dir() else [
            ".".join((m, *p.relative_to(folder).with_suffix("").parts)).removesuffix(".__init__")
            for p in sorted(folder.rglob("*.py"))]
    return names


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.what)
def test_written_imports_follow_the_layer_rules(rule):
    assert violations(SOURCE_ROOTS[rule.package], rule) == []


def test_the_pure_subpackage_is_covered_module_by_module():
    names = pure_module_names()
    assert {"planner", "planning", "planning.policy", "planning.status"} <= set(names), names


@pytest.mark.parametrize("name", pure_module_names())
def test_pure_modules_load_nothing_heavy(name):
    loaded = loaded_after_import(f"ratatouille_operator.{name}")
    assert not loaded & (ML | K8S | CLOUD | {"ratatouille_trainer"})


def test_the_contract_has_its_modules():
    assert {"jobdesc", "hparams", "layout"} <= set(CONTRACT_MODULES), CONTRACT_MODULES


@pytest.mark.parametrize("name", CONTRACT_MODULES)
def test_contract_modules_load_only_the_standard_library(name):
    loaded = loaded_after_import(f"ratatouille_contract.{name}")
    assert not loaded & (ML | K8S | CLOUD | SIDES)
    # besides the standard library: the contract itself, the interpreter's own start-up modules
    # (site hooks, an editable install's finder)
    other = {m for m in loaded - STDLIB - {"ratatouille_contract", "__main__", "_distutils_hack"}
             if not m.startswith("__editable__")}
    assert other == set(), other


def test_operator_process_loads_no_torch_or_timm():
    # the operator process itself: its main module and what the reconciler touches
    assert not loaded_after_import("ratatouille_operator.main") & ML


# A wrong-way arrow planted for each rule, as a developer might add it (inside a function, in a
# subpackage, relative): the checker must report exactly the planted module.
PLANTED = {
    "pure operator modules: no Kubernetes client, no ML, no S3":
        ("ratatouille_operator/planner.py", "def f():\n    import boto3.session\n"),
    "pure operator modules: no Kubernetes client, no ML, no S3 (a module of a pure subpackage)":
        ("ratatouille_operator/planning/policy.py", "from kubernetes import client\n"),
    "the operator never imports torch or timm":
        ("ratatouille_operator/sub/helper.py", "from timm.models import create_model\n"),
    "the trainer never imports Kubernetes nor the operator":
        ("ratatouille_trainer/stages.py", "from ratatouille_operator import planner\n"),
    "pure operator modules reach the trainer only through the contract":
        ("ratatouille_operator/planning/describe.py", "from ratatouille_trainer import jobdesc\n"),
    "the contract imports neither the operator nor the trainer":
        ("ratatouille_contract/layout.py", "def f():\n    from ratatouille_trainer.storage import join\n"),
    "the contract is standard library only":
        ("ratatouille_contract/sub/jobdesc.py", "from ..layout import MODEL\nimport numpy\n"),
}


def _clean_tree(root: Path) -> None:
    for rule in RULES:
        for module in rule.modules or ("__init__",):
            real = SOURCE_ROOTS[rule.package] / rule.package / module
            path = root / rule.package / (f"{module}/__init__.py" if real.is_dir() else f"{module}.py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("from __future__ import annotations\nimport json\n")


def _rule_of(planted: str) -> Rule:
    return next(r for r in RULES if planted.split(" (")[0] == r.what)


def test_every_rule_has_a_planted_violation():
    assert {_rule_of(p).what for p in PLANTED} == {r.what for r in RULES}


@pytest.mark.parametrize("planted", PLANTED)
def test_checker_catches_a_planted_wrong_way_import(tmp_path, planted):
    rule = _rule_of(planted)
    _clean_tree(tmp_path)
    assert violations(tmp_path, rule) == []
    relpath, source = PLANTED[planted]
    (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relpath).write_text(source)
    found = violations(tmp_path, rule)
    assert len(found) == 1 and found[0].startswith(relpath + ":"), found


def test_no_package_named_operator_shadows_the_standard_library():
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter")
