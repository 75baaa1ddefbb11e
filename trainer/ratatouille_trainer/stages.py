"""The four stages a child Job runs (docs/algorithm.md), each driven by a :class:`JobDescription`.

Every stage writes its results under ``desc.output`` through the storage, ``DONE`` last:
- ``aux``: linear-probe a head on the auxiliary dataset (all domains), then fine-tune
  everything from there; the **last-step** network is kept (consumers take its featurizer).
- ``linear-probe``: only the head trains on the frozen foundation featurizer; the best
  checkpoint by training-domain validation is kept.
- ``target``: foundation + LP head + the source's featurizer *parameters* (buffers stay the
  foundation's); when the source is not the foundation the first ``headWarmupSteps`` steps train
  only the head, then a fresh Adam over everything; best checkpoint by training-domain
  validation; accuracy on every test domain.
- ``average``: uniform or greedy weight averaging of the target members (streaming), evaluated
  on the test domains, with the best single member and diagnostics.

A stage given the member's :class:`~.lease.Lease` (the trainer's entrypoint always holds one)
checks it before every checkpoint and reads it back before the model and ``DONE``; its
checkpoints go under ``checkpoint/<the lease's attempt>/`` (ratatouille_contract.layout).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import torch
from ratatouille_contract.jobdesc import JobDescription, JobDescriptionError, best_member, member_key
from ratatouille_contract.layout import METRICS, MODEL, checkpoint_root, join

from . import __version__, diagnostics, integrity
from .averaging import AveragingError, RunningSum, greedy_select, interpolate
from .data import DomainDataset, TrainStream, load_dataset, seed_hash
from .integrity import strict_json
from .device import DeviceContext, select_device
from .models import (ModelError, Network, build_network, copy_featurizer_parameters,
                     featurizer_digest, freeze_bn, load_foundation, load_head,
                     load_network_state, load_weights)
from .progress import Progress
from .storage import open_storage
from .training import (Checkpointer, Evaluator, Phase, TrainResult,
                       test_accuracies, train)
from .weights import load_safetensors_file, save_state_dict, sha256_file


# ---------------------------------------------------------------------------------- helpers

def _float(value: Any, field: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise JobDescriptionError(f"{field}: not a number: {value!r}") from None
    if not math.isfinite(f) or f < 0:
        raise JobDescriptionError(f"{field}: must be a finite non-negative number, got {value!r}")
    return f


def _require_training(desc: JobDescription):
    if desc.training is None:
        raise JobDescriptionError(f"stage {desc.stage} needs the 'training' field")
    t = desc.training
    if int(t.steps) < 1:
        raise JobDescriptionError("training.steps must be at least 1")
    if int(t.batchSize) < 1:
        raise JobDescriptionError("training.batchSize must be at least 1")
    return t


def fingerprint(desc: JobDescription) -> str:
    return hashlib.sha256(desc.to_json().encode()).hexdigest()


def _storage(desc: JobDescription):
    return open_storage(desc.output, desc.storage_endpoint)


def _dataset(desc: JobDescription) -> DomainDataset:
    d = desc.data
    if d.prepared:  # the shards of the run's prepare member (prepared.py), no decoding here
        from .prepared import load_prepared, memory_budget

        return load_prepared(d.prepared, test_domains=d.testDomains, holdout_fraction=d.holdoutFraction,
                             split_seed=d.splitSeed, endpoint=desc.storage_endpoint,
                             budget=memory_budget(d.memoryBudget), expect_dataset=d.dataset,
                             expect_input_size=int(desc.foundation.inputSize))
    return load_dataset(d.dataset, int(desc.foundation.inputSize), test_domains=d.testDomains,
                        holdout_fraction=d.holdoutFraction, split_seed=d.splitSeed,
                        endpoint=desc.storage_endpoint)


def foundation_network(desc: JobDescription, num_classes: int, dropout: float,
                       storage=None) -> tuple[Network, str | None]:
    """The foundation network with a freshly initialised head and frozen BN.

    Without foundation weights (tests), the featurizer's random initialisation is seeded by the
    architecture name only, so every stage of every run sees the same "foundation"."""
    torch.manual_seed(seed_hash("foundation", desc.foundation.model))
    net = build_network(desc.foundation.model, num_classes, dropout, int(desc.foundation.inputSize))
    torch.manual_seed(seed_hash(desc.seed, desc.stage, desc.member, "head"))
    net.head.reset_parameters()
    sha = None
    if desc.foundation.weights:
        sha = load_foundation(net, desc.foundation.weights, storage)
    freeze_bn(net)
    return net, sha


def _model_metadata(desc: JobDescription) -> dict[str, str]:
    return {"format": "pt", "stage": desc.stage, "member": desc.member,
            "run": f"{desc.run.namespace}/{desc.run.name}", "foundation": desc.foundation.model,
            "trainer": f"ratatouille-trainer {__version__}"}


def _upload_model(storage, desc: JobDescription, state: dict[str, torch.Tensor], tmp: str) -> str:
    local = os.path.join(tmp, MODEL)
    save_state_dict(state, local, _model_metadata(desc))
    sha = sha256_file(local)
    storage.upload(local, join(desc.output, MODEL))
    return sha


def _summary(metrics: dict) -> dict:
    keys = ("stage", "member", "valAccuracy", "valAccuracyPooled", "testAccuracy", "bestStep",
            "steps", "sha256", "imagesPerSecond", "source", "selection", "selected", "bestSingle",
            "diagnosticWarnings")  # the average's warnings reach the operator's Events without storage
    return {k: metrics[k] for k in keys if k in metrics}


def _local_or_download(storage, uri: str, tmp: str, name: str) -> str:
    if uri.startswith("file://") or "://" not in uri:
        return uri[len("file://"):] if uri.startswith("file://") else uri
    local = os.path.join(tmp, name)
    storage.download(uri, local)
    return local


class _Job:
    """Shared set-up of the training stages."""

    def __init__(self, desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
                 lease=None):
        self.desc = desc
        self.lease = lease
        self.training = _require_training(desc)
        self.storage = _storage(desc)
        self.ctx = ctx or select_device()
        self.dataset = _dataset(desc)
        self.tmp = tempfile.mkdtemp(prefix="ratatouille-stage-")
        self.progress = progress
        self._checkpointer: Checkpointer | None = None

    def stream(self) -> TrainStream:
        from .prepared import train_stream  # TrainStream, or windows over the budget

        return train_stream(self.dataset, int(self.training.batchSize),
                            seed_hash(self.desc.seed, self.desc.stage, self.desc.member, "data"))

    def evaluator(self) -> Evaluator:
        return Evaluator(self.dataset.validation_sets(), self.ctx)

    def checkpointer(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(
                self.storage, checkpoint_root(self.desc.output), fingerprint(self.desc),
                attempt=self.lease.attempt if self.lease is not None else None,
                guard=self.lease.check if self.lease is not None else None)
        return self._checkpointer

    def make_progress(self, steps: int) -> Progress:
        if self.progress is None:
            self.progress = Progress(self.desc.stage, self.desc.member, steps)
        return self.progress

    def run(self, net: Network, phases: list[Phase], steps: int, keep: str) -> TrainResult:
        ck = self.checkpointer()
        try:
            return train(net, self.stream(), self.evaluator(), steps=steps,
                         eval_every=int(self.training.evalEvery), phases=phases, ctx=self.ctx,
                         keep=keep, checkpointer=ck, progress=self.make_progress(steps),
                         seed=seed_hash(self.desc.seed, self.desc.stage, self.desc.member, "torch"),
                         horizontal_flip=self.desc.augmentation.horizontalFlip)
        finally:
            ck.close()
            self._checkpointer = None

    def finish(self, net: Network, result: TrainResult, extra: dict) -> dict:
        """Write model.safetensors, metrics.json, then DONE; drop the checkpoints."""
        desc = self.desc
        load_network_state(net, result.state, "kept checkpoint")
        test = test_accuracies(net, self.dataset.test_domain_list, self.ctx)
        _confirm(self.lease)
        sha = _upload_model(self.storage, desc, result.state, self.tmp)
        metrics = {
            "stage": desc.stage, "member": desc.member,
            **result.score.as_dict(),
            "testAccuracy": test,
            "bestStep": result.step, "steps": result.steps,
            "curve": result.curve,
            "imagesPerSecond": result.images_per_second,
            "trainSeconds": result.train_seconds,
            "resumedFrom": result.resumed_from,
            "sha256": sha,
            "classes": self.dataset.classes,
            "domains": {"train": [d.name for d in self.dataset.train_domains],
                        "test": list(self.dataset.test_domains)},
            "skippedImages": sum(len(d.skipped) for d in self.dataset.domains),
            "preparedData": self.dataset.prepared,
            "device": self.ctx.describe(),
            "run": {"namespace": desc.run.namespace, "name": desc.run.name, "uid": desc.run.uid},
            "trainerVersion": __version__,
            **extra,
        }
        metrics = strict_json(metrics)  # metrics.json is strict JSON: no bare NaN/Infinity
        self.storage.write_json(join(desc.output, METRICS), metrics)
        _confirm(self.lease)
        self.storage.mark_done(desc.output, {"stage": desc.stage, "member": desc.member, "sha256": sha},
                               require=(MODEL, METRICS))
        if os.environ.get("RATATOUILLE_KEEP_CHECKPOINTS", "") not in ("1", "true", "yes"):
            self.checkpointer().clear()
        if self.progress is not None:
            self.progress.emit("done", valAccuracy=metrics["valAccuracy"], testAccuracy=test)
        return metrics

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _confirm(lease) -> None:
    """Still this member's writer? (raises LeaseLost otherwise; no lease: library use, tests)"""
    if lease is not None:
        lease.confirm()


def _hyper(desc: JobDescription) -> dict[str, float]:
    t = desc.training
    hp = desc.hyperparameters or {}
    return {
        "lr": _float(hp.get("lr", t.lr), "hyperparameters.lr"),
        "weightDecay": _float(hp.get("weightDecay", t.weightDecay), "hyperparameters.weightDecay"),
        "dropout": _float(hp.get("dropout", t.dropout), "hyperparameters.dropout"),
    }


# ------------------------------------------------------------------------------------ stages

def run_linear_probe(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
                     lease=None) -> dict:
    job = _Job(desc, ctx, progress, lease)
    try:
        t = job.training
        hp = _hyper(desc)
        if hp["dropout"] >= 1:
            raise JobDescriptionError("dropout must be below 1")
        net, fsha = foundation_network(desc, job.dataset.num_classes, hp["dropout"], job.storage)
        before = featurizer_digest(net)
        result = job.run(net, [Phase(0, "head", hp["lr"], hp["weightDecay"])], int(t.steps), "best")
        load_network_state(net, result.state, "kept checkpoint")
        if featurizer_digest(net) != before:
            raise RuntimeError("linear probe changed the featurizer (BUG: it must train the head only)")
        return job.finish(net, result, {
            "hyperparameters": {k: str(v) for k, v in hp.items()},
            "source": "foundation", "foundationSha256": fsha,
        })
    finally:
        job.close()


class SourceNotVerified(RuntimeError):
    """A finished result a target starts from is not the model its DONE marker vouches for."""


def _verify_source(storage, uri: str, sha: str, what: str) -> None:
    """A target starts only from the model its source's DONE marker vouches for (the LP head, an
    auxiliary fine-tuning). Recycled weights have no DONE marker: nothing to check. On a mismatch
    the source loses its DONE marker (it is trained again) and this attempt fails."""
    if not uri.rstrip("/").endswith("/" + MODEL):
        return
    prefix = uri.rstrip("/")[: -len(MODEL) - 1]
    storage = storage or open_storage(prefix)
    done = storage.read_done(prefix)
    if done is None or not done.get("sha256") or done["sha256"] == sha:
        return
    why = f"{uri} has sha256 {sha[:12]}..., its DONE marker records {str(done['sha256'])[:12]}..."
    integrity.discard(storage, prefix, why, what=what)
    raise SourceNotVerified(f"{what}: {why}; it will be trained again")


def init_target_network(desc: JobDescription, num_classes: int, storage=None) -> tuple[Network, dict]:
    """The target fine-tuning's starting network: foundation (frozen BN) + the LP head (only
    ``head.*``) + the source featurizer's *parameters* (buffers stay the foundation's)."""
    if desc.init is None or not desc.init.head:
        raise JobDescriptionError("target stage needs init.head (the linear probe's model URI)")
    hp = _hyper(desc)
    if hp["dropout"] >= 1:
        raise JobDescriptionError("dropout must be below 1")
    net, fsha = foundation_network(desc, num_classes, hp["dropout"], storage)
    head_state, head_sha = load_weights(desc.init.head, storage)
    _verify_source(storage, desc.init.head, head_sha, "linear-probe head")
    load_head(net, head_state, f"linear-probe head {desc.init.head}")
    del head_state
    info = {"foundationSha256": fsha, "headSha256": head_sha, "featurizerSha256": None,
            "featurizerParametersCopied": 0}
    if desc.init.featurizer:
        fstate, fsha2 = load_weights(desc.init.featurizer, storage)
        _verify_source(storage, desc.init.featurizer, fsha2, f"featurizer of {desc.init.source}")
        info["featurizerParametersCopied"] = copy_featurizer_parameters(
            net, fstate, f"featurizer of {desc.init.source} ({desc.init.featurizer})")
        info["featurizerSha256"] = fsha2
    elif desc.init.source != "foundation":
        raise JobDescriptionError(f"init.featurizer is required for source {desc.init.source!r}")
    return net, info


def target_phases(desc: JobDescription) -> list[Phase]:
    t = desc.training
    hp = _hyper(desc)
    warm = int(t.headWarmupSteps) if desc.init is not None and desc.init.source != "foundation" else 0
    if warm > 0:
        return [Phase(0, "head", hp["lr"], hp["weightDecay"]), Phase(warm, "all", hp["lr"], hp["weightDecay"])]
    return [Phase(0, "all", hp["lr"], hp["weightDecay"])]


def run_target(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
               lease=None) -> dict:
    job = _Job(desc, ctx, progress, lease)
    try:
        net, info = init_target_network(desc, job.dataset.num_classes, job.storage)
        result = job.run(net, target_phases(desc), int(job.training.steps), "best")
        return job.finish(net, result, {
            "hyperparameters": {k: str(v) for k, v in _hyper(desc).items()},
            "source": desc.init.source,
            "init": {"source": desc.init.source, "featurizer": desc.init.featurizer,
                     "head": desc.init.head},
            "headWarmupSteps": int(desc.training.headWarmupSteps) if desc.init.source != "foundation" else 0,
            **info,
        })
    finally:
        job.close()


def run_aux(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
            lease=None) -> dict:
    if desc.data.testDomains:
        raise JobDescriptionError("aux stage: data.testDomains must be empty (all domains train)")
    job = _Job(desc, ctx, progress, lease)
    try:
        t = job.training
        hp = _hyper(desc)
        lp_steps = int(t.lpSteps)
        lp_lr = _float(t.lpLr, "training.lpLr")
        net, fsha = foundation_network(desc, job.dataset.num_classes, hp["dropout"], job.storage)
        phases = [Phase(0, "all", hp["lr"], hp["weightDecay"])]
        if lp_steps > 0:
            phases = [Phase(0, "head", lp_lr, hp["weightDecay"]),
                      Phase(lp_steps, "all", hp["lr"], hp["weightDecay"])]
        result = job.run(net, phases, lp_steps + int(t.steps), "last")
        return job.finish(net, result, {
            "hyperparameters": {**{k: str(v) for k, v in hp.items()}, "lpSteps": str(lp_steps),
                                "lpLr": str(lp_lr)},
            "source": "foundation", "foundationSha256": fsha,
            "dataset": desc.data.dataset,
            "note": "last-step network; consumers use its featurizer parameters, the head is discarded",
        })
    finally:
        job.close()


# ---------------------------------------------------------------------------------- average

def _sort_key(name: str, acc: Any) -> tuple:
    try:
        a = float(acc)
    except (TypeError, ValueError):
        a = math.nan
    return (0 if not math.isnan(a) else 1, -a if not math.isnan(a) else 0.0, member_key(name))


def _featurizer_param_names(net: Network) -> list[str]:
    return ["featurizer." + n for n, _ in net.featurizer.named_parameters()]


def _check_average(desc: JobDescription) -> None:
    if desc.selection not in ("uniform", "greedy"):
        raise JobDescriptionError(f"selection must be uniform or greedy, got {desc.selection!r}")
    if not desc.members:
        raise JobDescriptionError("average stage needs at least one member")
    names = [m.member for m in desc.members]
    if len(set(names)) != len(names):
        raise JobDescriptionError("average stage: a member is listed twice")


def _member_infos(desc: JobDescription, storage) -> dict[str, dict]:
    """Each member's reference and metrics.json; a member that is not complete is an error."""
    infos: dict[str, dict] = {}
    for m in desc.members:
        if not storage.is_done(m.uri):
            raise AveragingError(f"member {m.member!r}: {m.uri} is not complete (no DONE marker)")
        try:
            met = storage.read_json(join(m.uri, METRICS))
        except Exception as e:
            raise AveragingError(f"member {m.member!r}: cannot read {join(m.uri, METRICS)}: {e}") from None
        if not isinstance(met, dict):
            raise AveragingError(f"member {m.member!r}: metrics.json is not an object")
        infos[m.member] = {"ref": m, "metrics": met}
    return infos


class _Average:
    """One averaging stage: the members are read once each, in one streaming pass that takes
    their pooled validation, the uniform running sum and the diagnostics as they go by
    (greedy keeps its own running sum); then the averages are scored and published."""

    def __init__(self, desc: JobDescription, storage, ctx: DeviceContext, progress, tmp: str):
        self.desc, self.storage, self.ctx, self.progress, self.tmp = desc, storage, ctx, progress, tmp
        self.dataset = _dataset(desc)
        self.evaluator = Evaluator(self.dataset.validation_sets(), ctx)
        self.infos = _member_infos(desc, storage)
        self.chance = chance_level(self.dataset)
        self.excluded, self.at_chance = _exclude_at_chance(self.infos, self.chance)
        self.sources = {n: str(i["ref"].source or i["metrics"].get("source") or "foundation")
                        for n, i in self.infos.items()}
        # the architecture only: every tensor comes from the members
        self.net = freeze_bn(build_network(desc.foundation.model, self.dataset.num_classes, 0.0,
                                           int(desc.foundation.inputSize)))
        ctx.prepare(self.net)
        self.net.eval()
        self.feat_names = _featurizer_param_names(self.net)
        self.found_feat = _foundation_featurizer(desc, self.dataset.num_classes, storage, self.feat_names)
        # what the streaming pass gathers
        self.uniform_sum = RunningSum()
        self.member_val: dict[str, float] = {}
        self.source_sums = diagnostics.SourceSums() if len(set(self.sources.values())) > 1 else None
        self.tally = diagnostics.VoteTally(self.evaluator.labels(), self.dataset.num_classes)
        self.member_rel: dict[str, float | None] = {}
        self.ref: dict[str, Any] = {}        # the first member read: name, featurizer parameters
        self.dist_to_ref: dict[str, float] = {}

    def set_state(self, state: dict, what: str) -> None:
        try:
            load_network_state(self.net, state, what)
        except ModelError as e:
            raise AveragingError(str(e)) from None

    def val_pooled(self, state: dict) -> float:
        self.set_state(state, "averaged candidate")
        return self.evaluator.score(self.net).pooled

    def load_member(self, name: str) -> dict[str, torch.Tensor]:
        """The member's weights, if they are the ones its metrics.json records (a member that
        does not verify loses DONE, so a re-run trains it again)."""
        m = self.infos[name]["ref"]
        uri = join(m.uri, MODEL)
        path = _local_or_download(self.storage, uri, self.tmp, f"member-{len(os.listdir(self.tmp))}.safetensors")
        sha = sha256_file(path)
        want = self.infos[name]["metrics"].get("sha256")
        if want and want != sha:
            why = f"{uri} has sha256 {sha[:12]}..., its metrics.json says {str(want)[:12]}..."
            integrity.discard(self.storage, m.uri, why, what=f"member {name}")
            raise AveragingError(f"member {name!r}: {why}")
        self.infos[name]["sha256"] = sha
        try:
            state = load_safetensors_file(path)
        except FileNotFoundError:
            raise AveragingError(f"member {name!r}: {uri} not found") from None
        if path.startswith(self.tmp):
            os.unlink(path)
        return state

    def _take(self, name: str) -> dict:
        """Read a member and take what the pass gathers from it: its pooled validation and
        predictions (ensemble, disagreement), its share of the uniform and per-source sums
        (leave-one-source-out), its distances to the foundation and to the first member read
        (the farthest pair for the interpolation check)."""
        state = self.load_member(name)
        self.uniform_sum.add(name, state)
        if self.source_sums is not None:
            self.source_sums.add(self.sources[name], state)
        self.set_state(state, f"member {name!r}")
        sc, probs, preds = self.evaluator.score_with_probs(self.net)
        self.member_val[name] = sc.pooled
        self.tally.add(probs, preds)
        del probs, preds
        if self.found_feat is not None:
            self.member_rel[name] = diagnostics.relative_l2(state, self.found_feat, self.feat_names)
        if not self.ref:
            self.ref["name"] = name
            self.ref["feat"] = {k: state[k].detach().clone() for k in self.feat_names}
        else:
            self.dist_to_ref[name] = diagnostics.l2_distance(state, self.ref["feat"], self.feat_names)
        self.progress.update(len(self.member_val), val=self.member_val[name])
        return state

    def select(self, ordered: list[str]) -> tuple[dict, list[str], list | None, dict]:
        """(the result's state, the members it averages, greedy's trace, the uniform average)."""
        if self.desc.selection == "greedy":
            ranked = [(n, (lambda n=n: self._take(n)), self.infos[n]["metrics"].get("valAccuracy")) for n in ordered]
            g = greedy_select(ranked, self.val_pooled)
            trace = [{"member": s.name, "valAccuracy": s.candidate_acc, "kept": s.kept} for s in g.trace]
            return g.state_dict, list(g.selected), trace, self.uniform_sum.mean()
        for n in sorted(self.infos):
            self._take(n)
        uniform_state = self.uniform_sum.mean()
        return uniform_state, sorted(self.infos), None, uniform_state

    def diagnose(self, uniform_state: dict, ordered: list[str]) -> dict[str, Any]:
        """The averaging diagnostics (diagnostics.py) of this pass and the uniform average."""
        uniform_val = self.val_pooled(uniform_state)
        leave_out: dict[str, float | None] = {}
        if self.source_sums is not None:  # leave-one-source-out: one validation pass per source
            for src in sorted(self.source_sums.sums):
                st = self.source_sums.mean_without(src, uniform_state)
                leave_out[src] = self.val_pooled(st) if st is not None else None
                del st
        self.uniform_sum = self.source_sums = None
        self.ref.pop("feat", None)
        chance = self.chance if self.chance is not None else 1.0 / self.dataset.num_classes
        out = {"uniform": diagnostics.uniform_diagnostic(uniform_val, list(self.member_val.values()),
                                                        int(self.tally.labels.shape[0]), chance),
               "ensemble": self.tally.as_dict(),
               "convergence": diagnostics.convergence({n: i["metrics"] for n, i in self.infos.items()})}
        self.tally = None
        out["sources"] = diagnostics.source_table(
            self.sources, self.member_val, self.member_rel,
            _source_distances(self.infos, self.sources, self.storage, self.found_feat, self.feat_names),
            leave_out, uniform_val)
        # twins (same hyperparameters, different sources), else the first member read and the
        # one farthest from it
        out["interpolation"] = _interpolation(self.infos, ordered, self.sources, self.load_member,
                                              self.val_pooled, self.member_val, self.feat_names,
                                              self.ref.get("name"), self.dist_to_ref)
        self.found_feat = None
        out["diagnosticWarnings"] = diagnostics.warnings(out["uniform"], out["sources"], out["convergence"],
                                                         out["interpolation"])
        for w in out["diagnosticWarnings"]:
            print(f"ratatouille-trainer: warning: {w['code']}: {w['message']}", file=sys.stderr, flush=True)
        return out

    def best_single(self, ordered: list[str]) -> dict[str, Any]:
        """The best single member (jobdesc.best_member: the rule the operator applies too)."""
        top = best_member({n: i["metrics"].get("valAccuracy") for n, i in self.infos.items()}) or ordered[0]
        met = self.infos[top]["metrics"]
        return {"member": top, "source": self.infos[top]["ref"].source, "valAccuracy": met.get("valAccuracy"),
                "valAccuracyPooled": self.member_val.get(top), "testAccuracy": dict(met.get("testAccuracy") or {})}

    def lineage_members(self) -> list[dict]:
        every = {**self.at_chance, **self.infos}
        out = []
        for n in sorted(every):
            met, ref = every[n]["metrics"], every[n]["ref"]
            out.append({
                "member": n, "uri": join(ref.uri, MODEL), "sha256": every[n].get("sha256") or met.get("sha256"),
                "source": ref.source or met.get("source"),
                "init": met.get("init") or {"source": ref.source},
                "hyperparameters": met.get("hyperparameters") or {},
                "valAccuracy": met.get("valAccuracy"), "testAccuracy": met.get("testAccuracy") or {},
                "bestStep": met.get("bestStep"),
            })
        return out


def _publish_average(avg: _Average, lease, result_state: dict, selected: list[str], trace, score, test,
                     best_single: dict, diag: dict) -> dict:
    """Write the model, lineage, model card, timm export and metrics.json, then DONE."""
    from .export import publish_timm  # the same weights under timm's names, for timm users
    from .provenance import lineage_json, model_card, write_lineage

    desc, storage = avg.desc, avg.storage
    _confirm(lease)
    sha = _upload_model(storage, desc, result_state, avg.tmp)
    result = {
        "selection": desc.selection, "selected": selected, "uri": join(desc.output, MODEL),
        "sha256": sha, "valAccuracy": score.mean, "testAccuracy": test, "bestSingle": best_single,
        "timm": join(desc.output, "timm", MODEL),
        "run": {"namespace": desc.run.namespace, "name": desc.run.name, "uid": desc.run.uid},
        "foundation": {"model": desc.foundation.model, "weights": desc.foundation.weights,
                       "inputSize": desc.foundation.inputSize},
        "data": {"dataset": desc.data.dataset, "testDomains": list(desc.data.testDomains),
                 "prepared": avg.dataset.prepared,
                 # how every member was trained (the planner gives them all the run's)
                 "augmentation": {"horizontalFlip": desc.augmentation.horizontalFlip}},
        **diag, "greedyTrace": trace,
        "trainerVersion": __version__, "excludedAtChance": avg.excluded, "chanceLevel": avg.chance,
    }
    lineage = write_lineage(avg.lineage_members(), result)
    storage.write_text(join(desc.output, "lineage.json"), lineage_json(lineage))
    card = model_card(lineage)
    storage.write_text(join(desc.output, "model-card.md"), card)
    publish_timm(storage, desc.output, result_state, desc.foundation.model, avg.dataset.classes,
                 int(desc.foundation.inputSize), avg.net.head.in_features, card, avg.tmp, _model_metadata(desc))
    metrics = strict_json({
        "stage": "average", "member": desc.member, "selection": desc.selection,
        **score.as_dict(), "testAccuracy": test,
        "members": len(selected), "membersAvailable": len(avg.infos), "selected": selected,
        "bestSingle": best_single, "greedyTrace": trace, "membersValAccuracyPooled": avg.member_val,
        **diag, "membersRelL2": avg.member_rel,
        "bestStep": None, "steps": 0, "hyperparameters": {}, "source": "average",
        "sha256": sha, "curve": [], "imagesPerSecond": None,
        "device": avg.ctx.describe(), "trainerVersion": __version__,
        "excludedAtChance": avg.excluded, "chanceLevel": avg.chance,
    })
    storage.write_json(join(desc.output, METRICS), metrics)
    _confirm(lease)
    storage.mark_done(desc.output, {"stage": "average", "member": desc.member, "sha256": sha},
                      require=(MODEL, "lineage.json", "model-card.md", METRICS,
                               "timm/model.safetensors", "timm/config.json"))
    return metrics


def run_average(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
                lease=None) -> dict:
    _check_average(desc)
    storage = _storage(desc)
    ctx = ctx or select_device()
    progress = progress or Progress(desc.stage, desc.member, len(desc.members))
    tmp = tempfile.mkdtemp(prefix="ratatouille-average-")
    try:
        avg = _Average(desc, storage, ctx, progress, tmp)
        ordered = sorted(avg.infos, key=lambda n: _sort_key(n, avg.infos[n]["metrics"].get("valAccuracy")))
        result_state, selected, trace, uniform_state = avg.select(ordered)
        diag = avg.diagnose(uniform_state, ordered)
        del uniform_state
        # the result: validation (DomainBed score and pooled) and test domains
        avg.set_state(result_state, "averaged model")
        score = avg.evaluator.score(avg.net)
        test = test_accuracies(avg.net, avg.dataset.test_domain_list, ctx)
        metrics = _publish_average(avg, lease, result_state, selected, trace, score, test,
                                   avg.best_single(ordered), diag)
        progress.emit("done", valAccuracy=score.mean, testAccuracy=test)
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


MIN_CHANCE_SAMPLES = 50  # below this many validation images, accuracy cannot tell weak from chance


def chance_level(dataset: DomainDataset) -> float | None:
    """What a model that learned nothing scores on the pooled training-domain validation split:
    always predicting its most frequent class (at least 1/classes). None when the split has fewer
    than MIN_CHANCE_SAMPLES images (one image is then 2 points or more: no member is judged)."""
    counts: dict[int, int] = {}
    total = 0
    for _, _, y in dataset.validation_sets():
        for label, n in zip(*torch.unique(y, return_counts=True)):
            counts[int(label)] = counts.get(int(label), 0) + int(n)
            total += int(n)
    if total < MIN_CHANCE_SAMPLES:
        return None
    return max(1.0 / dataset.num_classes, max(counts.values()) / total)


def _exclude_at_chance(infos: dict, chance: float | None) -> tuple[list[dict], dict]:
    """The rule: a member whose pooled training-domain validation accuracy (from its verified
    metrics.json) is not above ``chance_level`` (or is not a number) learned nothing, e.g. it
    diverged; averaging it in pulls every weight towards noise. It is left out, with a warning;
    if no member is left the average fails. Removes them from ``infos``; returns
    ([{member, valAccuracyPooled}], {member: info})."""
    excluded, removed = [], {}
    if chance is None:
        return excluded, removed
    for name in sorted(infos):
        met = infos[name]["metrics"]
        acc = met.get("valAccuracyPooled", met.get("valAccuracy"))
        ok = isinstance(acc, (int, float)) and math.isfinite(acc) and acc > chance
        if not ok:
            excluded.append({"member": name, "valAccuracyPooled": acc if isinstance(acc, (int, float)) else None})
            removed[name] = infos.pop(name)
            print(f"ratatouille-trainer: warning: member {name} is left out of the average: its "
                  f"validation accuracy {acc} is at chance level (always predicting the most "
                  f"frequent class scores {chance:.4f})", file=sys.stderr, flush=True)
    if not infos:
        raise AveragingError(f"every member is at chance level (validation accuracy <= {chance:.4f}): "
                             "nothing to average; lower the learning rates")
    return excluded, removed


def _foundation_featurizer(desc: JobDescription, num_classes: int, storage,
                           names: list[str]) -> dict[str, torch.Tensor] | None:
    """The foundation's featurizer parameters (the reference of the relative L2 distances);
    None, with a warning, when they cannot be loaded (the diagnostics then leave them out)."""
    try:
        fnet, _ = foundation_network(desc, num_classes, 0.0, storage)
        state = fnet.state_dict()
        return {k: state[k].detach().to("cpu").clone() for k in names}
    except Exception as e:  # a diagnostic never fails the average
        print(f"ratatouille-trainer: warning: foundation weights not loaded for the distance"
              f" diagnostics: {e}", file=sys.stderr, flush=True)
        return None


def _source_distances(infos: dict, sources: dict[str, str], storage, found_feat, names: list[str]) -> dict:
    """Relative L2 of each source's featurizer from the foundation's (0 for the foundation):
    one read per auxiliary source, of the featurizer its members started from."""
    out: dict[str, float | None] = {}
    for src in sorted(set(sources.values())):
        if found_feat is None:
            out[src] = None
            continue
        if src == "foundation":
            out[src] = 0.0
            continue
        uri = next((infos[n]["metrics"].get("init", {}).get("featurizer") for n in sorted(infos)
                    if sources[n] == src and isinstance(infos[n]["metrics"].get("init"), dict)
                    and infos[n]["metrics"]["init"].get("featurizer")), None)
        out[src] = None
        if uri:
            try:
                fstate, _ = load_weights(uri, storage)
                if all(k in fstate and fstate[k].shape == found_feat[k].shape for k in names):
                    out[src] = diagnostics.relative_l2(fstate, found_feat, names)
                del fstate
            except Exception as e:
                print(f"ratatouille-trainer: warning: featurizer of source {src} not read for the"
                      f" distance diagnostics: {e}", file=sys.stderr, flush=True)
    return out


def _interpolation(infos: dict, ordered: list[str], sources: dict[str, str], load_member, val_pooled,
                   member_val: dict[str, float], names: list[str], ref_name: str | None,
                   dist_to_ref: dict[str, float]) -> dict | None:
    """The barrier along the line between twins (same hyperparameters, different sources), or
    for a soup between the first member read and the member farthest from it (diagnostics.py).
    The ends' accuracies are the members' own (alpha 0 and 1 are the members exactly): three
    validation passes and two reads per pair."""
    hps = {n: infos[n]["metrics"].get("hyperparameters") for n in infos}
    pairs = diagnostics.twin_pairs(ordered, sources, hps)
    kind = "twins"
    if not pairs:
        if ref_name is None or not dist_to_ref:
            return None
        far = max(sorted(dist_to_ref), key=lambda n: dist_to_ref[n])
        pairs, kind = [(ref_name, far)], "farthest"
    out = []
    for a_name, b_name in pairs:
        a, b = load_member(a_name), load_member(b_name)
        points = [{"alpha": 0.0, "valAccuracy": member_val[a_name]}]
        for alpha in diagnostics.ALPHAS[1:-1]:
            points.append({"alpha": alpha, "valAccuracy": val_pooled(interpolate(a, b, alpha, names=(a_name, b_name)))})
        points.append({"alpha": 1.0, "valAccuracy": member_val[b_name]})
        out.append({"kind": kind, "a": a_name, "b": b_name, "sourceA": sources[a_name], "sourceB": sources[b_name],
                    "hyperparameters": dict(hps[a_name]) if kind == "twins" else None,
                    "featurizerDistance": diagnostics.l2_distance(a, b, names),
                    "points": points, "barrier": diagnostics.barrier(points)})
        del a, b
    top = max(out, key=lambda p: p["barrier"])
    return {**top, "pairs": out}


def run_prepare(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
                lease=None) -> dict:
    from .prepared import run_prepare as prepare

    _confirm(lease)
    return prepare(desc, ctx, progress)


STAGE_FUNCTIONS = {
    "prepare": run_prepare,
    "aux": run_aux,
    "linear-probe": run_linear_probe,
    "target": run_target,
    "average": run_average,
}


def run_stage(desc: JobDescription, ctx: DeviceContext | None = None, progress=None,
              lease=None) -> dict:
    """Run the stage. ``lease``: the member prefix's :class:`~.lease.Lease`, held by the caller
    (the trainer's entrypoint); without one (library use, tests) nothing is checked and the
    checkpoints go under a fresh attempt."""
    return STAGE_FUNCTIONS[desc.stage](desc, ctx, progress, lease)


def summary(metrics: dict) -> dict:
    return _summary(metrics)
