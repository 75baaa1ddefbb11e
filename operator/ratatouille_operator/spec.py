"""Typed, frozen view of a RatatouilleRun spec: validated once at the boundary, no dict digging after.

`RunSpec.from_dict` applies the CRD's defaults (`schema.py`: the CRD is their one source, nothing
here restates them) and expects a spec that passed the CRD schema (see `validation.load_run`); it
still raises `SpecError` naming the field for anything it cannot turn into the typed form. Pure: no kopf, kubernetes, boto3 or torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .schema import API_GROUP, API_VERSION, KIND, PLURAL, defaulted_spec  # noqa: F401  (re-exported)


class SpecError(ValueError):
    """An invalid RatatouilleRun; `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}")


@dataclass(frozen=True)
class Foundation:
    model: str
    weights: str | None
    input_size: int


@dataclass(frozen=True)
class Target:
    dataset: str
    test_domains: tuple[str, ...]
    holdout_fraction: float


@dataclass(frozen=True)
class Auxiliary:
    name: str
    dataset: str | None
    weights: str | None
    runs: int

    @property
    def recycled(self) -> bool:
        return self.weights is not None


@dataclass(frozen=True)
class Hyperparameter:
    default: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class StageBudget:
    steps: int
    batch_size: int
    lr: str


@dataclass(frozen=True)
class AuxiliaryFinetune(StageBudget):
    """``spec.auxiliaryFinetune``. Fine-tuning k of an auxiliary draws its hyperparameters from
    ``hyperparameters`` (names given there; ``lr`` always, its default ``lr`` above unless
    ``hyperparameters.lr.default`` is given) like the target runs do: k = 0 takes the defaults,
    the others sample the choices (no choices: the default). The draws and the training depend
    on the auxiliary, k and ``seed`` only (not ``spec.seed``, not the target), so runs with
    other seeds or targets share the auxiliary pool."""
    hyperparameters: Mapping[str, Hyperparameter] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True)
class Finetune:
    runs: int
    steps: int
    batch_size: int
    head_warmup_steps: int
    eval_every: int
    hyperparameters: Mapping[str, Hyperparameter]


def head_warmup_default(steps: int) -> int:
    """``finetune.headWarmupSteps`` when the manifest does not set it: 4% of the steps (the
    paper's 200 of 5,000) to the nearest integer (20 steps -> 1, 10 -> 0, 38 -> 2; 4% of a whole
    number is never exactly half), in integers; always below ``steps``."""
    return (4 * int(steps) + 50) // 100


@dataclass(frozen=True)
class Augmentation:
    """``spec.augmentation``: switches of the training augmentation (every training stage)."""
    horizontal_flip: bool = True


@dataclass(frozen=True)
class Storage:
    uri: str
    endpoint: str | None
    credentials_secret: str | None


@dataclass(frozen=True)
class PodTemplate:
    image: str | None
    resources: Mapping[str, Any]
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any] | None
    priority_class_name: str | None
    runtime_class_name: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    pod_annotations: Mapping[str, str] = field(default_factory=dict)
    pod_labels: Mapping[str, str] = field(default_factory=dict)
    scratch_size: str | None = None  # emptyDir sizeLimit and ephemeral-storage request
    #: Per-stage resources (CRD keys: prepare, auxiliary, linearProbe, target, average) that
    #: replace `resources` for that stage.
    stage_resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class FailurePolicy:
    backoff_limit: int
    max_attempts: int
    min_succeeded: int
    retry_backoff_seconds: int
    #: A child whose pod has not started running this long after its Job started is failed as
    #: one attempt (0: never).
    pod_start_timeout_seconds: int = 300


@dataclass(frozen=True)
class DataPreparation:
    """``spec.dataPreparation``: datasets prepared once into cached shards (a ``prepare`` Job
    per dataset) instead of decoded in every Job; ``memory_budget`` bounds what a trainer holds."""
    enabled: bool = False
    memory_budget: str | None = None


@dataclass(frozen=True)
class RunSpec:
    foundation: Foundation
    target: Target
    auxiliaries: tuple[Auxiliary, ...]
    include_foundation: bool
    linear_probe: StageBudget
    auxiliary_finetune: AuxiliaryFinetune
    finetune: Finetune
    selection: str
    seed: int
    storage: Storage
    template: PodTemplate
    parallelism: int
    failure_policy: FailurePolicy
    suspend: bool
    queue_name: str
    active_deadline_seconds: int
    data_preparation: DataPreparation = DataPreparation()
    augmentation: Augmentation = Augmentation()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: Not from the manifest: who shares auxiliary cache entries. The operator sets the run's
    #: namespace (unless its platform team shares the cache between namespaces); "" shares
    #: them with every run of the same storage (embedded mode).
    aux_cache_scope: str = ""

    @staticmethod
    def from_dict(spec: Mapping[str, Any]) -> "RunSpec":
        """Parse ``spec``, applying the CRD's defaults first (the one source of them; a body the
        API server or `validation` defaulted is unchanged by that)."""
        if not isinstance(spec, Mapping):
            raise SpecError("spec", "must be an object")
        return _parse(defaulted_spec(spec), raw=spec)


def _get(d: Mapping[str, Any], key: str, path: str, default: Any = ...):
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise SpecError(f"{path}.{key}" if path else key, "is required")
    return default


def _int(value: Any, path: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(path, f"must be >= {minimum}, got {value}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(path, f"must be a boolean (true or false), got {value!r}")
    return value


def _hp_table(raw: Any, path: str, defaults: Mapping[str, str]) -> dict[str, Hyperparameter]:
    """A ``hyperparameters`` table; a name without ``default`` takes ``defaults[name]``."""
    table = {}
    for name, hp in (raw or {}).items():
        p = f"{path}.{name}"
        default = _float_str(_get(hp, "default", p, defaults.get(name, ...)), f"{p}.default")
        choices = tuple(_float_str(c, f"{p}.choices[{j}]") for j, c in enumerate(hp.get("choices") or []))
        table[name] = Hyperparameter(default=default, choices=choices or (default,))
    return table


def _float_str(value: Any, path: str) -> str:
    """Numbers that matter are strings in the API; accept numbers too but normalise to str."""
    text = str(value)
    try:
        float(text)
    except ValueError:
        raise SpecError(path, f"must be a number (as a string), got {value!r}") from None
    return text


def _foundation(spec: Mapping[str, Any]) -> Foundation:
    f = _get(spec, "foundation", "spec")
    return Foundation(
        model=str(_get(f, "model", "spec.foundation")),
        weights=f.get("weights") or None,
        input_size=_int(_get(f, "inputSize", "spec.foundation"), "spec.foundation.inputSize", 8),
    )


def _target(spec: Mapping[str, Any]) -> Target:
    t = _get(spec, "target", "spec")
    frac = float(_float_str(_get(t, "holdoutFraction", "spec.target"), "spec.target.holdoutFraction"))
    if not 0.0 < frac < 1.0:
        raise SpecError("spec.target.holdoutFraction", f"must be between 0 and 1 exclusive, got {frac}")
    return Target(
        dataset=str(_get(t, "dataset", "spec.target")),
        test_domains=tuple(str(x) for x in _get(t, "testDomains", "spec.target")),
        holdout_fraction=frac,
    )


def _auxiliaries(spec: Mapping[str, Any]) -> tuple[Auxiliary, ...]:
    out = []
    for i, a in enumerate(spec.get("auxiliaries") or []):
        p = f"spec.auxiliaries[{i}]"
        out.append(Auxiliary(name=str(_get(a, "name", p)), dataset=a.get("dataset") or None,
                             weights=a.get("weights") or None, runs=_int(_get(a, "runs", p), f"{p}.runs", 1)))
    return tuple(out)


def _budget(spec: Mapping[str, Any], key: str) -> StageBudget:
    b = _get(spec, key, "spec")
    p = f"spec.{key}"
    return StageBudget(
        steps=_int(_get(b, "steps", p), f"{p}.steps", 1),
        batch_size=_int(_get(b, "batchSize", p), f"{p}.batchSize", 1),
        lr=_float_str(_get(b, "lr", p), f"{p}.lr"),
    )


def _auxiliary_finetune(spec: Mapping[str, Any]) -> AuxiliaryFinetune:
    b = _budget(spec, "auxiliaryFinetune")
    af = spec["auxiliaryFinetune"]
    return AuxiliaryFinetune(
        steps=b.steps, batch_size=b.batch_size, lr=b.lr,
        hyperparameters=_hp_table(af.get("hyperparameters"), "spec.auxiliaryFinetune.hyperparameters",
                                  {"lr": b.lr, "weightDecay": "0", "dropout": "0"}),
        seed=_int(_get(af, "seed", "spec.auxiliaryFinetune"), "spec.auxiliaryFinetune.seed", 0),
    )


def _finetune(spec: Mapping[str, Any]) -> Finetune:
    ft = _get(spec, "finetune", "spec")
    steps = _int(_get(ft, "steps", "spec.finetune"), "spec.finetune.steps", 1)
    warmup = ft.get("headWarmupSteps")
    return Finetune(
        runs=_int(_get(ft, "runs", "spec.finetune"), "spec.finetune.runs", 1),
        steps=steps,
        batch_size=_int(_get(ft, "batchSize", "spec.finetune"), "spec.finetune.batchSize", 1),
        # not defaulted by the CRD: it follows the steps unless it is set
        head_warmup_steps=(head_warmup_default(steps) if warmup is None
                           else _int(warmup, "spec.finetune.headWarmupSteps", 0)),
        eval_every=_int(_get(ft, "evalEvery", "spec.finetune"), "spec.finetune.evalEvery", 1),
        hyperparameters=_hp_table(ft.get("hyperparameters"), "spec.finetune.hyperparameters", {}),
    )


def _storage(spec: Mapping[str, Any]) -> Storage:
    s = _get(spec, "storage", "spec")
    return Storage(
        uri=str(_get(s, "uri", "spec.storage")).rstrip("/"),
        endpoint=s.get("endpoint") or None,
        credentials_secret=s.get("credentialsSecret") or None,
    )


def _template(spec: Mapping[str, Any]) -> PodTemplate:
    tp = spec.get("template") or {}
    return PodTemplate(
        image=tp.get("image") or None,
        resources=dict(tp.get("resources") or {}),
        node_selector=dict(tp.get("nodeSelector") or {}),
        tolerations=tuple(tp.get("tolerations") or ()),
        affinity=tp.get("affinity") or None,
        priority_class_name=tp.get("priorityClassName") or None,
        runtime_class_name=tp.get("runtimeClassName") or None,
        image_pull_secrets=tuple(str(x) for x in tp.get("imagePullSecrets") or ()),
        pod_annotations={str(k): str(v) for k, v in (tp.get("podAnnotations") or {}).items()},
        pod_labels={str(k): str(v) for k, v in (tp.get("podLabels") or {}).items()},
        scratch_size=str(tp["scratchSize"]) if tp.get("scratchSize") else None,
        stage_resources={str(k): dict(v) for k, v in (tp.get("stageResources") or {}).items() if v is not None},
    )


def _failure_policy(spec: Mapping[str, Any]) -> FailurePolicy:
    fp = _get(spec, "failurePolicy", "spec")

    def policy(key: str, minimum: int) -> int:
        return _int(_get(fp, key, "spec.failurePolicy"), f"spec.failurePolicy.{key}", minimum)

    return FailurePolicy(
        backoff_limit=policy("backoffLimit", 0), max_attempts=policy("maxAttempts", 1),
        min_succeeded=policy("minSucceeded", 1), retry_backoff_seconds=policy("retryBackoffSeconds", 0),
        pod_start_timeout_seconds=policy("podStartTimeoutSeconds", 0),
    )


def _parse(spec: Mapping[str, Any], raw: Mapping[str, Any]) -> RunSpec:
    """The typed form of a defaulted ``spec``: every default it reads comes from the CRD."""
    prep = _get(spec, "dataPreparation", "spec")
    return RunSpec(
        foundation=_foundation(spec),
        target=_target(spec),
        auxiliaries=_auxiliaries(spec),
        include_foundation=_bool(_get(spec, "includeFoundation", "spec"), "spec.includeFoundation"),
        linear_probe=_budget(spec, "linearProbe"),
        auxiliary_finetune=_auxiliary_finetune(spec),
        finetune=_finetune(spec),
        selection=str(_get(_get(spec, "averaging", "spec"), "selection", "spec.averaging")),
        seed=_int(_get(spec, "seed", "spec"), "spec.seed", 0),
        storage=_storage(spec),
        template=_template(spec),
        parallelism=_int(_get(spec, "parallelism", "spec"), "spec.parallelism", 1),
        failure_policy=_failure_policy(spec),
        suspend=_bool(_get(spec, "suspend", "spec"), "spec.suspend"),
        queue_name=str(spec.get("queueName") or ""),
        active_deadline_seconds=_int(_get(spec, "activeDeadlineSeconds", "spec"), "spec.activeDeadlineSeconds", 0),
        data_preparation=DataPreparation(
            enabled=_bool(_get(prep, "enabled", "spec.dataPreparation"), "spec.dataPreparation.enabled"),
            memory_budget=str(prep.get("memoryBudget") or "") or None),
        augmentation=Augmentation(horizontal_flip=_bool(
            _get(_get(spec, "augmentation", "spec"), "horizontalFlip", "spec.augmentation"),
            "spec.augmentation.horizontalFlip")),
        raw=dict(raw),
    )
