"""Issue 12, results that are not what they claim: DONE is trusted only when the files verify
(sha256), unreadable checkpoints are discarded, non-finite foundations are refused, a diverging
stage fails with reason Diverged, members at chance level are left out of the average, and
metrics.json is strict JSON. Tiny data, a few training steps."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ratatouille_contract import layout
from ratatouille_trainer import integrity, stages
from ratatouille_trainer.integrity import loads_strict
from ratatouille_trainer.storage import open_storage

from . import util
from .test_stages import _env, _quiet  # noqa: F401  (the same CPU-only, no-fault environment)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    ds = util.write_dataset(tmp / "ds", per_class=6)
    fw = util.write_foundation(tmp / "foundation.safetensors")
    return {"tmp": tmp, "ds": ds, "fw": fw}


def _lp_job(world, out, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("eval_every", 1)
    kw.setdefault("lr", "1e-2")
    return util.job("linear-probe", out, world["ds"], weights=str(world["fw"]), **kw)


def _cli(job: dict, env_extra=None):
    env = util.env()
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "ratatouille_trainer.cli", job["stage"], "--job-json",
                           json.dumps(job)], capture_output=True, text=True, env=env, timeout=300)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_result(prefix: Path, *, metrics_extra=None) -> str:
    prefix.mkdir(parents=True, exist_ok=True)
    save_file({"featurizer.w": torch.ones(4), "head.weight": torch.zeros(2, 4)}, str(prefix / "model.safetensors"))
    sha = _sha(prefix / "model.safetensors")
    (prefix / "metrics.json").write_text(json.dumps({"sha256": sha, "valAccuracy": 0.5, **(metrics_extra or {})}))
    (prefix / "DONE").write_text(json.dumps({"sha256": sha}))
    return sha


# --------------------------------------------------------------------------- verification

def test_problem_finds_every_way_a_result_can_lie(tmp_path):
    storage = open_storage(str(tmp_path))
    p = tmp_path / "r"
    _fake_result(p)
    assert integrity.problem(storage, str(p)) is None
    _flip_a_bit(p / "model.safetensors")
    assert "sha256" in integrity.problem(storage, str(p))
    _fake_result(p)
    (p / "model.safetensors").unlink()
    assert "missing" in integrity.problem(storage, str(p))
    _fake_result(p)
    (p / "metrics.json").write_text('{"sha256": "x", "valAccuracy": NaN}')
    assert "strict JSON" in integrity.problem(storage, str(p))
    _fake_result(p)
    (p / "metrics.json").write_text('{"sha256": "0000"}')
    assert "another model" in integrity.problem(storage, str(p))
    _fake_result(p)
    (p / "DONE").write_text("{trunc")
    assert "not JSON" in integrity.problem(storage, str(p))
    (p / "DONE").unlink()
    assert integrity.problem(storage, str(p)) is None  # unfinished: nothing to verify


def _executor(tmp_path, **spec):
    from ratatouille_operator.executor import LocalExecutor
    from ratatouille_operator.validation import validate_manifest

    doc = {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun", "metadata": {"name": "integ"},
           "spec": {"foundation": {"model": "test_resnet"},
                    "target": {"dataset": str(tmp_path / "ds"), "testDomains": ["d2"]},
                    "auxiliaries": [{"name": "shapes", "dataset": str(tmp_path / "aux")}],
                    "storage": {"uri": (tmp_path / "store").as_uri()},
                    "finetune": {"runs": 2}, **spec}}
    run = validate_manifest(doc)
    return LocalExecutor(run.namespace, run.name, run.spec, storage=open_storage(run.spec.storage.uri),
                         workdir=tmp_path / "work")


def test_a_corrupted_cached_auxiliary_is_a_miss_with_a_warning(tmp_path, capsys):
    from ratatouille_operator import planner

    from ratatouille_trainer import inputs

    util.write_dataset(tmp_path / "aux", per_class=2)
    ex = _executor(tmp_path)
    key = planner.aux_cache_key(ex.spec, ex.spec.auxiliaries[0], 0)
    entry = Path(layout.aux_cache_uri(ex.spec.storage.uri, key).removeprefix("file://"))
    _fake_result(entry)
    storage = open_storage(str(tmp_path))
    inputs.record(storage, str(entry), inputs.identity(storage, str(tmp_path / "aux"), None))
    assert ex._cache_hits() == {key}
    _flip_a_bit(entry / "model.safetensors")
    assert ex._cache_hits() == frozenset()
    assert not (entry / "DONE").exists()  # so the auxiliary Job is created and trains it again
    err = capsys.readouterr().err
    assert "does not verify" in err and str(entry) in err
    # an entry with DONE but no model is a miss too (it used to be a silent hit forever)
    _fake_result(entry)
    (entry / "model.safetensors").unlink()
    assert ex._cache_hits() == frozenset() and not (entry / "DONE").exists()


def test_a_member_whose_files_do_not_verify_is_redone_on_resume(tmp_path, capsys):
    from ratatouille_operator import planner

    ex = _executor(tmp_path)
    prefix = Path(planner.member_output(ex.spec, ex.run, "target", "0").removeprefix("file://"))
    good = Path(planner.member_output(ex.spec, ex.run, "target", "1").removeprefix("file://"))
    _fake_result(prefix)
    _fake_result(good)
    ex.status = {"phase": "Target"}
    ex.jobs = {}
    for m in ("0", "1"):
        from ratatouille_operator.executor import LocalJob
        name = planner.job_name(ex.run.name, "target", m, 1)
        ex.jobs[name] = LocalJob(name=name, stage="target", member=m, attempt=1, state="Succeeded")
    ex._save()
    (prefix / "metrics.json").write_text('{"valAccuracy": NaN}')  # unparseable as JSON
    again = _executor(tmp_path)
    assert sorted(j.member for j in again.jobs.values()) == ["1"]
    assert not (prefix / "DONE").exists() and (good / "DONE").exists()
    assert "does not verify" in capsys.readouterr().err


def test_trainer_redoes_an_output_whose_done_does_not_verify(world, tmp_path):
    out = tmp_path / "lp"
    job = _lp_job(world, out)
    first = _cli(job)
    assert first.returncode == 0, first.stderr
    sha = json.loads((out / "DONE").read_text())["sha256"]
    _flip_a_bit(out / "model.safetensors")
    second = _cli(job)
    assert second.returncode == 0, second.stderr
    assert "does not verify" in second.stderr and "already complete" not in second.stderr
    assert _sha(out / "model.safetensors") == json.loads((out / "DONE").read_text())["sha256"] == sha
    third = _cli(job)
    assert third.returncode == 0 and "already complete" in third.stderr


def test_a_target_refuses_a_head_that_is_not_the_one_done_vouches_for(world, tmp_path):
    lp = tmp_path / "lp"
    stages.run_stage(util.desc(_lp_job(world, lp)), progress=_quiet())
    state = load_file(str(lp / "model.safetensors"))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(lp / "model.safetensors"))
    init = {"source": "foundation", "featurizer": None, "head": str(lp / "model.safetensors")}
    job = util.job("target", tmp_path / "t0", world["ds"], member="0", weights=str(world["fw"]), init=init,
                   steps=2, eval_every=1)
    with pytest.raises(stages.SourceNotVerified, match="linear-probe head"):
        stages.run_stage(util.desc(job), progress=_quiet())
    assert not (lp / "DONE").exists()  # the LP is trained again
    assert not (tmp_path / "t0" / "DONE").exists()


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("damage", ["truncate-model", "state-json"])
def test_an_unreadable_checkpoint_is_discarded_and_training_starts_over(world, tmp_path, monkeypatch, damage,
                                                                         capfd):
    out = tmp_path / "lp"
    job = _lp_job(world, out, steps=4)
    monkeypatch.setenv("RATATOUILLE_ABORT_AT_STEP", "2")
    from ratatouille_trainer.training import SimulatedCrash
    with pytest.raises(SimulatedCrash):
        stages.run_stage(util.desc(job), progress=_quiet())
    monkeypatch.delenv("RATATOUILLE_ABORT_AT_STEP")
    (ck,) = (out / "checkpoint").glob("attempt-*")  # the crashed attempt's folder
    if damage == "truncate-model":
        (model,) = [p for p in ck.glob("step-*/model.safetensors")
                    if p.parent.name == json.loads((ck / "state.json").read_text())["latestDir"]]
        model.write_bytes(model.read_bytes()[:100])
    else:
        (ck / "state.json").write_text('{"version": 1, "fingerp')
    metrics = stages.run_stage(util.desc(job), progress=_quiet())
    assert metrics["resumedFrom"] is None and metrics["steps"] == 4
    assert (out / "DONE").exists()
    assert "discarding the unreadable checkpoint" in capfd.readouterr().err
    # the same result as a run that never crashed
    clean = tmp_path / "clean"
    ref = stages.run_stage(util.desc(_lp_job(world, clean, steps=4)), progress=_quiet())
    assert ref["valAccuracy"] == metrics["valAccuracy"]
    assert _sha(clean / "model.safetensors") != "" and load_file(str(clean / "model.safetensors")).keys() == \
        load_file(str(out / "model.safetensors")).keys()


# --------------------------------------------------------------------------- non-finite

def test_non_finite_foundation_weights_are_refused_exit_2(world, tmp_path):
    state = load_file(str(world["fw"]))
    key = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight") and "fc" not in k)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan-foundation.safetensors"
    save_file(state, str(bad))
    job = util.job("linear-probe", tmp_path / "lp", world["ds"], weights=str(bad), steps=2)
    proc = _cli(job)
    assert proc.returncode == 2, proc.stderr
    assert "NaN/Inf" in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "lp" / "DONE").exists()


def test_a_diverging_stage_fails_with_reason_diverged_and_no_done(world, tmp_path):
    out = tmp_path / "lp"
    job = _lp_job(world, out, lr="1e37", steps=6)
    termination = tmp_path / "termination-log"
    termination.write_text("")
    proc = _cli(job, {"RATATOUILLE_TERMINATION_LOG": str(termination)})
    assert proc.returncode == 3, proc.stderr
    assert "Diverged" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(termination.read_text())["reason"] == "Diverged"
    assert not (out / "DONE").exists() and not (out / "metrics.json").exists()
    # no checkpoint of a non-finite model was kept to resume from
    for ck in out.glob("checkpoint/attempt-*/step-*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ck)).values() if t.is_floating_point())


def test_the_local_executor_reports_exit_3_as_diverged(tmp_path):
    from ratatouille_operator.executor import LocalJob

    ex = _executor(tmp_path)
    job = LocalJob(name="j", stage="target", member="0", attempt=1, state="Active")
    job.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    job.proc.wait()
    ex.jobs = {"j": job}
    ex._reap()
    assert job.state == "Failed" and job.reason == "Diverged"


# --------------------------------------------------------------------------- strict metrics, chance level

def test_metrics_json_is_strict_json(world, tmp_path, monkeypatch):
    real = stages.test_accuracies
    monkeypatch.setattr(stages, "test_accuracies", lambda *a: {k: math.nan for k in real(*a)})
    out = tmp_path / "lp"
    stages.run_stage(util.desc(_lp_job(world, out)), progress=_quiet())
    metrics = loads_strict((out / "metrics.json").read_text())
    assert metrics["testAccuracy"] == {"d2": None}
    assert integrity.problem(open_storage(str(out)), str(out)) is None


class _Split:
    def __init__(self, labels, classes):
        self.labels = labels
        self.num_classes = classes

    def validation_sets(self):
        return [("d", None, torch.tensor(self.labels[: len(self.labels) // 2])),
                ("e", None, torch.tensor(self.labels[len(self.labels) // 2:]))]


def test_chance_level_is_the_majority_share_and_needs_enough_images():
    assert stages.chance_level(_Split([0, 1, 2, 3] * 25, 4)) == pytest.approx(0.25)
    assert stages.chance_level(_Split([0] * 60 + [1] * 20 + [2] * 20, 3)) == pytest.approx(0.6)
    assert stages.chance_level(_Split([0, 1] * 10, 2)) is None  # 20 images cannot tell


def test_members_at_chance_level_are_left_out_with_a_warning(capsys):
    infos = {str(i): {"metrics": {"valAccuracyPooled": acc}, "ref": None}
             for i, acc in enumerate([0.8, 0.1, 0.25, 0.26, math.nan])}
    excluded, removed = stages._exclude_at_chance(infos, 0.25)
    assert sorted(infos) == ["0", "3"]
    assert [e["member"] for e in excluded] == ["1", "2", "4"] and set(removed) == {"1", "2", "4"}
    err = capsys.readouterr().err
    assert err.count("left out of the average") == 3 and "chance level" in err
    with pytest.raises(stages.AveragingError, match="every member is at chance level"):
        stages._exclude_at_chance({"0": {"metrics": {"valAccuracy": 0.2}, "ref": None}}, 0.25)
    kept = {"0": {"metrics": {"valAccuracy": 0.2}, "ref": None}}
    assert stages._exclude_at_chance(kept, None) == ([], {}) and list(kept) == ["0"]


def test_planner_warns_about_members_left_out_at_chance():
    from ratatouille_operator import planner

    metrics = {"excludedAtChance": [{"member": "3", "valAccuracyPooled": 0.07}], "chanceLevel": 0.1,
               "selected": ["0", "1"], "valAccuracy": 0.8}
    observed = planner.Observed(member_metrics={"average/0": metrics})
    from ratatouille_operator.validation import validate_manifest
    run = validate_manifest({"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun",
                             "metadata": {"name": "w"}, "spec": {"foundation": {"model": "resnet18"},
                             "target": {"dataset": "s3://d/x", "testDomains": ["a"]},
                             "storage": {"uri": "s3://b/r"}}})
    ref = planner.RunRef(namespace="default", name="w", uid="u")
    result = planner._result(run.spec, ref, observed, [0, 1])
    assert result["diagnostics"]["excludedAtChance"][0]["member"] == "3"
