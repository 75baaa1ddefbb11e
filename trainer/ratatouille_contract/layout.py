"""The keys a trainer writes inside one member's prefix (docs/contract.md, "Storage layout").

    <member prefix>/
      LEASE                          the writer's exclusive lease (lease.py); gone once it is done
      model.safetensors  metrics.json  DONE  (and the average's lineage, card, timm/)
      inputs.json                    an auxiliary cache entry's inputs, by content (inputs.py)
      checkpoint/<attempt>/          one writer's checkpoints: state.json, step-XXXXXXXX/
                                     {model,optimizer}.safetensors

Each writer (one trainer process) has its own attempt id, so it only ever writes or deletes
under its own ``checkpoint/<attempt>/``: a stale writer cannot delete the current one's
checkpoint. A writer resumes from the newest complete checkpoint of the earlier attempts.
Torch-free and stdlib-only.
"""
from __future__ import annotations

import os
import time

from .storage import join

MODEL = "model.safetensors"
METRICS = "metrics.json"
LEASE = "LEASE"
INPUTS = "inputs.json"
CHECKPOINTS = "checkpoint"
ATTEMPT_PREFIX = "attempt-"


def lease_uri(output: str) -> str:
    return join(output, LEASE)


def checkpoint_root(output: str) -> str:
    return join(output, CHECKPOINTS)


def new_attempt() -> str:
    """A fresh attempt id: ``attempt-<UTC time>-<random>`` (sorts by start time)."""
    return f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.urandom(4).hex()}"


def is_attempt(name: str) -> bool:
    return name.startswith(ATTEMPT_PREFIX)
