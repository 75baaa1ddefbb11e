"""The RatatouilleRun CRD and `ratatouille_operator.validation`: schema shape, defaulting,
schema-level and semantic refusals (tests/operator/invalid/*.yaml), file loading, --set overrides."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from ratatouille_operator import validation
from ratatouille_operator.spec import RunSpec, SpecError
from ratatouille_operator.validation import (
    ValidatedRun,
    apply_defaults,
    apply_overrides,
    load_crd,
    load_crd_schema,
    load_manifest_file,
    load_run,
    read_manifest_file,
    validate_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "ratatouilleruns.ratatouille.dev.yaml"
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))

SHORT = {
    "apiVersion": "ratatouille.dev/v1alpha1",
    "kind": "RatatouilleRun",
    "metadata": {"name": "officehome-art"},
    "spec": {
        "foundation": {"model": "resnet50"},
        "target": {"dataset": "s3://datasets/office_home", "testDomains": ["art"]},
        "auxiliaries": [{"name": "pacs", "dataset": "s3://datasets/PACS"}],
        "storage": {"uri": "s3://ratatouille/runs"},
    },
}

# The design's full example (every spec field; docs/contract.md, "The resource"), holdoutFraction a string.
FULL = """
apiVersion: ratatouille.dev/v1alpha1
kind: RatatouilleRun
metadata: {name: officehome-art, namespace: research}
spec:
  foundation:
    model: resnet50
    weights: s3://models/resnet50.safetensors
    inputSize: 224
  target:
    dataset: s3://datasets/office_home
    testDomains: [art]
    holdoutFraction: "0.2"
  auxiliaries:
  - name: pacs
    dataset: s3://datasets/PACS
    runs: 1
  - name: community-vlcs
    weights: s3://community/vlcs.safetensors
  includeFoundation: true
  linearProbe: {steps: 5000}
  auxiliaryFinetune: {steps: 5000, batchSize: 32}
  finetune:
    runs: 20
    steps: 5000
    batchSize: 32
    headWarmupSteps: 200
    evalEvery: 100
    hyperparameters:
      lr: {default: "5e-5", choices: ["1e-5", "3e-5", "5e-5"]}
      weightDecay: {default: "0", choices: ["1e-4", "1e-6"]}
      dropout: {default: "0", choices: ["0", "0.1", "0.5"]}
  averaging:
    selection: greedy
  seed: 0
  storage:
    uri: s3://ratatouille/runs
    endpoint: http://minio.minio:9000
    credentialsSecret: s3-credentials
  template:
    image: ghcr.io/example/ratatouille:0.1.0
    resources: {limits: {nvidia.com/gpu: "1"}}
    nodeSelector: {}
    tolerations: []
  parallelism: 8
  failurePolicy:
    backoffLimit: 1
    maxAttempts: 2
    minSucceeded: 2
  suspend: false
  queueName: ""
  activeDeadlineSeconds: 0
status:
  observedGeneration: 3
  phase: Averaging
  progress: "9/25"
  conditions:
  - {type: Accepted, status: "True", reason: Valid, message: ok, lastTransitionTime: "2024-01-01T00:00:00Z", observedGeneration: 3}
  stages:
    auxiliary: {total: 1, active: 0, succeeded: 1, failed: 0}
    target: {total: 20, active: 8, succeeded: 4, failed: 0}
  jobs:
  - {name: officehome-art-target-3-a1, stage: target, member: "3", attempt: 1, state: Succeeded, valAccuracy: "0.81"}
  result:
    model: s3://ratatouille/runs/research/officehome-art/uid/average/model.safetensors
    sha256: "abc"
    selection: greedy
    members: 14
    valAccuracy: "0.871"
    testAccuracy: {art: "0.735"}
    bestSingle: {member: target-07, valAccuracy: "0.86", testAccuracy: {art: "0.70"}}
    diagnostics: {anything: [1, 2, {goes: here}]}
"""


def short(**spec_updates) -> dict:
    doc = copy.deepcopy(SHORT)
    doc["spec"].update(spec_updates)
    return doc


def spec_error(doc) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_manifest(doc)
    return info.value


# --------------------------------------------------------------------------- the CRD file

def test_crd_structure():
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "ratatouilleruns.ratatouille.dev"
    s = crd["spec"]
    assert s["group"] == "ratatouille.dev" and s["scope"] == "Namespaced"
    assert s["names"]["kind"] == "RatatouilleRun"
    assert s["names"]["plural"] == "ratatouilleruns" and s["names"]["singular"] == "ratatouillerun"
    assert s["names"]["shortNames"] == ["rrun"] and s["names"]["categories"] == ["ratatouille"]
    assert len(s["versions"]) == 1
    v = s["versions"][0]
    assert (v["name"], v["served"], v["storage"]) == ("v1alpha1", True, True)
    assert v["subresources"] == {"status": {}}
    cols = {c["name"]: c for c in v["additionalPrinterColumns"]}
    assert [c["name"] for c in v["additionalPrinterColumns"]] == [
        "Phase", "Progress", "Complete", "Val-Acc", "Age", "Model", "Queue"]
    assert cols["Phase"]["jsonPath"] == ".status.phase"
    assert cols["Progress"]["jsonPath"] == ".status.progress"
    assert cols["Complete"]["jsonPath"] == '.status.conditions[?(@.type=="Complete")].status'
    assert cols["Val-Acc"]["jsonPath"] == ".status.result.valAccuracy"
    assert cols["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    assert cols["Model"]["jsonPath"] == ".spec.foundation.model" and cols["Model"]["priority"] == 1
    assert cols["Queue"]["jsonPath"] == ".spec.queueName" and cols["Queue"]["priority"] == 1
    assert all("priority" not in cols[n] for n in ("Phase", "Progress", "Complete", "Val-Acc", "Age"))
    schema = v["schema"]["openAPIV3Schema"]
    assert load_crd_schema() == schema
    assert load_crd() == crd
    spec = schema["properties"]["spec"]
    assert set(spec["required"]) == {"foundation", "target", "storage"}
    assert spec["properties"]["averaging"]["properties"]["selection"]["enum"] == ["uniform", "greedy"]
    assert spec["properties"]["target"]["properties"]["testDomains"]["minItems"] == 1
    assert schema["properties"]["status"]["properties"]["phase"]["enum"] == [
        "Pending", "Auxiliary", "Target", "Averaging", "Succeeded", "Failed", "Suspended"]


# Keys an apiextensions.k8s.io/v1 JSONSchemaProps may carry (unknown keys are refused by the server).
_K8S_KEYS = {
    "type", "format", "description", "title", "default", "enum", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "uniqueItems", "multipleOf", "minProperties", "maxProperties", "required", "properties",
    "additionalProperties", "items", "nullable", "allOf", "anyOf", "oneOf", "not", "example",
    "externalDocs", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}


def _walk(node, path="."):
    yield path, node
    for k, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}{k}.")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[].")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}*.")


def test_schema_is_structural():
    schema = load_crd_schema()
    for path, node in _walk(schema):
        assert set(node) <= _K8S_KEYS, (path, set(node) - _K8S_KEYS)
        if not (node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")):
            assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path  # forbidden in v1 CRDs
        for key in node.get("required", []):
            assert key in node["properties"], (path, key)
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object", path
    assert schema["properties"]["metadata"] == {"type": "object"}
    # preserve-unknown-fields only where foreign or open-ended data lives
    preserved = {p for p, n in _walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {
        ".spec.template.tolerations.[].", ".spec.template.affinity.",
        ".status.", ".status.result.", ".status.result.diagnostics."}


def test_every_default_is_valid_against_its_own_schema():
    schema = load_crd_schema()
    count = 0
    for path, node in _walk(schema):
        if "default" in node:
            count += 1
            sub = validation._to_jsonschema(node)
            value = apply_defaults(node, copy.deepcopy(node["default"]))
            jsonschema.Draft7Validator(sub).validate(value)
    assert count >= 30


# --------------------------------------------------------------------------- defaulting

def test_apply_defaults_walks_like_the_api_server():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "default": {}, "properties": {
                "x": {"type": "integer", "default": 1},
                "y": {"type": "object", "default": {}, "properties": {"z": {"type": "string", "default": "deep"}}},
            }},
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "default": 7}}}},
            "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"k": {"type": "boolean", "default": True}}}},
            "nul": {"type": "string", "default": "filled"},
            "gone": {"type": "string"},
            "keep": {"type": "string", "nullable": True, "default": "unused"},
        },
    }
    obj = {"items": [{}, {"n": 3}], "m": {"p": {}, "q": {"k": False}}, "nul": None, "gone": None, "keep": None}
    out = apply_defaults(schema, obj)
    assert out is obj
    assert obj == {
        "a": {"x": 1, "y": {"z": "deep"}},
        "items": [{"n": 7}, {"n": 3}],
        "m": {"p": {"k": True}, "q": {"k": False}},
        "nul": "filled",
        "keep": None,
    }
    # defaults are copies: mutating the result never changes the schema
    obj["a"]["y"]["z"] = "changed"
    assert schema["properties"]["a"]["default"] == {}


def test_short_form_gets_every_default():
    run = validate_manifest(SHORT)
    assert isinstance(run, ValidatedRun)
    assert (run.namespace, run.name) == ("default", "officehome-art")
    assert SHORT["spec"].get("finetune") is None, "validate_manifest must not mutate its input"
    body = run.body["spec"]
    assert run.body["metadata"]["namespace"] == "default"
    assert body["finetune"] == {
        # no headWarmupSteps: it follows the steps (the parser's 4%, below)
        "runs": 20, "steps": 5000, "batchSize": 32, "evalEvery": 100,
        "hyperparameters": {
            "lr": {"default": "5e-5", "choices": ["1e-5", "3e-5", "5e-5"]},
            "weightDecay": {"default": "0", "choices": ["1e-4", "1e-6"]},
            "dropout": {"default": "0", "choices": ["0", "0.1", "0.5"]},
        },
    }
    assert body["linearProbe"] == {"steps": 5000, "batchSize": 32, "lr": "1e-3"}
    assert body["auxiliaryFinetune"] == {"steps": 5000, "batchSize": 32, "lr": "5e-5", "seed": 0}
    assert body["augmentation"] == {"horizontalFlip": True}
    assert body["failurePolicy"] == {"backoffLimit": 1, "maxAttempts": 2, "minSucceeded": 1,
                                     "retryBackoffSeconds": 10, "podStartTimeoutSeconds": 300}
    assert body["auxiliaries"] == [{"name": "pacs", "dataset": "s3://datasets/PACS", "runs": 1}]
    assert body["foundation"] == {"model": "resnet50", "inputSize": 224}
    assert body["target"]["holdoutFraction"] == "0.2"
    assert body["averaging"] == {"selection": "uniform"}
    assert (body["includeFoundation"], body["seed"], body["parallelism"], body["suspend"],
            body["queueName"], body["activeDeadlineSeconds"]) == (True, 0, 8, False, "", 0)
    assert body["template"] == {}

    s = run.spec
    assert isinstance(s, RunSpec)
    assert s.foundation.weights is None and s.foundation.input_size == 224
    assert s.target.test_domains == ("art",) and s.target.holdout_fraction == 0.2
    assert [(a.name, a.dataset, a.runs, a.recycled) for a in s.auxiliaries] == [("pacs", "s3://datasets/PACS", 1, False)]
    assert s.finetune.runs == 20 and s.finetune.head_warmup_steps == 200
    assert s.finetune.hyperparameters["lr"].choices == ("1e-5", "3e-5", "5e-5")
    assert s.linear_probe.lr == "1e-3" and s.auxiliary_finetune.lr == "5e-5"
    assert s.failure_policy.max_attempts == 2 and s.failure_policy.min_succeeded == 1
    assert s.selection == "uniform" and s.parallelism == 8 and s.include_foundation is True


def test_partial_hyperparameter_keeps_the_other_defaults():
    run = validate_manifest(short(finetune={"runs": 3, "hyperparameters": {"lr": {"default": "1e-4"}}}))
    hps = run.spec.finetune.hyperparameters
    assert hps["lr"].default == "1e-4" and hps["lr"].choices == ("1e-5", "3e-5", "5e-5")
    assert hps["dropout"].default == "0" and run.spec.finetune.steps == 5000


def test_null_fields_take_their_default_or_disappear():
    doc = short(seed=None)
    doc["spec"]["foundation"]["weights"] = None
    run = validate_manifest(doc)
    assert run.body["spec"]["seed"] == 0
    assert "weights" not in run.body["spec"]["foundation"] and run.spec.foundation.weights is None


def test_full_design_manifest_validates():
    run = validate_manifest(yaml.safe_load(FULL))
    assert (run.namespace, run.name) == ("research", "officehome-art")
    s = run.spec
    assert [a.name for a in s.auxiliaries] == ["pacs", "community-vlcs"]
    assert s.auxiliaries[1].recycled and s.auxiliaries[1].dataset is None and s.auxiliaries[1].runs == 1
    assert s.foundation.weights == "s3://models/resnet50.safetensors"
    assert s.selection == "greedy" and s.failure_policy.min_succeeded == 2
    assert s.storage.endpoint == "http://minio.minio:9000" and s.storage.credentials_secret == "s3-credentials"
    assert s.template.image == "ghcr.io/example/ratatouille:0.1.0"
    assert s.template.resources == {"limits": {"nvidia.com/gpu": "1"}}
    assert s.linear_probe.steps == 5000 and s.linear_probe.lr == "1e-3"
    assert run.body["status"]["result"]["diagnostics"] == {"anything": [1, 2, {"goes": "here"}]}


def test_pod_template_passes_foreign_fields_through():
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    run = validate_manifest(short(template={
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"nvidia.com/gpu": 1}},
        "nodeSelector": {"accelerator": "h100"}, "tolerations": [tol], "affinity": aff,
        "priorityClassName": "batch-low"}))
    assert run.spec.template.tolerations == (tol,)
    assert run.spec.template.affinity == aff
    assert run.spec.template.node_selector == {"accelerator": "h100"}
    assert run.spec.template.priority_class_name == "batch-low"
    err = spec_error(short(template={"nodeSelector": {"gpu": True}}))
    assert err.field == "spec.template.nodeSelector.gpu"


def test_status_is_checked_too():
    doc = yaml.safe_load(FULL)
    doc["status"]["phase"] = "Running"
    assert spec_error(doc).field == "status.phase"
    doc = yaml.safe_load(FULL)
    doc["status"]["result"]["valAccuracy"] = 0.871
    err = spec_error(doc)
    assert err.field == "status.result.valAccuracy" and "quote it" in err.message


def test_recycled_only_run_without_foundation_init_is_fine():
    run = validate_manifest(short(includeFoundation=False, auxiliaries=[
        {"name": "vlcs", "weights": "file:///models/vlcs.safetensors"}]))
    assert run.spec.include_foundation is False and run.spec.auxiliaries[0].recycled


def test_plain_paths_are_accepted_as_data_uris():
    run = validate_manifest(short(auxiliaries=[{"name": "pacs", "dataset": "/data/PACS"},
                                               {"name": "vlcs", "weights": "models/vlcs.safetensors"}]))
    assert run.spec.auxiliaries[0].dataset == "/data/PACS"


# --------------------------------------------------------------------------- invalid manifests

def _expectation(path: Path) -> tuple[str, str | None]:
    lines = path.read_text().splitlines()
    m = re.fullmatch(r"# expect: (\S+)", lines[0])
    assert m, f"{path.name}: first line must be '# expect: <field>'"
    msg = re.fullmatch(r"# message: (.+)", lines[1])
    return m.group(1), (msg.group(1) if msg else None)


def test_there_are_enough_invalid_manifests():
    assert len(INVALID) >= 12


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(path):
    field, message = _expectation(path)
    with pytest.raises(SpecError) as info:
        load_manifest_file(path)
    err = info.value
    assert err.field == field, f"{path.name}: {err}"
    assert err.message and "\n" not in err.message
    if message is not None:
        assert message in err.message, f"{path.name}: {err}"


def test_invalid_manifests_each_differ_from_valid_by_their_error_only():
    # The same files become valid once the named field is fixed or removed: proves each file
    # carries exactly the one mistake its header names (no accidental second error).
    fixes = {
        "bad-selection-enum": ["spec.averaging.selection=greedy"],
        "negative-runs": ["spec.finetune.runs=2"],
        "bad-storage-scheme": ["spec.storage.uri=s3://bucket/runs"],
        "min-succeeded-above-runs": ["spec.failurePolicy.minSucceeded=4"],
        "no-initialization": ["spec.includeFoundation=true"],
        "endpoint-not-http": ["spec.storage.endpoint=http://minio.minio:9000"],
        "eval-every-above-steps": ["spec.finetune.evalEvery=50"],
        "recycled-runs": ["spec.auxiliaries[0].runs=1"],
        "holdout-unquoted": ['spec.target.holdoutFraction="0.3"'],
        "pickle-weights": ["spec.auxiliaries[1].weights=s3://community/vlcs.safetensors"],
        "duplicate-auxiliary-names": ["spec.auxiliaries[1].name=pacs-recycled"],
        "hyperparameter-default-not-number": ['spec.finetune.hyperparameters.lr.default="1e-4"'],
    }
    by_stem = {p.stem: p for p in INVALID}
    for stem, overrides in fixes.items():
        run = load_manifest_file(by_stem[stem], overrides)
        assert run.name == "bad", stem


def test_unknown_spec_field_message_lists_known_fields():
    err = spec_error(short(finetunes={"runs": 2}))
    assert err.field == "spec.finetunes"
    assert "silently drop" in err.message and "finetune" in err.message and "storage" in err.message


def test_run_name_limit_is_forty():
    assert validate_manifest({**SHORT, "metadata": {"name": "a" * 40}}).name == "a" * 40
    assert spec_error({**SHORT, "metadata": {"name": "a" * 41}}).field == "metadata.name"
    assert spec_error({**SHORT, "metadata": {"name": "run.with.dots"}}).field == "metadata.name"
    assert spec_error({**SHORT, "metadata": {}}).field == "metadata.name"
    assert spec_error({k: v for k, v in SHORT.items() if k != "metadata"}).field == "metadata"
    assert spec_error({**SHORT, "metadata": {"name": "ok", "namespace": "Bad_NS"}}).field == "metadata.namespace"


def test_non_mapping_document_is_refused():
    assert spec_error(["not", "a", "run"]).field == "manifest"


def test_first_error_is_the_shallowest():
    doc = short(averaging={"selection": "best"})
    del doc["spec"]["target"]
    assert spec_error(doc).field == "spec.target"


# --------------------------------------------------------------------------- files

def _write(tmp_path, text: str, name="run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_load_manifest_file_round_trip(tmp_path):
    p = _write(tmp_path, yaml.safe_dump(SHORT))
    run = load_manifest_file(p)
    assert run.spec == validate_manifest(SHORT).spec
    assert load_run(p).name == "officehome-art"
    assert load_run(SHORT, ["spec.seed=5"]).spec.seed == 5
    assert read_manifest_file(p) == SHORT


def test_trailing_document_separator_is_fine(tmp_path):
    p = _write(tmp_path, "---\n" + yaml.safe_dump(SHORT) + "---\n")
    assert load_manifest_file(p).name == "officehome-art"


@pytest.mark.parametrize("text, needle", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("spec: [unclosed\n", "not valid YAML at line"),
    ("a: 1\n---\nb: 2\n", "2 YAML documents"),
    ("- just\n- a list\n", "got a list"),
    ("just a string\n", "got a string"),
    ("spec:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed' (first at line 2)"),
])
def test_bad_files_name_the_manifest(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_manifest_file(p)
    assert info.value.field == "manifest"
    assert needle in info.value.message


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_manifest_file(tmp_path / "nope.yaml")
    assert info.value.field == "manifest" and "cannot read" in info.value.message


# --------------------------------------------------------------------------- overrides

def test_overrides_shrink_a_run():
    out = apply_overrides(SHORT, [
        "spec.finetune.runs=2",
        "spec.finetune.steps=20",
        "spec.finetune.headWarmupSteps=5",
        "spec.finetune.evalEvery=10",
        'spec.finetune.hyperparameters.lr.default="1e-4"',
        "spec.foundation.inputSize=32",
        "spec.auxiliaries[0].dataset=file:///data/PACS",
        "spec.auxiliaries[1]={name: vlcs, weights: /w/vlcs.safetensors}",
        "spec.target.testDomains=[art, clipart]",
        "metadata.name=tiny",
    ])
    assert "finetune" not in SHORT["spec"] and SHORT["spec"]["auxiliaries"][0]["dataset"] == "s3://datasets/PACS"
    assert out["spec"]["finetune"]["runs"] == 2 and isinstance(out["spec"]["finetune"]["runs"], int)
    assert out["spec"]["finetune"]["hyperparameters"]["lr"] == {"default": "1e-4"}
    run = validate_manifest(out)
    assert run.name == "tiny"
    assert (run.spec.finetune.runs, run.spec.finetune.steps, run.spec.foundation.input_size) == (2, 20, 32)
    assert run.spec.finetune.hyperparameters["lr"].default == "1e-4"
    assert [a.name for a in run.spec.auxiliaries] == ["pacs", "vlcs"]
    assert run.spec.auxiliaries[0].dataset == "file:///data/PACS"
    assert run.spec.target.test_domains == ("art", "clipart")


def test_override_value_types():
    out = apply_overrides({}, ["a.b=true", "a.c=1e-4", "a.d='7'", "a.e=", "a.f=x=y"])
    assert out == {"a": {"b": True, "c": "1e-4", "d": "7", "e": None, "f": "x=y"}}


def test_override_null_restores_default():
    run = load_run(short(parallelism=3), ["spec.parallelism=null"])
    assert run.spec.parallelism == 8


@pytest.mark.parametrize("override, field", [
    ("spec.finetune.runs", "--set"),
    ("=3", "--set"),
    ("spec..runs=3", "--set"),
    ("spec.auxiliaries[5].runs=2", "spec.auxiliaries[5]"),
    ("spec.foundation.model.name=x", "spec.foundation.model.name"),
    ("spec.target[0]=x", "spec.target[0]"),
    ("spec.seed=[unclosed", "spec.seed"),
])
def test_bad_overrides(override, field):
    with pytest.raises(SpecError) as info:
        apply_overrides(SHORT, [override])
    assert info.value.field == field


def test_override_errors_surface_through_validation():
    err = spec_error(apply_overrides(SHORT, ["spec.finetune.runs=0"]))
    assert err.field == "spec.finetune.runs"


# --------------------------------------------------------------------------- purity

def test_validation_imports_no_heavy_modules():
    code = ("import sys, ratatouille_operator.validation as v; v.validate_manifest(%r); "
            "bad = [m for m in ('kopf', 'kubernetes', 'boto3', 'botocore', 'torch', 'timm') if m in sys.modules]; "
            "print(bad)") % (SHORT,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
