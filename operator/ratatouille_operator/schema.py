"""The RatatouilleRun CRD shipped with the package (`crd.yaml`), and its schema's defaults applied
as the API server applies them. The CRD is the one source of every spec default: the parser
(`spec.py`) reads a defaulted body and restates none. Pure: no kopf, kubernetes, boto3 or torch.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Mapping

import yaml

API_GROUP = "ratatouille.dev"
API_VERSION = "v1alpha1"
KIND = "RatatouilleRun"
PLURAL = "ratatouilleruns"
CRD_FILE = Path(__file__).with_name("crd.yaml")


@functools.lru_cache(maxsize=1)
def _crd() -> dict:
    with open(CRD_FILE, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_crd() -> dict:
    """The whole CustomResourceDefinition shipped with the package (a fresh copy)."""
    return copy.deepcopy(_crd())


def load_crd_schema(version: str = API_VERSION) -> dict:
    """The openAPIV3Schema of `version` from the package copy of the CRD (a fresh copy)."""
    for v in _crd()["spec"]["versions"]:
        if v["name"] == version:
            return copy.deepcopy(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"CRD has no version {version!r}")


def apply_defaults(schema: Mapping[str, Any], obj: Any) -> Any:
    """Apply structural-schema defaults to `obj` in place, as the API server does; returns `obj`.

    Missing properties (and nulls in non-nullable properties) that have a default get a copy of
    it; then every property is walked recursively, defaulted ones included, so nested defaults
    inside a `default: {}` apply too. Nulls in non-nullable properties without a default are
    dropped. Array items and additionalProperties values are walked with their item schema.
    """
    if not isinstance(schema, Mapping):
        return obj
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            present = key in obj
            if present and obj[key] is None and not sub.get("nullable", False):
                if "default" in sub:
                    obj[key] = copy.deepcopy(sub["default"])
                else:
                    del obj[key]
            elif not present and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if key in props:
                apply_defaults(props[key], value)
            elif isinstance(extra, Mapping):
                apply_defaults(extra, value)
    elif isinstance(obj, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for value in obj:
                apply_defaults(items, value)
    return obj


def spec_schema() -> dict:
    """The schema of ``spec`` (a fresh copy)."""
    return load_crd_schema()["properties"]["spec"]


@functools.lru_cache(maxsize=1)
def _spec_schema() -> dict:
    return spec_schema()


def defaulted_spec(spec: Mapping[str, Any]) -> dict:
    """A copy of ``spec`` with the CRD's defaults applied (a no-op on a body the API server or
    `validation` already defaulted)."""
    return apply_defaults(_spec_schema(), copy.deepcopy(dict(spec)))
