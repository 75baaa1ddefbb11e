"""The contract package (trainer/ratatouille_contract/) on its own: storage keys and file names,
the job description's round trip, the hyperparameter draws, the best-member rule. Pure: no
operator, trainer, torch or storage here."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ratatouille_contract import hparams, layout
from ratatouille_contract.jobdesc import (Augmentation, DataRef, FoundationRef, JobDescription,
                                          JobDescriptionError, RunRef, Training, best_member, member_key)

RUN = SimpleNamespace(namespace="team-a", name="office", uid="uid-1")


@pytest.mark.parametrize("uri, parts, want", [
    ("s3://b/runs", ("x", "model.safetensors"), "s3://b/runs/x/model.safetensors"),
    ("s3://b/runs/", ("/x/",), "s3://b/runs/x"),
    ("file:///tmp/store", ("a",), "file:///tmp/store/a"),
    ("/tmp/store", ("", "a"), "/tmp/store/a"),
    ("s3://", ("b", "k"), "s3://b/k"),
])
def test_join_keeps_the_uris_style_and_single_slashes(uri, parts, want):
    assert layout.join(uri, *parts) == want


def test_every_key_of_a_run_is_built_in_one_place():
    prefix = layout.run_prefix("s3://b/runs", RUN)
    assert prefix == "s3://b/runs/team-a/office/uid-1"
    assert layout.stage_output(prefix, "target", "3") == f"{prefix}/target/3"
    assert layout.stage_output(prefix, "linear-probe", "0") == f"{prefix}/linear-probe"
    assert layout.stage_output(prefix, "average", "0") == f"{prefix}/average"
    assert layout.stage_output(prefix, "prepare", "aux-pacs") == f"{prefix}/prepare/aux-pacs"
    with pytest.raises(ValueError, match="aux_cache_uri"):
        layout.stage_output(prefix, "aux", "pacs-0")
    assert layout.aux_cache_uri("s3://b/runs", "ab12") == "s3://b/runs/cache/aux/ab12"
    assert layout.data_cache_uri("s3://b/runs") == "s3://b/runs/cache/data"
    out = layout.stage_output(prefix, "target", "0")
    assert [layout.model_uri(out), layout.metrics_uri(out), layout.done_uri(out), layout.lease_uri(out),
            layout.checkpoint_root(out), layout.status_uri(prefix)] == [
        f"{out}/model.safetensors", f"{out}/metrics.json", f"{out}/DONE", f"{out}/LEASE",
        f"{out}/checkpoint", f"{prefix}/status.json"]


def test_attempt_ids_are_recognised_and_distinct():
    a, b = layout.new_attempt(), layout.new_attempt()
    assert a != b and layout.is_attempt(a) and not layout.is_attempt("step-00000010")


def _desc(**kw) -> JobDescription:
    base = dict(stage="target", run=RunRef("team-a", "office", "uid-1"), member="3",
                output="s3://b/runs/team-a/office/uid-1/target/3", seed=7,
                foundation=FoundationRef("resnet18", "s3://m/r18.safetensors", 32),
                data=DataRef("s3://d/office", ("art",), 0.2, 3),
                training=Training(steps=20, batchSize=8, lr="5e-5", headWarmupSteps=1),
                hyperparameters={"lr": "5e-5"})
    base.update(kw)
    return JobDescription(**base)


def test_a_job_description_survives_its_json_and_refuses_a_wrong_one():
    d = _desc(augmentation=Augmentation(horizontalFlip=False))
    again = JobDescription.from_json(d.to_json())
    assert again == d and again.augmentation.horizontalFlip is False
    # the default augmentation is not written: older trainers read the same description
    assert "augmentation" not in json.loads(_desc().to_json())
    broken = json.loads(d.to_json())
    broken["stage"] = "bake"
    with pytest.raises(JobDescriptionError):
        JobDescription.from_json(json.dumps(broken))


def test_hyperparameter_draws_are_stable_and_run_zero_takes_the_defaults():
    table = hparams.DEFAULT_TABLE
    assert hparams.draw_all(5, 0, table) == {"dropout": "0", "lr": "5e-5", "weightDecay": "0"}
    first = hparams.draw_all(5, 3, table)
    assert first == hparams.draw_all(5, 3, table)  # deterministic, whatever the process
    assert all(first[k] in table[k][1] for k in table)
    draws = {hparams.draw(5, r, "lr", "5e-5", ("1e-5", "3e-5", "5e-5")) for r in range(1, 40)}
    assert draws == {"1e-5", "3e-5", "5e-5"}
    # an auxiliary's stream is its own: the same run index draws independently of the targets'
    aux = [hparams.draw(5, r, "lr", "5e-5", ("1e-5", "3e-5", "5e-5"), hparams.aux_stream("s3://d/pacs"))
           for r in range(1, 40)]
    assert aux != [hparams.draw(5, r, "lr", "5e-5", ("1e-5", "3e-5", "5e-5")) for r in range(1, 40)]


def test_the_best_member_is_the_highest_validation_with_ties_in_natural_order():
    assert member_key("2") < member_key("10") < member_key("a")
    assert best_member({"10": 0.8, "2": 0.8, "3": 0.7}) == "2"
    assert best_member({"0": 0.5, "1": float("nan"), "2": True, "3": None}) == "0"
    assert best_member({"0": None}) is None
