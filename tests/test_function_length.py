"""No product function longer than 60 lines, except those listed here with their length today.

Walks the product packages with `ast` (functions, methods and nested functions, each named by
its path and dotted qualified name; a function's length runs from its `def` to its last line).
The allowlist can only shrink: a listed function that grew, is gone, or is now 60 lines or
shorter fails the test, so the list stays true (lower its number, or drop it, as it is split).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("operator/ratatouille_operator", "trainer/ratatouille_trainer", "trainer/ratatouille_contract")
LIMIT = 60

#: "<path>::<qualified name>": its length when it was listed (longest first).
ALLOWED = {
    "trainer/ratatouille_trainer/data.py::augment_batch": 63,
    "trainer/ratatouille_trainer/prepared.py::prepare_dataset": 63,
    "trainer/ratatouille_trainer/prepared.py::load_prepared": 61,
}


def function_lengths(root: Path, packages=PACKAGES) -> dict[str, int]:
    """`<path>::<qualified name>` -> lines, for every function under the packages."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[f"{rel}::{name}"] = child.end_lineno - child.lineno + 1
                walk(child, rel, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, rel, prefix + child.name + ".")
            else:
                walk(child, rel, prefix)

    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            walk(ast.parse(path.read_text(), filename=rel), rel, "")
    return out


def problems(lengths: dict[str, int], allowed: dict[str, int], limit: int = LIMIT) -> list[str]:
    found = [f"{name}: {n} lines (> {limit}): split it" for name, n in lengths.items()
             if n > limit and name not in allowed]
    for name, was in allowed.items():
        n = lengths.get(name)
        if n is None:
            found.append(f"{name}: listed but gone: drop it from ALLOWED")
        elif n <= limit:
            found.append(f"{name}: {n} lines now: drop it from ALLOWED")
        elif n > was:
            found.append(f"{name}: grew from {was} to {n} lines: split it")
    return sorted(found)


def test_no_product_function_is_longer_than_the_limit():
    assert problems(function_lengths(ROOT), ALLOWED) == []


@pytest.mark.parametrize("lengths, expected", [
    ({"a.py::f": 60, "long.py::g": 80}, []),
    ({"a.py::f": 61, "long.py::g": 80}, ["a.py::f: 61 lines (> 60): split it"]),
    ({"long.py::g": 79}, []),                                                 # shrank, still long: fine
    ({"long.py::g": 81}, ["long.py::g: grew from 80 to 81 lines: split it"]),
    ({"long.py::g": 60}, ["long.py::g: 60 lines now: drop it from ALLOWED"]),
    ({}, ["long.py::g: listed but gone: drop it from ALLOWED"]),
])
def test_the_checker(lengths, expected):
    assert problems(lengths, {"long.py::g": 80}) == expected


def test_lengths_are_measured_from_def_to_last_line(tmp_path):
    src = ("class C:\n    def m(self):\n        def inner():\n            return 1\n        return inner\n\n\n"
           "async def f():\n    pass\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(src)
    assert function_lengths(tmp_path, ("pkg",)) == {
        "pkg/mod.py::C.m": 4, "pkg/mod.py::C.m.inner": 2, "pkg/mod.py::f": 2}
