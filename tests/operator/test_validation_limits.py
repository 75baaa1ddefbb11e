"""Issue 12: a manifest cannot ask for an unbounded plan, smuggle a value past an anchored regex,
name a path outside its dataset, or expand into gigabytes through YAML aliases. Everything
`ratatouille run` would refuse, `validate` refuses first (exit 2, the error names the field)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ratatouille_operator.spec import SpecError
from ratatouille_operator.validation import (
    apply_overrides,
    load_crd_schema,
    read_manifest_file,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

SHORT = {
    "apiVersion": "ratatouille.dev/v1alpha1",
    "kind": "RatatouilleRun",
    "metadata": {"name": "limits"},
    "spec": {
        "foundation": {"model": "resnet18"},
        "target": {"dataset": "s3://datasets/office_home", "testDomains": ["art"]},
        "auxiliaries": [{"name": "pacs", "dataset": "s3://datasets/PACS"}],
        "storage": {"uri": "s3://ratatouille/runs"},
    },
}


def with_set(*overrides: str) -> dict:
    return apply_overrides(copy.deepcopy(SHORT), list(overrides))


def refused(doc) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_manifest(doc)
    assert "\n" not in info.value.message
    return info.value


def _schema_at(path: str) -> dict:
    node = load_crd_schema()["properties"]["spec"]
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


# --------------------------------------------------------------------------- documented maxima

MAXIMA = [
    # (field path in the schema, --set path, the README's documented maximum)
    ("finetune.runs", "spec.finetune.runs", 500),
    ("auxiliaries.[].runs", "spec.auxiliaries[0].runs", 8),
    ("parallelism", "spec.parallelism", 256),
    ("failurePolicy.maxAttempts", "spec.failurePolicy.maxAttempts", 10),
    ("finetune.steps", "spec.finetune.steps", 10_000_000),
]


@pytest.mark.parametrize("schema_path,set_path,maximum", MAXIMA, ids=[m[1] for m in MAXIMA])
def test_integer_maxima_are_in_the_crd_and_refused_one_above(schema_path, set_path, maximum):
    assert _schema_at(schema_path)["maximum"] == maximum
    extra = ["spec.failurePolicy.minSucceeded=1"]
    ok = validate_manifest(with_set(f"{set_path}={maximum}", *extra))
    assert ok.name == "limits"
    err = refused(with_set(f"{set_path}={maximum + 1}", *extra))
    assert err.field == set_path and f"<= {maximum}" in err.message


def test_list_maxima_are_in_the_crd_and_refused_one_above():
    assert _schema_at("auxiliaries")["maxItems"] == 16
    assert _schema_at("target.testDomains")["maxItems"] == 64
    auxes = [{"name": f"a{i}", "dataset": f"s3://d/a{i}"} for i in range(16)]
    validate_manifest(with_set(f"spec.auxiliaries={auxes!r}"))
    auxes.append({"name": "a16", "dataset": "s3://d/a16"})
    assert refused(with_set(f"spec.auxiliaries={auxes!r}")).field == "spec.auxiliaries"
    domains = [f"d{i}" for i in range(65)]
    assert refused(with_set(f"spec.target.testDomains={domains!r}")).field == "spec.target.testDomains"


def test_free_form_scheduling_fields_are_bounded_in_size():
    """affinity and tolerations are copied into every child Job; the schema leaves them free-form."""
    from ratatouille_operator.validation import MAX_SCHEDULING_BYTES

    term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z" * 60] * 60}]}
    small = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}
    doc = copy.deepcopy(SHORT)
    doc["spec"]["template"] = {"affinity": small}
    assert validate_manifest(doc).spec.template.affinity == small
    big = copy.deepcopy(small)
    big["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] = [term] * 10
    doc["spec"]["template"] = {"affinity": big}
    err = refused(doc)
    assert err.field == "spec.template.affinity" and str(MAX_SCHEDULING_BYTES) in err.message
    doc["spec"]["template"] = {"tolerations": [{"key": "k" * 63, "operator": "Exists", "effect": "NoSchedule",
                                                "value": "v" * 600}] * 64}
    assert refused(doc).field == "spec.template.tolerations"


@pytest.mark.parametrize("set_path", ["spec.foundation.model", "spec.target.dataset",
                                      "spec.storage.uri", "spec.queueName",
                                      "spec.storage.credentialsSecret"])
def test_long_strings_are_refused_by_length(set_path):
    value = "s3://b/" + "x" * 2000 if set_path in ("spec.target.dataset", "spec.storage.uri") else "x" * 2000
    err = refused(with_set(f"{set_path}={value}"))
    assert err.field == set_path and "at most" in err.message


def test_every_string_and_list_of_the_spec_is_bounded():
    """No unbounded string or list left in the spec schema (template internals excepted: those
    are Kubernetes' own types, bounded by the API server's request size)."""
    unbounded = []

    def walk(node: dict, path: str) -> None:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return
        t = node.get("type")
        if t == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(path)
        if t == "array" and "maxItems" not in node:
            unbounded.append(path)
        if t == "integer" and "maximum" not in node:
            unbounded.append(path)
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path + ".*")

    walk(load_crd_schema()["properties"]["spec"], "spec")
    assert unbounded == []


def _cli(*args, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(BIN / "ratatouille"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_plan_with_a_billion_runs_is_refused_at_once(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(SHORT))
    for set_path in ("spec.finetune.runs", "spec.auxiliaries[0].runs", "spec.parallelism"):
        t0 = time.monotonic()
        proc = _cli("plan", path, "--set", f"{set_path}=1000000000")
        assert time.monotonic() - t0 < 30
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert set_path in proc.stderr and "<=" in proc.stderr


# --------------------------------------------------------------------------- anchored names

@pytest.mark.parametrize("set_path,good,bad", [
    ("spec.queueName", "team-a.gpu_queue", "rt\n"),
    ("spec.queueName", "team-a", "-team"),
    ("spec.storage.credentialsSecret", "s3-credentials", "s3-credentials\n"),
    ("spec.storage.credentialsSecret", "s3.creds", "S3_Creds"),
    ("spec.template.priorityClassName", "high-priority", "high\n"),
    ("spec.auxiliaries[0].name", "pacs", "pacs\n"),
    ("spec.template.image", "ghcr.io/x/y:1", "img\nx"),
])
def test_names_are_checked_with_anchors_that_refuse_a_trailing_newline(set_path, good, bad):
    validate_manifest(with_set(f"{set_path}={good}"))
    doc = with_set(f"{set_path}=placeholder")
    node, parts = doc, set_path.replace("[0]", ".0").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    node[parts[-1]] = bad
    assert refused(doc).field == set_path


def test_metadata_names_refuse_a_trailing_newline():
    doc = copy.deepcopy(SHORT)
    doc["metadata"] = {"name": "rt\n"}
    assert refused(doc).field == "metadata.name"
    doc["metadata"] = {"name": "rt", "namespace": "ns\n"}
    assert refused(doc).field == "metadata.namespace"


# --------------------------------------------------------------------------- refused at validate

@pytest.mark.parametrize("set_path,value", [
    ("spec.target.testDomains", '["../x"]'),
    ("spec.target.testDomains", '[".."]'),
    ("spec.target.testDomains", '["."]'),
    ("spec.target.testDomains", '["a\\u0000b"]'),
    ("spec.target.dataset", "s3:///x"),
    ("spec.target.dataset", "file://otherhost/data"),
    ("spec.target.dataset", "S3://bucket/data"),
    ("spec.target.dataset", '"/data/my set\\n"'),
    ("spec.storage.uri", "s3:///runs"),
    ("spec.auxiliaries[0].dataset", "s3://"),
    ("spec.foundation.weights", "s3://bucket"),
    ("spec.foundation.model", "hf-hub:timm/resnet50.a1_in1k"),
    ("spec.foundation.model", "local-dir:/models/x"),
    ("spec.foundation.model", "../resnet50"),
    ("spec.storage.endpoint", "http://minio:9000/ x"),
])
def test_what_run_would_refuse_validate_refuses(set_path, value):
    field = set_path.split("[", 1)[0] if set_path.endswith("]") else set_path
    err = refused(with_set(f"{set_path}={value}"))
    assert err.field.startswith(field), err


def test_timm_names_with_pretrained_tags_stay_valid():
    for model in ("resnet50", "test_resnet", "resnet50.a1_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k"):
        assert validate_manifest(with_set(f"spec.foundation.model={model}")).spec.foundation.model == model


# --------------------------------------------------------------------------- YAML aliases

BOMB = textwrap.dedent("""\
    apiVersion: ratatouille.dev/v1alpha1
    kind: RatatouilleRun
    metadata: {name: bomb}
    spec:
      foundation: {model: resnet18}
      target: {dataset: s3://d/x, testDomains: [art]}
      storage: {uri: s3://r/runs}
      template:
        resources:
          a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
          b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
          c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
          d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
          e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
          f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
          g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
          h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
          i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    """)


def test_alias_bomb_is_refused_before_anything_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 1500
    t0 = time.monotonic()
    with pytest.raises(SpecError) as info:
        read_manifest_file(path)
    assert time.monotonic() - t0 < 2
    assert info.value.field == "manifest"
    assert "alias" in info.value.message and "line 11" in info.value.message


def test_a_single_alias_or_merge_key_is_refused_too(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: ratatouille.dev/v1alpha1
        kind: RatatouilleRun
        metadata: {name: merge}
        spec:
          foundation: &f {model: resnet18}
          target: {dataset: s3://d/x, testDomains: [art]}
          storage: {uri: s3://r/runs}
          auxiliaries:
          - {<<: *f, name: pacs, dataset: s3://d/pacs}
        """))
    with pytest.raises(SpecError) as info:
        read_manifest_file(path)
    assert "alias" in info.value.message
    # anchors alone (nothing refers to them) are harmless and stay accepted
    path.write_text(BOMB.split("  template:")[0].replace("{model: resnet18}", "&f {model: resnet18}"))
    assert read_manifest_file(path)["metadata"]["name"] == "bomb"


def test_set_values_refuse_aliases_too():
    with pytest.raises(SpecError) as info:
        apply_overrides(SHORT, ["spec.template.resources=[&a [1, 2], *a, *a]"])
    assert info.value.field == "spec.template.resources" and "alias" in info.value.message


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_cli_refuses_the_bomb_in_one_line(tmp_path, command):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc = _cli(command, path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "alias" in proc.stderr


def test_oversized_manifest_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(SHORT) + "#" + "x" * (3 << 20) + "\n")
    with pytest.raises(SpecError) as info:
        read_manifest_file(path)
    assert info.value.field == "manifest" and "MiB" in info.value.message
