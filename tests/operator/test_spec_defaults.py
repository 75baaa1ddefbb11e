"""Issue 15, one source per fact: spec defaults live in the CRD schema only. The parser reads a
defaulted body and restates none, and the README's field table states the CRD's defaults."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ratatouille_operator import schema as S
from ratatouille_operator.spec import RunSpec

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"foundation": {"model": "resnet18"},
           "target": {"dataset": "s3://d/office", "testDomains": ["art"]},
           "auxiliaries": [{"name": "pacs", "dataset": "s3://d/pacs"}],
           "storage": {"uri": "s3://b/runs"}}


def _crd_default(path: str):
    node = S.spec_schema()
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node["default"]


@pytest.mark.parametrize("path, read", [
    ("finetune.runs", lambda s: s.finetune.runs),
    ("finetune.steps", lambda s: s.finetune.steps),
    ("finetune.evalEvery", lambda s: s.finetune.eval_every),
    ("linearProbe.steps", lambda s: s.linear_probe.steps),
    ("auxiliaryFinetune.batchSize", lambda s: s.auxiliary_finetune.batch_size),
    ("foundation.inputSize", lambda s: s.foundation.input_size),
    ("parallelism", lambda s: s.parallelism),
    ("failurePolicy.maxAttempts", lambda s: s.failure_policy.max_attempts),
    ("failurePolicy.podStartTimeoutSeconds", lambda s: s.failure_policy.pod_start_timeout_seconds),
    ("auxiliaries.[].runs", lambda s: s.auxiliaries[0].runs),
])
def test_the_parser_takes_every_default_from_the_crd(monkeypatch, path, read):
    """Change a default in the CRD and the parsed spec follows it: nothing restates it."""
    changed = S.spec_schema()
    node = changed
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    assert read(RunSpec.from_dict(MINIMAL)) == node["default"]
    node["default"] = node["default"] + 3
    monkeypatch.setattr(S, "_spec_schema", lambda: changed)
    assert read(RunSpec.from_dict(MINIMAL)) == node["default"]


def test_the_parser_names_a_field_the_crd_does_not_default():
    from ratatouille_operator.spec import SpecError

    with pytest.raises(SpecError) as info:
        RunSpec.from_dict({k: v for k, v in MINIMAL.items() if k != "storage"})
    assert info.value.field == "spec.storage"


# -- the README's table of fields ---------------------------------------------------------------
ROW = re.compile(r"^\| (`[^|]+`(?: / `?\.[\w]+`?)*) \| ([^|]+) \|")


def _readme_defaults() -> dict[str, str]:
    """field path -> default as the README's table writes it, for rows that give one default per
    field (``a.b`` / ``.c`` fields, ``x / y`` defaults)."""
    out = {}
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| field | default | meaning | maximum |")
    end = lines.index("", start)
    for line in lines[start + 2:end]:
        m = ROW.match(line)
        if not m:
            continue
        fields = [f.strip().strip("`") for f in m.group(1).split(" / ")]
        defaults = [d.strip() for d in m.group(2).split(" / ")]
        if len(fields) != len(defaults) or any("," in f or "{" in f for f in fields):
            continue
        parent = fields[0].rpartition(".")[0]
        for f, d in zip(fields, defaults):
            out[f"{parent}{f}" if f.startswith(".") else f] = d
    return out


def _as_crd_value(text: str):
    text = text.strip("`")
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"\d+", text):
        return int(text)
    return text.strip('"')


def test_the_readme_states_the_crds_defaults():
    stated = _readme_defaults()
    checked = []
    for field, text in stated.items():
        if text.strip() in ("—", "") or not re.fullmatch(r"`?\"?[\w.-]+\"?`?", text.strip()):
            continue  # no default, or one said in words (derived, "random init", ...)
        path = field.replace("[]", ".[]")
        try:
            want = _crd_default(path)
        except KeyError:
            pytest.fail(f"README states a default for {field}, which the CRD does not default")
        assert _as_crd_value(text.strip()) == want, f"README: {field} defaults to {text}, the CRD says {want!r}"
        checked.append(field)
    # The table really was read (a change of its format must not make this test vacuous).
    assert {"finetune.runs", "finetune.steps", "parallelism", "failurePolicy.maxAttempts",
            "target.holdoutFraction", "includeFoundation", "averaging.selection"} <= set(checked)
