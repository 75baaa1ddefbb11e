"""Issue 12, input edges: `ratatouille average` never replaces what is not a regular file and names
the file it cannot read; the safetensors header reader refuses what the safetensors library
refuses (duplicate keys, holes) and deep nesting without a RecursionError; a local member is read
from one snapshot; the CLI refuses bad --parallelism / --timeout values without a traceback and
survives a damaged status.json; the model card escapes Markdown."""
from __future__ import annotations

import json
import os
import re
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ratatouille_trainer import averaging
from ratatouille_trainer.averaging import AveragingError, UnsafeWeightsError, average_files

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RATATOUILLE_DEVICE="cpu")
    return subprocess.run([str(BIN / "ratatouille"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def safetensors_bytes(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def member(path: Path, values) -> Path:
    x = np.asarray(values, dtype="<f4")
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F32", "shape": [len(x)],
                                              "data_offsets": [0, x.nbytes]}}, x.tobytes()))
    return path


# --------------------------------------------------------------------------- average OUT

@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo", "device"])
def test_average_refuses_an_output_that_is_not_a_regular_file(tmp_path, kind):
    a, b = member(tmp_path / "a.safetensors", [1, 2]), member(tmp_path / "b.safetensors", [3, 4])
    out = tmp_path / "out"
    if kind == "directory":
        out.mkdir()
    elif kind == "symlink":
        target = tmp_path / "elsewhere.safetensors"
        target.write_bytes(b"keep me")
        out.symlink_to(target)
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out = Path("/dev/null")
    before = os.lstat(out)
    proc = cli("average", out, a, b)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stderr and "regular file" in proc.stderr
    after = os.lstat(out)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "symlink":
        assert (tmp_path / "elsewhere.safetensors").read_bytes() == b"keep me"


def test_average_writes_a_new_path_and_replaces_a_regular_file(tmp_path):
    a, b = member(tmp_path / "a.safetensors", [1, 2]), member(tmp_path / "b.safetensors", [3, 5])
    for out in (tmp_path / "new.safetensors", a.with_name("old.safetensors")):
        if out.name == "old.safetensors":
            out.write_bytes(b"old")
        proc = cli("average", out, a, b)
        assert proc.returncode == 0, proc.stderr
        _, data = out.read_bytes()[:8], out.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert np.frombuffer(data[8 + n:], dtype="<f4").tolist() == [2.0, 3.5]


def test_average_errors_name_the_missing_file(tmp_path):
    a = member(tmp_path / "a.safetensors", [1, 2])
    missing = tmp_path / "nope.safetensors"
    proc = cli("average", tmp_path / "out.safetensors", a, missing)
    assert proc.returncode == 2
    assert "None" not in proc.stderr and str(missing) in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- safetensors headers

def _refusal(tmp_path, data: bytes, name="bad.safetensors") -> str:
    good = member(tmp_path / "good.safetensors", [1, 2])
    bad = tmp_path / name
    bad.write_bytes(data)
    with pytest.raises((UnsafeWeightsError, AveragingError)) as info:
        average_files(tmp_path / "avg.safetensors", [good, bad])
    assert not (tmp_path / "avg.safetensors").exists()
    msg = str(info.value)
    assert name in msg and "\n" not in msg
    return msg


def test_deeply_nested_header_is_refused_without_recursion_error(tmp_path):
    depth = 200_000
    header = b'{"w": ' + b"[" * depth + b"]" * depth + b"}"
    msg = _refusal(tmp_path, safetensors_bytes(header, b""))
    assert "nested" in msg or "bad header" in msg
    proc = cli("average", tmp_path / "o.safetensors", tmp_path / "good.safetensors", tmp_path / "bad.safetensors")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr


def test_duplicate_tensor_keys_are_refused(tmp_path):
    x = np.arange(2, dtype="<f4").tobytes()
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    header = ('{"w": ' + entry + ', "w": ' + entry.replace("[0, 8]", "[8, 16]") + "}").encode()
    msg = _refusal(tmp_path, safetensors_bytes(header, x + x))
    assert "'w'" in msg and "twice" in msg


def test_a_hole_in_the_data_section_is_refused(tmp_path):
    x = np.arange(2, dtype="<f4").tobytes()
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    msg = _refusal(tmp_path, safetensors_bytes(header, b"\0" * 8 + x))
    assert "hole" in msg


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1},
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]},
    [1, 2],
])
def test_malformed_header_entries_are_refused(tmp_path, entry):
    _refusal(tmp_path, safetensors_bytes({"w": entry}, b"\0" * 8))


def test_the_library_agrees_on_what_is_refused(tmp_path):
    """The same files the safetensors library refuses."""
    from safetensors.numpy import load_file

    x = np.arange(2, dtype="<f4").tobytes()
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    dup = safetensors_bytes(('{"w": ' + entry + ', "w": ' + entry.replace("[0, 8]", "[8, 16]") + "}").encode(), x + x)
    hole = safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8 + x)
    for name, data in (("dup", dup), ("hole", hole)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(Exception):
            load_file(str(path))


# --------------------------------------------------------------------------- torn reads

def test_a_member_rewritten_in_place_mid_average_is_refused(tmp_path):
    n = 64
    paths = [member(tmp_path / f"m{i}.safetensors", np.full(n, i, dtype="<f4")) for i in range(2)]
    real = averaging._Opener.__call__
    state = {"calls": 0}

    def opener(self, mi, start, end, m):
        state["calls"] += 1
        if state["calls"] == 2:  # after the first block of member 0: rewrite member 1 in place
            with open(paths[1], "r+b") as f:
                f.seek(os.path.getsize(paths[1]) - 4)
                f.write(np.float32(99).tobytes())
            os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))
        return real(self, mi, start, end, m)

    averaging._Opener.__call__ = opener
    try:
        with pytest.raises(AveragingError, match="changed while it was being averaged"):
            average_files(tmp_path / "avg.safetensors", paths, block_elems=8)
    finally:
        averaging._Opener.__call__ = real
    assert not (tmp_path / "avg.safetensors").exists()


def test_a_member_replaced_by_rename_mid_average_is_read_whole_from_its_snapshot(tmp_path):
    n = 64
    paths = [member(tmp_path / f"m{i}.safetensors", np.full(n, 2 * i, dtype="<f4")) for i in range(2)]
    real = averaging._Opener.__call__
    state = {"calls": 0}

    def opener(self, mi, start, end, m):
        state["calls"] += 1
        if state["calls"] == 2:
            fresh = member(tmp_path / "fresh.safetensors", np.full(n, 100, dtype="<f4"))
            os.replace(fresh, paths[1])
        return real(self, mi, start, end, m)

    averaging._Opener.__call__ = opener
    try:
        sa = average_files(None, paths, block_elems=8)["average"]
    finally:
        averaging._Opener.__call__ = real
    assert sa.mean_arrays()["w"].tolist() == [1.0] * n  # (0 + 2) / 2 everywhere: no block of the new file


# --------------------------------------------------------------------------- the run CLI

def _tiny_manifest(tmp_path: Path, **spec) -> Path:
    doc = {"apiVersion": "ratatouille.dev/v1alpha1", "kind": "RatatouilleRun", "metadata": {"name": "edges"},
           "spec": {"foundation": {"model": "test_resnet", "inputSize": 32},
                    "target": {"dataset": str(tmp_path / "no-data"), "testDomains": ["d2"]},
                    "storage": {"uri": (tmp_path / "store").as_uri()},
                    "linearProbe": {"steps": 2}, "finetune": {"runs": 1, "steps": 2, "headWarmupSteps": 0,
                                                              "evalEvery": 1},
                    "failurePolicy": {"retryBackoffSeconds": 600}, **spec}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("value", ["-1", "0", "100000", "two"])
def test_run_refuses_a_bad_parallelism_at_once(tmp_path, value):
    path = _tiny_manifest(tmp_path)
    t0 = time.monotonic()
    proc = cli("run", path, "--parallelism", value, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 2 and "--parallelism" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("value", ["-5", "nan", "inf"])
def test_run_refuses_a_bad_timeout(tmp_path, value):
    proc = cli("run", _tiny_manifest(tmp_path), f"--timeout={value}", timeout=60)
    assert proc.returncode == 2 and "--timeout" in proc.stderr and "Traceback" not in proc.stderr


def test_run_timeout_ends_in_one_line_not_a_traceback(tmp_path):
    proc = cli("run", _tiny_manifest(tmp_path), "--timeout", "0.5", "--quiet", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--timeout" in proc.stderr and "resume" in proc.stderr


def test_a_damaged_status_json_is_set_aside_and_the_run_resumes(tmp_path, capsys):
    from ratatouille_operator.executor import LocalExecutor
    from ratatouille_operator.validation import load_manifest_file
    from ratatouille_trainer.storage import open_storage

    run = load_manifest_file(_tiny_manifest(tmp_path))
    storage = open_storage(run.spec.storage.uri)

    def executor():
        return LocalExecutor(run.namespace, run.name, run.spec, storage=storage, workdir=tmp_path / "w")

    status_uri = executor().status_uri
    for damaged in (b"{not json", b"[]", b'{"jobs": [{"name": "x"}]}', b'{"jobs": [7]}',
                    b'{"status": [1], "jobs": []}', b"\xff\xfe"):
        storage.write_bytes(status_uri, damaged)
        ex = executor()  # no exception: the record is set aside
        assert ex.status == {} and ex.jobs == {}
        assert storage.read_bytes(status_uri + ".damaged") == damaged
        err = capsys.readouterr().err
        assert "warning: ignoring" in err and "status.json" in err


def test_run_with_a_damaged_status_json_has_no_traceback(tmp_path):
    path = _tiny_manifest(tmp_path)
    first = cli("run", path, "--timeout", "0.5", "--quiet")
    assert first.returncode == 1
    (status,) = (tmp_path / "store").glob("default/edges/*/status.json")
    status.write_text('{"jobs": "nonsense"')
    proc = cli("run", path, "--timeout", "0.5", "--quiet")
    assert "Traceback" not in proc.stderr and "warning: ignoring" in proc.stderr


# --------------------------------------------------------------------------- model card

def test_model_card_escapes_markdown_in_every_field():
    from ratatouille_trainer.provenance import model_card, write_lineage

    evil = "x` | ![img](http://e.vil/x.png) <script>alert(1)</script>\n# Heading *bold* [link](javascript:x)"
    members = [{"member": evil, "uri": "s3://b/" + evil, "sha256": "a" * 64, "source": evil,
                "hyperparameters": {"lr": evil}, "valAccuracy": 0.5, "testAccuracy": {evil: 0.4}}]
    result = {"selection": "uniform", "selected": [evil], "sha256": "b" * 64, "valAccuracy": 0.5,
              "testAccuracy": {evil: 0.4}, "run": {"namespace": evil, "name": evil, "uid": evil},
              "foundation": {"model": evil, "weights": evil, "inputSize": 32},
              "data": {"dataset": evil, "testDomains": [evil]}, "trainerVersion": evil,
              "bestSingle": {"member": evil, "valAccuracy": 0.5, "testAccuracy": {evil: 0.4}}}
    card = model_card(write_lineage(members, result))
    assert "\n# Heading" not in card
    fenced = False
    for line in card.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            assert not line.startswith("```") and "\n" not in line
            continue
        # outside code spans, nothing may start markup: every <, [, *, ` and | is escaped
        prose = re.sub(r"(?<![`\\])(`+)(?!`)(.+?)(?<!`)\1(?!`)", "CODE", line)
        assert not re.search(r"(?<!\\)[<\[*`]", prose), line
        if line.startswith("|"):
            # every row keeps its table's column count: no pipe broke out of a cell
            assert len(re.findall(r"(?<!\\)\|", prose)) - 1 in (2, 3, 10), line
    # an inline code span holds the backtick without ending early
    assert "`` x` " in card


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/m", "../resnet18",
                                  "resnet18\n"])
def test_trainer_refuses_non_timm_model_names_before_timm_sees_them(name):
    from ratatouille_trainer.models import ModelError, build_network

    with pytest.raises(ModelError, match="not a timm architecture name"):
        build_network(name, 3)
# --------------------------------------------------------------------------- umask

def test_outputs_honour_the_umask(tmp_path):
    a, b = member(tmp_path / "a.safetensors", [1, 2]), member(tmp_path / "b.safetensors", [3, 4])
    out = tmp_path / "avg.safetensors"
    code = (f"import os, sys; os.umask(0o022); from ratatouille_operator.cli import main; "
            f"sys.exit(main(['average', {str(out)!r}, {str(a)!r}, {str(b)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_saved_weights_honour_the_umask(tmp_path):
    code = ("import os, torch; os.umask(0o027); from ratatouille_trainer.weights import save_state_dict; "
            f"save_state_dict({{'w': torch.ones(2)}}, {str(tmp_path / 'w.safetensors')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o640
