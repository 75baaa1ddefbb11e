"""Issue 12: the auxiliary cache is keyed by content, not by URI. A dataset or foundation replaced
at the same URI does not reuse the fine-tuning of the old content: the trainer told its entry is
complete retrains it (saying what changed), and the local executor does not count it as a hit.
Tiny data, a few training steps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ratatouille_contract import layout
from ratatouille_trainer import inputs
from ratatouille_trainer.storage import open_storage

from . import util
from .test_results_integrity import _cli, _executor, _fake_result


@pytest.fixture()
def world(tmp_path):
    ds = util.write_dataset(tmp_path / "aux", per_class=4)
    fw = util.write_foundation(tmp_path / "foundation.safetensors")
    return {"tmp": tmp_path, "ds": ds, "fw": fw}


def _aux_job(world, out):
    return util.job("aux", out, world["ds"], member="shapes-0", test_domains=(), steps=2, eval_every=1,
                    weights=str(world["fw"]))


def _result(proc) -> dict:
    """The trainer's result event (its last JSON line on stdout)."""
    return next(json.loads(ln) for ln in reversed(proc.stdout.splitlines()) if ln.startswith('{"event": "result"'))


def _add_image(ds: Path) -> None:
    src = next(iter(sorted(ds.glob("d0/*/*.png"))))
    (src.parent / "added.png").write_bytes(src.read_bytes())


def test_identity_changes_with_the_content_behind_the_same_uris(world):
    storage = open_storage(str(world["tmp"]))
    before = inputs.identity(storage, str(world["ds"]), str(world["fw"]))
    assert before == inputs.identity(storage, str(world["ds"]), str(world["fw"]))  # stable
    _add_image(world["ds"])
    after = inputs.identity(storage, str(world["ds"]), str(world["fw"]))
    assert after["dataset"]["objects"] == before["dataset"]["objects"] + 1
    assert after["dataset"]["digest"] != before["dataset"]["digest"]
    assert after["foundation"] == before["foundation"]
    util.write_foundation(world["fw"], seed=7)  # other weights, same URI
    assert inputs.identity(storage, str(world["ds"]), str(world["fw"]))["foundation"] != before["foundation"]


def test_changed_names_what_changed(world, tmp_path):
    storage = open_storage(str(tmp_path))
    entry = tmp_path / "entry"
    entry.mkdir()
    now = inputs.identity(storage, str(world["ds"]), str(world["fw"]))
    assert "missing" in inputs.changed(storage, str(entry), now)  # written before the record existed
    inputs.record(storage, str(entry), now)
    assert inputs.changed(storage, str(entry), now) is None
    _add_image(world["ds"])
    why = inputs.changed(storage, str(entry), inputs.identity(storage, str(world["ds"]), str(world["fw"])))
    assert why is not None and str(world["ds"]) in why and "changed" in why
    (entry / "inputs.json").write_text("[1, 2]")
    assert "not a JSON object: its inputs are unknown" in inputs.changed(storage, str(entry), now)


def test_a_trainer_retrains_an_auxiliary_whose_dataset_was_replaced_at_the_same_uri(world, tmp_path):
    out = tmp_path / "cache" / "aux" / "k"
    job = _aux_job(world, out)
    first = _cli(job)
    assert first.returncode == 0, first.stderr
    recorded = json.loads((out / "inputs.json").read_text())
    assert recorded["dataset"]["uri"] == str(world["ds"]) and recorded["foundation"]["uri"] == str(world["fw"])
    again = _cli(job)
    assert again.returncode == 0 and "already complete" in again.stderr  # same content: a hit

    _add_image(world["ds"])
    term = tmp_path / "termination-log"
    term.write_text("")
    third = _cli(job, {"RATATOUILLE_TERMINATION_LOG": str(term)})
    assert third.returncode == 0, third.stderr
    assert "already complete" not in third.stderr
    assert "changed since it was trained" in third.stderr and str(world["ds"]) in third.stderr
    # ... and in its result and termination message, which the operator turns into an Event
    assert "changed since it was trained" in _result(third)["retrained"]
    assert json.loads(term.read_text())["retrained"] == _result(third)["retrained"]
    assert "retrained" not in _result(first)
    assert json.loads((out / "inputs.json").read_text())["dataset"]["objects"] == recorded["dataset"]["objects"] + 1
    assert (out / "DONE").exists()
    fourth = _cli(job)
    assert fourth.returncode == 0 and "already complete" in fourth.stderr


def test_a_trainer_retrains_an_entry_that_records_no_inputs(world, tmp_path):
    out = tmp_path / "cache" / "aux" / "old"
    job = _aux_job(world, out)
    assert _cli(job).returncode == 0
    (out / "inputs.json").unlink()  # as entries written before content-keyed caching
    r = _cli(job)
    assert r.returncode == 0 and "already complete" not in r.stderr and "inputs are unknown" in r.stderr
    assert (out / "inputs.json").exists()


def test_the_local_executor_counts_a_hit_only_for_the_current_content(tmp_path, capsys):
    from ratatouille_operator import planner

    aux = util.write_dataset(tmp_path / "aux", per_class=2)
    ex = _executor(tmp_path)
    key = planner.aux_cache_key(ex.spec, ex.spec.auxiliaries[0], 0)
    entry = Path(layout.aux_cache_uri(ex.spec.storage.uri, key).removeprefix("file://"))
    _fake_result(entry)
    assert ex._cache_hits() == frozenset()  # complete, but its inputs are unknown
    storage = open_storage(str(tmp_path))
    inputs.record(storage, str(entry), inputs.identity(storage, str(aux), None))
    assert _executor(tmp_path)._cache_hits() == {key}
    _add_image(aux)
    assert _executor(tmp_path)._cache_hits() == frozenset()  # its Job retrains it
    assert (entry / "DONE").exists()  # the trainer, not the executor, discards it (and says why)
