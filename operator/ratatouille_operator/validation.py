"""Validate a RatatouilleRun manifest the way the cluster would, then a little stricter.

Three layers, applied in order, each raising `SpecError(field, message)` for the first problem:

1. Envelope: apiVersion, kind, metadata.name (a DNS label of at most 40 characters so that child
   Job names fit in 63), metadata.namespace (default "default").
2. The CRD's openAPIV3Schema (the package copy `crd.yaml`, identical to `crds/`): defaults are
   applied exactly as the API server does (`apply_defaults`), then the object is validated with
   jsonschema. Kubernetes-specific keywords are translated; objects without
   `x-kubernetes-preserve-unknown-fields` reject unknown fields, as `kubectl apply
   --validate=strict` does (the server would otherwise prune them silently).
3. Semantic rules the schema cannot express (`_semantic_checks`).

The result is a `ValidatedRun` holding the typed `RunSpec` and the defaulted body.
Pure: pyyaml and jsonschema only (no kopf, kubernetes, boto3 or torch).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jsonschema
import yaml

from ratatouille_contract.layout import SCHEME

from .schema import apply_defaults, load_crd, load_crd_schema  # noqa: F401  (re-exported)
from .planning.graph import NO_SOURCE, has_source
from .spec import API_GROUP, API_VERSION, KIND, RunSpec, SpecError

__all__ = [
    "MAX_RUN_NAME",
    "ValidatedRun",
    "SpecError",
    "load_crd",
    "load_crd_schema",
    "apply_defaults",
    "validate_manifest",
    "read_manifest_file",
    "load_manifest_file",
    "load_run",
    "apply_overrides",
]

API = f"{API_GROUP}/{API_VERSION}"
MAX_RUN_NAME = 40
MAX_MANIFEST_BYTES = 3 << 20
#: template.affinity and template.tolerations are free-form in the CRD (the Kubernetes types, not
#: restated); each is copied into every child Job, so its size is bounded here.
MAX_SCHEDULING_BYTES = 32 << 10
# Every regex here is applied with fullmatch: `$` would also match before a final newline, so
# "rt\n" would pass for "rt".
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
HTTP_URL = re.compile(r"https?://[^/\s?#]+(/\S*)?")
_S3_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Readable explanations for the schema's patterns (jsonschema would only print the regex).
_PATTERN_HINTS = {
    r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$": 'must be a number written as a string, e.g. "5e-5"',
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": "must be a DNS label: lowercase letters, digits and '-', "
                                        "starting and ending with a letter or digit",
    r"^(s3|file)://": "must start with s3:// or file://",
    r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?$": "must be a timm architecture name such as resnet50 or "
                                           "resnet50.a1_in1k (hf-hub:, local-dir: and paths are refused; "
                                           "weights come from foundation.weights)",
    r"^[^/]+$": "must be one directory name of the dataset (no '/')",
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$":
        "must be a DNS subdomain: lowercase letters, digits, '-' and '.', starting and ending "
        "with a letter or digit",
    r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$":
        "must be a Kubernetes label value: letters, digits, '-', '_' and '.', starting and "
        "ending with a letter or digit",
    r"^[^\s]+$": "must not contain whitespace",
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$":
        "must be a Kubernetes quantity such as 500m, 2 or 4Gi",
}
_JSON_TYPES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "a boolean", "object": "an object", "array": "a list", "null": "null"}


@dataclass(frozen=True)
class ValidatedRun:
    namespace: str
    name: str
    spec: RunSpec
    body: dict  # the whole manifest with defaults applied and metadata.namespace set


# --------------------------------------------------------------------------- the CRD and its schema

def _go_pattern(pattern: str) -> str:
    """A CRD `pattern` (Go RE2, where `$` ends the text) as a Python regex with the same meaning:
    a final unescaped `$` becomes `\\Z` (Python's `$` also matches before a trailing newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + "\\Z"
    return pattern


def _to_jsonschema(node: Any) -> Any:
    """Translate a Kubernetes structural schema into plain JSON Schema (draft 7 semantics).

    x-kubernetes-* keywords are dropped; `nullable` adds "null" to the type; patterns are
    anchored as Go anchors them (`_go_pattern`);
    x-kubernetes-int-or-string becomes integer|string; objects with properties and neither
    additionalProperties nor x-kubernetes-preserve-unknown-fields refuse unknown fields.
    """
    if isinstance(node, list):
        return [_to_jsonschema(x) for x in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("allOf", "anyOf", "oneOf"):
            out[key] = _to_jsonschema(value)
        elif key == "pattern" and isinstance(value, str):
            out[key] = _go_pattern(value)
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = types + ["null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if (out.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = _to_jsonschema(load_crd_schema())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


# --------------------------------------------------------------------------- errors

def _dotted(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any, limit: int = 80) -> str:
    """repr() of a value for a one-line message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _schema_error(err: jsonschema.ValidationError) -> SpecError:
    """One jsonschema error as SpecError(dotted field, short message)."""
    path = _dotted(err.absolute_path)
    kind, arg, inst = err.validator, err.validator_value, err.instance
    if kind == "required":
        missing = [k for k in arg if isinstance(inst, dict) and k not in inst]
        return SpecError(_join(path, missing[0] if missing else "?"), "is required")
    if kind == "additionalProperties":
        known = sorted((err.schema.get("properties") or {}).keys())
        unknown = sorted(k for k in inst if k not in known) if isinstance(inst, dict) else []
        where = _join(path, unknown[0]) if unknown else path
        return SpecError(where, "unknown field (Kubernetes would silently drop it); known fields here: "
                                + ", ".join(known))
    if kind == "type":
        wanted = arg if isinstance(arg, list) else [arg]
        msg = "must be " + " or ".join(_JSON_TYPES.get(t, t) for t in wanted) + f", got {_type_name(inst)}"
        if "string" in wanted and isinstance(inst, (int, float)) and not isinstance(inst, bool):
            msg += f' (numbers are strings in this API: quote it, e.g. "{inst}")'
        return SpecError(path or "manifest", msg)
    if kind == "enum":
        return SpecError(path, "must be one of " + ", ".join(map(str, arg)) + f", got {_short(inst)}")
    if kind == "pattern":
        crd_pattern = arg[:-2] + "$" if isinstance(arg, str) and arg.endswith("\\Z") else arg
        return SpecError(path, _PATTERN_HINTS.get(crd_pattern, f"must match {crd_pattern}")
                         + f", got {_short(inst)}")
    if kind in ("minimum", "exclusiveMinimum"):
        op = ">=" if kind == "minimum" else ">"
        return SpecError(path, f"must be {op} {arg}, got {inst!r}")
    if kind in ("maximum", "exclusiveMaximum"):
        op = "<=" if kind == "maximum" else "<"
        return SpecError(path, f"must be {op} {arg}, got {inst!r}")
    if kind == "minItems":
        return SpecError(path, f"must have at least {arg} item{'s' if arg != 1 else ''}")
    if kind == "maxItems":
        return SpecError(path, f"must have at most {arg} items")
    if kind == "minLength":
        return SpecError(path, "must not be empty" if arg == 1 else f"must be at least {arg} characters")
    if kind == "maxLength":
        return SpecError(path, f"must be at most {arg} characters, got {len(inst)}")
    if kind == "maxProperties":
        return SpecError(path, f"must have at most {arg} entries")
    return SpecError(path or "manifest", err.message)


def _first_schema_error(body: Mapping[str, Any]) -> SpecError | None:
    errors = list(_validator().iter_errors(body))
    if not errors:
        return None
    # Shallowest first (a missing section explains its children's errors), then schema order.
    best = min(enumerate(errors), key=lambda ie: (len(ie[1].absolute_path), ie[0]))[1]
    return _schema_error(best)


# --------------------------------------------------------------------------- semantic rules

def _check_uri(value: Any, field: str, weights: bool = False) -> None:
    """The URI rules storage applies when the run starts (ratatouille_trainer.storage.split_uri),
    checked here so that `validate` refuses what `run` would refuse."""
    if value is None:
        return
    text = str(value)
    if _CONTROL_OR_SPACE.search(text):
        raise SpecError(field, f"must not contain whitespace or control characters, got {_short(text)}")
    m = SCHEME.match(text)
    scheme = m.group(1).lower() if m else None
    if scheme is not None and scheme not in ("s3", "file"):
        raise SpecError(field, f"must be an s3:// or file:// URI or a path, got scheme {m.group(1)}://")
    if scheme is not None and m.group(1) != scheme:
        raise SpecError(field, f"the scheme must be lowercase ({scheme}://), got {m.group(1)}://")
    if scheme == "s3":
        bucket, _, key = text[len("s3://"):].partition("/")
        if not bucket:
            raise SpecError(field, f"S3 URI without a bucket: expected s3://BUCKET/KEY, got {_short(text)}")
        if not _S3_BUCKET.fullmatch(bucket):
            raise SpecError(field, f"S3 bucket name {_short(bucket)} is not valid")
        if weights and not key.strip("/"):
            raise SpecError(field, f"names a bucket, not a weights file: {_short(text)}")
    elif scheme == "file":
        host = text[len("file://"):].partition("/")[0]
        if host not in ("", "localhost"):
            raise SpecError(field, f"file URIs must be local (file:///path), got host {_short(host)}")
    if weights and text.lower().rstrip("/").endswith(PICKLE_SUFFIXES):
        raise SpecError(field, "pickle checkpoints (.pt/.pth/.bin/.ckpt/.pkl) are refused: "
                               "weights must be safetensors (nothing is ever unpickled)")


def _number(value: Any, field: str) -> float:
    try:
        x = float(str(value))
    except ValueError:
        raise SpecError(field, f'must be a number written as a string, e.g. "5e-5", got {value!r}') from None
    if not math.isfinite(x):
        raise SpecError(field, f"must be a finite number, got {value!r}")
    return x


_HP_RANGES = {
    # name: (check, description)
    "lr": (lambda x: x > 0, "must be > 0"),
    "weightDecay": (lambda x: x >= 0, "must be >= 0"),
    "dropout": (lambda x: 0 <= x < 1, "must be in [0, 1)"),
}


def _check_hyperparameters(table: Mapping[str, Any], path: str) -> None:
    """Every default and choice of a hyperparameter table within its name's range."""
    for name, hp in table.items():
        p = f"{path}.{name}"
        check, what = _HP_RANGES.get(name, (lambda x: True, ""))
        values = ([("default", hp["default"])] if "default" in hp else []) + \
            [(f"choices[{j}]", c) for j, c in enumerate(hp.get("choices") or [])]
        for sub, value in values:
            if not check(_number(value, f"{p}.{sub}")):
                raise SpecError(f"{p}.{sub}", f"{what}, got {value!r}")


def _check_target(t: Mapping[str, Any]) -> None:
    _check_uri(t["dataset"], "spec.target.dataset")
    seen: set[str] = set()
    for j, dom in enumerate(t["testDomains"]):
        if dom in (".", "..") or "/" in dom or "\\" in dom or _CONTROL.search(dom):
            raise SpecError(f"spec.target.testDomains[{j}]",
                            f"must be one directory name of the dataset (no '/', not '.' or '..', "
                            f"no control characters), got {_short(dom)}")
        if dom in seen:
            raise SpecError(f"spec.target.testDomains[{j}]", f"duplicate test domain {dom!r}")
        seen.add(dom)
    frac = _number(t["holdoutFraction"], "spec.target.holdoutFraction")
    if not 0 < frac < 1:
        raise SpecError("spec.target.holdoutFraction", f"must be between 0 and 1 exclusive, got {t['holdoutFraction']!r}")


def _check_auxiliaries(auxiliaries: Sequence[Mapping[str, Any]]) -> None:
    names: dict[str, int] = {}
    for i, a in enumerate(auxiliaries):
        p = f"spec.auxiliaries[{i}]"
        if a["name"] in names:
            raise SpecError(f"{p}.name", f"duplicate auxiliary name {a['name']!r} (also auxiliaries[{names[a['name']]}])")
        names[a["name"]] = i
        has_data, has_weights = a.get("dataset") is not None, a.get("weights") is not None
        if has_data == has_weights:
            raise SpecError(p, "needs exactly one of dataset (fine-tune the foundation on it) or "
                               "weights (recycle an existing fine-tuning)"
                               + ("; both are set" if has_data else "; neither is set"))
        _check_uri(a.get("dataset"), f"{p}.dataset")
        _check_uri(a.get("weights"), f"{p}.weights", weights=True)
        if has_weights and a.get("runs", 1) > 1:
            raise SpecError(f"{p}.runs", "must be 1 for recycled weights (nothing is trained), got "
                                         f"{a['runs']}")


def _check_training(spec: Mapping[str, Any]) -> None:
    for key in ("linearProbe", "auxiliaryFinetune"):
        if _number(spec[key]["lr"], f"spec.{key}.lr") <= 0:
            raise SpecError(f"spec.{key}.lr", f"must be > 0, got {spec[key]['lr']!r}")

    _check_hyperparameters(spec["auxiliaryFinetune"].get("hyperparameters") or {},
                           "spec.auxiliaryFinetune.hyperparameters")
    ft = spec["finetune"]
    # headWarmupSteps has no CRD default: unset, the parser derives it below the steps.
    if ft.get("headWarmupSteps") is not None and ft["headWarmupSteps"] >= ft["steps"]:
        raise SpecError("spec.finetune.headWarmupSteps",
                        f"must be less than finetune.steps ({ft['steps']}), got {ft['headWarmupSteps']}")
    if ft["evalEvery"] > ft["steps"]:
        raise SpecError("spec.finetune.evalEvery",
                        f"must be at most finetune.steps ({ft['steps']}), got {ft['evalEvery']}")
    _check_hyperparameters(ft["hyperparameters"], "spec.finetune.hyperparameters")

    fp = spec["failurePolicy"]
    if fp["minSucceeded"] > ft["runs"]:
        raise SpecError("spec.failurePolicy.minSucceeded",
                        f"must be at most finetune.runs ({ft['runs']}), got {fp['minSucceeded']}")


def _check_storage_and_template(spec: Mapping[str, Any]) -> None:
    _check_uri(spec["storage"]["uri"], "spec.storage.uri")
    endpoint = spec["storage"].get("endpoint")
    if endpoint is not None and not HTTP_URL.fullmatch(endpoint):
        raise SpecError("spec.storage.endpoint", f"must be an http:// or https:// URL, got {_short(endpoint)}")

    template = spec.get("template") or {}
    for key in ("affinity", "tolerations"):
        size = len(json.dumps(template.get(key) or {}, separators=(",", ":")))
        if size > MAX_SCHEDULING_BYTES:
            raise SpecError(f"spec.template.{key}", f"must be at most {MAX_SCHEDULING_BYTES} bytes as JSON "
                                                    f"(it is copied into every child Job), got {size}")


def _semantic_checks(spec: Mapping[str, Any]) -> None:
    """Rules the schema cannot express. Raises the first violation, in spec field order."""
    _check_uri(spec["foundation"].get("weights"), "spec.foundation.weights", weights=True)
    _check_target(spec["target"])
    _check_auxiliaries(spec.get("auxiliaries") or [])
    if not has_source(spec["includeFoundation"], spec.get("auxiliaries") or []):
        raise SpecError("spec.includeFoundation", NO_SOURCE)
    _check_training(spec)
    _check_storage_and_template(spec)


# --------------------------------------------------------------------------- entry points

def _check_dns_label(value: Any, field: str, max_len: int) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, "is required" if value in (None, "") else f"must be a string, got {_type_name(value)}")
    if len(value) > max_len:
        raise SpecError(field, f"must be at most {max_len} characters, got {len(value)}"
                        + (" (child Job names <run>-<stage>-<member>-a<attempt> must fit in 63)"
                           if max_len == MAX_RUN_NAME else ""))
    if not DNS_LABEL.fullmatch(value):
        raise SpecError(field, f"{_PATTERN_HINTS['^' + DNS_LABEL.pattern + '$']}, got {_short(value)}")
    return value


def validate_manifest(doc: Mapping[str, Any]) -> ValidatedRun:
    """Validate one RatatouilleRun object (as parsed from YAML); never mutates `doc`."""
    if not isinstance(doc, Mapping):
        raise SpecError("manifest", f"must be a mapping (a RatatouilleRun object), got {_type_name(doc)}")
    if doc.get("apiVersion") != API:
        raise SpecError("apiVersion", f"must be {API}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        raise SpecError("kind", f"must be {KIND}, got {doc.get('kind')!r}")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        raise SpecError("metadata", "is required (with at least a name)" if meta is None
                        else f"must be an object, got {_type_name(meta)}")
    name = _check_dns_label(meta.get("name"), "metadata.name", MAX_RUN_NAME)
    namespace = meta.get("namespace")
    namespace = "default" if namespace in (None, "") else _check_dns_label(namespace, "metadata.namespace", 63)

    body = copy.deepcopy(dict(doc))
    body["metadata"] = dict(body["metadata"], namespace=namespace)
    apply_defaults(load_crd_schema(), body)
    err = _first_schema_error(body)
    if err is not None:
        raise err
    _semantic_checks(body["spec"])
    spec = RunSpec.from_dict(body["spec"])
    return ValidatedRun(namespace=namespace, name=name, spec=spec, body=body)


class _AliasRefused(yaml.composer.ComposerError):
    """A manifest uses a YAML alias (valid YAML, refused on purpose)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently;
    kubectl refuses them), so two `finetune:` blocks cannot hide one another, and refuses
    aliases (`*name`, merge keys `<<: *name` included): a few hundred bytes of nested aliases
    expand to gigabytes once the object is copied or serialised (the "billion laughs";
    Kubernetes caps alias expansion since CVE-2019-11253). A manifest never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(
                None, None, f"YAML aliases (*{event.anchor}) are refused in manifests: write the "
                            "value out in full", event.start_mark)
        return super().compose_node(parent, index)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: let the default constructor report it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_manifest_file(path: str | Path) -> dict:
    """Parse a manifest file holding exactly one YAML mapping; SpecError(field='manifest') otherwise."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise SpecError("manifest", f"{path} is larger than {MAX_MANIFEST_BYTES // (1 << 20)} MiB "
                                        "(the Kubernetes API's request limit)")
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("manifest", f"cannot read {path}: {exc}") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        what = "refused" if isinstance(exc, _AliasRefused) else "is not valid YAML"
        raise SpecError("manifest", f"{path} {what}{where}: {problem}") from None
    if not docs:
        raise SpecError("manifest", f"{path} is empty: expected one RatatouilleRun")
    if len(docs) > 1:
        raise SpecError("manifest", f"{path} holds {len(docs)} YAML documents: put exactly one RatatouilleRun in it")
    if not isinstance(docs[0], dict):
        raise SpecError("manifest", f"{path} must hold a YAML mapping (a RatatouilleRun object), "
                                    f"got {_type_name(docs[0])}")
    return docs[0]


def load_manifest_file(path: str | Path, overrides: Sequence[str] = ()) -> ValidatedRun:
    """Read, override (`--set` strings) and validate a one-document manifest file."""
    doc = read_manifest_file(path)
    if overrides:
        doc = apply_overrides(doc, overrides)
    return validate_manifest(doc)


def load_run(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> ValidatedRun:
    """A manifest path or an already-parsed object -> ValidatedRun (ARCHITECTURE.md's entry point)."""
    if isinstance(source, Mapping):
        return validate_manifest(apply_overrides(source, overrides) if overrides else source)
    return load_manifest_file(source, overrides)


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _parse_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    pos = 0
    while pos < len(path):
        if path[pos] == "." and parts and pos + 1 < len(path) and path[pos + 1] != "[":
            pos += 1
        m = _SEGMENT.match(path, pos)
        if not m:
            raise SpecError("--set", f"cannot parse the path {path!r}")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts or not isinstance(parts[0], str):
        raise SpecError("--set", f"cannot parse the path {path!r}")
    return parts


def apply_overrides(doc: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """Return a copy of `doc` with `--set` style overrides applied, e.g. `spec.finetune.runs=2`
    or `spec.auxiliaries[0].dataset=file:///data/pacs`. Values are parsed as YAML (so `2` is an
    integer, `"2"` a string, `null` removes the field once defaults are applied); missing
    intermediate mappings are created; a list index may address an existing item or append
    one (index == length)."""
    out = copy.deepcopy(dict(doc))
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", f"expected PATH=VALUE, got {item!r}")
        raw_path, raw_value = item.split("=", 1)
        raw_path = raw_path.strip()
        parts = _parse_path(raw_path)
        try:
            value = yaml.load(raw_value, Loader=_StrictLoader) if raw_value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise SpecError(raw_path, f"--set value {_short(raw_value)}: {problem}") from None
        node: Any = out
        for depth, (key, nxt) in enumerate(zip(parts, parts[1:] + [None])):
            here = _dotted(parts[:depth + 1])
            last = nxt is None
            if isinstance(key, str):
                if not isinstance(node, dict):
                    raise SpecError(here, f"--set cannot set a field on {_type_name(node)}")
                if last:
                    node[key] = value
                    continue
                if node.get(key) is None:
                    node[key] = {} if isinstance(nxt, str) else []
                node = node[key]
            else:
                if not isinstance(node, list):
                    raise SpecError(here, f"--set cannot index {_type_name(node)}")
                if key > len(node):
                    raise SpecError(here, f"--set index out of range (the list has {len(node)} items)")
                if key == len(node):
                    node.append(None)
                if last:
                    node[key] = value
                    continue
                if node[key] is None:
                    node[key] = {} if isinstance(nxt, str) else []
                node = node[key]
    return out
