"""Job descriptions: the self-contained JSON each member's Job runs from (docs/contract.md, "Job
description"), one builder per stage. Pure: standard library, `spec`, the contract's `jobdesc`
and `layout`.
"""
from __future__ import annotations

from typing import Any, Sequence

from ratatouille_contract import jobdesc as _jd
from ratatouille_contract import layout

from ..spec import RunSpec
from .graph import Source, initialization_sources, source_of
from .naming import (aux_hyperparameters, auxiliary, job_augmentation, member_output, prepare_members,
                     split_aux_member, target_hyperparameters)
from .vocabulary import (AUX_HOLDOUT_FRACTION, FOUNDATION, LP_MEMBER, SEED_STRIDE, STAGE_AUX, STAGE_AVERAGE, STAGE_LP,
                         STAGE_PREPARE, STAGE_TARGET, RunRef)


def _prepared(spec: RunSpec, run: RunRef, dataset: str) -> dict[str, Any]:
    """The job description's data fields that point a consumer at its prepared dataset."""
    member = prepare_members(spec).get(dataset)
    if member is None:
        return {}
    return {"prepared": member_output(spec, run, STAGE_PREPARE, member),
            "memoryBudget": spec.data_preparation.memory_budget}


def _base(spec: RunSpec, run: RunRef, stage: str, member: str, seed: int, data: _jd.DataRef,
          **kw: Any) -> _jd.JobDescription:
    return _jd.JobDescription(
        stage=stage,
        run=_jd.RunRef(namespace=run.namespace, name=run.name, uid=run.uid),
        member=member,
        output=member_output(spec, run, stage, member),
        seed=seed,
        foundation=_jd.FoundationRef(model=spec.foundation.model, weights=spec.foundation.weights,
                                     inputSize=spec.foundation.input_size),
        data=data,
        storage_endpoint=spec.storage.endpoint,
        augmentation=job_augmentation(spec) if stage != STAGE_PREPARE else _jd.Augmentation(),
        **kw,
    )


def _target_data(spec: RunSpec, run: RunRef) -> _jd.DataRef:
    return _jd.DataRef(dataset=spec.target.dataset, testDomains=tuple(spec.target.test_domains),
                       holdoutFraction=spec.target.holdout_fraction, splitSeed=spec.seed,
                       **_prepared(spec, run, spec.target.dataset))


def _prepare(spec: RunSpec, run: RunRef, member: str) -> _jd.JobDescription:
    dataset = next(d for d, m in prepare_members(spec).items() if m == member)
    return _base(spec, run, STAGE_PREPARE, member, seed=spec.seed,
                 data=_jd.DataRef(dataset=dataset, testDomains=(), holdoutFraction=AUX_HOLDOUT_FRACTION,
                                  splitSeed=spec.seed, prepared=layout.data_cache_uri(spec.storage.uri)))


def _aux(spec: RunSpec, run: RunRef, member: str) -> _jd.JobDescription:
    name, k = split_aux_member(member)
    aux = auxiliary(spec, name)
    af, lp = spec.auxiliary_finetune, spec.linear_probe
    hp = aux_hyperparameters(spec, aux, k)
    # The pool's seed, not the run's: the fine-tuning is what its cache key says.
    return _base(spec, run, STAGE_AUX, member, seed=af.seed * SEED_STRIDE + k,
                 data=_jd.DataRef(dataset=str(aux.dataset), testDomains=(),
                                  holdoutFraction=AUX_HOLDOUT_FRACTION, splitSeed=af.seed,
                                  **_prepared(spec, run, str(aux.dataset))),
                 training=_jd.Training(steps=af.steps, batchSize=af.batch_size, lr=hp["lr"],
                                       weightDecay=hp.get("weightDecay", "0"),
                                       dropout=hp.get("dropout", "0"),
                                       evalEvery=spec.finetune.eval_every,
                                       lpSteps=lp.steps, lpLr=lp.lr),
                 hyperparameters=hp)


def _linear_probe(spec: RunSpec, run: RunRef, member: str) -> _jd.JobDescription:
    lp = spec.linear_probe
    return _base(spec, run, STAGE_LP, member, seed=spec.seed, data=_target_data(spec, run),
                 training=_jd.Training(steps=lp.steps, batchSize=lp.batch_size, lr=lp.lr,
                                       evalEvery=spec.finetune.eval_every,
                                       lpSteps=lp.steps, lpLr=lp.lr))


def _target(spec: RunSpec, run: RunRef, member: str, sources: Sequence[Source]) -> _jd.JobDescription:
    i = int(member)
    ft = spec.finetune
    source, featurizer, _key = source_of(spec, sources, i)
    hp = target_hyperparameters(spec, i)
    return _base(spec, run, STAGE_TARGET, member, seed=spec.seed * SEED_STRIDE + i, data=_target_data(spec, run),
                 training=_jd.Training(steps=ft.steps, batchSize=ft.batch_size, lr=hp["lr"],
                                       weightDecay=hp.get("weightDecay", "0"),
                                       dropout=hp.get("dropout", "0"),
                                       # The head-only warm-up exists for auxiliary featurizers
                                       # (docs/algorithm.md, stage 3); from the foundation the LP head
                                       # already matches the featurizer.
                                       headWarmupSteps=0 if source == FOUNDATION else ft.head_warmup_steps,
                                       evalEvery=ft.eval_every,
                                       lpSteps=spec.linear_probe.steps, lpLr=spec.linear_probe.lr),
                 init=_jd.Init(source=source, featurizer=featurizer,
                               head=layout.model_uri(member_output(spec, run, STAGE_LP, LP_MEMBER))),
                 hyperparameters=hp)


def _average(spec: RunSpec, run: RunRef, member: str, sources: Sequence[Source],
             succeeded_targets: Sequence[int]) -> _jd.JobDescription:
    members = tuple(
        _jd.MemberRef(member=str(i), uri=member_output(spec, run, STAGE_TARGET, str(i)),
                      source=source_of(spec, sources, i)[0])
        for i in sorted(succeeded_targets))
    return _base(spec, run, STAGE_AVERAGE, member, seed=spec.seed, data=_target_data(spec, run),
                 members=members, selection=spec.selection)


def describe(spec: RunSpec, run: RunRef, stage: str, member: str,
             succeeded_targets: Sequence[int] = (), *, _sources: Sequence[Source] | None = None) -> _jd.JobDescription:
    """The self-contained job description of one member (docs/contract.md, "Job description")."""
    if stage == STAGE_PREPARE:
        return _prepare(spec, run, member)
    if stage == STAGE_AUX:
        return _aux(spec, run, member)
    if stage == STAGE_LP:
        return _linear_probe(spec, run, member)
    sources = initialization_sources(spec) if _sources is None else _sources
    if stage == STAGE_TARGET:
        return _target(spec, run, member, sources)
    if stage == STAGE_AVERAGE:
        return _average(spec, run, member, sources, succeeded_targets)
    raise ValueError(f"unknown stage {stage!r}")
