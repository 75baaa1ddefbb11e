"""Every storage key and file name of a run (docs/contract.md, "Storage layout").

    <storage.uri>/<namespace>/<run>/<uid>/        run_prefix
      status.json                                 the local executor's record (STATUS)
      prepare/<member>/  linear-probe/  target/<i>/  average/     stage_output
    <storage.uri>/cache/aux/<key>/                aux_cache_uri: an auxiliary fine-tuning, shared
    <storage.uri>/cache/data/<key>/               data_cache_uri: prepared datasets, shared

    <member prefix>/
      LEASE                          the writer's exclusive lease (lease.py); gone once it is done
      model.safetensors  metrics.json  DONE  (and the average's lineage, card, timm/)
      inputs.json                    an auxiliary cache entry's inputs, by content (inputs.py)
      checkpoint/<attempt>/          one writer's checkpoints: state.json, step-XXXXXXXX/
                                     {model,optimizer}.safetensors

Each writer (one trainer process) has its own attempt id, so it only ever writes or deletes
under its own ``checkpoint/<attempt>/``: a stale writer cannot delete the current one's
checkpoint. A writer resumes from the newest complete checkpoint of the earlier attempts.

Which auxiliary cache entry a member is (its key, a hash of the spec) is the planner's decision
(planning/naming.py); where it lives is here. Standard library only.
"""
from __future__ import annotations

import os
import re
import time
from typing import Protocol

MODEL = "model.safetensors"
METRICS = "metrics.json"
DONE = "DONE"
LEASE = "LEASE"
INPUTS = "inputs.json"
STATUS = "status.json"
CHECKPOINTS = "checkpoint"
ATTEMPT_PREFIX = "attempt-"
# inside checkpoint/<attempt>/: state.json, and step-XXXXXXXX/{model,optimizer}.safetensors
CHECKPOINT_STATE = "state.json"
CHECKPOINT_MODEL = MODEL
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"

# Where each stage's members live under the run prefix (aux members live in the shared cache).
STAGE_DIRS = {"prepare": "prepare", "linear-probe": "linear-probe", "target": "target", "average": "average"}
SINGLE_MEMBER_STAGES = ("linear-probe", "average")   # one member: the stage's folder is its output

#: A URI's "<scheme>://" head, the scheme as group 1 (RFC 3986); what has none is a path.
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RunLike(Protocol):
    namespace: str
    name: str
    uid: str


def join(uri: str, *parts: str) -> str:
    """Join key parts onto a URI with single slashes, keeping the URI's own style."""
    m = SCHEME.match(uri)
    head = m.group(0) if m else ""
    rest = uri[len(head):]
    stripped = rest.rstrip("/")
    out = head + (stripped or ("/" if rest.startswith("/") else ""))
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = out + part if out.endswith("/") else out + "/" + part
    return out


# -- run and cache prefixes ----------------------------------------------------------------------
def run_prefix(storage_uri: str, run: RunLike) -> str:
    """``<storage.uri>/<namespace>/<run>/<uid>``: everything one run writes outside the caches."""
    return f"{storage_uri}/{run.namespace}/{run.name}/{run.uid}"


def aux_cache_uri(storage_uri: str, key: str) -> str:
    """One auxiliary fine-tuning's entry in the shared cache (``key``: the planner's aux_cache_key)."""
    return f"{storage_uri}/cache/aux/{key}"


def data_cache_uri(storage_uri: str) -> str:
    """Root of the prepared-dataset cache entries (the trainer's prepared.py), shared like cache/aux."""
    return f"{storage_uri}/cache/data"


def stage_output(prefix: str, stage: str, member: str) -> str:
    """Where a member of a stage other than ``aux`` writes, under the run prefix (no trailing slash)."""
    if stage not in STAGE_DIRS:
        raise ValueError(f"unknown stage {stage!r}" + (" (aux members live in the cache: aux_cache_uri)"
                                                       if stage == "aux" else ""))
    if stage in SINGLE_MEMBER_STAGES:
        return f"{prefix}/{STAGE_DIRS[stage]}"
    return f"{prefix}/{STAGE_DIRS[stage]}/{member}"


def status_uri(prefix: str) -> str:
    return join(prefix, STATUS)


# -- files inside a member's prefix -------------------------------------------------------------
def model_uri(output: str) -> str:
    return join(output, MODEL)


def metrics_uri(output: str) -> str:
    return join(output, METRICS)


def done_uri(output: str) -> str:
    return join(output, DONE)


def lease_uri(output: str) -> str:
    return join(output, LEASE)


def checkpoint_root(output: str) -> str:
    return join(output, CHECKPOINTS)


def new_attempt() -> str:
    """A fresh attempt id: ``attempt-<UTC time>-<random>`` (sorts by start time)."""
    return f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(4).hex()}"


def is_attempt(name: str) -> bool:
    return name.startswith(ATTEMPT_PREFIX)
