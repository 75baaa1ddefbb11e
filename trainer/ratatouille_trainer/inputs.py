"""What a cached auxiliary fine-tuning was computed from, by content.

An auxiliary cache entry's place (``cache/aux/<key>``) is named by the spec: the foundation's and
the dataset's URIs, the recipe, the seed. URIs are not content: a dataset or foundation replaced
at the same URI would otherwise reuse a fine-tuning of the old data. So the trainer that writes
an entry records, in ``inputs.json`` beside its model, the content identity of what it read:

- the dataset: a digest of its listing (every visible object's relative key, size and ETag, or
  mtime and size for local files) and the number of objects;
- the foundation weights (when the spec names a file): its size and ETag (or mtime and size).

Whoever is about to use the entry (a trainer told its output is already complete, the local
executor counting cache hits) compares that record with the inputs as they are now: an entry
whose inputs changed, or that records none (written before this record existed), is a miss and
is trained again, with a warning that says what changed. On a cluster the operator does not look
at storage to decide this: every auxiliary Job is created, and its trainer returns at once when
the entry is complete and current.

Torch-free (the local executor imports it).
"""
from __future__ import annotations

import hashlib
from typing import Any

from .integrity import read_object
from ratatouille_contract.layout import INPUTS, join


def dataset_identity(storage, dataset: str) -> dict[str, Any]:
    from .prepared import dataset_entries  # the same visible-object rule as prepared datasets

    entries = dataset_entries(storage, dataset)
    h = hashlib.sha256()
    for rel, size, token in entries:
        h.update(f"{rel}\t{size}\t{token}\n".encode())
    return {"uri": dataset, "objects": len(entries), "digest": h.hexdigest()}


def weights_identity(storage, uri: str) -> dict[str, Any]:
    return {"uri": uri, "size": storage.size(uri), "version": storage.etag_or_mtime(uri)}


def identity(storage, dataset: str, weights: str | None) -> dict[str, Any]:
    """The content identity of an auxiliary fine-tuning's inputs (raises NotFound / DataError
    when the dataset or the foundation weights are not there)."""
    out: dict[str, Any] = {"dataset": dataset_identity(storage, dataset)}
    if weights:
        out["foundation"] = weights_identity(storage, weights)
    return out


def of_description(storage, desc) -> dict[str, Any] | None:
    """The identity to record for ``desc``'s result, or None when its stage is not cached by
    content (only auxiliary fine-tunings live in the shared cache)."""
    if desc.stage != "aux":
        return None
    return identity(storage, desc.data.dataset, desc.foundation.weights)


def record(storage, prefix: str, ident: dict[str, Any]) -> None:
    storage.write_json(join(prefix, INPUTS), ident)


def changed(storage, prefix: str, ident: dict[str, Any]) -> str | None:
    """Why the result under ``prefix`` was not computed from ``ident``'s inputs, or None when
    it was."""
    recorded, why = read_object(storage, join(prefix, INPUTS))
    if why is not None:
        return f"{why}: its inputs are unknown"
    for what, label in (("dataset", "dataset"), ("foundation", "foundation weights")):
        now, then = ident.get(what), recorded.get(what)
        if now is None and then is None:
            continue
        if now is None or then is None:
            return f"its inputs and the current ones differ in whether they name {label}"
        if what == "dataset" and (now.get("digest") != then.get("digest")):
            return (f"the dataset {now['uri']} changed since it was trained "
                    f"({then.get('objects')} -> {now.get('objects')} objects, listing digest differs)")
        if what == "foundation" and (now.get("size"), now.get("version")) != (then.get("size"), then.get("version")):
            return f"the foundation weights {now['uri']} changed since it was trained"
    return None
