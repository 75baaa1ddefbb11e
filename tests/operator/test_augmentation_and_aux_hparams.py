"""spec.augmentation, auxiliary hyperparameters drawn per fine-tuning, and headWarmupSteps that
follows finetune.steps: parsing, validation (offline CRD + semantic rules), the planner's job
descriptions and the auxiliary cache key."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ratatouille_operator import planner as P
from ratatouille_operator.spec import RunSpec, SpecError, head_warmup_default
from ratatouille_operator.validation import load_crd_schema, validate_manifest
from ratatouille_contract.jobdesc import JobDescription

ROOT = Path(__file__).resolve().parents[2]
RUN = P.RunRef(namespace="team-a", name="office", uid="uid-1", generation=1, creation_time=0.0)

SPEC = {
    "foundation": {"model": "resnet18", "weights": "s3://models/r18.safetensors", "inputSize": 32},
    "target": {"dataset": "s3://data/office", "testDomains": ["art"]},
    "auxiliaries": [{"name": "pacs", "dataset": "s3://data/pacs", "runs": 2}],
    "linearProbe": {"steps": 50, "batchSize": 16, "lr": "1e-3"},
    "auxiliaryFinetune": {"steps": 60, "batchSize": 8, "lr": "5e-5"},
    "storage": {"uri": "s3://bucket/runs"},
}
# Keys of SPEC's two auxiliary fine-tunings before augmentation and auxiliary hyperparameter
# tables existed (f6d08f8): cache entries of existing manifests (seed 0) stay valid.
KEYS_BEFORE = ["607d375a2940cdfe", "043a05d869aa7b57"]


def spec(**changes) -> RunSpec:
    """SPEC with `a__b=v` meaning spec[a][b] = v (top-level keys replaced as they are)."""
    d = copy.deepcopy(SPEC)
    for key, value in changes.items():
        outer, _, inner = key.partition("__")
        if inner:
            d.setdefault(outer, {})[inner] = value
        else:
            d[outer] = value
    return RunSpec.from_dict(d)


def manifest(**spec_changes) -> dict:
    body = {"foundation": {"model": "resnet18"},
            "target": {"dataset": "file:///data/office", "testDomains": ["art"]},
            "auxiliaries": [{"name": "pacs", "dataset": "file:///data/pacs", "runs": 3}],
            "storage": {"uri": "file:///tmp/runs"}}
    body.update(spec_changes)
    return {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
            "metadata": {"name": "t"}, "spec": body}


def refused(doc: dict) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate_manifest(doc)
    return info.value


def keys(s: RunSpec, runs: int = 2) -> list[str]:
    return [P.aux_cache_key(s, "pacs", k) for k in range(runs)]


# -- spec.augmentation ------------------------------------------------------------------------
def test_augmentation_defaults_to_horizontal_flip_and_parses_false():
    assert validate_manifest(manifest()).spec.augmentation.horizontal_flip is True
    run = validate_manifest(manifest(augmentation={"horizontalFlip": False}))
    assert run.spec.augmentation.horizontal_flip is False
    assert run.body["spec"]["augmentation"] == {"horizontalFlip": False}
    schema = load_crd_schema()["properties"]["spec"]["properties"]["augmentation"]
    assert schema["properties"]["horizontalFlip"]["type"] == "boolean"


@pytest.mark.parametrize("value", ["false", 0, "no", [True]])
def test_augmentation_refuses_a_non_boolean(value):
    err = refused(manifest(augmentation={"horizontalFlip": value}))
    assert err.field == "spec.augmentation.horizontalFlip" and "boolean" in err.message
    with pytest.raises(SpecError, match="boolean") as info:   # the parser too (operator path)
        spec(augmentation={"horizontalFlip": value})
    assert info.value.field == "spec.augmentation.horizontalFlip"
    assert refused(manifest(augmentation={"verticalFlip": True})).field.startswith("spec.augmentation")


def test_augmentation_reaches_every_training_description_and_the_average():
    s = spec(augmentation={"horizontalFlip": False})
    for stage, member in (("aux", "pacs-1"), ("linear-probe", "0"), ("target", "1"), ("average", "0")):
        d = P.describe(s, RUN, stage, member, succeeded_targets=(0, 1))
        assert d.augmentation.horizontalFlip is False, stage
        assert d.to_dict()["augmentation"] == {"horizontalFlip": False}
        assert JobDescription.from_json(d.to_json()) == d
    # the default is not written: descriptions of runs that do not use it are unchanged
    d = P.describe(spec(), RUN, "target", "1")
    assert d.augmentation.horizontalFlip is True and "augmentation" not in d.to_dict()


def test_augmentation_changes_the_aux_cache_key_only_when_it_differs_from_the_default():
    assert keys(spec()) == KEYS_BEFORE
    assert keys(spec(augmentation={"horizontalFlip": True})) == KEYS_BEFORE
    off = keys(spec(augmentation={"horizontalFlip": False}))
    assert not set(off) & set(KEYS_BEFORE) and off[0] != off[1]


# -- auxiliary hyperparameters ----------------------------------------------------------------
AUX_TABLE = {"lr": {"default": "5e-5", "choices": ["1e-5", "3e-5", "5e-5", "1e-4"]},
             "weightDecay": {"choices": ["1e-4", "1e-6"]},
             "dropout": {"default": "0.1", "choices": ["0", "0.1", "0.5"]}}


def test_without_a_table_every_aux_run_takes_auxiliaryFinetune_lr_as_before():
    s = spec(auxiliaryFinetune__lr="2e-4")
    for k in range(3):
        assert P.aux_hyperparameters(s, "pacs", k) == {"lr": "2e-4"}
    d = P.describe(s, RUN, "aux", "pacs-1")
    assert (d.training.lr, d.training.weightDecay, d.training.dropout) == ("2e-4", "0", "0")
    assert d.hyperparameters == {"lr": "2e-4"}


def test_aux_run_zero_takes_the_defaults_and_the_others_draw_choices():
    s = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE)
    assert P.aux_hyperparameters(s, "pacs", 0) == {"lr": "5e-5", "weightDecay": "0", "dropout": "0.1"}
    draws = [P.aux_hyperparameters(s, "pacs", k) for k in range(1, 40)]
    for hp in draws:
        assert hp["lr"] in AUX_TABLE["lr"]["choices"] and hp["weightDecay"] in ("1e-4", "1e-6")
        assert hp["dropout"] in AUX_TABLE["dropout"]["choices"]
    assert len({tuple(sorted(hp.items())) for hp in draws}) > 5   # really drawn
    assert draws == [P.aux_hyperparameters(s, "pacs", k) for k in range(1, 40)]  # deterministic
    d = P.describe(s, RUN, "aux", "pacs-1")
    hp = draws[0]
    assert d.hyperparameters == hp
    assert (d.training.lr, d.training.weightDecay, d.training.dropout) == (hp["lr"], hp["weightDecay"], hp["dropout"])


def test_hyperparameters_lr_default_wins_over_auxiliaryFinetune_lr():
    s = spec(auxiliaryFinetune={"lr": "5e-5", "hyperparameters": {"lr": {"default": "1e-4", "choices": ["1e-3"]}}})
    assert P.aux_hyperparameters(s, "pacs", 0) == {"lr": "1e-4"}
    assert P.aux_hyperparameters(s, "pacs", 1) == {"lr": "1e-3"}
    # without lr.default, auxiliaryFinetune.lr is the default
    s = spec(auxiliaryFinetune={"lr": "7e-5", "hyperparameters": {"lr": {"choices": ["1e-3"]}}})
    assert P.aux_hyperparameters(s, "pacs", 0) == {"lr": "7e-5"}


def test_aux_draws_depend_on_the_auxiliary_and_the_pool_seed_not_on_the_target():
    base = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE)
    other = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE, seed=7,
                 target={"dataset": "s3://data/other", "testDomains": ["x"]},
                 finetune={"runs": 3, "hyperparameters": {"lr": {"default": "1e-3", "choices": ["2e-3"]}}})
    ks = range(1, 30)
    assert [P.aux_hyperparameters(other, "pacs", k) for k in ks] == [P.aux_hyperparameters(base, "pacs", k) for k in ks]
    reseeded = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE, auxiliaryFinetune__seed=1)
    assert [P.aux_hyperparameters(reseeded, "pacs", k) for k in ks] != [P.aux_hyperparameters(base, "pacs", k) for k in ks]
    # another auxiliary (dataset) has its own stream; the target runs keep theirs
    two = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE,
               auxiliaries=[{"name": "pacs", "dataset": "s3://data/pacs", "runs": 2},
                            {"name": "vlcs", "dataset": "s3://data/vlcs", "runs": 2}])
    assert [P.aux_hyperparameters(two, "vlcs", k) for k in ks] != [P.aux_hyperparameters(two, "pacs", k) for k in ks]
    assert [P.aux_hyperparameters(two, "pacs", k) for k in ks] == [P.aux_hyperparameters(base, "pacs", k) for k in ks]


def test_runs_with_other_seeds_share_the_aux_pool():
    s0, s9 = spec(seed=0), spec(seed=9)
    assert keys(s0) == keys(s9) == KEYS_BEFORE
    a0, a9 = P.describe(s0, RUN, "aux", "pacs-1"), P.describe(s9, RUN, "aux", "pacs-1")
    assert a0.to_json() == a9.to_json()            # the same fine-tuning, whatever spec.seed
    assert (a9.seed, a9.data.splitSeed) == (1, 0)  # the pool's seed (auxiliaryFinetune.seed 0)
    # the targets of the seed-9 run start from the shared entries
    assert P.target_source(s9, 1)[2] == KEYS_BEFORE[0]
    # another pool seed is another pool
    s1 = spec(auxiliaryFinetune__seed=1)
    assert not set(keys(s1)) & set(KEYS_BEFORE)
    assert P.describe(s1, RUN, "aux", "pacs-1").seed == 1 * 1000 + 1


def test_aux_cache_key_follows_the_drawn_hyperparameters():
    s = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE)
    # run 0 takes the defaults; with lr default 5e-5 (= auxiliaryFinetune.lr) and weightDecay 0
    # only dropout's default 0.1 differs from the plain spec
    assert P.aux_cache_key(s, "pacs", 0) != KEYS_BEFORE[0]
    same_defaults = spec(auxiliaryFinetune__hyperparameters={"lr": {"choices": ["1e-3"]}})
    assert P.aux_cache_key(same_defaults, "pacs", 0) == KEYS_BEFORE[0]   # k = 0: same fine-tuning
    assert P.aux_cache_key(same_defaults, "pacs", 1) != KEYS_BEFORE[1]   # k = 1 draws lr 1e-3
    # different choices that draw the same values: the same key
    again = spec(auxiliaryFinetune__hyperparameters={"lr": {"choices": ["1e-3", "1e-3"]}})
    assert keys(again) == keys(same_defaults)


def test_plan_shows_the_aux_draws():
    s = spec(auxiliaryFinetune__hyperparameters=AUX_TABLE)
    aux = {n["member"]: n for n in P.job_graph(s, RUN) if n["stage"] == "aux"}
    assert aux["pacs-1"]["hyperparameters"] == P.aux_hyperparameters(s, "pacs", 1)
    assert "dropout=" in aux["pacs-1"]["note"] and aux["pacs-1"]["cacheKey"] in aux["pacs-1"]["note"]


def test_aux_hyperparameters_validate_offline():
    run = validate_manifest(manifest(auxiliaryFinetune={"lr": "1e-4", "seed": 3, "hyperparameters": {
        "lr": {"choices": ["1e-5", "1e-4"]}, "weightDecay": {"choices": ["1e-4"]}}}))
    af = run.spec.auxiliary_finetune
    assert af.seed == 3 and af.hyperparameters["lr"].default == "1e-4"
    assert af.hyperparameters["weightDecay"].default == "0"      # the CRD's default
    for table, field in (({"dropout": {"choices": ["0", "1.5"]}}, "dropout.choices"),
                         ({"lr": {"default": "0"}}, "lr.default"),
                         ({"weightDecay": {"choices": ["-1"]}}, "weightDecay.choices"),
                         ({"momentum": {"default": "0.9"}}, "momentum"),
                         ({"lr": {"choices": ["fast"]}}, "lr.choices[0]")):
        err = refused(manifest(auxiliaryFinetune={"hyperparameters": table}))
        assert err.field.startswith(f"spec.auxiliaryFinetune.hyperparameters.{field}"), (table, err)
    assert refused(manifest(auxiliaryFinetune={"seed": -1})).field == "spec.auxiliaryFinetune.seed"


# -- headWarmupSteps follows finetune.steps -----------------------------------------------------
@pytest.mark.parametrize("steps, warmup", [(1, 0), (10, 0), (12, 0), (13, 1), (20, 1), (37, 1), (38, 2),
                                           (100, 4), (5000, 200), (15000, 600)])
def test_head_warmup_default_is_four_percent_rounded(steps, warmup):
    assert head_warmup_default(steps) == warmup < steps


def test_short_run_without_head_warmup_validates_and_derives_it():
    run = validate_manifest(manifest(finetune={"steps": 20, "evalEvery": 10}))
    assert run.spec.finetune.head_warmup_steps == 1
    assert "headWarmupSteps" not in run.body["spec"]["finetune"]   # the CRD no longer defaults it
    assert spec(finetune={"steps": 20}).finetune.head_warmup_steps == 1          # the parser alone
    assert validate_manifest(manifest()).spec.finetune.head_warmup_steps == 200  # 4% of 5000
    # the targets from an auxiliary get it
    d = P.describe(spec(finetune={"steps": 20, "runs": 2}), RUN, "target", "1")
    assert d.init.source == "pacs-0" and d.training.headWarmupSteps == 1


def test_explicit_head_warmup_is_kept_and_must_be_below_steps():
    run = validate_manifest(manifest(finetune={"steps": 20, "headWarmupSteps": 7, "evalEvery": 10}))
    assert run.spec.finetune.head_warmup_steps == 7
    assert validate_manifest(manifest(finetune={"steps": 20, "headWarmupSteps": 0,
                                                "evalEvery": 10})).spec.finetune.head_warmup_steps == 0
    for bad in (20, 21):
        err = refused(manifest(finetune={"steps": 20, "headWarmupSteps": bad, "evalEvery": 10}))
        assert err.field == "spec.finetune.headWarmupSteps" and "less than finetune.steps (20)" in err.message


def test_cli_validates_a_short_run_without_head_warmup(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(manifest(finetune={"steps": 20, "evalEvery": 10})))
    ok = subprocess.run([sys.executable, "-m", "ratatouille_operator.cli", "validate", str(path)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    path.write_text(yaml.safe_dump(manifest(finetune={"steps": 20, "headWarmupSteps": 20, "evalEvery": 10})))
    bad = subprocess.run([sys.executable, "-m", "ratatouille_operator.cli", "validate", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "spec.finetune.headWarmupSteps" in bad.stderr
