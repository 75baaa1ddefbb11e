"""The trainer is truthful about its device: a GPU asked for and missing is an error (exit 2), not
a silent CPU run; CPU threads follow the container's cgroup quota, not the host's cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ratatouille_trainer.device import DeviceError, cgroup_cpu_limit, cpu_threads, select_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("want", ["cuda", "gpu"])
def test_a_gpu_asked_for_and_missing_is_an_error(want):
    with pytest.raises(DeviceError, match="no usable CUDA device"):
        select_device({"RATATOUILLE_DEVICE": want})
    assert select_device({"RATATOUILLE_DEVICE": "auto"}).device.type == "cpu"  # auto may fall back


def test_an_unknown_device_is_refused():
    with pytest.raises(DeviceError, match="expected auto, cpu or cuda"):
        select_device({"RATATOUILLE_DEVICE": "tpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_stage_exits_2_with_the_reason_in_its_termination_message(tmp_path):
    term = tmp_path / "termination"
    term.write_text("")
    from tests.trainer.util import job, write_dataset

    data = write_dataset(tmp_path / "data", per_class=2)
    desc = job("linear-probe", (tmp_path / "out").as_uri(), data.as_uri(), steps=2)
    env = dict(os.environ, RATATOUILLE_DEVICE="cuda", RATATOUILLE_TERMINATION_LOG=str(term), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "ratatouille_trainer.cli", "linear-probe", "--job-json",
                           json.dumps(desc)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no usable CUDA device" in proc.stderr
    assert "no usable CUDA device" in json.loads(term.read_text())["error"]


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert cpu_threads(1.5, 64) == 2 and cpu_threads(1.5, 1) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None and cpu_threads(None, 8) == 8


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5 and cpu_threads(0.5, 16) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
