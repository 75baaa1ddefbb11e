"""Where the trainer runs: a GPU automatically when one is present, the CPU otherwise.

On CUDA: bf16 autocast, channels_last memory format, the (small, uint8) image cache moved to the
GPU once (or pinned host memory with non-blocking copies when it is too large), optional
``torch.compile`` with ``RATATOUILLE_COMPILE=1``. On the CPU: plain fp32; training batches are
made with one intra-op thread (``RATATOUILLE_DATA_THREADS``), the step with all of them; when the
process runs one intra-op thread, the next batch is made in a background thread during the step
(``RATATOUILLE_PREFETCH=0``: never). ``RATATOUILLE_DEVICE=cpu`` forces the CPU;
``RATATOUILLE_DEVICE=cuda`` (the operator sets it on pods that request ``nvidia.com/gpu``)
requires a usable CUDA device: without one the stage fails (DeviceError, exit 2) instead of
training on the CPU of a node that was meant to give it a GPU.

Intra-op threads follow the container's CPU quota (cgroup v2 ``cpu.max``, or v1's CFS quota), not
the host's core count: a pod limited to 2 CPUs on a 64-core node runs 2 threads, not 64.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DeviceContext:
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    pin_memory: bool = False
    non_blocking: bool = False
    compile: bool = False
    # datasets up to this many bytes are kept on the device itself
    device_cache_bytes: int = 4 << 30
    # CPU: intra-op threads for making a training batch (sampling + augmentation: many small
    # ops that stall with every core's thread on them when the CPU is shared; measured 586 ms
    # vs 41 ms per 96-image batch at 32 px on a loaded 2-core machine). None: unchanged.
    data_threads: int | None = None
    # CPU with one intra-op thread: make the next batch in a background thread (another core)
    prefetch: bool = False
    # CUDA: launch the next batch's sampling and augmentation after the step's backward and
    # before waiting for its loss, so the CPU's work for it overlaps the GPU's for the step
    launch_ahead: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.device:
            return x
        if self.pin_memory and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()
        return x.to(self.device, non_blocking=self.non_blocking)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """Final layout of a float input batch."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        net.to(self.device)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        return net

    def compiled(self, net: torch.nn.Module):
        """The callable to run forward passes with (compiled when asked for)."""
        if self.compile:
            return torch.compile(net)
        return net

    @contextlib.contextmanager
    def data_scope(self):
        """Run the data pipeline with ``data_threads`` intra-op threads (restored after)."""
        if self.data_threads is None or self.is_cuda:
            yield
            return
        before = torch.get_num_threads()
        if before == self.data_threads:
            yield
            return
        torch.set_num_threads(self.data_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def describe(self) -> str:
        if self.is_cuda:
            name = torch.cuda.get_device_name(self.device)
            return f"cuda ({name}, bf16 autocast, channels_last{', compiled' if self.compile else ''})"
        return "cpu (fp32)"


class DeviceError(RuntimeError):
    """The device the job asks for is not there (bad input for this node: exit 2)."""


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs the container may use by its CFS quota (None: no quota). cgroup v2 `cpu.max` holds
    "<quota> <period>" or "max <period>"; v1 has cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((base / "cpu.cfs_quota_us").read_text())
            period_us = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def cpu_threads(limit: float | None, cores: int | None) -> int:
    """Intra-op threads for a CPU quota: the quota rounded up, never more than the cores."""
    cores = max(1, cores or 1)
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def apply_cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """Size torch's intra-op pool from the cgroup quota when it is below the core count."""
    threads = cpu_threads(cgroup_cpu_limit(root), os.cpu_count())
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def select_device(env: dict | None = None) -> DeviceContext:
    env = os.environ if env is None else env
    want = (env.get("RATATOUILLE_DEVICE") or "auto").lower()
    if want not in ("auto", "cpu", "cuda", "gpu"):
        raise DeviceError(f"RATATOUILLE_DEVICE={want!r}: expected auto, cpu or cuda")
    if want in ("cuda", "gpu") and not torch.cuda.is_available():
        raise DeviceError(
            f"RATATOUILLE_DEVICE={want}: this pod asked for a GPU but torch finds no usable CUDA "
            f"device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); refusing to train on the CPU")
    use_cuda = torch.cuda.is_available() and want in ("auto", "cuda", "gpu")
    prefetch = env.get("RATATOUILLE_PREFETCH", "1").lower() not in ("0", "false", "no")
    if not use_cuda:
        if "OMP_NUM_THREADS" not in env:  # an explicit setting wins over the quota
            apply_cpu_quota()
        raw = env.get("RATATOUILLE_DATA_THREADS", "1")
        try:
            threads = max(1, int(raw)) if raw else None
        except ValueError:
            threads = 1
        return DeviceContext(device=torch.device("cpu"), data_threads=threads, prefetch=prefetch)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    bf16 = torch.cuda.is_bf16_supported()
    return DeviceContext(
        device=torch.device("cuda"),
        amp_dtype=torch.bfloat16 if bf16 else None,
        channels_last=True,
        pin_memory=True,
        non_blocking=True,
        compile=env.get("RATATOUILLE_COMPILE", "") in ("1", "true", "yes"),
        launch_ahead=prefetch,
    )
