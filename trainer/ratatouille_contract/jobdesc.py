"""The job description: the self-contained JSON that tells one child Job what to do.

It is the whole contract between the planner (which writes it) and the trainer (which reads it);
see docs/contract.md. Pure standard library, so the planner can build descriptions with it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

VERSION = 1
STAGES = ("prepare", "aux", "linear-probe", "target", "average")


class JobDescriptionError(ValueError):
    pass


@dataclass(frozen=True)
class RunRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class FoundationRef:
    model: str
    weights: str | None
    inputSize: int


@dataclass(frozen=True)
class DataRef:
    dataset: str
    testDomains: tuple[str, ...]
    holdoutFraction: float
    splitSeed: int
    # Prepared datasets (optional; absent = decode in the Job). For the prepare stage: the root
    # of the cache entries (<storage.uri>/cache/data); for the others: the prepare member's
    # output, whose prepared.json names the entry.
    prepared: str | None = None
    memoryBudget: str | None = None


@dataclass(frozen=True)
class Training:
    steps: int
    batchSize: int
    lr: str
    weightDecay: str = "0"
    dropout: str = "0"
    headWarmupSteps: int = 0
    evalEvery: int = 100
    lpSteps: int = 0
    lpLr: str = "1e-3"


@dataclass(frozen=True)
class Augmentation:
    """``spec.augmentation``: the training augmentation's switches. A description without the
    field (written before it existed) gets these defaults, which are what training did then."""
    horizontalFlip: bool = True

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Augmentation":
        if not isinstance(d, Mapping):
            raise JobDescriptionError(f"augmentation must be an object, got {d!r}")
        flip = d.get("horizontalFlip", True)
        if not isinstance(flip, bool):
            raise JobDescriptionError(f"augmentation.horizontalFlip must be a boolean, got {flip!r}")
        return Augmentation(horizontalFlip=flip)


@dataclass(frozen=True)
class Init:
    source: str                 # "foundation" or the auxiliary member name it starts from
    featurizer: str | None      # URI of the source's model.safetensors (None = foundation)
    head: str | None            # URI of the linear probe's model.safetensors


@dataclass(frozen=True)
class MemberRef:
    member: str
    uri: str                    # the member's output prefix
    source: str


def _common_base(uris: list[str]) -> str:
    """The longest common prefix of the URIs that ends with '/' (empty for fewer than two)."""
    if len(uris) < 2:
        return ""
    prefix = os.path.commonprefix(uris)
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else ""


@dataclass(frozen=True)
class JobDescription:
    stage: str
    run: RunRef
    member: str
    output: str
    seed: int
    foundation: FoundationRef
    data: DataRef
    storage_endpoint: str | None = None
    training: Training | None = None
    init: Init | None = None
    hyperparameters: Mapping[str, str] = field(default_factory=dict)
    members: tuple[MemberRef, ...] = ()
    selection: str = "uniform"
    augmentation: Augmentation = Augmentation()
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "stage": self.stage,
            "run": asdict(self.run),
            "member": self.member,
            "output": self.output,
            "storage": {"endpoint": self.storage_endpoint},
            "seed": self.seed,
            "foundation": asdict(self.foundation),
            "data": {k: v for k, v in {**asdict(self.data), "testDomains": list(self.data.testDomains)}.items()
                     if v is not None or k not in ("prepared", "memoryBudget")},
        }
        if self.training is not None:
            d["training"] = asdict(self.training)
        if self.init is not None:
            d["init"] = asdict(self.init)
        if self.hyperparameters:
            d["hyperparameters"] = dict(self.hyperparameters)
        if self.augmentation != Augmentation():
            # Written only when it differs from the defaults, so the descriptions (and the
            # checkpoint fingerprints) of runs that do not use it stay what they were.
            d["augmentation"] = asdict(self.augmentation)
        if self.stage == "average":
            members = [asdict(m) for m in self.members]
            # The members' outputs share the run's prefix: it is written once (membersBase) and
            # each uri relative to it, so a 500-member average with a long storage URI stays far
            # below the kernel's limit on one argument (MAX_ARG_STRLEN, 128 KiB).
            base = _common_base([m["uri"] for m in members])
            if base:
                d["membersBase"] = base
                for m in members:
                    m["uri"] = m["uri"][len(base):]
            d["members"] = members
            d["selection"] = self.selection
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "JobDescription":
        try:
            version = int(d.get("version", VERSION))
            if version != VERSION:
                raise JobDescriptionError(f"unsupported job description version {version} (this trainer reads {VERSION})")
            stage = d["stage"]
            if stage not in STAGES:
                raise JobDescriptionError(f"stage: unknown stage {stage!r} (expected one of {', '.join(STAGES)})")
            data = d["data"]
            training = d.get("training")
            init = d.get("init")
            return JobDescription(
                version=version,
                stage=stage,
                run=RunRef(**d["run"]),
                member=str(d["member"]),
                output=str(d["output"]).rstrip("/"),
                storage_endpoint=(d.get("storage") or {}).get("endpoint"),
                seed=int(d.get("seed", 0)),
                foundation=FoundationRef(**d["foundation"]),
                data=DataRef(
                    dataset=data["dataset"],
                    testDomains=tuple(data.get("testDomains") or ()),
                    holdoutFraction=float(data.get("holdoutFraction", 0.2)),
                    splitSeed=int(data.get("splitSeed", 0)),
                    prepared=data.get("prepared") or None,
                    memoryBudget=data.get("memoryBudget") or None,
                ),
                training=Training(**training) if training else None,
                init=Init(**init) if init else None,
                hyperparameters=dict(d.get("hyperparameters") or {}),
                members=tuple(MemberRef(**{**m, "uri": str(d.get("membersBase") or "") + str(m["uri"])})
                              for m in d.get("members") or ()),
                selection=str(d.get("selection", "uniform")),
                augmentation=Augmentation.from_dict(d.get("augmentation") or {}),
            )
        except JobDescriptionError:
            raise
        except KeyError as e:
            raise JobDescriptionError(f"job description is missing field {e.args[0]!r}") from None
        except TypeError as e:
            raise JobDescriptionError(f"job description has a malformed field: {e}") from None

    @staticmethod
    def from_json(text: str) -> "JobDescription":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise JobDescriptionError(f"job description is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise JobDescriptionError("job description must be a JSON object")
        return JobDescription.from_dict(d)


def trainer_argv(desc: JobDescription) -> list[str]:
    """The container command of a Job (and the local executor's argv, after the executable)."""
    return ["ratatouille-trainer", desc.stage, "--job-json", desc.to_json()]


def member_key(member: str) -> tuple:
    """Natural order of member names: numbers numerically ("2" before "10"), then text."""
    parts = re.split(r"(\d+)", str(member))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def best_member(val_accuracy: Mapping[str, Any]) -> str | None:
    """The best single member of an average (its result's `bestSingle`): the highest validation
    accuracy, a tie going to the member first in natural order; members without a number are
    not candidates. None when none has one. The one rule for the trainer and the operator."""
    scored = [(m, float(v)) for m, v in val_accuracy.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
    if not scored:
        return None
    return min(scored, key=lambda mv: (-mv[1], member_key(mv[0])))[0]
