"""Property-based tests (hypothesis), bounded to a few seconds each so they run in CI with the rest:

- the manifest validator, on arbitrary documents and on valid manifests with one field replaced
  by an arbitrary value, either accepts (and then every documented maximum holds) or raises
  SpecError naming a field: never another exception, never a multi-line message;
- the manifest reader on arbitrary text refuses with SpecError or returns one mapping;
- the streaming averager's safetensors header reader, on arbitrary bytes and on files built from
  arbitrary (often wrong) headers, refuses with its own errors only, and never accepts a file the
  safetensors library refuses; what it accepts it describes exactly as the library does.
"""
from __future__ import annotations

import copy
import io
import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratatouille_operator.spec import SpecError
from ratatouille_operator.validation import read_manifest_file, validate_manifest
from ratatouille_trainer import weights
from ratatouille_trainer.weights import AveragingError, UnsafeWeightsError

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID = {
    "apiVersion": "ratatouille.dev/v1alpha1",
    "kind": "RatatouilleRun",
    "metadata": {"name": "prop"},
    "spec": {
        "foundation": {"model": "resnet18", "weights": "s3://models/r18.safetensors", "inputSize": 64},
        "target": {"dataset": "s3://datasets/office_home", "testDomains": ["art", "clipart"]},
        "auxiliaries": [{"name": "pacs", "dataset": "s3://datasets/PACS", "runs": 2},
                        {"name": "vlcs", "weights": "file:///models/vlcs.safetensors"}],
        "finetune": {"runs": 4, "steps": 100, "evalEvery": 10, "headWarmupSteps": 5},
        "failurePolicy": {"minSucceeded": 2},
        "storage": {"uri": "s3://ratatouille/runs", "endpoint": "http://minio:9000",
                    "credentialsSecret": "s3-credentials"},
        "queueName": "team-a",
        "parallelism": 4,
    },
}

# Every leaf and container of VALID, by path, so one can be replaced.
PATHS: list[tuple] = []


def _collect(node, path=()):
    PATHS.append(path)
    if isinstance(node, dict):
        for k, v in node.items():
            _collect(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _collect(v, path + (i,))


_collect(VALID)
PATHS.remove(())

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e9", "nan", "s3:///x", "s3://", "file://host/x", "../x", "..",
                     "rt\n", "hf-hub:timm/x", "x" * 300, "a.b", "UPPER", "-lead", "trail-"]),
    st.sampled_from([0, 1, 8, 256, 257, 500, 501, 10 ** 7, 10 ** 7 + 1, 2 ** 31, 2 ** 63]),
)
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=30)


def _assert_within_documented_maxima(run) -> None:
    spec = run.spec
    assert 1 <= spec.finetune.runs <= 500
    assert 1 <= spec.parallelism <= 256
    assert len(spec.auxiliaries) <= 16
    assert all(1 <= a.runs <= 8 for a in spec.auxiliaries)
    body = run.body["spec"]
    assert 1 <= len(body["target"]["testDomains"]) <= 64
    assert all(d not in (".", "..") and "/" not in d for d in body["target"]["testDomains"])
    assert "\n" not in body.get("queueName", "") and len(body.get("queueName", "")) <= 63
    assert "\n" not in run.name and len(run.name) <= 40


def _validate(doc) -> None:
    try:
        run = validate_manifest(doc)
    except SpecError as e:
        assert e.field and "\n" not in e.message
        return
    _assert_within_documented_maxima(run)
    # the defaulted body is itself valid and validates to the same spec
    assert validate_manifest(run.body).spec == run.spec


@BOUNDED
@given(documents)
def test_validator_on_arbitrary_documents_raises_only_spec_errors(doc):
    _validate(doc)


@BOUNDED
@given(st.sampled_from(PATHS), documents)
def test_validator_with_one_field_replaced_accepts_within_maxima_or_names_a_field(path, value):
    doc = copy.deepcopy(VALID)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    _validate(doc)


@BOUNDED
@given(st.text(max_size=400))
def test_manifest_reader_on_arbitrary_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("m") / "m.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        doc = read_manifest_file(path)
    except SpecError as e:
        assert e.field == "manifest" and "\n" not in e.message
        return
    assert isinstance(doc, dict)
    _validate(doc)


# --------------------------------------------------------------------------- safetensors headers

DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _read(data: bytes):
    class Raw(io.BytesIO):
        pass

    rd = weights.Reader(Raw(data), "prop.safetensors")
    return weights.read_header(rd, len(data))


def _library_accepts(data: bytes):
    from safetensors.torch import load  # the library's own parser (torch: it has bfloat16)

    try:
        return load(data)
    except Exception:
        return None


@BOUNDED
@given(st.binary(max_size=200))
def test_header_reader_on_arbitrary_bytes_raises_only_its_own_errors(data):
    try:
        _read(data)
    except (UnsafeWeightsError, AveragingError) as e:
        assert "\n" not in str(e)


@st.composite
def safetensors_files(draw):
    """A file whose header lists tensors with arbitrary dtypes and shapes and offsets that are
    usually right, sometimes shifted, swapped, duplicated, overlapping or leaving holes."""
    n = draw(st.integers(0, 4))
    entries, pos = [], 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype] if shape else DTYPES[dtype]
        start = pos + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 8]))
        end = start + nbytes + draw(st.sampled_from([0, 0, 0, 0, 1, -2]))
        key = draw(st.sampled_from([f"t{i}", "t0", f"featurizer.t{i}", "__metadata__"]))
        entries.append((key, {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}))
        pos = max(pos, end)
    if draw(st.booleans()):
        entries.insert(0, ("__metadata__", {"format": "pt"}))
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in entries) + "}"
    raw = text.encode()
    raw += b" " * draw(st.sampled_from([-len(raw) % 8, 0, 3]))
    data_len = max(pos, 0) + draw(st.sampled_from([0, 0, 0, 4]))
    return struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


@BOUNDED
@given(safetensors_files())
def test_header_reader_never_accepts_what_the_library_refuses(data):
    try:
        tensors, meta, data_len = _read(data)
    except (UnsafeWeightsError, AveragingError) as e:
        assert "\n" not in str(e)
        return
    loaded = _library_accepts(data)
    assert loaded is not None, "the reader accepted a file the safetensors library refuses"
    assert {t.key for t in tensors} == set(loaded)
    for t in tensors:
        assert tuple(loaded[t.key].shape) == t.shape
        assert loaded[t.key].numel() * loaded[t.key].element_size() == t.end - t.start


def test_the_generated_files_exercise_both_sides():
    """The strategy is not vacuous: some of its files are accepted, some refused."""
    from hypothesis import find

    find(safetensors_files(), lambda d: _library_accepts(d) is not None and len(d) > 100,
         settings=settings(max_examples=500, deadline=None, derandomize=True))
    find(safetensors_files(), lambda d: _library_accepts(d) is None,
         settings=settings(max_examples=500, deadline=None, derandomize=True))
