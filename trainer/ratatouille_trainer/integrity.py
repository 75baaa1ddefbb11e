"""Is a finished result what its ``DONE`` marker says it is?

``DONE`` records the sha256 of the ``model.safetensors`` it vouches for; ``metrics.json`` records
it too. A result *verifies* when its DONE marker is a JSON object, its model exists and hashes to
that sha256, and its metrics.json is strict JSON (no bare NaN/Infinity) describing the same
model. Whoever is about to use a result (the local executor counting cache hits or resuming, a
trainer told its output is already complete, a target reading its auxiliary featurizer or the
linear-probe head) checks it first; one that does not verify loses its DONE marker, with a
warning on stderr, so the member is trained again rather than used or trusted.

Verification results are remembered per (URI, version token) in :class:`Verifier`, so the same
unchanged file is hashed once per process. Torch-free (the operator side imports it).
"""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from ratatouille_contract.layout import DONE, METRICS, MODEL, join

from .storage import NotFound, StorageError

__all__ = ["MODEL", "METRICS", "strict_json", "loads_strict", "read_object", "problem", "Verifier", "discard"]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: bytes | str) -> Any:
    """json.loads that refuses NaN, Infinity and -Infinity (Python writes them; JSON has none)."""
    return json.loads(data, parse_constant=_refuse_constant)


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` fit for strict JSON: non-finite floats become None (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def read_object(storage, uri: str) -> tuple[dict | None, str | None]:
    """(the strict-JSON object stored at ``uri``, None), or (None, why it is not one)."""
    try:
        obj = loads_strict(storage.read_bytes(uri))
    except NotFound:
        return None, f"{uri} is missing"
    except ValueError:
        return None, f"{uri} is not strict JSON"
    if not isinstance(obj, dict):
        return None, f"{uri} is not a JSON object"
    return obj, None


def problem(storage, prefix: str, model: str = MODEL, *, sha256=None) -> str | None:
    """Why the result under ``prefix`` does not verify, or None when it does (or has no DONE:
    an unfinished prefix is not a result, nothing to verify). ``sha256(uri)`` computes a digest
    (default: the storage's own)."""
    done_uri = join(prefix, DONE)
    try:
        raw = storage.read_bytes(done_uri)
    except NotFound:
        return None
    try:
        done = loads_strict(raw)
    except ValueError:
        return f"{done_uri} is not JSON"
    if not isinstance(done, dict):
        return f"{done_uri} is not a JSON object"
    want = done.get("sha256")
    metrics_uri = join(prefix, METRICS)
    metrics, why = read_object(storage, metrics_uri)
    if why is not None:
        return why
    if want is None:
        return None if metrics.get("sha256") is None else f"{done_uri} records no sha256"
    if metrics.get("sha256") not in (None, want):
        return f"{metrics_uri} describes another model (sha256 {str(metrics['sha256'])[:12]}...)"
    model_uri = join(prefix, model)
    try:
        got = (sha256 or storage.sha256_of)(model_uri)
    except NotFound:
        return f"{model_uri} is missing"
    if got != want:
        return f"{model_uri} has sha256 {got[:12]}..., its DONE marker records {str(want)[:12]}..."
    return None


def discard(storage, prefix: str, why: str, *, what: str = "result") -> None:
    """Delete ``prefix``'s DONE marker (so it is redone), saying why on stderr."""
    print(f"ratatouille: warning: {what} {prefix} does not verify ({why}): discarding its DONE "
          "marker; it will be trained again", file=sys.stderr, flush=True)
    try:
        storage.delete(join(prefix, DONE))
    except NotFound:
        pass


class Verifier:
    """Verifies results, remembering the answer per (DONE version, model version): an unchanged
    result is hashed once. ``check(prefix)`` -> True when it verifies; when it does not, its DONE
    marker is discarded (with a warning) and False is returned."""

    def __init__(self, storage, what: str = "result") -> None:
        self.storage = storage
        self.what = what
        self._seen: dict[str, tuple[tuple, bool]] = {}

    def _version(self, prefix: str) -> tuple:
        out = []
        for name in (DONE, MODEL, METRICS):
            try:
                out.append(self.storage.etag_or_mtime(join(prefix, name)))
            except NotFound:
                out.append(None)
        return tuple(out)

    def check(self, prefix: str) -> bool:
        try:
            version = self._version(prefix)
        except StorageError:
            return False
        if version[0] is None:  # no DONE: not finished
            return False
        seen = self._seen.get(prefix)
        if seen is not None and seen[0] == version:
            return seen[1]
        why = problem(self.storage, prefix)
        if why is not None:
            discard(self.storage, prefix, why, what=self.what)
            self._seen.pop(prefix, None)
            return False
        self._seen[prefix] = (version, True)
        return True
