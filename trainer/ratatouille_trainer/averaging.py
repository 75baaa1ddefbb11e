"""Weight averaging of fine-tuned members (docs/algorithm.md, stage 4), streaming.

Members are read one at a time: a member is a ``(name, load)`` pair where ``load()`` returns a
state dict (``dict[str, torch.Tensor]``). Where the weights come from (a local file, a storage
URI) is the loader's business, so storage is only an adapter around these functions.

Memory stays near one model however many members are averaged: a :class:`RunningSum` holds one
float64 accumulator per floating tensor (plus the first member's integer buffers) and never keeps
a reference to the state dicts it is given. Greedy selection keeps the running sum of the kept
members, so every member is loaded exactly once (O(N) loads, not the reference's O(N^2)).

Weights are untrusted input: only safetensors is read, never pickles (:func:`refuse_pickle`).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import os
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

StateDict = dict[str, torch.Tensor]
Loader = Callable[[], Mapping[str, torch.Tensor]]

__all__ = [
    "AveragingError",
    "UnsafeWeightsError",
    "RunningSum",
    "GreedyResult",
    "GreedyStep",
    "uniform_average",
    "greedy_select",
    "interpolate",
    "average_files",
    "load_safetensors_file",
    "load_safetensors_bytes",
    "refuse_pickle",
    "save_state_dict",
    "sha256_file",
]


# The exceptions and the pickle guard live in the torch-free streaming module, so both share them.
from .streamavg import (  # noqa: E402
    PICKLE_SUFFIXES,
    AveragingError,
    UnsafeWeightsError,
    check_same_keys,
    describe_head as _describe_head,
    new_file_mode,
    refuse_pickle,
)


def load_safetensors_file(path: str | os.PathLike) -> StateDict:
    """Load a local safetensors file onto the CPU (after :func:`refuse_pickle`)."""
    from safetensors.torch import load_file

    refuse_pickle(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {os.fspath(path)}")
    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UnsafeWeightsError(f"cannot read {os.fspath(path)} as safetensors: {e}") from e


def load_safetensors_bytes(data: bytes, name: str = "<bytes>") -> StateDict:
    """Load safetensors content already in memory (e.g. ``Storage.read_bytes``)."""
    from safetensors.torch import load

    refuse_pickle(name, head=bytes(data[:16]) if len(data) >= 16 else bytes(data))
    if len(data) >= 8:
        (n,) = struct.unpack("<Q", bytes(data[:8]))
        if 8 + n > len(data):
            raise UnsafeWeightsError(f"refusing {name}: not a safetensors file (truncated)")
    try:
        return load(bytes(data))
    except Exception as e:
        raise UnsafeWeightsError(f"cannot read {name} as safetensors: {e}") from e


# --------------------------------------------------------------------------------------------
# Running sum
# --------------------------------------------------------------------------------------------

def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_averaged(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


# numpy's mixed-dtype add and pairwise sum are several times faster on the CPU than torch's
# (measured: float32 into float64, 94 MB: ~35 ms vs 100-190 ms; torch.isfinite().all() ~180 ms).
_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)
_PIECE = 1 << 18


def _numpy_view(t: torch.Tensor):
    if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS and t.is_contiguous() \
            and not t.requires_grad:
        return t.reshape(-1).numpy()
    return None


def _all_finite(t: torch.Tensor) -> bool:
    """All elements finite: a vectorised float32 sum per cache-sized piece, and the exact
    element test only where that sum is not finite (overflow of large finite values)."""
    import numpy as np

    x = _numpy_view(t.detach())
    if x is None:
        return bool(torch.isfinite(t).all())
    for i in range(0, x.size, _PIECE):
        piece = x[i:i + _PIECE]
        with np.errstate(over="ignore", invalid="ignore"):
            s = piece.sum(dtype=np.float32) if piece.dtype == np.float16 else piece.sum()
        if not math.isfinite(float(s)) and not bool(np.isfinite(piece).all()):
            return False
    return True


def _mean_tensor(acc: torch.Tensor, extra: torch.Tensor | None, n: float,
                 dtype: torch.dtype, out: torch.Tensor | None = None,
                 check: tuple[str, str] | None = None) -> torch.Tensor:
    """``((acc + extra) / n).to(dtype)`` (``extra`` optional) in cache-sized pieces, without a
    float64 copy of the whole tensor; the same IEEE operations as torch, so the same bits
    (float16 goes through float32 as torch's conversion does). ``out``: a tensor of the
    result's shape and dtype to write into (fresh pages cost more than the arithmetic).
    ``check=(member, key)``: refuse a non-finite ``extra`` (``acc`` is a sum of finite values)
    within the same pass, naming the member and the tensor."""
    import numpy as np

    x = _numpy_view(extra) if extra is not None else None
    if dtype not in _NUMPY_FLOATS or not acc.is_contiguous() or (extra is not None and x is None):
        if check is not None and extra is not None and extra.numel() and not _all_finite(extra):
            raise AveragingError(f"member {check[0]!r}: tensor {check[1]!r} contains NaN or Inf")
        s = acc.clone() if extra is None else acc + extra.to(device="cpu", dtype=torch.float64)
        s.div_(n)
        if out is not None:
            out.copy_(s.to(dtype))
            return out
        return s.to(dtype)
    a = acc.reshape(-1).numpy()
    if out is None or out.dtype != dtype or out.shape != acc.shape or not out.is_contiguous():
        out = torch.empty(acc.shape, dtype=dtype)
    o = out.reshape(-1).numpy()
    scratch = np.empty(min(_PIECE, a.size), dtype=np.float64)
    for i in range(0, a.size, _PIECE):
        k = min(_PIECE, a.size - i)
        buf = scratch[:k]
        if x is not None:
            np.add(a[i:i + k], x[i:i + k], out=buf)
            if check is not None:
                # a finite sum plus a finite piece sums finite (or overflows): the exact test
                # only when the piece's sum is not finite
                with np.errstate(over="ignore", invalid="ignore"):
                    total = buf.sum()
                if not math.isfinite(float(total)) and not bool(np.isfinite(x[i:i + k]).all()):
                    raise AveragingError(f"member {check[0]!r}: tensor {check[1]!r} contains NaN or Inf")
            src = buf
        else:
            src = a[i:i + k]
        np.divide(src, n, out=buf)
        if dtype == torch.float16:
            o[i:i + k] = buf.astype(np.float32)
        else:
            o[i:i + k] = buf
    return out


def _add_into(acc: torch.Tensor, t: torch.Tensor) -> None:
    """``acc += t`` with ``acc`` a float64 CPU tensor, without a float64 copy of ``t``."""
    import numpy as np

    x = _numpy_view(t)
    if x is None or not acc.is_contiguous():
        acc.add_(t.to(device="cpu", dtype=torch.float64))
        return
    a = acc.reshape(-1).numpy()
    np.add(a, x, out=a)


class RunningSum:
    """Sum of members' state dicts, float tensors accumulated in float64.

    The first member fixes the keys, shapes and dtypes; every later member must match them
    exactly. Floating tensors (parameters and float buffers such as BatchNorm running stats)
    are summed; integer and bool buffers (e.g. ``num_batches_tracked``) are kept from the first
    member. Non-finite values are refused. ``add`` validates the whole member before changing
    anything, so a refused member leaves the sum as it was, and keeps no reference to it.
    """

    def __init__(self) -> None:
        self._spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._data: dict[str, torch.Tensor] = {}
        self._names: list[str] = []

    @property
    def count(self) -> int:
        return len(self._names)

    @property
    def names(self) -> list[str]:
        """Members added so far, in order."""
        return list(self._names)

    def __len__(self) -> int:
        return self.count

    def copy(self) -> "RunningSum":
        other = RunningSum()
        other._spec = dict(self._spec)
        other._data = {k: v.clone() for k, v in self._data.items()}
        other._names = list(self._names)
        return other

    # -- validation ---------------------------------------------------------------------------

    def validate(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`AveragingError` if ``state`` cannot join this sum."""
        self._validate_structure(name, state)
        for key, t in state.items():
            if _is_averaged(t.dtype) and t.numel() and not _all_finite(t):
                raise AveragingError(f"member {name!r}: tensor {key!r} contains NaN or Inf")

    def _validate_structure(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """``validate`` without the finiteness test (names, types, shapes, dtypes)."""
        if not isinstance(state, Mapping):
            raise AveragingError(f"member {name!r}: loader returned {type(state).__name__}, "
                                 "expected a state dict")
        if not state:
            raise AveragingError(f"member {name!r}: state dict is empty")
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise AveragingError(f"member {name!r}: tensor {key!r} is a "
                                     f"{type(t).__name__}, not a tensor")
            if t.is_complex():
                raise AveragingError(f"member {name!r}: tensor {key!r} has complex dtype "
                                     f"{t.dtype}, which is not supported")
        if self._spec:
            check_same_keys(name, state, self._names[0], self._spec)
            for key, (shape, dtype) in self._spec.items():
                t = state[key]
                if _shape(t) != shape:
                    raise AveragingError(f"member {name!r}: tensor {key!r} has shape "
                                         f"{_fmt_shape(_shape(t))}, expected {_fmt_shape(shape)}")
                if t.dtype != dtype:
                    raise AveragingError(f"member {name!r}: tensor {key!r} has dtype "
                                         f"{t.dtype}, expected {dtype}")

    # -- accumulation -------------------------------------------------------------------------

    @torch.no_grad()
    def add(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Validate ``state`` and add it to the sum (keeps no reference to it)."""
        self.validate(name, state)
        self._accumulate(name, state)

    @torch.no_grad()
    def _accumulate(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """``add`` for a state already validated against this sum (greedy: by ``mean_with``)."""
        if not self._spec:
            for key, t in state.items():
                t = t.detach()
                self._spec[key] = (_shape(t), t.dtype)
                if _is_averaged(t.dtype):
                    self._data[key] = t.to(device="cpu", dtype=torch.float64, copy=True)
                else:
                    self._data[key] = t.to(device="cpu", copy=True)
        else:
            for key in self._spec:
                acc = self._data[key]
                if _is_averaged(acc.dtype):
                    _add_into(acc, state[key].detach())
        self._names.append(name)

    def _require(self) -> None:
        if not self._names:
            raise AveragingError("no members to average")

    @torch.no_grad()
    def mean(self) -> StateDict:
        """The average so far, each tensor in its original dtype (fresh tensors)."""
        self._require()
        out: StateDict = {}
        n = float(self.count)
        for key, (_shape_, dtype) in self._spec.items():
            acc = self._data[key]
            if _is_averaged(dtype):
                out[key] = _mean_tensor(acc, None, n, dtype)
            else:
                out[key] = acc.clone()
        return out

    @torch.no_grad()
    def mean_with(self, name: str, state: Mapping[str, torch.Tensor],
                  out: StateDict | None = None) -> StateDict:
        """``(sum + state) / (count + 1)`` without changing the sum (the greedy candidate).

        The result is bit-identical to ``add(name, state)`` followed by ``mean()``. ``out``: a
        previous result of this sum to overwrite (its tensors are reused) instead of allocating.
        """
        self._require()
        self._validate_structure(name, state)  # finiteness: checked during the pass below
        result: StateDict = {}
        n = float(self.count + 1)
        for key, (_shape_, dtype) in self._spec.items():
            acc = self._data[key]
            if _is_averaged(dtype):
                result[key] = _mean_tensor(acc, state[key].detach(), n, dtype,
                                           out.get(key) if out is not None else None,
                                           check=(name, key))
            else:
                result[key] = acc.clone()
        return result


# --------------------------------------------------------------------------------------------
# Uniform and greedy averaging
# --------------------------------------------------------------------------------------------

def uniform_average(members: Iterable[tuple[str, Loader]]) -> tuple[StateDict, int]:
    """Arithmetic mean of all members, each loaded once, one at a time."""
    rs = RunningSum()
    for name, load in members:
        state = load()
        rs.add(name, state)
        del state  # drop it before the next load: at most one member alive at a time
    if rs.count == 0:
        raise AveragingError("no members to average")
    return rs.mean(), rs.count


class GreedyStep(NamedTuple):
    name: str
    candidate_acc: float
    kept: bool


@dataclass
class GreedyResult:
    selected: list[str]
    state_dict: StateDict
    val_accuracy: float
    trace: list[GreedyStep] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.selected)


def _sort_key(item: tuple[int, tuple]) -> tuple:
    _, (name, _load, acc) = item
    try:
        acc = float(acc)
    except (TypeError, ValueError):
        acc = math.nan
    return (0 if not math.isnan(acc) else 1, -acc if not math.isnan(acc) else 0.0, str(name))


def _checked_acc(acc: float, name: str) -> float:
    try:
        value = float(acc)
    except (TypeError, ValueError):
        raise AveragingError(f"member {name!r}: evaluate returned {acc!r}, not a number") from None
    if not math.isfinite(value):
        raise AveragingError(f"member {name!r}: evaluate returned {value} for the candidate soup")
    return value


def _unshared(state: StateDict) -> bool:
    """Whether only ``state`` (and the caller's own names) refer to these tensors and their
    storage, so they may be overwritten: nothing kept the dict, a tensor, or a view of one."""
    import sys

    if sys.getrefcount(state) > 3:  # the caller's name, this argument, getrefcount's own
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    for t in state.values():
        if sys.getrefcount(t) > 3:  # the dict, the loop name, getrefcount's own
            return False
        # 2: the tensor and the temporary storage object made to ask
        if use_count is not None and use_count(t.untyped_storage()._cdata) > 2:
            return False
    return True


def greedy_select(ranked: Sequence[tuple[str, Loader, float]],
                  evaluate: Callable[[StateDict], float]) -> GreedyResult:
    """Greedy soup (docs/algorithm.md, stage 4).

    Members are sorted by their own validation accuracy, descending (stable; ties by name;
    missing/NaN accuracies last). The first is always kept; each next member is kept if the
    average with it scores ``>=`` the best so far on ``evaluate`` (the pooled training-domain
    validation accuracy). Each member is loaded exactly once: the candidate is
    ``(sum + member) / (k + 1)`` from a running sum of the kept members; a kept candidate is the
    soup (bit-identical to the sum's mean), so the result is not recomputed. Candidates are
    written into a rejected candidate's (or the previous soup's) tensors when ``evaluate`` kept no
    reference to them (the dict, a tensor or a view), so a step allocates nothing.
    """
    order = [m for _, m in sorted(enumerate(ranked), key=_sort_key)]
    if not order:
        raise AveragingError("no members to average")
    rs = RunningSum()
    trace: list[GreedyStep] = []
    best = -math.inf
    scratch: StateDict | None = None
    soup: StateDict | None = None  # the kept candidate: the mean of the selection, bit for bit
    for i, (name, load, _own_acc) in enumerate(order):
        state = load()
        if i == 0:
            rs.add(name, state)
            del state
            soup = rs.mean()
            best = _checked_acc(evaluate(soup), name)
            trace.append(GreedyStep(name, best, True))
            continue
        candidate = rs.mean_with(name, state, out=scratch)
        scratch = None  # its tensors now belong to candidate
        acc = _checked_acc(evaluate(candidate), name)
        kept = acc >= best
        if kept:
            rs._accumulate(name, state)  # mean_with validated it against this very sum
            best = acc
            # the candidate is the new soup (== rs.mean(), not recomputed at the end); the old
            # soup's tensors serve the next candidate unless evaluate kept a reference to them
            candidate, soup = soup, candidate
        # the next candidate reuses these tensors unless evaluate kept a reference to them
        scratch = candidate if _unshared(candidate) else None
        del candidate
        del state
        trace.append(GreedyStep(name, acc, kept))
    return GreedyResult(selected=rs.names, state_dict=soup, val_accuracy=best, trace=trace)


@torch.no_grad()
def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float,
                names: tuple[str, str] = ("a", "b")) -> StateDict:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (in float64, cast back to a's
    dtype); integer/bool buffers are taken from ``a``. ``alpha`` 0 gives ``a``, 1 gives ``b``."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise AveragingError(f"interpolation alpha must be finite, got {alpha}")
    check = RunningSum()
    check.add(names[0], a)  # cheap way to fix the spec; validates a too
    check.validate(names[1], b)
    del check
    out: StateDict = {}
    for key, ta in a.items():
        ta = ta.detach()
        if _is_averaged(ta.dtype):
            x = ta.to(device="cpu", dtype=torch.float64) * (1.0 - alpha)
            x.add_(b[key].detach().to(device="cpu", dtype=torch.float64), alpha=alpha)
            out[key] = x.to(ta.dtype)
        else:
            out[key] = ta.to(device="cpu", copy=True)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _independent_tensors(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous CPU tensors, none sharing storage with another (what safetensors requires)."""
    seen: set[int] = set()
    out: StateDict = {}
    for key, t in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict key {key!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        shared = ptr is not None and ptr in seen
        partial = t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if shared or partial or not t.is_contiguous():
            t = t.contiguous().clone()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _canonical_header(path: str) -> None:
    """Rewrite a safetensors header as sorted, compact JSON so that equal tensors and metadata
    give equal bytes (and sha256) in every process: the library writes its metadata map in a
    per-process hash order. Offsets are relative to the data section, so only the header moves;
    when the canonical header has the same padded length it is overwritten in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
        if len(text) == n:
            f.seek(8)
            f.write(text)
            return
    moved = path + ".hdr"
    with open(path, "rb") as src, open(moved, "wb") as dst:
        src.seek(8 + n)
        dst.write(struct.pack("<Q", len(text)))
        dst.write(text)
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(moved, path)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` as safetensors atomically: a temporary file in the same folder, renamed
    over ``path`` only once complete, so a failure never leaves a half-written file."""
    from safetensors.torch import save_file

    meta = None
    if metadata:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
            meta[k] = v
    tensors = _independent_tensors(state)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        _canonical_header(tmp)
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), new_file_mode())  # mkstemp made it 0600: honour the umask
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def average_files(out_path: str | os.PathLike, in_paths: Sequence[str | os.PathLike],
                  metadata: Mapping[str, str] | None = None) -> dict:
    """Uniformly average local safetensors files into ``out_path`` (``ratatouille average``).

    Every input is checked for pickle content before anything is loaded; mismatched keys,
    shapes, dtypes or non-finite values raise :class:`AveragingError` naming the file and
    tensor. ``out_path`` is written atomically and only after all inputs were averaged, so on
    any error no (new or half-written) output is left. Returns a summary dict.

    Streams each file through :class:`~ratatouille_trainer.streamavg.StreamingAverage`
    (constant memory, one pass per file); the result is bit-identical to :class:`RunningSum`.
    """
    from .streamavg import average_paths

    paths = [os.fspath(p) for p in in_paths]
    sa, digest = average_paths(out_path, paths, metadata)
    return {
        "path": os.fspath(out_path),
        "count": sa.count,
        "members": paths,
        "sha256": digest,
        "tensors": len(sa.mean_keys()),
        "parameters": sa.parameters,
    }


def average_uris(out_uri: str, in_uris: Sequence[str], *, endpoint: str | None = None) -> dict:
    """`ratatouille average OUT IN IN...` for paths or URIs (file://, s3://).

    Members are streamed one at a time (S3 objects by a prefetch thread that downloads the next
    member while the current one is added, no scratch files), so memory stays near one float64
    accumulator whatever the count. The output is written locally first and uploaded only when
    complete. See :func:`ratatouille_trainer.streamavg.average_uris` (which needs no torch).
    """
    from .streamavg import average_uris as _stream_average_uris

    summary = _stream_average_uris(out_uri, in_uris, endpoint=endpoint)
    return {k: summary[k] for k in ("path", "count", "members", "sha256", "tensors", "parameters")}
