"""`ratatouille average OUT IN IN...`: the standalone uniform average, from paths and from S3."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BIN = Path(sys.executable).parent


def average(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([str(BIN / "ratatouille"), "average", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=120)


def members(tmp_path, n=3):
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = {"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(),
                 "n": torch.tensor(10 + i)}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def test_average_of_paths_is_the_mean_and_keeps_dtypes(tmp_path):
    paths = members(tmp_path)
    out = tmp_path / "avg.safetensors"
    proc = average(out, paths[0], paths[1].as_uri(), paths[2])
    assert proc.returncode == 0, proc.stderr
    assert "averaged 3 checkpoints" in proc.stdout
    got = load_file(str(out))
    states = [load_file(str(p)) for p in paths]
    assert torch.allclose(got["w"], sum(s["w"] for s in states) / 3, atol=1e-6)
    assert got["h"].dtype == torch.float16 and got["n"].dtype == torch.int64
    assert int(got["n"]) == 10  # integer buffers come from the first member, not averaged


def test_mismatch_is_refused_naming_the_tensor_and_nothing_is_written(tmp_path):
    paths = members(tmp_path, 2)
    save_file({"w": torch.zeros(4, 4), "h": torch.zeros(5).half(), "n": torch.tensor(1)}, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "avg.safetensors"
    proc = average(out, paths[0], tmp_path / "bad.safetensors")
    assert proc.returncode == 2
    assert "'w'" in proc.stderr and "bad.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_pickle_weights_are_refused_without_loading(tmp_path):
    paths = members(tmp_path, 1)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"

    class Boom:  # would create `marker` if anything unpickled it
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil.write_bytes(pickle.dumps({"w": Boom()}))
    proc = average(tmp_path / "avg.safetensors", paths[0], evil)
    assert proc.returncode == 2 and "evil.safetensors" in proc.stderr
    assert not marker.exists()
    (tmp_path / "w.pt").write_bytes(pickle.dumps({"w": 1}))
    proc = average(tmp_path / "avg.safetensors", tmp_path / "w.pt", paths[0])
    assert proc.returncode == 2 and "w.pt" in proc.stderr


def test_average_from_and_to_s3(tmp_path, moto_server, s3_bucket):
    from ratatouille_trainer.storage import open_storage

    paths = members(tmp_path)
    store = open_storage(s3_bucket, endpoint=moto_server)
    uris = []
    for p in paths:
        uris.append(f"{s3_bucket}/members/{p.name}")
        store.upload(str(p), uris[-1])
    out_uri = f"{s3_bucket}/avg/model.safetensors"
    proc = average(out_uri, *uris, "--endpoint", moto_server)
    assert proc.returncode == 0, proc.stderr
    store.download(out_uri, str(tmp_path / "back.safetensors"))
    local = tmp_path / "local.safetensors"
    assert average(local, *paths).returncode == 0
    a, b = load_file(str(tmp_path / "back.safetensors")), load_file(str(local))
    assert all(torch.equal(a[k], b[k]) for k in a)
