"""Naming: what every member and its Job are called and where their results live.

Deterministic names (`job_name`, `label_value`, `job_labels`), each member's output
(`member_output`: which key of the contract's `layout` it is), the auxiliary cache: which entries
a run has (`aux_entries`, the one loop over auxiliaries and their runs) and their content keys
(`aux_cache_key`, which hashes the hyperparameters fine-tuning k draws), and the prepare members
of `spec.dataPreparation`. Where keys live (run prefix, caches, file names) is
`ratatouille_contract.layout`. Pure: standard library, `spec`, the contract.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from typing import Any, NamedTuple

from ratatouille_contract import hparams as _hparams
from ratatouille_contract import jobdesc as _jd
from ratatouille_contract import layout

from ..spec import Augmentation, Auxiliary, RunSpec
from .vocabulary import (AUX_HOLDOUT_FRACTION, LABEL_ATTEMPT, LABEL_KUEUE_QUEUE, LABEL_MANAGED_BY,
                         LABEL_MEMBER, LABEL_RUN, LABEL_RUN_UID, LABEL_STAGE, MANAGED_BY, PREPARE_TARGET,
                         SHORT, STAGE_AUX, RunRef)

# -- names ----------------------------------------------------------------------------------
_NOT_DNS = re.compile(r"[^a-z0-9-]")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9._-]")


def _hash6(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _dns(text: str) -> str:
    return _NOT_DNS.sub("-", text.lower()).strip("-")


def job_name(run_name: str, stage: str, member: str, attempt: int) -> str:
    """`<run>-<short>-<member>-a<attempt>`, a lowercase DNS-1123 label of at most 63 characters.

    Longer names keep their stage/member/attempt suffix whole, shorten the run part and insert a
    hash of the full name, so distinct children never collide and the result is deterministic.
    """
    short = SHORT.get(stage, stage)
    full = f"{run_name}-{short}-{member}-a{attempt}"
    name = _dns(full)
    if len(name) <= 63:
        return name
    digest = _hash6(full)
    suffix = "-" + _dns(f"{short}-{member}-a{attempt}")
    room = 63 - len(suffix) - len(digest) - 1
    prefix = _dns(run_name)[:max(room, 0)].rstrip("-")
    if prefix:
        return f"{prefix}-{digest}{suffix}"
    # The member alone is too long: keep what fits, the hash keeps it unique.
    return name[:63 - len(digest) - 1].rstrip("-") + "-" + digest


def label_value(value: str) -> str:
    """A valid label value (<= 63 chars, alphanumeric ends); long values keep a hash suffix."""
    text = _NOT_LABEL.sub("-", str(value))
    if len(text) > 63:
        text = text[:56].rstrip("-._") + "-" + _hash6(str(value))
    return text.strip("-._")


def job_labels(spec: RunSpec, run: RunRef, stage: str, member: str, attempt: int) -> dict[str, str]:
    labels = {
        LABEL_RUN: label_value(run.name),
        LABEL_RUN_UID: label_value(run.uid),
        LABEL_STAGE: stage,
        LABEL_MEMBER: label_value(member),
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    if spec.queue_name:
        labels[LABEL_KUEUE_QUEUE] = spec.queue_name
    return labels


# -- storage keys ----------------------------------------------------------------------------
def auxiliary(spec: RunSpec, aux: Auxiliary | str) -> Auxiliary:
    if isinstance(aux, Auxiliary):
        return aux
    for a in spec.auxiliaries:
        if a.name == aux:
            return a
    raise KeyError(f"no auxiliary named {aux!r}")


def aux_cache_key(spec: RunSpec, aux: Auxiliary | str, k: int) -> str:
    """Identity of one auxiliary fine-tuning, shared by every run in the same storage and
    cache scope (the namespace, on a cluster).

    The material is what determines the fine-tuning: the foundation, the dataset, its split,
    the budgets, the hyperparameters fine-tuning k drew (`aux_hyperparameters`), the pool's
    seed `auxiliaryFinetune.seed` and k. Not the run's `spec.seed` nor the target, so the pool
    is trained once and reused by runs with other seeds and targets. The augmentation is in it
    only when it differs from the default, and the drawn table is only `lr` unless the spec
    names more, so entries trained before either existed keep their keys."""
    a = auxiliary(spec, aux)
    af = spec.auxiliary_finetune
    material: dict[str, Any] = {
        "foundation": {"model": spec.foundation.model, "weights": spec.foundation.weights,
                       "inputSize": spec.foundation.input_size},
        "dataset": a.dataset,
        "holdoutFraction": AUX_HOLDOUT_FRACTION,
        "auxiliaryFinetune": {"steps": af.steps, "batchSize": af.batch_size,
                              **aux_hyperparameters(spec, a, k)},
        "linearProbe": {"steps": spec.linear_probe.steps, "lr": spec.linear_probe.lr},
        "seed": af.seed,
        "k": int(k),
    }
    if spec.augmentation != Augmentation():
        material["augmentation"] = asdict(job_augmentation(spec))
    if spec.aux_cache_scope:
        # Runs of another namespace neither read nor write this entry (a tenant cannot plant a
        # fine-tuning another one then builds on), unless the operator shares the cache.
        material["scope"] = spec.aux_cache_scope
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def aux_member(aux_name: str, k: int) -> str:
    return f"{aux_name}-{k}"


def split_aux_member(member: str) -> tuple[str, int]:
    name, _, k = member.rpartition("-")
    if not name or not k.isdigit():
        raise ValueError(f"not an auxiliary member name: {member!r}")
    return name, int(k)


def prepare_members(spec: RunSpec) -> dict[str, str]:
    """Dataset URI -> prepare member (``target``, ``aux-<name>``), one per distinct dataset;
    empty unless ``spec.dataPreparation.enabled``."""
    if not spec.data_preparation.enabled:
        return {}
    out = {spec.target.dataset: PREPARE_TARGET}
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if not aux.recycled and aux.dataset not in out:
            out[str(aux.dataset)] = f"aux-{aux.name}"
    return out


def member_output(spec: RunSpec, run: RunRef, stage: str, member: str) -> str:
    """Where a member's results live (no trailing slash); aux members live in the shared cache."""
    if stage == STAGE_AUX:
        name, k = split_aux_member(member)
        return layout.aux_cache_uri(spec.storage.uri, aux_cache_key(spec, name, k))
    return layout.stage_output(layout.run_prefix(spec.storage.uri, run), stage, member)


def hparam_table(spec: RunSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    table = dict(_hparams.DEFAULT_TABLE)
    for name, hp in spec.finetune.hyperparameters.items():
        table[name] = (hp.default, tuple(hp.choices))
    return table


def target_hyperparameters(spec: RunSpec, i: int) -> dict[str, str]:
    return _hparams.draw_all(spec.seed, i, hparam_table(spec))


def aux_hyperparameters(spec: RunSpec, aux: Auxiliary | str, k: int) -> dict[str, str]:
    """The hyperparameters of fine-tuning k of an auxiliary: `lr` (default `auxiliaryFinetune.lr`)
    and every name of `auxiliaryFinetune.hyperparameters`, drawn from (auxiliaryFinetune.seed,
    the auxiliary's dataset, k) only, so every run sharing the pool draws the same."""
    a = auxiliary(spec, aux)
    af = spec.auxiliary_finetune
    table = {"lr": (af.lr, ())}
    table.update((name, (hp.default, tuple(hp.choices))) for name, hp in af.hyperparameters.items())
    return _hparams.draw_all(af.seed, k, table, _hparams.aux_stream(str(a.dataset)))


class AuxEntry(NamedTuple):
    """One auxiliary fine-tuning of the pool: its member, its cache key and where it lives."""
    auxiliary: Auxiliary
    k: int
    member: str      # `<name>-<k>`, the aux member
    key: str         # aux_cache_key
    uri: str         # layout.aux_cache_uri: the entry's prefix in the shared cache


def aux_entries(spec: RunSpec) -> list[AuxEntry]:
    """Every auxiliary cache entry the run uses, by auxiliary name then k: `runs` fine-tunings
    of each auxiliary with a dataset (recycled weights are not trained, so they have none)."""
    out = []
    for aux in sorted(spec.auxiliaries, key=lambda a: a.name):
        if aux.recycled:
            continue
        out += [aux_entry(spec, aux, k) for k in range(aux.runs)]
    return out


def aux_entry(spec: RunSpec, aux: Auxiliary, k: int) -> AuxEntry:
    """Fine-tuning k of an auxiliary with a dataset."""
    key = aux_cache_key(spec, aux, k)
    return AuxEntry(aux, k, aux_member(aux.name, k), key, layout.aux_cache_uri(spec.storage.uri, key))


def job_augmentation(spec: RunSpec) -> _jd.Augmentation:
    return _jd.Augmentation(horizontalFlip=spec.augmentation.horizontal_flip)
