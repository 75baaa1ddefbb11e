"""Naming (planning/naming.py) as tables: Job names and labels, storage keys, the auxiliary cache
entries a run has and what their keys depend on."""
from __future__ import annotations

import re

import pytest

from ratatouille_contract import layout
from ratatouille_operator.planning import naming as N

from .test_planner import RUN, make_spec

PREFIX = "s3://bucket/runs/team-a/office/uid-123"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LONG_RUN = "r" * 60


@pytest.mark.parametrize("run_name, stage, member, attempt, expected", [
    ("office", "linear-probe", "0", 1, "office-lp-0-a1"),
    ("office", "aux", "pacs-0", 2, "office-aux-pacs-0-a2"),
    ("office", "target", "12", 3, "office-target-12-a3"),
    ("office", "average", "0", 1, "office-avg-0-a1"),
    ("office", "prepare", "aux-pacs", 1, "office-prep-aux-pacs-a1"),
    ("Office_X", "target", "3", 1, "office-x-target-3-a1"),         # lowercased, `_` -> `-`
])
def test_job_name(run_name, stage, member, attempt, expected):
    assert N.job_name(run_name, stage, member, attempt) == expected


@pytest.mark.parametrize("run_name, member", [(LONG_RUN, "3"), (LONG_RUN, "17"), ("office", "m" * 80)])
def test_long_job_names_fit_a_dns_label_and_stay_distinct(run_name, member):
    name = N.job_name(run_name, "target", member, 1)
    assert len(name) <= 63 and DNS_LABEL.match(name)
    assert name != N.job_name(run_name, "target", member, 2)
    if len(member) < 10:
        assert name.endswith(f"-target-{member}-a1")   # the suffix is kept whole


@pytest.mark.parametrize("value, expected", [
    ("office", "office"),
    ("a/b c", "a-b-c"),
    ("-x.", "x"),                                   # alphanumeric ends
])
def test_label_value(value, expected):
    assert N.label_value(value) == expected


def test_long_label_values_keep_a_hash():
    a, b = N.label_value("x" * 70), N.label_value("x" * 71)
    assert len(a) <= 63 and len(b) <= 63 and a != b


@pytest.mark.parametrize("changes, queue", [({}, None), ({"queueName": "team-q"}, "team-q")])
def test_job_labels(changes, queue):
    labels = N.job_labels(make_spec(**changes), RUN, "target", "4", 2)
    assert labels["ratatouille.dev/member"] == "4" and labels["ratatouille.dev/attempt"] == "2"
    assert labels.get("kueue.x-k8s.io/queue-name") == queue


@pytest.mark.parametrize("stage, member, expected", [
    ("linear-probe", "0", f"{PREFIX}/linear-probe"),
    ("target", "5", f"{PREFIX}/target/5"),
    ("average", "0", f"{PREFIX}/average"),
    ("prepare", "target", f"{PREFIX}/prepare/target"),
])
def test_member_output(stage, member, expected):
    assert N.member_output(make_spec(), RUN, stage, member) == expected


def test_aux_members_live_in_the_shared_cache():
    spec = make_spec()
    key = N.aux_cache_key(spec, "pacs", 1)
    assert N.member_output(spec, RUN, "aux", "pacs-1") == f"s3://bucket/runs/cache/aux/{key}"


@pytest.mark.parametrize("auxiliaries, members", [
    ([{"name": "vlcs", "weights": "s3://c/v.safetensors"},
      {"name": "pacs", "dataset": "s3://data/pacs", "runs": 2}], ["pacs-0", "pacs-1"]),   # recycled: none
    ([{"name": "b", "dataset": "s3://d/b"}, {"name": "a", "dataset": "s3://d/a", "runs": 3}],
     ["a-0", "a-1", "a-2", "b-0"]),                                                        # by name, then k
    ([], []),
])
def test_aux_entries(auxiliaries, members):
    spec = make_spec(auxiliaries=auxiliaries)
    entries = N.aux_entries(spec)
    assert [e.member for e in entries] == members
    for e in entries:
        assert e.key == N.aux_cache_key(spec, e.auxiliary, e.k)
        assert e.uri == layout.aux_cache_uri(spec.storage.uri, e.key)
        assert N.member_output(spec, RUN, "aux", e.member) == e.uri


# What the key of auxiliary fine-tuning pacs-0 depends on: True, a change makes another entry.
@pytest.mark.parametrize("changes, other_entry", [
    ({"seed": 99}, False),                                            # the run's seed: shared pool
    ({"target": {"dataset": "s3://data/other", "testDomains": ["x"]}}, False),   # nor the target
    ({"finetune__runs": 20}, False),
    ({"auxiliaryFinetune__seed": 7}, True),                           # the pool's seed
    ({"auxiliaryFinetune__steps": 61}, True),
    ({"linearProbe__lr": "2e-3"}, True),
    ({"foundation__weights": "s3://models/other.safetensors"}, True),
    ({"augmentation": {"horizontalFlip": False}}, True),
])
def test_aux_cache_key_depends_on_what_determines_the_fine_tuning(changes, other_entry):
    before = N.aux_cache_key(make_spec(), "pacs", 0)
    assert (N.aux_cache_key(make_spec(**changes), "pacs", 0) != before) == other_entry


@pytest.mark.parametrize("enabled, auxiliaries, expected", [
    (False, None, {}),
    (True, None, {"s3://data/office": "target", "s3://data/pacs": "aux-pacs"}),
    (True, [{"name": "x", "dataset": "s3://data/office"}], {"s3://data/office": "target"}),  # one per dataset
])
def test_prepare_members(enabled, auxiliaries, expected):
    changes = {"dataPreparation": {"enabled": enabled}}
    if auxiliaries is not None:
        changes["auxiliaries"] = auxiliaries
    assert N.prepare_members(make_spec(**changes)) == expected
