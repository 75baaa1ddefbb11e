"""Stages end to end on CPU with tiny data: LP, aux, target, resume, average, CLI errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ratatouille_trainer import stages
from ratatouille_trainer.progress import Progress
from ratatouille_trainer.training import SimulatedCrash
from tests.trainer import util

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RATATOUILLE_DEVICE", "cpu")
    monkeypatch.delenv("RATATOUILLE_ABORT_AT_STEP", raising=False)
    monkeypatch.delenv("RATATOUILLE_KEEP_CHECKPOINTS", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """dataset + foundation + linear probe + one auxiliary fine-tuning (shared by the tests)."""
    tmp = tmp_path_factory.mktemp("world")
    ds = util.write_dataset(tmp / "ds", formats=("png", "jpg"))
    aux_ds = util.write_dataset(tmp / "auxds", domains=("a0", "a1"), classes=("p", "q"), per_class=8, seed=5)
    fw = util.write_foundation(tmp / "foundation.safetensors")
    out = tmp / "runs"
    quiet = Progress("t", "t", 1, stream=io.StringIO())
    lp = stages.run_stage(util.desc(util.job("linear-probe", out / "linear-probe", ds, weights=str(fw),
                                             steps=8, eval_every=2, lr="1e-2")), progress=quiet)
    aux = stages.run_stage(util.desc(util.job("aux", out / "aux" / "p-0", aux_ds, test_domains=(), member="p-0",
                                              weights=str(fw), steps=4, lp_steps=2, lr="1e-3")), progress=quiet)
    return {"tmp": tmp, "ds": ds, "fw": fw, "out": out, "lp": lp, "aux": aux,
            "lp_model": out / "linear-probe" / "model.safetensors",
            "aux_model": out / "aux" / "p-0" / "model.safetensors"}


def _quiet():
    return Progress("t", "t", 1, stream=io.StringIO())


def _target_job(world, out, member, source="foundation", featurizer=None, **kw):
    init = {"source": source, "featurizer": featurizer, "head": str(world["lp_model"])}
    kw.setdefault("steps", 9)
    kw.setdefault("eval_every", 2)
    kw.setdefault("lr", "3e-3")
    return util.job("target", out, world["ds"], member=member, weights=str(world["fw"]), init=init, **kw)


def _assert_best_is_curve_max(metrics):
    vals = [p["valAccuracy"] for p in metrics["curve"]]
    first_max = metrics["curve"][vals.index(max(vals))]
    assert metrics["bestStep"] == first_max["step"]
    assert metrics["valAccuracy"] == pytest.approx(max(vals))


# --------------------------------------------------------------------------------- linear probe

def test_linear_probe_trains_head_only(world):
    out = world["out"] / "linear-probe"
    assert sorted(p.name for p in out.iterdir()) == ["DONE", "metrics.json", "model.safetensors"]
    model = load_file(str(world["lp_model"]))
    found = load_file(str(world["fw"]))
    feat = {k[len("featurizer."):]: v for k, v in model.items() if k.startswith("featurizer.")}
    assert feat and all(torch.equal(v, found[k]) for k, v in feat.items())  # bytes unchanged
    # the head moved away from its initialisation: the probe learned something
    m = world["lp"]
    assert m["stage"] == "linear-probe" and m["source"] == "foundation"
    assert m["foundationSha256"] and m["sha256"] and set(m["testAccuracy"]) == {"d2"}
    assert m["curve"][0]["step"] == 0 and m["curve"][-1]["step"] == 7
    _assert_best_is_curve_max(m)
    # the head moved away from its (seeded, reproducible) initialisation
    d = util.desc(util.job("linear-probe", out, world["ds"], weights=str(world["fw"])))
    init, _ = stages.foundation_network(d, 3, 0.0)
    assert not torch.equal(init.head.weight, model["head.weight"])
    assert json.loads((out / "metrics.json").read_text())["sha256"] == m["sha256"]


def test_aux_keeps_last_step_and_trains_everything(world):
    m = world["aux"]
    assert m["bestStep"] == m["steps"] - 1 == 5  # lpSteps 2 + steps 4, last step kept
    aux = load_file(str(world["aux_model"]))
    found = load_file(str(world["fw"]))
    changed = [k for k, v in aux.items() if k.startswith("featurizer.") and "running" not in k
               and "num_batches" not in k and not torch.equal(v, found[k[len("featurizer."):]])]
    assert changed  # the featurizer was fine-tuned
    for k, v in aux.items():  # frozen BN: running statistics untouched
        if "running_" in k:
            assert torch.equal(v, found[k[len("featurizer."):]]), k
    assert aux["head.weight"].shape[0] == 2  # the aux dataset's own classes


# ------------------------------------------------------------------------------------ target

def test_target_init_copies_featurizer_parameters_only_and_lp_head(world, tmp_path):
    # an aux source whose BN buffers differ from the foundation's: they must not be copied
    aux = load_file(str(world["aux_model"]))
    for k in aux:
        if k.endswith("running_mean"):
            aux[k] = aux[k] + 3.0
    src = tmp_path / "aux-odd.safetensors"
    save_file(aux, str(src))
    d = util.desc(_target_job(world, tmp_path / "t", "1", source="p-0", featurizer=str(src)))
    net, info = stages.init_target_network(d, 3)
    found = load_file(str(world["fw"]))
    lp = load_file(str(world["lp_model"]))
    for k, v in net.state_dict().items():
        if k.startswith("head."):
            assert torch.equal(v, lp[k]), k
        elif any(s in k for s in ("running_", "num_batches_tracked")):
            assert torch.equal(v, found[k[len("featurizer."):]]), k
        else:
            assert torch.equal(v, aux[k]), k
    assert info["featurizerParametersCopied"] == len(list(net.featurizer.parameters()))
    assert stages.target_phases(d)[0].trainable == "all"  # head_warmup 0 in this job


def test_target_from_aux_trains_with_warmup_and_keeps_best(world, tmp_path):
    out = tmp_path / "target-1"
    d = util.desc(_target_job(world, out, "1", source="p-0", featurizer=str(world["aux_model"]),
                              head_warmup=3, lr="1e-2", steps=11))
    phases = stages.target_phases(d)
    assert [(p.start, p.trainable) for p in phases] == [(0, "head"), (3, "all")]
    m = stages.run_stage(d, progress=_quiet())
    assert (out / "DONE").exists() and not (out / "checkpoint").exists()
    _assert_best_is_curve_max(m)
    assert m["source"] == "p-0" and m["headWarmupSteps"] == 3
    model = load_file(str(out / "model.safetensors"))
    found = load_file(str(world["fw"]))
    for k, v in model.items():  # BN statistics unchanged after training
        if "running_" in k:
            assert torch.equal(v, found[k[len("featurizer."):]]), k
    # the saved model is the best checkpoint: re-evaluating it gives the recorded score
    from ratatouille_trainer.data import load_dataset
    from ratatouille_trainer.device import select_device
    from ratatouille_trainer.training import Evaluator
    net, _ = stages.foundation_network(d, 3, 0.0)
    net.load_state_dict(model)
    ds = load_dataset(str(world["ds"]), 32, test_domains=("d2",))
    score = Evaluator(ds.validation_sets(), select_device()).score(net)
    assert score.mean == pytest.approx(m["valAccuracy"]) and score.pooled == pytest.approx(m["valAccuracyPooled"])


def test_resume_after_crash_continues_without_repeating_steps(world, tmp_path, monkeypatch):
    job = dict(steps=10, eval_every=3, lr="1e-2", dropout="0.1", member="5")
    ref = stages.run_stage(util.desc(_target_job(world, tmp_path / "ref", **job)), progress=_quiet())

    out = tmp_path / "crashy"
    monkeypatch.setenv("RATATOUILLE_ABORT_AT_STEP", "8")  # dies after step index 7 (checkpoint at 6)
    with pytest.raises(SimulatedCrash):
        stages.run_stage(util.desc(_target_job(world, out, **job)), progress=_quiet())
    assert not (out / "DONE").exists() and not (out / "model.safetensors").exists()
    (state_json,) = (out / "checkpoint").glob("attempt-*/state.json")  # one folder per attempt
    state = json.loads(state_json.read_text())
    assert state["step"] == 6
    monkeypatch.delenv("RATATOUILLE_ABORT_AT_STEP")

    buf = io.StringIO()
    m = stages.run_stage(util.desc(_target_job(world, out, **job)), progress=Progress("target", "5", 10, stream=buf, every=1))
    events = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert events[0]["event"] == "resume" and events[0]["step"] == 7
    steps_done = [e["step"] for e in events if e["event"] == "progress"]
    assert steps_done == [8, 9, 10]  # steps 7, 8, 9 (1-based 8..10): nothing repeated
    assert m["resumedFrom"] == 6
    # exactly the uninterrupted run: same curve, same best step, same weights
    assert [(p["step"], p["valAccuracy"]) for p in m["curve"]] == [(p["step"], p["valAccuracy"]) for p in ref["curve"]]
    assert [p["loss"] for p in m["curve"]] == pytest.approx([p["loss"] for p in ref["curve"]], abs=1e-6)
    assert m["bestStep"] == ref["bestStep"]
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


# ----------------------------------------------------------------------------------- average

@pytest.fixture(scope="module")
def members(world):
    out = world["out"] / "target"
    # "1" is the twin of "0": same hyperparameters, another initialization source
    specs = [("0", "foundation", None, {}), ("1", "p-0", str(world["aux_model"]), {}),
             ("2", "foundation", None, {"lr": "3e-3", "weightDecay": "1e-4", "dropout": "0.1"})]
    refs = []
    for name, source, feat, hp in specs:
        d = _target_job(world, out / name, name, source=source, featurizer=feat, head_warmup=2,
                        steps=7, hyper={"lr": "5e-3", "weightDecay": "0", "dropout": "0", **hp})
        stages.run_stage(util.desc(d), progress=_quiet())
        refs.append({"member": name, "uri": str(out / name), "source": source})
    return refs


@pytest.mark.parametrize("selection", ["uniform", "greedy"])
def test_average_end_to_end(world, members, selection):
    out = world["out"] / f"average-{selection}"
    d = util.job("average", out, world["ds"], member="average", weights=str(world["fw"]),
                 members=members, selection=selection)
    m = stages.run_stage(util.desc(d), progress=_quiet())
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(files) == {"model.safetensors", "model-card.md", "lineage.json", "metrics.json", "DONE", "timm"}
    assert sorted(p.name for p in (out / "timm").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    files.update({f"timm/{p.name}": p.stat().st_mtime_ns for p in (out / "timm").iterdir()})
    assert files["DONE"] >= max(v for k, v in files.items() if k != "DONE")
    lineage = json.loads((out / "lineage.json").read_text())
    assert [x["member"] for x in lineage["members"]] == ["0", "1", "2"]
    assert all(len(x["sha256"]) == 64 for x in lineage["members"])
    card = (out / "model-card.md").read_text()
    assert selection in card and m["sha256"][:12] in card
    assert lineage["result"]["sha256"] == m["sha256"] and lineage["selection"] == selection
    avg = load_file(str(out / "model.safetensors"))
    states = {r["member"]: load_file(str(Path(r["uri"]) / "model.safetensors")) for r in members}
    sel = m["selected"]
    for k, v in avg.items():
        if v.is_floating_point():
            mean = sum(states[s][k].double() for s in sel) / len(sel)
            assert torch.allclose(v.double(), mean, atol=1e-6), k
        assert v.dtype == states["0"][k].dtype
    best = m["bestSingle"]
    vals = {r["member"]: json.loads((Path(r["uri"]) / "metrics.json").read_text())["valAccuracy"] for r in members}
    assert best["valAccuracy"] == max(vals.values())
    assert set(m["testAccuracy"]) == {"d2"}
    assert m["uniform"]["membersBestVal"] == max(m["membersValAccuracyPooled"].values())
    assert isinstance(m["uniform"]["collapse"], bool)
    interp = m["interpolation"]
    assert interp["kind"] == "twins" and interp["a"] == "0" and interp["b"] == "1"
    assert interp["sourceA"] == "foundation" and interp["sourceB"] == "p-0" and interp["featurizerDistance"] > 0
    assert [p["alpha"] for p in interp["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert interp["points"][0]["valAccuracy"] == pytest.approx(m["membersValAccuracyPooled"][interp["a"]])
    assert interp["points"][-1]["valAccuracy"] == pytest.approx(m["membersValAccuracyPooled"]["1"])
    pts = interp["points"]
    assert interp["barrier"] == pytest.approx(max((1 - p["alpha"]) * pts[0]["valAccuracy"] + p["alpha"]
                                                  * pts[-1]["valAccuracy"] - p["valAccuracy"] for p in pts))
    assert interp["pairs"] == [{k: v for k, v in interp.items() if k != "pairs"}]
    # the other diagnostics: present, consistent, and strict JSON on disk
    u = m["uniform"]
    assert u["gain"] == pytest.approx(u["valAccuracy"] - u["membersMeanVal"])
    assert u["gapToBest"] == pytest.approx(u["valAccuracy"] - u["membersBestVal"])
    assert u["collapseGrade"] in ("none", "partial", "collapsed") and u["collapse"] == (u["collapseGrade"] != "none")
    src = m["sources"]
    assert set(src) == {"foundation", "p-0"}
    assert src["foundation"]["members"] == 2 and src["p-0"]["members"] == 1
    assert src["foundation"]["featurizerRelL2"] == 0.0 and src["p-0"]["featurizerRelL2"] > 0
    assert src["foundation"]["membersRelL2"] > 0 and src["p-0"]["membersRelL2"] > 0
    assert src["p-0"]["meanVal"] == pytest.approx(m["membersValAccuracyPooled"]["1"])
    assert all(0 <= s["leaveOutVal"] <= 1 for s in src.values())
    e = m["ensemble"]
    assert e["members"] == 3 and 0 <= e["disagreement"] <= 1 and 0 <= e["valAccuracy"] <= 1
    c = m["convergence"]
    assert c["members"] == 3 and c["share"] == pytest.approx(c["bestAtLast"] / 3)
    assert c["warn"] == (c["share"] > 0.5)
    assert isinstance(m["diagnosticWarnings"], list)
    assert json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: 1 / 0)["sources"] == src
    assert "## Averaging diagnostics" in card
    if selection == "uniform":
        assert sel == ["0", "1", "2"] and m["members"] == 3
        assert m["uniform"]["valAccuracy"] == pytest.approx(m["valAccuracyPooled"])
    else:
        # greedy: the best-ranked member is always kept first and the soup never does worse
        # than it on the pooled training-domain validation
        assert sel[0] == best["member"]
        assert m["valAccuracyPooled"] >= best["valAccuracyPooled"]
        assert [t["member"] for t in m["greedyTrace"]][0] == best["member"]


def test_average_diagnostics_of_identical_members(world, members, tmp_path):
    """Three copies of one member, from two sources with the same hyperparameters: every
    diagnostic has a known answer (no gain, no disagreement, no barrier, nothing to leave out)."""
    import shutil

    src = Path(members[0]["uri"])
    last = max(p["step"] for p in json.loads((src / "metrics.json").read_text())["curve"])
    refs = []
    for name, source, best in (("x0", "foundation", last), ("x1", "p-0", last), ("x2", "p-0", 0)):
        dst = tmp_path / "target" / name
        shutil.copytree(src, dst)
        met = json.loads((dst / "metrics.json").read_text())
        met.update(member=name, source=source, bestStep=best)
        if source != "foundation":
            met["init"] = {**met["init"], "source": source, "featurizer": str(world["aux_model"])}
        (dst / "metrics.json").write_text(json.dumps(met))
        refs.append({"member": name, "uri": str(dst), "source": source})
    out = tmp_path / "average"
    d = util.job("average", out, world["ds"], member="average", weights=str(world["fw"]), members=refs)
    m = stages.run_stage(util.desc(d), progress=_quiet())
    val = m["membersValAccuracyPooled"]["x0"]
    assert set(m["membersValAccuracyPooled"].values()) == {val}
    u = m["uniform"]
    assert u["valAccuracy"] == val and u["gain"] == pytest.approx(0, abs=1e-12) and u["gapToBest"] == 0
    assert u["collapseGrade"] == "none" and u["collapse"] is False and u["valImages"] > 0
    assert m["ensemble"] == {"members": 3, "disagreement": 0.0, "valAccuracy": pytest.approx(val)}
    s = m["sources"]
    assert s["foundation"]["members"] == 1 and s["p-0"]["members"] == 2
    assert s["foundation"]["leaveOutVal"] == val and s["p-0"]["leaveOutVal"] == val
    assert s["foundation"]["leaveOutGain"] == 0 and s["p-0"]["leaveOutGain"] == 0
    assert s["foundation"]["featurizerRelL2"] == 0.0 and s["p-0"]["featurizerRelL2"] > 0
    assert s["foundation"]["membersRelL2"] > 0
    assert s["foundation"]["membersRelL2"] == pytest.approx(s["p-0"]["membersRelL2"])
    it = m["interpolation"]
    assert (it["kind"], it["a"], it["b"]) == ("twins", "x0", "x1") and len(it["pairs"]) == 1
    assert it["featurizerDistance"] == 0 and it["barrier"] == pytest.approx(0, abs=1e-12)
    assert all(p["valAccuracy"] == val for p in it["points"])
    c = m["convergence"]
    assert (c["members"], c["bestAtLast"], c["warn"]) == (3, 2, True)
    assert [w["code"] for w in m["diagnosticWarnings"]] == ["TrainLonger"]
    card = (out / "model-card.md").read_text()
    assert "train longer before averaging" in card and "disagreement 0.0000" in card


def test_average_soup_interpolates_the_farthest_pair(world, members, tmp_path):
    """A soup (one source, no twins): the interpolation pair is the first member read and the
    member farthest from it; a copy of the first is at distance 0 and is not chosen."""
    import shutil

    by_name = {r["member"]: Path(r["uri"]) for r in members}
    refs = []
    for name, orig in (("s0", "0"), ("s1", "2"), ("s2", "0")):
        shutil.copytree(by_name[orig], tmp_path / name)
        refs.append({"member": name, "uri": str(tmp_path / name), "source": "foundation"})
    d = util.job("average", tmp_path / "average", world["ds"], member="average", weights=str(world["fw"]),
                 members=refs)
    m = stages.run_stage(util.desc(d), progress=_quiet())
    it = m["interpolation"]
    assert (it["kind"], it["a"], it["b"]) == ("farthest", "s0", "s1") and len(it["pairs"]) == 1
    a, b = (load_file(str(by_name[n] / "model.safetensors")) for n in ("0", "2"))
    names = [k for k in a if k.startswith("featurizer.") and a[k].is_floating_point()
             and not k.endswith(("running_mean", "running_var"))]
    dist = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in names) ** 0.5
    assert it["featurizerDistance"] == pytest.approx(dist, rel=1e-6)
    assert m["sources"]["foundation"]["members"] == 3 and m["sources"]["foundation"]["leaveOutVal"] is None
    assert "SourceBreaksAverage" not in [w["code"] for w in m["diagnosticWarnings"]]


# ---------------------------------------------------------------------------------------- CLI

def _cli(job: dict | None, stage=None, extra=(), env_extra=None):
    env = util.env()
    env["PYTHONPATH"] = str(ROOT / "trainer") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    args = [sys.executable, "-m", "ratatouille_trainer.cli", stage or job["stage"]]
    if job is not None:
        args += ["--job-json", json.dumps(job)]
    args += list(extra)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("ratatouille-trainer: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_bad_input(world, tmp_path):
    # missing dataset
    job = util.job("linear-probe", tmp_path / "o1", tmp_path / "missing-ds", weights=str(world["fw"]))
    _one_line_error(_cli(job), 2, "missing-ds", "not found")
    assert not (tmp_path / "o1" / "DONE").exists()
    # unknown test domain: named, with the available ones listed
    job = util.job("linear-probe", tmp_path / "o2", world["ds"], test_domains=("sketch",))
    _one_line_error(_cli(job), 2, "'sketch'", "d0, d1, d2")
    # a domain with no images
    bad = util.write_dataset(tmp_path / "ds-empty", per_class=3)
    for f in (bad / "d1").rglob("*.png"):
        f.unlink()
    _one_line_error(_cli(util.job("linear-probe", tmp_path / "o3", bad)), 2, "'d1'", "no images")
    # pickle weights refused (by name and by content)
    pt = tmp_path / "foundation.pt"
    pt.write_bytes(pickle.dumps({"x": 1}))
    _one_line_error(_cli(util.job("linear-probe", tmp_path / "o4", world["ds"], weights=str(pt))), 2, "foundation.pt")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    _one_line_error(_cli(util.job("linear-probe", tmp_path / "o5", world["ds"], weights=str(fake))), 2, "pickle")
    # stage mismatch, malformed JSON, missing options
    _one_line_error(_cli(util.job("linear-probe", tmp_path / "o6", world["ds"]), stage="target"), 2, "does not match")
    _one_line_error(_cli(None, stage="target", extra=["--job-json", "{not json"]), 2, "JSON")
    _one_line_error(_cli(None, stage="target"), 2)
    for o in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not (tmp_path / o / "DONE").exists()


def test_cli_truncated_image_warns_then_completes_and_is_idempotent(world, tmp_path):
    ds = util.write_dataset(tmp_path / "ds", per_class=6)
    img = ds / "d0" / "square" / "1.png"
    img.write_bytes(img.read_bytes()[:40])
    term = tmp_path / "termination-log"
    term.write_text("")
    job = util.job("linear-probe", tmp_path / "lp", ds, weights=str(world["fw"]), steps=2, eval_every=1)
    r = _cli(job, env_extra={"RATATOUILLE_TERMINATION_LOG": str(term)})
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "1.png" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "lp" / "DONE").exists()
    events = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert any(e["event"] == "progress" and e["step"] == 2 for e in events)
    summary = json.loads(term.read_text())
    assert summary["stage"] == "linear-probe" and 0 <= summary["valAccuracy"] <= 1
    assert len(term.read_text()) < 4096
    r2 = _cli(job)
    assert r2.returncode == 0 and "already complete" in r2.stderr


def test_progress_metrics_server():
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RATATOUILLE_METRICS_ADDR"] = "127.0.0.1"
    try:
        p = Progress("target", "3", 10, stream=io.StringIO(), port=port)
        p.update(4, loss=0.5, val=0.75, images_per_second=123.0)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        del os.environ["RATATOUILLE_METRICS_ADDR"]
    assert "ratatouille_trainer_step 4.0" in body
    assert "ratatouille_trainer_val_accuracy 0.75" in body
    assert 'ratatouille_trainer_info{member="3",stage="target"} 1.0' in body
    line = json.loads(p.stream.getvalue().splitlines()[-1])
    assert line["event"] == "progress" and line["step"] == 4 and line["valAccuracy"] == 0.75
