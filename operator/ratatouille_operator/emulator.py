"""An emulated Kubernetes API on loopback, for tests and for trying the operator without a cluster.

`Emulator` runs kmock's `KubernetesEmulator` (kmock 0.8, a test/dev extra imported lazily here)
as an HTTP server on 127.0.0.1 in a background thread with its own asyncio loop, and closes the
gaps between kmock and a real API server that a kopf operator, the kubernetes Python client and
kubectl run into (see shared/ENVIRONMENT.md):

* object metadata: ``uid``, ``resourceVersion`` (one monotonic counter, bumped on every change),
  ``creationTimestamp``, ``generation`` (bumped on changes outside metadata and, where a status
  subresource exists, outside status), ``metadata.namespace`` on namespaced creates,
  ``generateName``; no-op patches change nothing;
* request parsing: ``/api/v1/namespaces[/<name>]``, ``watch=true|True|1``, PUT (update),
  DELETE on a collection (deletecollection), ``dryRun``;
* lists carry ``apiVersion``, ``kind: <Kind>List`` and a resourceVersion; ``labelSelector``
  (``=``, ``==``, ``!=``, ``in``, ``notin``, existence, ``!key``) and ``fieldSelector``
  (``=``, ``==``, ``!=`` on any dotted field path) filter lists, watches and deletecollection;
* watch streams are ``application/json`` and resume from a ``resourceVersion`` (410 Expired when it
  is too old); objects that start or stop matching a selector arrive as ADDED or DELETED;
  ``timeoutSeconds``, ``sendInitialEvents`` with the initial-events-end BOOKMARK;
* patches: JSON merge patch, JSON patch (RFC 6902 incl. ``test``, which kopf uses for finalizers),
  strategic merge patch approximated as a merge patch whose object lists merge by ``name``,
  server-side apply approximated as a merge patch that may create;
  ``metadata.resourceVersion`` in a patch or update is a precondition (409 Conflict);
* the status subresource: writes to ``.../status`` change only ``status``; writes to the main
  resource leave ``status`` alone wherever the resource has a status subresource; create drops
  ``status`` there too;
* custom resources from CRD files (``register_crd``) or from CRD objects created through the API
  (so ``kubectl apply -f crd.yaml`` works): discovery, short names, categories, the CRD objects
  themselves (kopf lists and watches them), structural-schema defaulting, pruning and
  validation (CEL rules are not evaluated), ``additionalPrinterColumns`` in server-side Table
  output (what ``kubectl get`` prints);
* deletion: finalizers (``deletionTimestamp`` first, removal once the last finalizer goes),
  propagation policies Background, Foreground and Orphan, preconditions; a background garbage
  collector removes objects whose owners (by ``ownerReferences[].uid``) are all gone, and the
  contents of deleted namespaces;
* Jobs get the server-side defaults a real API server sets (selector, controller-uid and
  job-name labels, backoffLimit, completions, parallelism) and an immutable pod template; names
  and labels are validated as the API server does (a Job name longer than 63 characters is
  rejected, as in a real cluster);
* every API request is recorded as an `ApiRequest` with its RBAC verb.

There is no scheduler, no Job or Pod controller: tests (or a stand-in controller) write Job
status through `Emulator.patch_status`.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import copy
import datetime
import json
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

__all__ = ["ApiRequest", "Emulator", "EmulatorError", "ResourceDef", "serve_forever"]

CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
NAMESPACES = "v1/namespaces"
JOBS = "batch/v1/jobs"
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # as the API server's generateName suffixes
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LOG_LIMIT = 100_000  # watch events retained for resuming watches from a resourceVersion


class ApiRequest(NamedTuple):
    """One API request as RBAC sees it (group "" is the core group)."""
    verb: str
    group: str
    version: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None


class EmulatorError(Exception):
    """An API error, rendered as a Kubernetes `Status` (also raised by the direct accessors)."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details,
                "code": self.code}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Resources.

class ResourceDef:
    """What the emulator knows about one served resource (group/version/plural)."""

    def __init__(self, group: str, version: str, plural: str, kind: str, *, namespaced: bool,
                 subresources: Iterable[str] = (), shortnames: Iterable[str] = (),
                 categories: Iterable[str] = (), singular: str | None = None,
                 list_kind: str | None = None, verbs: Iterable[str] = ALL_VERBS,
                 printer_columns: list[dict] | None = None, schema: dict | None = None,
                 crd_name: str | None = None):
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.namespaced = namespaced
        self.subresources = set(subresources)
        self.shortnames, self.categories = set(shortnames), set(categories)
        self.singular = singular or kind.lower()
        self.list_kind = list_kind or f"{kind}List"
        self.verbs = set(verbs)
        self.printer_columns = printer_columns
        self.schema = schema
        self.crd_name = crd_name

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}" if self.group else f"{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified(self) -> str:  # as in API error messages: jobs.batch, ratatouilleruns.ratatouille.dev
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def __repr__(self) -> str:
        return f"ResourceDef({self.key!r}, kind={self.kind!r}, namespaced={self.namespaced})"


def _resource_key(resource: Any) -> str:
    """Normalise 'v1/pods', 'batch/v1/jobs', ('', 'v1', 'pods'), ResourceDef to a key string."""
    if isinstance(resource, ResourceDef):
        return resource.key
    if isinstance(resource, tuple):
        group, version, plural = resource
        return f"{group}/{version}/{plural}" if group else f"{version}/{plural}"
    parts = str(resource).strip("/").split("/")
    if len(parts) == 3 and parts[0] in ("", "core"):
        parts = parts[1:]
    if len(parts) not in (2, 3):
        raise ValueError(f"resource must look like 'v1/pods' or 'batch/v1/jobs', got {resource!r}")
    return "/".join(parts)


def _crd_resource_defs(crd: Mapping) -> list[ResourceDef]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not (group and plural and kind):
        raise EmulatorError(422, "Invalid", "CustomResourceDefinition needs spec.group, "
                                           "spec.names.plural and spec.names.kind")
    defs = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = set((version.get("subresources") or spec.get("subresources") or {}).keys())
        schema = ((version.get("schema") or spec.get("validation") or {}).get("openAPIV3Schema"))
        columns = version.get("additionalPrinterColumns") or spec.get("additionalPrinterColumns")
        defs.append(ResourceDef(
            group, version["name"], plural, kind,
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            subresources=subresources, shortnames=names.get("shortNames") or (),
            categories=names.get("categories") or (), singular=names.get("singular"),
            list_kind=names.get("listKind"), printer_columns=columns, schema=schema,
            crd_name=(crd.get("metadata") or {}).get("name")))
    return defs


def _load_crd_documents(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if not crds:
        raise ValueError(f"{path}: no CustomResourceDefinition in it")
    return crds


# ---------------------------------------------------------------------------------------------
# Selectors, patches, JSONPath, schemas: pure helpers.

def parse_label_selector(text: str | Mapping | None) -> list[tuple[str, str, set[str]]]:
    """Parse 'a=b,c!=d,e,!f,g in (x,y),h notin (z)' into (key, op, values) requirements."""
    if not text:
        return []
    if isinstance(text, Mapping):
        return [(k, "=", {str(v)}) for k, v in text.items()]
    reqs: list[tuple[str, str, set[str]]] = []
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        m = re.match(r"^([^\s!=]+)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            reqs.append((m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            reqs.append((k.strip(), "!=", {v.strip()}))
        elif "==" in part:
            k, v = part.split("==", 1)
            reqs.append((k.strip(), "=", {v.strip()}))
        elif "=" in part:
            k, v = part.split("=", 1)
            reqs.append((k.strip(), "=", {v.strip()}))
        elif part.startswith("!"):
            reqs.append((part[1:].strip(), "!", set()))
        else:
            reqs.append((part, "exists", set()))
    return reqs


def _labels_match(labels: Mapping | None, reqs) -> bool:
    labels = labels or {}
    for key, op, values in reqs:
        present = key in labels
        value = labels.get(key)
        if op in ("=", "in") and not (present and value in values):
            return False
        if op in ("!=", "notin") and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    reqs = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        for op in ("!=", "==", "="):
            if op in part:
                k, v = part.split(op, 1)
                reqs.append((k.strip(), "!=" if op == "!=" else "=", v.strip()))
                break
        else:
            raise EmulatorError(400, "BadRequest", f"invalid field selector: {part!r}")
    return reqs


def _fields_match(obj: Mapping, reqs) -> bool:
    for path, op, value in reqs:
        cur: Any = obj
        for step in path.split("."):
            cur = cur.get(step) if isinstance(cur, Mapping) else None
        actual = "" if cur is None else (str(cur).lower() if isinstance(cur, bool) else str(cur))
        if (actual == value) != (op == "="):
            return False
    return True


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 JSON merge patch; with strategic=True, '$'-directives are dropped and lists of
    objects that all carry a 'name' merge by name (the common strategic merge key)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        elif (strategic and isinstance(value, list) and isinstance(result.get(key), list)
              and value and all(isinstance(v, Mapping) and "name" in v for v in value)
              and all(isinstance(v, Mapping) and "name" in v for v in result[key])):
            merged = {item["name"]: item for item in result[key]}
            for item in value:
                if item.get("$patch") == "delete":
                    merged.pop(item["name"], None)
                else:
                    merged[item["name"]] = merge_patch(merged.get(item["name"], {}), item, strategic=True)
            result[key] = list(merged.values())
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise EmulatorError(422, "Invalid", f"invalid JSON pointer: {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test). Failures raise 422."""
    if not isinstance(ops, list):
        raise EmulatorError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)

    def parent(path: str):
        parts = _pointer(path)
        if not parts:
            raise EmulatorError(422, "Invalid", "cannot address the document root")
        cur = doc
        for p in parts[:-1]:
            try:
                cur = cur[int(p)] if isinstance(cur, list) else cur[p]
            except (KeyError, IndexError, ValueError, TypeError):
                raise EmulatorError(422, "Invalid", f"path {path!r} does not exist") from None
        return cur, parts[-1]

    def get(path: str):
        cur = doc
        for p in _pointer(path):
            try:
                cur = cur[int(p)] if isinstance(cur, list) else cur[p]
            except (KeyError, IndexError, ValueError, TypeError):
                raise EmulatorError(422, "Invalid", f"path {path!r} does not exist") from None
        return cur

    def add(path: str, value: Any):
        nonlocal doc
        if path == "":
            doc = value
            return
        cont, last = parent(path)
        if isinstance(cont, list):
            idx = len(cont) if last == "-" else int(last)
            if not 0 <= idx <= len(cont):
                raise EmulatorError(422, "Invalid", f"index out of range in {path!r}")
            cont.insert(idx, value)
        elif isinstance(cont, dict):
            cont[last] = value
        else:
            raise EmulatorError(422, "Invalid", f"cannot add at {path!r}")

    def remove(path: str):
        cont, last = parent(path)
        try:
            if isinstance(cont, list):
                return cont.pop(int(last))
            return cont.pop(last)
        except (KeyError, IndexError, ValueError, AttributeError):
            raise EmulatorError(422, "Invalid", f"path {path!r} does not exist") from None

    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            remove(path)
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            add(path, remove(op["from"]))
        elif kind == "copy":
            add(path, copy.deepcopy(get(op["from"])))
        elif kind == "test":
            if get(path) != op.get("value"):
                raise EmulatorError(422, "Invalid", f"the test operation failed at {path!r}: "
                                                    f"{get(path)!r} != {op.get('value')!r}")
        else:
            raise EmulatorError(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    return doc


def jsonpath(obj: Any, path: str) -> list[Any]:
    """The JSONPath subset used by printer columns: .a.b, ['a'], [0], [*], [?(@.k=="v")]."""
    tokens = re.findall(r"\.([A-Za-z0-9_\-$]+)|\['([^']+)'\]|\[(\d+|\*)\]|"
                        r"\[\?\(@\.([A-Za-z0-9_.\-]+)\s*(==|!=)\s*[\"']?([^\"')]*)[\"']?\)\]",
                        path.strip().lstrip("$").strip("{}"))
    values = [obj]
    for field, quoted, index, fkey, fop, fval in tokens:
        nxt = []
        for v in values:
            if field or quoted:
                if isinstance(v, Mapping) and (field or quoted) in v:
                    nxt.append(v[field or quoted])
            elif index:
                if isinstance(v, list):
                    nxt.extend(v if index == "*" else v[int(index):int(index) + 1])
                elif isinstance(v, Mapping) and index == "*":
                    nxt.extend(v.values())
            elif fkey and isinstance(v, list):
                for item in v:
                    cur = item
                    for step in fkey.split("."):
                        cur = cur.get(step) if isinstance(cur, Mapping) else None
                    if (str(cur) == fval) == (fop == "=="):
                        nxt.append(item)
        values = nxt
    return values


def _human_age(timestamp: str | None) -> str | None:
    if not timestamp:
        return None
    try:
        then = datetime.datetime.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=datetime.timezone.utc)
    except ValueError:
        return timestamp
    s = max(0, int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    m, h, d = s // 60, s // 3600, s // 86400
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if h < 3:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    return f"{d}d" if d < 730 else f"{d // 365}y"


def _schema_walk(value: Any, schema: Mapping | None, path: str) -> Any:
    """Apply structural-schema defaulting and pruning to a value (in place where possible)."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, dict):
        props = schema.get("properties")
        if isinstance(props, Mapping):
            for key, sub in props.items():
                if key not in value and isinstance(sub, Mapping) and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
            addl = schema.get("additionalProperties")
            for key in list(value):
                if key in props:
                    value[key] = _schema_walk(value[key], props[key], f"{path}.{key}")
                elif isinstance(addl, Mapping):
                    value[key] = _schema_walk(value[key], addl, f"{path}.{key}")
                elif not (schema.get("x-kubernetes-preserve-unknown-fields") or addl is True):
                    del value[key]  # pruned, as the API server does for structural schemas
        elif isinstance(schema.get("additionalProperties"), Mapping):
            for key in list(value):
                value[key] = _schema_walk(value[key], schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_schema_walk(v, schema["items"], f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _json_schema(schema: Any) -> Any:
    """Translate the OpenAPI v3 dialect of CRDs (nullable, int-or-string) to JSON Schema."""
    if isinstance(schema, list):
        return [_json_schema(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: _json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")
           and k not in ("nullable", "format", "default", "example", "externalDocs")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in schema:
        out["properties"] = {k: _json_schema(v) for k, v in schema["properties"].items()}
    return out


def _schema_errors(obj: Mapping, schema: Mapping) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema is a core dependency
        return []
    body = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
    js = _json_schema(schema)
    for key in ("metadata", "apiVersion", "kind"):
        (js.get("properties") or {}).pop(key, None)
    errors = []
    for err in sorted(jsonschema.Draft7Validator(js).iter_errors(body), key=lambda e: list(e.path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.path).lstrip(".")
        if err.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", err.message)
            field = ".".join(filter(None, [where] + missing))
            errors.append(f"{field}: Required value")
        elif err.validator == "enum":
            allowed = ", ".join(json.dumps(v) for v in err.validator_value)
            errors.append(f"{where}: Unsupported value: {json.dumps(err.instance)}: "
                          f"supported values: {allowed}")
        else:
            errors.append(f"{where or '<root>'}: Invalid value: {json.dumps(err.instance)[:80]}: "
                          f"{err.message}")
    return errors


def _printer_columns(rd: ResourceDef) -> list[dict]:
    if rd.printer_columns is not None:
        return [{"name": "Name", "type": "string", "format": "name",
                 "description": "Name must be unique within a namespace.", "priority": 0,
                 "jsonPath": ".metadata.name"}] + [dict(c) for c in rd.printer_columns]
    if rd.key == JOBS:
        return [{"name": "Name", "type": "string", "format": "name", "priority": 0, "jsonPath": ".metadata.name"},
                {"name": "Status", "type": "string", "priority": 0, "fn": _job_status_cell},
                {"name": "Completions", "type": "string", "priority": 0, "fn": lambda o: (
                    f"{(o.get('status') or {}).get('succeeded', 0)}/{(o.get('spec') or {}).get('completions', 1)}")},
                {"name": "Age", "type": "date", "priority": 0, "jsonPath": ".metadata.creationTimestamp"}]
    return [{"name": "Name", "type": "string", "format": "name", "priority": 0, "jsonPath": ".metadata.name"},
            {"name": "Age", "type": "date", "priority": 0, "jsonPath": ".metadata.creationTimestamp"}]


def _job_status_cell(job: Mapping) -> str:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed", "Suspended"):
            return cond["type"]
    return "Running" if status.get("active") else ("Suspended" if (job.get("spec") or {}).get("suspend") else "Pending")


def _table(rd: ResourceDef, objs: list[dict], include: str, rv: str) -> dict:
    columns = _printer_columns(rd)
    rows = []
    for obj in objs:
        cells = []
        for col in columns:
            if "fn" in col:
                value = col["fn"](obj)
            else:
                found = jsonpath(obj, col.get("jsonPath", ""))
                value = found[0] if len(found) == 1 else (",".join(map(str, found)) if found else None)
            if value is not None and col.get("type") == "date":
                value = _human_age(str(value))
            elif isinstance(value, (dict, list)):
                value = json.dumps(value)
            elif value is not None and col.get("type") == "string" and not isinstance(value, str):
                value = json.dumps(value) if isinstance(value, bool) else str(value)
            cells.append(value)
        row_obj = obj if include == "Object" else (
            None if include == "None" else
            {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})})
        rows.append({"cells": cells, "object": row_obj})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{k: v for k, v in c.items() if k not in ("jsonPath", "fn")} | {
                "format": c.get("format", ""), "description": c.get("description", ""),
                "priority": c.get("priority", 0)} for c in columns],
            "rows": rows}


# ---------------------------------------------------------------------------------------------
# The state: objects, resource versions, the watch-event log, garbage collection.
# All methods run on the emulator's event loop thread only.

class _Event(NamedTuple):
    rv: int
    key: str
    type: str
    old: dict | None
    new: dict


class _Core:
    def __init__(self, kmock: Any, handler: Any, loop: asyncio.AbstractEventLoop, *, validate: bool):
        self.kmock, self.handler, self.loop, self.validate = kmock, handler, loop, validate
        self.defs: dict[str, ResourceDef] = {}
        self.live: dict[str, dict[tuple[str | None, str], dict]] = collections.defaultdict(dict)
        self.rv = 0
        self.log: list[_Event] = []
        self.log_rvs: list[int] = []
        self.log_offset = 0  # absolute index of self.log[0]
        self.changed: asyncio.Future = loop.create_future()
        self.closing = False
        self.gc_scheduled = False
        self.requests: list[ApiRequest] = []
        self.requests_lock = threading.Lock()
        self.errors: list[str] = []
        self.faults: list[dict] = []

    # --- resources -----------------------------------------------------------------------------
    def add_resource(self, rd: ResourceDef) -> None:
        self.defs[rd.key] = rd
        self.handler.resources[self.kres(rd.key)] = self.kmock.ResourceInfo(
            namespaced=rd.namespaced, kind=rd.kind, singular=rd.singular, verbs=rd.verbs,
            shortnames=rd.shortnames, categories=rd.categories,
            subresources={s for s in rd.subresources if s in ("status", "scale")})

    def remove_resource(self, key: str) -> None:
        self.defs.pop(key, None)
        kres = self.kres(key)
        if kres in self.handler.resources:
            del self.handler.resources[kres]

    def kres(self, key: str) -> Any:
        parts = key.split("/")
        group, version, plural = parts if len(parts) == 3 else ("", *parts)
        return self.kmock.resource(group=group, version=version, plural=plural)

    def rd(self, resource: Any) -> ResourceDef:
        key = _resource_key(resource)
        if key not in self.defs:
            raise EmulatorError(404, "NotFound", "the server could not find the requested resource")
        return self.defs[key]

    # --- reading -------------------------------------------------------------------------------
    def get(self, rd: ResourceDef, ns: str | None, name: str) -> dict:
        obj = self.live[rd.key].get((ns if rd.namespaced else None, name))
        if obj is None:
            raise EmulatorError(404, "NotFound", f'{rd.qualified} "{name}" not found',
                                {"name": name, "group": rd.group, "kind": rd.plural})
        return obj

    def select(self, rd: ResourceDef, ns: str | None, labels=None, fields=None) -> list[dict]:
        lreqs = parse_label_selector(labels) if not isinstance(labels, list) else labels
        freqs = parse_field_selector(fields) if not isinstance(fields, list) else fields
        return [obj for (ons, _), obj in self.live[rd.key].items()
                if (ns is None or not rd.namespaced or ons == ns)
                and _labels_match(obj["metadata"].get("labels"), lreqs) and _fields_match(obj, freqs)]

    def list(self, rd: ResourceDef, ns: str | None, labels=None, fields=None) -> dict:
        return {"apiVersion": rd.api_version, "kind": rd.list_kind,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": self.select(rd, ns, labels, fields)}

    # --- writing -------------------------------------------------------------------------------
    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, rd: ResourceDef, kind: str, old: dict | None, new: dict) -> None:
        self.log.append(_Event(int(new["metadata"]["resourceVersion"]), rd.key, kind, old, new))
        self.log_rvs.append(int(new["metadata"]["resourceVersion"]))
        if len(self.log) > _LOG_LIMIT:
            drop = len(self.log) // 2
            del self.log[:drop], self.log_rvs[:drop]
            self.log_offset += drop
        self.wake()

    def wake(self) -> None:
        if not self.changed.done():
            self.changed.set_result(None)
        self.changed = self.loop.create_future()

    def _store(self, rd: ResourceDef, obj: dict) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace"), meta["name"])
        self.live[rd.key][key] = obj
        okey = (self.kres(rd.key), key[0], key[1])
        if okey in self.handler.objects:
            self.handler.objects[okey].history.append(obj)
        else:
            self.handler.objects[okey] = obj

    def _validate_meta(self, rd: ResourceDef, obj: dict) -> None:
        meta = obj["metadata"]
        name = meta["name"]
        limit = 63 if rd.key in (JOBS, NAMESPACES) else 253
        if len(name) > limit or not _DNS_SUBDOMAIN.match(name) or (
                rd.key in (JOBS, NAMESPACES) and "." in name):
            raise EmulatorError(422, "Invalid", f'{rd.kind}.{rd.group or "core"} "{name}" is invalid: '
                                               f"metadata.name: Invalid value: {name!r}: must be a lowercase RFC 1123 "
                                               f"{'label' if limit == 63 else 'subdomain'} (at most {limit} characters)")
        labelsets = [("metadata.labels", meta.get("labels"))]
        if rd.key == JOBS:
            labelsets.append(("spec.template.metadata.labels",
                              (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")))
        for where, labels in labelsets:
            for key, value in (labels or {}).items():
                prefix, _, lname = key.rpartition("/")
                ok_key = (0 < len(lname) <= 63 and _LABEL_NAME.match(lname)
                          and (not prefix or (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))))
                ok_value = isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.match(value)
                if not (ok_key and ok_value):
                    raise EmulatorError(422, "Invalid", f'{rd.kind} "{name}" is invalid: {where}: '
                                                       f"Invalid value: {key}={value!r}: not a valid label")

    def _apply_schema(self, rd: ResourceDef, obj: dict) -> dict:
        if rd.schema is None or not self.validate:
            return obj
        kept = {k: obj.pop(k) for k in ("apiVersion", "kind", "metadata") if k in obj}
        obj = _schema_walk(obj, rd.schema, "")
        obj.update(kept)
        errors = _schema_errors(obj, rd.schema)
        if errors:
            name = obj["metadata"].get("name")
            raise EmulatorError(422, "Invalid", f'{rd.kind}.{rd.group} "{name}" is invalid: ' + ", ".join(errors),
                                {"name": name, "group": rd.group, "kind": rd.kind,
                                 "causes": [{"message": e} for e in errors]})
        return obj

    def _job_defaults(self, obj: dict) -> None:
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        spec = obj.setdefault("spec", {})
        for key, value in (("backoffLimit", 6), ("completions", 1), ("parallelism", 1),
                           ("suspend", False), ("completionMode", "NonIndexed")):
            spec.setdefault(key, value)
        tmeta = spec.setdefault("template", {}).setdefault("metadata", {})
        labels = tmeta.setdefault("labels", {})
        if not spec.get("manualSelector"):
            labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                           "controller-uid": uid, "job-name": name})
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        if not obj["metadata"].get("labels"):
            obj["metadata"]["labels"] = {k: v for k, v in labels.items()}

    def ensure_namespace(self, ns: str) -> None:
        if (None, ns) not in self.live[NAMESPACES] and NAMESPACES in self.defs:
            self.create(self.defs[NAMESPACES], None, {"metadata": {"name": ns}}, internal=True)

    def create(self, rd: ResourceDef, ns: str | None, body: Any, *, dry_run: bool = False,
               keep_status: bool = False, internal: bool = False) -> dict:
        if not isinstance(body, Mapping):
            raise EmulatorError(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(dict(body))
        meta = obj.get("metadata") or {}
        obj["metadata"] = meta
        if rd.namespaced:
            body_ns = meta.get("namespace")
            if ns and body_ns and body_ns != ns:
                raise EmulatorError(400, "BadRequest", "the namespace of the provided object does not "
                                                      "match the namespace sent on the request")
            ns = ns or body_ns
            if not ns:
                raise EmulatorError(400, "BadRequest", f"a namespace is required to create {rd.qualified}")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
            ns = None
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise EmulatorError(422, "Invalid", f"{rd.kind} is invalid: metadata.name: "
                                                   "Required value: name or generateName is required")
            for _ in range(100):
                meta["name"] = meta["generateName"] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
                if (ns, meta["name"]) not in self.live[rd.key]:
                    break
        name = meta["name"]
        if (ns, name) in self.live[rd.key]:
            raise EmulatorError(409, "AlreadyExists", f'{rd.qualified} "{name}" already exists',
                                {"name": name, "group": rd.group, "kind": rd.plural})
        obj["apiVersion"], obj["kind"] = rd.api_version, rd.kind
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if rd.has_status and not keep_status:
            obj.pop("status", None)
        if rd.key == JOBS:
            self._job_defaults(obj)
        if rd.key == NAMESPACES:
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        self._validate_meta(rd, obj)
        obj = self._apply_schema(rd, obj)
        if rd.key == CRD_RESOURCE:
            new_defs = _crd_resource_defs(obj)
            names = obj["spec"]["names"]
            obj["status"] = {
                "acceptedNames": names, "storedVersions": [d.version for d in new_defs][:1],
                "conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": _now(),
                                "message": m} for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"))]}
        if dry_run:
            return obj
        if rd.namespaced and not internal:
            self.ensure_namespace(ns)
        meta["resourceVersion"] = str(self._next_rv())
        self._store(rd, obj)
        self._emit(rd, "ADDED", None, obj)
        if rd.key == CRD_RESOURCE:
            for d in new_defs:
                self.add_resource(d)
        if meta.get("ownerReferences"):
            self.schedule_gc()
        return obj

    def patch(self, rd: ResourceDef, ns: str | None, name: str, sub: str | None, content_type: str,
              patch: Any, *, dry_run: bool = False) -> tuple[dict, bool]:
        ns = ns if rd.namespaced else None
        ctype = (content_type or "").split(";")[0].strip()
        if ctype == "application/apply-patch+yaml":
            if isinstance(patch, (str, bytes)):
                patch = yaml.safe_load(patch)
            if (ns, name) not in self.live[rd.key] and sub is None:
                body = copy.deepcopy(patch)
                body.setdefault("metadata", {}).setdefault("name", name)
                return self.create(rd, ns, body, dry_run=dry_run), True
        old = self.get(rd, ns, name)
        self._check_sub(rd, sub)
        if ctype == "application/json-patch+json":
            new = json_patch(old, patch)
            rv_precondition = None
        elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                       "application/apply-patch+yaml"):
            if not isinstance(patch, Mapping):
                raise EmulatorError(400, "BadRequest", "a merge patch must be a JSON object")
            rv_precondition = (patch.get("metadata") or {}).get("resourceVersion")
            new = merge_patch(old, patch, strategic=ctype != "application/merge-patch+json")
        else:
            raise EmulatorError(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                                                             f"format - accepted media types include: "
                                                             f"application/json-patch+json, "
                                                             f"application/merge-patch+json, "
                                                             f"application/apply-patch+yaml")
        return self.replace(rd, old, new, sub, rv_precondition=rv_precondition, dry_run=dry_run), False

    def update(self, rd: ResourceDef, ns: str | None, name: str, sub: str | None, body: Any, *,
               dry_run: bool = False) -> dict:
        if not isinstance(body, Mapping):
            raise EmulatorError(400, "BadRequest", "the request body must be a JSON object")
        if (body.get("metadata") or {}).get("name") not in (None, name):
            raise EmulatorError(400, "BadRequest", "the name of the object does not match the name on the URL")
        old = self.get(rd, ns if rd.namespaced else None, name)
        self._check_sub(rd, sub)
        return self.replace(rd, old, copy.deepcopy(dict(body)), sub,
                            rv_precondition=(body.get("metadata") or {}).get("resourceVersion"),
                            dry_run=dry_run)

    def _check_sub(self, rd: ResourceDef, sub: str | None) -> None:
        if sub is not None and (sub != "status" or not rd.has_status):
            raise EmulatorError(404, "NotFound", f"the server could not find the requested resource "
                                                 f"({rd.qualified}/{sub})")

    def replace(self, rd: ResourceDef, old: dict, new: Any, sub: str | None, *,
                rv_precondition: str | None = None, dry_run: bool = False, internal: bool = False) -> dict:
        """Turn a requested new state into the stored one, as the API server's strategies do."""
        if not isinstance(new, dict):
            raise EmulatorError(422, "Invalid", "the patched object is not a JSON object")
        old_meta = old["metadata"]
        if rv_precondition not in (None, "") and str(rv_precondition) != old_meta["resourceVersion"]:
            raise EmulatorError(409, "Conflict", f'Operation cannot be fulfilled on {rd.qualified} '
                                                 f'"{old_meta["name"]}": the object has been modified; please '
                                                 f"apply your changes to the latest version and try again")
        if sub == "status":
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            meta = result.get("metadata")
            if not isinstance(meta, dict):
                meta = result["metadata"] = {}
            if rd.has_status and not internal:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            for key in ("name", "namespace", "uid", "creationTimestamp", "generation",
                        "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
                if key in old_meta:
                    meta[key] = old_meta[key]
                elif not internal:
                    meta.pop(key, None)
            result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
            if rd.key == JOBS and (result.get("spec") or {}).get("template") != (old.get("spec") or {}).get("template"):
                raise EmulatorError(422, "Invalid", f'Job.batch "{old_meta["name"]}" is invalid: '
                                                   "spec.template: Invalid value: field is immutable")
            self._validate_meta(rd, result)
        result = self._apply_schema(rd, result)
        if result == old:
            return old
        ignore = {"metadata"} | ({"status"} if rd.has_status else set())
        if {k: v for k, v in result.items() if k not in ignore} != {k: v for k, v in old.items() if k not in ignore}:
            result["metadata"]["generation"] = int(old_meta.get("generation", 1)) + 1
        if dry_run:
            return result
        result["metadata"]["resourceVersion"] = str(self._next_rv())
        self._store(rd, result)
        self._emit(rd, "MODIFIED", old, result)
        if rd.key == CRD_RESOURCE:
            for d in _crd_resource_defs(result):
                self.add_resource(d)
        if result["metadata"].get("ownerReferences") != old_meta.get("ownerReferences"):
            self.schedule_gc()
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            if rd.key != NAMESPACES:
                return self._remove(rd, result)
            self.schedule_gc()
        return result

    def delete(self, rd: ResourceDef, ns: str | None, name: str, options: Mapping | None = None, *,
               dry_run: bool = False) -> dict:
        options = options or {}
        old = self.get(rd, ns if rd.namespaced else None, name)
        meta = old["metadata"]
        pre = options.get("preconditions") or {}
        if (pre.get("uid") and pre["uid"] != meta["uid"]) or (
                pre.get("resourceVersion") and str(pre["resourceVersion"]) != meta["resourceVersion"]):
            raise EmulatorError(409, "Conflict", f'Operation cannot be fulfilled on {rd.qualified} '
                                                 f'"{name}": precondition failed')
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background")
        if dry_run:
            return old
        if policy == "Orphan":
            self._orphan(meta["uid"])
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and "foregroundDeletion" not in finalizers and self._dependents(meta["uid"]):
            finalizers.append("foregroundDeletion")
        if meta.get("deletionTimestamp"):
            if finalizers != list(meta.get("finalizers") or []):
                new = copy.deepcopy(old)
                new["metadata"]["finalizers"] = finalizers
                return self.replace(rd, old, new, None, internal=True)
            return old
        if finalizers or rd.key == NAMESPACES:
            new = copy.deepcopy(old)
            new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            if finalizers:
                new["metadata"]["finalizers"] = finalizers
            if rd.key == NAMESPACES:
                new["status"] = {"phase": "Terminating"}
            result = self.replace(rd, old, new, None, internal=True)
            self.schedule_gc()
            return result
        return self._remove(rd, old)

    def _remove(self, rd: ResourceDef, obj: dict) -> dict:
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = str(self._next_rv())
        key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        self.live[rd.key].pop(key, None)
        okey = (self.kres(rd.key), key[0], key[1])
        if okey in self.handler.objects:
            self.handler.objects[okey].delete()
        self._emit(rd, "DELETED", obj, final)
        if rd.key == CRD_RESOURCE:
            for d in _crd_resource_defs(obj):
                for item in list(self.live[d.key].values()):
                    self._remove(d, item)
                self.remove_resource(d.key)
        self.schedule_gc()
        return final

    def _dependents(self, uid: str) -> list[tuple[ResourceDef, dict]]:
        return [(self.defs[key], obj) for key, objs in self.live.items() if key in self.defs
                for obj in objs.values()
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])]

    def _orphan(self, uid: str) -> None:
        for rd, obj in self._dependents(uid):
            new = copy.deepcopy(obj)
            refs = [r for r in new["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                del new["metadata"]["ownerReferences"]
            self.replace(rd, obj, new, None, internal=True)

    def schedule_gc(self) -> None:
        if not self.gc_scheduled and not self.closing:
            self.gc_scheduled = True
            self.loop.call_later(0.05, self.gc)

    def gc(self) -> None:
        """One garbage-collector pass; repeats itself while it still finds work."""
        self.gc_scheduled = False
        try:
            worked = self._gc_pass()
        except Exception:  # pragma: no cover - a bug here must not kill the loop
            self.errors.append(traceback.format_exc())
            return
        if worked:
            self.schedule_gc()

    def _gc_pass(self) -> bool:
        worked = False
        everything = [(self.defs[key], obj) for key, objs in self.live.items() if key in self.defs
                      for obj in list(objs.values())]
        by_uid = {obj["metadata"]["uid"]: obj for _, obj in everything}

        def gone(ref: Mapping) -> bool:
            owner = by_uid.get(ref.get("uid"))
            return owner is None or (bool(owner["metadata"].get("deletionTimestamp"))
                                     and "foregroundDeletion" in (owner["metadata"].get("finalizers") or []))

        for rd, obj in everything:
            meta = obj["metadata"]
            refs = meta.get("ownerReferences") or []
            if refs and not meta.get("deletionTimestamp") and all(gone(r) for r in refs):
                key = (meta.get("namespace"), meta["name"])
                if self.live[rd.key].get(key) is obj:
                    self.delete(rd, key[0], key[1], {"propagationPolicy": "Background"})
                    worked = True
        for rd, obj in everything:
            meta = obj["metadata"]
            key = (meta.get("namespace"), meta["name"])
            if self.live[rd.key].get(key) is not obj or not meta.get("deletionTimestamp"):
                continue
            if "foregroundDeletion" in (meta.get("finalizers") or []) and not self._dependents(meta["uid"]):
                new = copy.deepcopy(obj)
                new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != "foregroundDeletion"]
                self.replace(rd, obj, new, None, internal=True)
                worked = True
            elif rd.key == NAMESPACES:
                contents = [(d, o) for d, o in everything if d.namespaced and o["metadata"].get("namespace") == key[1]
                            and self.live[d.key].get((key[1], o["metadata"]["name"])) is o]
                for d, o in contents:
                    if not o["metadata"].get("deletionTimestamp"):
                        self.delete(d, key[1], o["metadata"]["name"])
                        worked = True
                if not any(self.live[d.key].get((key[1], o["metadata"]["name"])) for d, o in contents) \
                        and not meta.get("finalizers"):
                    self._remove(rd, obj)
                    worked = True
        return worked

    # --- watching ------------------------------------------------------------------------------
    def position_after(self, rv: int) -> int | None:
        """The absolute log index of the first event newer than rv, or None if rv is too old."""
        if rv > self.rv:
            return self.log_offset + len(self.log)
        if self.log_offset and (not self.log_rvs or rv < self.log_rvs[0] - 1):
            return None
        return self.log_offset + bisect.bisect_right(self.log_rvs, rv)

    def events_since(self, pos: int) -> tuple[list[_Event] | None, int]:
        if pos < self.log_offset:
            return None, pos
        events = self.log[pos - self.log_offset:]
        return events, pos + len(events)


# ---------------------------------------------------------------------------------------------
# The HTTP side: kmock's server and discovery, with the API served by _Core.

def _parse_path(path: str) -> dict | None:
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3 and not (
            group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    return {"group": group, "version": version, "plural": rest[0],
            "name": rest[1] if len(rest) > 1 else None,
            "subresource": "/".join(rest[2:]) or None, "namespace": namespace}


def _make_handler_class():
    import aiohttp.web
    import kmock
    from kmock._internal import rendering  # kmock==0.8 pinned: private module

    class ShimmedKubernetesEmulator(kmock.KubernetesEmulator):
        """kmock's emulator whose resource endpoints are served by the shim's _Core."""

        core: _Core  # assigned right after construction

        async def __call__(self, raw_request):  # replaces kmock's parser, which crashes on /api/v1/namespaces
            await raw_request.read()
            try:
                return await self._shim_handle(raw_request)
            except EmulatorError as e:
                return aiohttp.web.json_response(e.status(), status=e.code)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an emulator bug: report it like an API server's 500
                self.core.errors.append(traceback.format_exc())
                err = EmulatorError(500, "InternalError", f"emulator error: {e!r}")
                return aiohttp.web.json_response(err.status(), status=500)

        async def _shim_handle(self, raw):
            core = self.core
            body = await raw.read()
            parsed = _parse_path(raw.path)
            if parsed is None:
                return await self._discovery(raw, body)
            params = dict(raw.query)
            method = raw.method.upper()
            name, sub, ns = parsed["name"], parsed["subresource"], parsed["namespace"]
            watch = params.get("watch", "").lower() in ("true", "1")
            verb = {"GET": "watch" if watch else ("get" if name else "list"),
                    "POST": "create", "PATCH": "patch", "PUT": "update",
                    "DELETE": "delete" if name else "deletecollection"}.get(method)
            if verb is None:
                raise EmulatorError(405, "MethodNotAllowed", f"{method} is not supported")
            record = ApiRequest(verb, parsed["group"], parsed["version"], parsed["plural"], sub, ns, name)
            with core.requests_lock:
                core.requests.append(record)
            key = _resource_key((parsed["group"], parsed["version"], parsed["plural"]))
            for fault in core.faults:
                if fault["times"] > 0 and fault["verb"] == verb and fault["key"] == key and (
                        fault["subresource"] in ("*", sub)):
                    fault["times"] -= 1
                    raise EmulatorError(fault["code"], fault["reason"], fault["message"])
            rd = core.rd(key)
            if rd.namespaced and ns is None and verb in ("get", "patch", "update", "delete"):
                raise EmulatorError(404, "NotFound", "the server could not find the requested resource")
            data: Any = None
            if body:
                ctype = raw.headers.get("Content-Type", "")
                if "protobuf" in ctype or "cbor" in ctype:  # client-go then retries in JSON
                    raise EmulatorError(415, "UnsupportedMediaType",
                                        f"the body of the request was in an unknown format - "
                                        f"accepted media types include: application/json, application/yaml")
                try:
                    data = yaml.safe_load(body) if "yaml" in ctype else json.loads(body)
                except ValueError as e:
                    raise EmulatorError(400, "BadRequest", f"cannot parse the request body: {e}") from None
            dry_run = bool(params.get("dryRun"))
            accept = raw.headers.get("Accept", "")
            as_table = "as=Table" in accept
            include = params.get("includeObject", "Metadata")
            status = 200
            if verb == "watch":
                return await self._watch(raw, rd, ns, name, params, as_table, include)
            elif verb == "get":
                core._check_sub(rd, sub)
                obj = core.get(rd, ns if rd.namespaced else None, name)
                result = _table(rd, [obj], include, obj["metadata"]["resourceVersion"]) if as_table else obj
            elif verb == "list":
                result = core.list(rd, ns, params.get("labelSelector"), params.get("fieldSelector"))
                if as_table:
                    result = _table(rd, result["items"], include, result["metadata"]["resourceVersion"])
            elif verb == "create":
                if sub is not None:
                    raise EmulatorError(404, "NotFound", f"subresource {sub!r} is not served")
                result, status = core.create(rd, ns, data, dry_run=dry_run), 201
            elif verb == "patch":
                result, created = core.patch(rd, ns, name, sub, raw.headers.get("Content-Type", ""), data,
                                             dry_run=dry_run)
                status = 201 if created else 200
            elif verb == "update":
                result = core.update(rd, ns, name, sub, data, dry_run=dry_run)
            elif verb == "delete":
                options = dict(data or {}) if isinstance(data, Mapping) else {}
                for key in ("propagationPolicy", "orphanDependents"):
                    if key in params:
                        options[key] = params[key] if key == "propagationPolicy" else params[key] == "true"
                result = core.delete(rd, ns, name, options, dry_run=dry_run)
            else:  # deletecollection
                items = core.select(rd, ns, params.get("labelSelector"), params.get("fieldSelector"))
                for obj in list(items):
                    m = obj["metadata"]
                    if core.live[rd.key].get((m.get("namespace"), m["name"])) is obj:
                        core.delete(rd, m.get("namespace"), m["name"], data if isinstance(data, Mapping) else {},
                                    dry_run=dry_run)
                result = {"apiVersion": rd.api_version, "kind": rd.list_kind,
                          "metadata": {"resourceVersion": str(core.rv)}, "items": items}
            return aiohttp.web.json_response(result, status=status)

        async def _discovery(self, raw, body):
            parts = [p for p in raw.path.strip("/").split("/") if p]
            if parts in (["healthz"], ["readyz"], ["livez"]):
                return aiohttp.web.Response(text="ok")
            if parts == ["version"]:
                return aiohttp.web.json_response({
                    "major": "1", "minor": "32", "gitVersion": "v1.32.0+ratatouille-emulator",
                    "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"})
            group = version = None
            if len(parts) == 2 and parts[0] == "api":
                group, version = "", parts[1]
            elif len(parts) in (2, 3) and parts[0] == "apis":
                group, version = parts[1], (parts[2] if len(parts) == 3 else None)
            request = rendering.Request(
                method=raw.method, url=raw.url, params=dict(raw.query), headers=dict(raw.headers),
                body=body, raw_request=raw,
                resource=None if group is None else kmock.resource(group=group, version=version))
            if raw.method.upper() == "GET":
                if parts == []:
                    return aiohttp.web.json_response(await self._serve_root(request))
                if parts == ["api"]:
                    return aiohttp.web.json_response(await self._serve_api(request))
                if parts == ["apis"]:
                    return aiohttp.web.json_response(await self._serve_apis(request))
                if group is not None and version is not None:
                    try:
                        listing = await self._serve_version(request)
                        listing["groupVersion"] = f"{group}/{version}" if group else version
                        for entry in listing.get("resources", []):  # subresources as the API server lists them
                            if "/" in entry["name"]:
                                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
                            entry["storageVersionHash"] = ""
                        return aiohttp.web.json_response(listing)
                    except kmock.KubernetesError:
                        raise EmulatorError(404, "NotFound", "the server could not find the requested resource")
                if group is not None:
                    try:
                        return aiohttp.web.json_response(await self._serve_group(request))
                    except kmock.KubernetesError:
                        raise EmulatorError(404, "NotFound", "the server could not find the requested resource")
            try:  # anything else (e.g. /openapi/v2): kmock's DSL reactions and fallbacks
                return await kmock.RawHandler._handle(self, request)
            except (kmock.KubernetesError, NotImplementedError):
                raise EmulatorError(404, "NotFound", "the server could not find the requested resource")

        async def _watch(self, raw, rd, ns, name, params, as_table, include):
            core = self.core
            lreqs = parse_label_selector(params.get("labelSelector"))
            freqs = parse_field_selector(params.get("fieldSelector"))
            if name:
                freqs.append(("metadata.name", "=", name))
            ns = ns if rd.namespaced else None
            resp = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(raw)
            first_table = [True]

            def matches(obj):
                return (obj is not None and (ns is None or obj["metadata"].get("namespace") == ns)
                        and _labels_match(obj["metadata"].get("labels"), lreqs) and _fields_match(obj, freqs))

            def encode(kind, obj):
                if as_table and kind != "ERROR" and kind != "BOOKMARK":
                    obj = _table(rd, [obj], include, obj["metadata"]["resourceVersion"])
                    if not first_table[0]:
                        obj["columnDefinitions"] = []
                    first_table[0] = False
                return (json.dumps({"type": kind, "object": obj}) + "\n").encode()

            try:
                rv = params.get("resourceVersion", "")
                initial = params.get("sendInitialEvents") == "true"
                chunks = []
                if not rv or rv == "0" or initial:
                    pos = core.log_offset + len(core.log)
                    for obj in core.select(rd, ns, lreqs, freqs):
                        chunks.append(encode("ADDED", obj))
                    if initial and params.get("allowWatchBookmarks") == "true":
                        chunks.append(encode("BOOKMARK", {
                            "kind": rd.kind, "apiVersion": rd.api_version,
                            "metadata": {"resourceVersion": str(core.rv),
                                         "annotations": {"k8s.io/initial-events-end": "true"}}}))
                else:
                    try:
                        found = core.position_after(int(rv))
                    except ValueError:
                        raise EmulatorError(400, "BadRequest", f"invalid resourceVersion {rv!r}") from None
                    if found is None:
                        await resp.write(encode("ERROR", EmulatorError(
                            410, "Expired", f"too old resource version: {rv} ({core.rv})").status()))
                        await resp.write_eof()
                        return resp
                    pos = found
                for chunk in chunks:
                    await resp.write(chunk)
                timeout = params.get("timeoutSeconds")
                deadline = time.monotonic() + float(timeout) if timeout else None
                while not core.closing:
                    events, pos = core.events_since(pos)
                    if events is None:
                        await resp.write(encode("ERROR", EmulatorError(410, "Expired", "too old resource version").status()))
                        break
                    for ev in events:
                        if ev.key != rd.key:
                            continue
                        was, now = matches(ev.old), matches(ev.new)
                        kind = ev.type
                        if ev.type == "DELETED":
                            kind = "DELETED" if was or now else None
                        elif ev.type == "MODIFIED":
                            kind = "MODIFIED" if was and now else "ADDED" if now else "DELETED" if was else None
                        elif not now:
                            kind = None
                        if kind:
                            await resp.write(encode(kind, ev.new))
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    waiter = core.changed
                    try:
                        await asyncio.wait_for(asyncio.shield(waiter), timeout=min(remaining or 1.0, 1.0))
                    except asyncio.TimeoutError:
                        if raw.transport is None or raw.transport.is_closing():
                            return resp
                await resp.write_eof()
            except (ConnectionError, RuntimeError):
                pass  # the client went away
            return resp

    return ShimmedKubernetesEmulator


# ---------------------------------------------------------------------------------------------
# The public, thread-safe façade.

class Emulator:
    """A Kubernetes API emulator on loopback (kmock + shims), run in a background thread.

    Use as a context manager::

        with Emulator(crds=["crds/ratatouilleruns.ratatouille.dev.yaml"]) as k8s:
            k8s.write_kubeconfig(tmp_path / "kubeconfig")
            ...  # point kopf, kubectl, the kubernetes client at k8s.url
            assert k8s.count("create", "batch/v1/jobs") == 1

    The direct accessors (get/list/create/patch/patch_status/delete) take resources as
    'v1/pods', 'batch/v1/jobs', 'ratatouille.dev/v1alpha1/ratatouilleruns' and act exactly as the
    API does (resource versions, watch events, garbage collection), without being recorded
    in `requests`.
    """

    def __init__(self, crds: Iterable[str | os.PathLike] = (), *, host: str = "127.0.0.1",
                 port: int = 0, namespaces: Iterable[str] = ("default",), validate: bool = True):
        self._crd_paths = [Path(p) for p in crds]
        self._host, self._port = host, port
        self._namespaces = list(namespaces)
        self._validate = validate
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._core: _Core | None = None
        self.kmock: Any = None  # the kmock handler (for kmock's own `objects` and DSL reactions)
        self.url: str = ""

    # --- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "Emulator":
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._startup_error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._startup_error
        if not self._ready.is_set():
            raise RuntimeError("the Kubernetes emulator did not start within 30 s")
        try:
            for path in self._crd_paths:
                self.register_crd(path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # pragma: no cover - reported by start()
            self._startup_error = e
            self._ready.set()

    async def _main(self) -> None:
        import kmock

        handler_cls = _make_handler_class()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        handler = handler_cls()
        core = _Core(kmock, handler, self._loop, validate=self._validate)
        handler.core = core
        bundled = kmock.ResourcesArray()
        bundled.load_bundled()
        for res in bundled:
            info = bundled[res]
            if res.group == "metrics.k8s.io" or not res.plural or "/" in res.plural:
                continue
            core.add_resource(ResourceDef(
                res.group, res.version, res.plural, info.kind or res.plural.capitalize(),
                namespaced=bool(info.namespaced), subresources=info.subresources,
                shortnames=info.shortnames, categories=info.categories, singular=info.singular,
                verbs=info.verbs or ALL_VERBS))
        for rd in (ResourceDef("", "v1", "events", "Event", namespaced=True, shortnames=["ev"]),
                   ResourceDef("events.k8s.io", "v1", "events", "Event", namespaced=True, shortnames=["ev"]),
                   ResourceDef("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)):
            if rd.key not in core.defs:
                core.add_resource(rd)
        for ns in self._namespaces:
            core.ensure_namespace(ns)
        self._core = core
        self.kmock = handler
        async with handler, kmock.Server(handler, host=self._host, port=self._port or None) as server:
            self.url = f"http://{self._host}:{server.port}"
            self._ready.set()
            await self._stop.wait()
            core.closing = True
            core.wake()
            await asyncio.sleep(0.05)

    def _call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        if self._loop is None or self._core is None:
            raise RuntimeError("the emulator is not started")
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)

        async def run():
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    # --- resources -----------------------------------------------------------------------------
    def register_crd(self, path_or_body: str | os.PathLike | Mapping) -> list[ResourceDef]:
        """Serve the custom resources a CRD file (or CRD dict) defines; the CRD object itself is
        stored under apiextensions.k8s.io/v1 customresourcedefinitions, as kopf expects."""
        docs = [path_or_body] if isinstance(path_or_body, Mapping) else _load_crd_documents(path_or_body)

        def register():
            rd = self._core.defs[CRD_RESOURCE]
            out = []
            for doc in docs:
                name = (doc.get("metadata") or {}).get("name")
                existing = self._core.live[CRD_RESOURCE].get((None, name))
                if existing is None:
                    self._core.create(rd, None, doc)
                else:
                    body = copy.deepcopy(dict(doc))
                    self._core.replace(rd, existing, body, None)
                out.extend(_crd_resource_defs(doc))
            return out

        return self._call(register)

    def register_resource(self, rd: ResourceDef) -> None:
        self._call(self._core.add_resource, rd)

    @property
    def resources(self) -> dict[str, ResourceDef]:
        return self._call(lambda: dict(self._core.defs)) if self._core else {}

    # --- direct object access ------------------------------------------------------------------
    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The object as stored now (a copy), or None if absent."""
        def get():
            try:
                return copy.deepcopy(self._core.get(self._core.rd(resource), namespace, name))
            except EmulatorError as e:
                if e.code == 404:
                    return None
                raise
        return self._call(get)

    def list(self, resource: str, namespace: str | None = None,
             labels: str | Mapping[str, str] | None = None, fields: str | None = None) -> list[dict]:
        """Objects (copies) of a resource, optionally in one namespace and matching a label
        selector (a dict for equality, or a selector string)."""
        return self._call(lambda: copy.deepcopy(self._core.select(self._core.rd(resource), namespace, labels, fields)))

    def create(self, resource: str, body: Mapping, namespace: str | None = None) -> dict:
        """Create an object as the API would (status kept, for seeding)."""
        return self._call(lambda: copy.deepcopy(self._core.create(
            self._core.rd(resource), namespace, body, keep_status=True)))

    def patch(self, resource: str, namespace: str | None, name: str, patch: Mapping, *,
              subresource: str | None = None, content_type: str = "application/merge-patch+json") -> dict:
        return self._call(lambda: copy.deepcopy(self._core.patch(
            self._core.rd(resource), namespace, name, subresource, content_type, patch)[0]))

    def patch_status(self, resource: str, namespace: str | None, name: str, status: Mapping) -> dict:
        """Merge-patch `status` through the status subresource (new resourceVersion, a MODIFIED
        watch event, generation unchanged)."""
        def patch_status():
            rd = self._core.rd(resource)
            old = self._core.get(rd, namespace, name)
            new = merge_patch(old, {"status": dict(status)})
            return copy.deepcopy(self._core.replace(rd, old, new, "status" if rd.has_status else None))
        return self._call(patch_status)

    def delete(self, resource: str, namespace: str | None, name: str, *,
               propagation_policy: str = "Background") -> dict | None:
        """Delete as the API does (finalizers honoured); None if the object was absent."""
        def delete():
            try:
                return copy.deepcopy(self._core.delete(self._core.rd(resource), namespace, name,
                                                       {"propagationPolicy": propagation_policy}))
            except EmulatorError as e:
                if e.code == 404:
                    return None
                raise
        return self._call(delete)

    @property
    def resource_version(self) -> int:
        return self._core.rv if self._core else 0

    # --- requests and faults -------------------------------------------------------------------
    @property
    def requests(self) -> list[ApiRequest]:
        """A snapshot of every API request (discovery excluded) with its RBAC verb."""
        if self._core is None:
            return []
        with self._core.requests_lock:
            return list(self._core.requests)

    def count(self, verb: str, resource: str, *, subresource: str | None = None,
              namespace: str | None = None) -> int:
        key = _resource_key(resource)
        return sum(1 for r in self.requests if r.verb == verb and r.subresource == subresource
                   and _resource_key((r.group, r.version, r.resource)) == key
                   and (namespace is None or r.namespace == namespace))

    def clear_requests(self) -> None:
        if self._core is not None:
            with self._core.requests_lock:
                self._core.requests.clear()

    @property
    def errors(self) -> list[str]:
        """Tracebacks of emulator-internal errors (answered as HTTP 500); empty when healthy."""
        return list(self._core.errors) if self._core else []

    def fail_next(self, verb: str, resource: str, *, times: int = 1, code: int = 500,
                  reason: str = "InternalError", message: str = "injected fault",
                  subresource: str | None = "*") -> None:
        """Answer the next `times` API requests of this verb and resource with an error."""
        fault = {"verb": verb, "key": _resource_key(resource), "times": times, "code": code,
                 "reason": reason, "message": message, "subresource": subresource}
        self._call(self._core.faults.append, fault)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
        """Poll `predicate` until it returns something truthy; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    # --- kubeconfig ----------------------------------------------------------------------------
    def write_kubeconfig(self, path: str | os.PathLike, *, namespace: str = "default") -> Path:
        path = Path(path)
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "ratatouille-emulator",
                          "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "emulator-user", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "ratatouille-emulator",
                          "context": {"cluster": "ratatouille-emulator", "user": "emulator-user",
                                      "namespace": namespace}}],
            "current-context": "ratatouille-emulator",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path


# ---------------------------------------------------------------------------------------------
# The CLI hook.

def _default_crds() -> list[Path]:
    here = Path(__file__).resolve().parent
    repo = here.parent.parent / "crds"
    if repo.is_dir() and sorted(repo.glob("*.yaml")):
        return sorted(repo.glob("*.yaml"))
    return [here / "crd.yaml"] if (here / "crd.yaml").exists() else []


def serve_forever(args: Any, *, services: Iterable[Callable[[Emulator], Any]] = (),
                  stop_event: threading.Event | None = None, out=None) -> int:
    """Run an emulator until Ctrl-C or SIGTERM (or `stop_event`), for `ratatouille dev-cluster`.

    `args` may carry: crds (list of CRD files; default: the project's), kubeconfig (path; default
    ./kubeconfig.emulator), port (0 = any free port), host. Each of `services` is called with the
    started emulator and must return a context manager (a job controller, an S3 server); a
    service's entered value may offer `usage_lines` to print.
    """
    import contextlib

    out = out or sys.stdout
    crds = list(getattr(args, "crds", None) or _default_crds())
    kubeconfig = Path(getattr(args, "kubeconfig", None) or "kubeconfig.emulator").resolve()
    port = int(getattr(args, "port", 0) or 0)
    host = getattr(args, "host", None) or "127.0.0.1"
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        with Emulator(crds=crds, host=host, port=port) as emulator, contextlib.ExitStack() as stack:
            emulator.write_kubeconfig(kubeconfig)
            lines = [f"Kubernetes API emulator listening on {emulator.url}",
                     f"  serving CRDs: {', '.join(str(c) for c in crds) or '(none)'}",
                     f"export KUBECONFIG={kubeconfig}",
                     "  kubectl get rrun                      # list RatatouilleRuns",
                     "  kubectl apply -f run.yaml --validate=false",
                     "  ratatouille operator --namespace default   # in another shell, same KUBECONFIG"]
            for service in services:
                entered = stack.enter_context(service(emulator))
                lines.extend(getattr(entered, "usage_lines", None) or [])
            lines.append("Press Ctrl-C to stop.")
            print("\n".join(lines), file=out, flush=True)
            while not stop.wait(0.2):
                pass
            print("Stopping the Kubernetes API emulator.", file=out, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ratatouille_operator.emulator",
                                     description="Serve an emulated Kubernetes API on loopback.")
    parser.add_argument("--crd", dest="crds", action="append", help="a CRD file to serve (repeatable)")
    parser.add_argument("--kubeconfig", default="kubeconfig.emulator")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    return serve_forever(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
