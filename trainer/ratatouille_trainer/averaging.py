"""Weight averaging of fine-tuned members (docs/algorithm.md, stage 4): the one engine.

The uniform mean is, per element, a float64 sum in member order, one division, and the cast
back to the tensor's dtype the way torch casts (float64 -> float32 -> float16/bfloat16, round to
nearest even). Two kernels compute it, :func:`_add_piece` (check a piece of a member finite and
add it) and :func:`_mean_into` (divide and cast a piece of the sum), and they have two drivers:

- :class:`RunningSum`, member after member with the whole model's sum in memory: the run's
  averaging stage (uniform, and greedy selection through :meth:`RunningSum.mean_with`), which
  needs each average as a state dict to evaluate it;
- :class:`StreamingAverage`, block after block of the parameters, each member's bytes for the
  block read straight from its safetensors file or S3 object (``Storage.open_read``): ``ratatouille
  average`` (:func:`average_files`, :func:`average_uris`), whose memory is one block whatever the
  model size.

Either way each member is read once, memory does not grow with the member count, every error
names the member and the tensor, and only safetensors is ever read (weights.py). This module
imports numpy only; torch is imported by the functions that take or give torch tensors, so
``ratatouille average`` never loads it (~650 MB).
"""
from __future__ import annotations

import math
import os
import queue
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .weights import (DTYPES, TORCH_NAMES, AveragingError, Reader, TensorEntry,
                      UnsafeWeightsError, check_output_path, check_same_keys, fmt_shape,
                      read_header, refuse_pickle, write_streamed)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    StateDict = dict[str, torch.Tensor]
Loader = Callable[[], Mapping[str, "torch.Tensor"]]

__all__ = [
    "AveragingError",
    "UnsafeWeightsError",
    "RunningSum",
    "StreamingAverage",
    "GreedyResult",
    "GreedyStep",
    "uniform_average",
    "greedy_select",
    "interpolate",
    "average_files",
    "average_uris",
]

PIECE = 1 << 20                  # bytes of a member read, checked and added at a time
ELEMS = 1 << 18                  # elements per kernel call in memory (a 2 MiB float64 scratch)
BLOCK_ELEMS = 4 << 20            # floating elements per block: a 32 MiB float64 accumulator
PREFETCH_BYTES = 16 << 20        # S3: at most this much downloaded ahead of the arithmetic
MAX_STREAMS = 64                 # S3: members read through an open GET at once (the others re-open)

# --------------------------------------------------------------------------------------------
# The kernels: the mean, once
# --------------------------------------------------------------------------------------------

_STORED = {tag: np_dtype for tag, (_size, np_dtype, averaged) in DTYPES.items() if averaged}


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, as ``torch`` (c10::BFloat16) converts float32 to bfloat16."""
    bits = x.view(np.uint32)
    out = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _refuse_nonfinite(x: np.ndarray, tag: str, name: str, key: str) -> None:
    """One vectorised sum (in cache); the exact element test only when that sum is not finite
    (which large finite values can also cause, by overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = x.sum(dtype=np.float32) if tag == "F16" else x.sum()
    if not math.isfinite(float(s)) and not bool(np.isfinite(x).all()):
        raise AveragingError(f"member {name!r}: tensor {key!r} contains NaN or Inf")


def _add_piece(dst: np.ndarray, x: np.ndarray, tag: str, first: bool,
               who: tuple[str, str] | None, base: np.ndarray | None = None) -> None:
    """Add a piece of a member's tensor (its stored values: bfloat16 as uint16 bits) into its
    float64 sum ``dst`` (or ``dst = base + x``), refusing NaN/Inf when ``who = (member,
    tensor)`` is given. The first member's values start the sum (no zeroing pass; a -0.0 keeps
    its sign)."""
    if tag == "BF16":
        x = _bf16_to_f32(x)
    if who is not None:
        _refuse_nonfinite(x, tag, *who)
    if base is not None:
        np.add(base, x, out=dst)
    elif first:
        np.copyto(dst, x)
    else:
        np.add(dst, x, out=dst)


def _mean_into(acc: np.ndarray, n: float, tag: str, out: np.ndarray,
               extra: np.ndarray | None = None, who: tuple[str, str] | None = None) -> None:
    """``out = ((acc + extra) / n)`` cast to ``tag`` (``extra``, a member's stored values, is
    optional and checked finite when ``who`` is given), a cache-sized piece at a time: the same
    IEEE operations as torch's, so the same bits, and no float64 copy of the whole tensor."""
    scratch = np.empty(min(ELEMS, acc.size), dtype=np.float64)
    for i in range(0, acc.size, ELEMS):
        k = min(ELEMS, acc.size - i)
        buf = scratch[:k]
        if extra is not None:
            _add_piece(buf, extra[i:i + k], tag, False, who, base=acc[i:i + k])
            np.divide(buf, n, out=buf)
        else:
            np.divide(acc[i:i + k], n, out=buf)
        if tag == "BF16":
            out[i:i + k] = _f32_to_bf16(buf.astype(np.float32))
        elif tag == "F16":
            out[i:i + k] = buf.astype(np.float32)  # float64 -> float32 -> float16, as torch
        else:
            out[i:i + k] = buf


def _check_like(name: str, got: Mapping[str, tuple[tuple[int, ...], str]], first: str,
                expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Refuse member ``name`` whose tensors (key -> shape, dtype) differ from the first
    member's: names, then shapes and dtypes, naming the tensor."""
    check_same_keys(name, got, first, expected)
    for key, (shape, dtype) in expected.items():
        if got[key][0] != shape:
            raise AveragingError(f"member {name!r}: tensor {key!r} has shape "
                                 f"{fmt_shape(got[key][0])}, expected {fmt_shape(shape)}")
        if got[key][1] != dtype:
            raise AveragingError(f"member {name!r}: tensor {key!r} has dtype {got[key][1]}, "
                                 f"expected {dtype}")


# --------------------------------------------------------------------------------------------
# RunningSum: member after member, in memory (torch state dicts)
# --------------------------------------------------------------------------------------------

def _tags() -> dict:
    import torch

    return {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
            torch.bfloat16: "BF16"}


def _stored(t: "torch.Tensor", tag: str) -> np.ndarray:
    """The tensor's values as a flat numpy array (bfloat16: its uint16 bits), a view of the
    tensor itself when it is a contiguous CPU tensor (so writes go into it)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu").contiguous()
    if tag == "BF16":
        return t.view(torch.int16).reshape(-1).numpy().view(np.uint16)
    return t.reshape(-1).numpy()


class RunningSum:
    """Sum of members' state dicts, floating tensors accumulated in float64.

    The first member fixes the keys, shapes and dtypes; every later member must match them
    exactly. Floating tensors (parameters and float buffers such as BatchNorm running stats)
    are summed; integer and bool buffers (e.g. ``num_batches_tracked``) are kept from the first
    member. Non-finite values are refused. ``add`` validates the whole member before changing
    anything, so a refused member leaves the sum as it was, and keeps no reference to it.
    """

    def __init__(self) -> None:
        self._spec: dict[str, tuple[tuple[int, ...], Any, str | None]] = {}  # shape, dtype, tag
        self._sums: dict[str, np.ndarray] = {}      # flat float64, per floating tensor
        self._kept: dict[str, Any] = {}             # the first member's other tensors
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

    # -- validation ---------------------------------------------------------------------------

    def validate(self, name: str, state: Mapping[str, "torch.Tensor"]) -> None:
        """Raise :class:`AveragingError` if ``state`` cannot join this sum."""
        tags = self._validate_structure(name, state)
        for key, tag in tags.items():
            x = _stored(state[key], tag)
            for i in range(0, x.size, ELEMS):
                piece = x[i:i + ELEMS]
                _refuse_nonfinite(_bf16_to_f32(piece) if tag == "BF16" else piece, tag, name, key)

    def _validate_structure(self, name: str, state: Mapping[str, "torch.Tensor"]) -> dict[str, str]:
        """``validate`` without the finiteness test (names, types, shapes, dtypes); returns the
        floating tensors' dtype tags."""
        import torch

        if not isinstance(state, Mapping):
            raise AveragingError(f"member {name!r}: loader returned {type(state).__name__}, "
                                 "expected a state dict")
        if not state:
            raise AveragingError(f"member {name!r}: state dict is empty")
        tags, floats = {}, _tags()
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise AveragingError(f"member {name!r}: tensor {key!r} is a "
                                     f"{type(t).__name__}, not a tensor")
            if t.is_complex() or (t.is_floating_point() and t.dtype not in floats):
                raise AveragingError(f"member {name!r}: tensor {key!r} has dtype {t.dtype}, "
                                     "which is not supported for averaging")
            if t.is_floating_point():
                tags[key] = floats[t.dtype]
        if self._spec:
            _check_like(name, {k: (tuple(t.shape), str(t.dtype)) for k, t in state.items()},
                        self._names[0], {k: (s, str(d)) for k, (s, d, _) in self._spec.items()})
        return tags

    # -- accumulation -------------------------------------------------------------------------

    def add(self, name: str, state: Mapping[str, "torch.Tensor"]) -> None:
        """Validate ``state`` and add it to the sum (keeps no reference to it)."""
        self.validate(name, state)
        self._accumulate(name, state)

    def _accumulate(self, name: str, state: Mapping[str, "torch.Tensor"]) -> None:
        """``add`` for a state already validated against this sum (greedy: by ``mean_with``)."""
        first = not self._spec
        if first:
            floats = _tags()
            for key, t in state.items():
                tag = floats.get(t.dtype)
                self._spec[key] = (tuple(t.shape), t.dtype, tag)
                if tag is None:
                    self._kept[key] = t.detach().to("cpu", copy=True)
                else:
                    self._sums[key] = np.empty(t.numel(), dtype=np.float64)
        for key, acc in self._sums.items():
            x = _stored(state[key], self._spec[key][2])
            for i in range(0, x.size, ELEMS):
                _add_piece(acc[i:i + ELEMS], x[i:i + ELEMS], self._spec[key][2], first, None)
        self._names.append(name)

    def _require(self) -> None:
        if not self._names:
            raise AveragingError("no members to average")

    def _means(self, n: float, out: Mapping[str, "torch.Tensor"] | None,
               extra: tuple[str, Mapping[str, "torch.Tensor"]] | None) -> StateDict:
        import torch

        result: StateDict = {}
        for key, (shape, dtype, tag) in self._spec.items():
            if tag is None:
                result[key] = self._kept[key].clone()
                continue
            t = out.get(key) if out is not None else None
            if t is None or t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() \
                    or t.device.type != "cpu":
                t = torch.empty(shape, dtype=dtype)
            x = _stored(extra[1][key], tag) if extra is not None else None
            _mean_into(self._sums[key], n, tag, _stored(t, tag), x,
                       (extra[0], key) if extra is not None else None)
            result[key] = t
        return result

    def mean(self) -> StateDict:
        """The average so far, each tensor in its original dtype (fresh tensors)."""
        self._require()
        return self._means(float(self.count), None, None)

    def mean_with(self, name: str, state: Mapping[str, "torch.Tensor"],
                  out: StateDict | None = None) -> StateDict:
        """``(sum + state) / (count + 1)`` without changing the sum (the greedy candidate).

        The result is bit-identical to ``add(name, state)`` followed by ``mean()``. ``out``: a
        previous result of this sum to overwrite (its tensors are reused) instead of allocating.
        """
        self._require()
        self._validate_structure(name, state)  # finiteness: checked during the pass below
        return self._means(float(self.count + 1), out, (name, state))


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

    import torch

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


def interpolate(a: Mapping[str, "torch.Tensor"], b: Mapping[str, "torch.Tensor"], alpha: float,
                names: tuple[str, str] = ("a", "b")) -> StateDict:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (in float64, cast back to a's
    dtype); integer/bool buffers are taken from ``a``. ``alpha`` 0 gives ``a``, 1 gives ``b``."""
    import torch

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
        if ta.is_floating_point():
            x = ta.to(device="cpu", dtype=torch.float64) * (1.0 - alpha)
            x.add_(b[key].detach().to(device="cpu", dtype=torch.float64), alpha=alpha)
            out[key] = x.to(ta.dtype)
        else:
            out[key] = ta.to(device="cpu", copy=True)
    return out


# --------------------------------------------------------------------------------------------
# StreamingAverage: block after block, from safetensors files and S3 objects
# --------------------------------------------------------------------------------------------

@dataclass
class _Member:
    """One member as its header describes it, and where its bytes come from."""
    name: str                       # as given (messages name it)
    tensors: dict[str, TensorEntry]
    data_start: int                 # file offset of the data section (8 + header length)
    size: int
    meta: dict[str, str]
    path: str | None = None         # a local file, or
    uri: str | None = None          # an S3 object, with its ETag and the GET its header was
    etag: str | None = None         # read from (left open for the weights, taken by the
    stream: Any = None              # prefetcher)
    file: Any = None                # local: the file, opened once; every block reads this
    identity: tuple | None = None   # snapshot, checked unchanged (inode, size, mtime) at the end

    def check_unchanged(self) -> None:
        """A local member rewritten in place while it was read would mix two versions block by
        block: refuse it (a member replaced by rename is still read whole from the old file)."""
        if self.file is not None and _identity(os.fstat(self.file.fileno())) != self.identity:
            raise AveragingError(f"member {self.name!r} changed while it was being averaged; "
                                 "nothing was written")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass(frozen=True)
class _Item:
    """Elements [lo, hi) of tensor ``key`` within one block. Floating pieces are summed into the
    block's accumulator from element ``acc``; other dtypes (``acc == -1``) are copied from the
    first member."""
    key: str
    dtype: str
    lo: int
    hi: int
    acc: int


def _block_sizes(total: int, block_elems: int) -> list[int]:
    """Block sizes (floating elements) for ``total``: at most ``block_elems`` each, and a last
    block of at most an eighth of that, so little is left to do once the last byte is in."""
    if total <= block_elems:
        return [total]
    last = max(1, block_elems // 8)
    rest = total - last
    sizes = [block_elems] * (rest // block_elems)
    if rest % block_elems:
        sizes.append(rest % block_elems)
    return sizes + [last]


def _plan_blocks(order: Sequence[TensorEntry], block_elems: int) -> list[list[_Item]]:
    """Cut the first member's tensors, in file order, into blocks (:func:`_block_sizes`) of
    floating elements (a tensor may span blocks; integer tensors ride along whole)."""
    total = sum(t.numel for t in order if DTYPES[t.dtype][2])
    sizes = _block_sizes(total, block_elems)
    blocks: list[list[_Item]] = [[]]
    used = 0
    for t in order:
        if not DTYPES[t.dtype][2]:
            blocks[-1].append(_Item(t.key, t.dtype, 0, t.numel, -1))
            continue
        if t.numel == 0:
            blocks[-1].append(_Item(t.key, t.dtype, 0, 0, used))
            continue
        lo = 0
        while lo < t.numel:
            if used == sizes[len(blocks) - 1]:
                blocks.append([])
                used = 0
            hi = min(t.numel, lo + sizes[len(blocks) - 1] - used)
            blocks[-1].append(_Item(t.key, t.dtype, lo, hi, used))
            used += hi - lo
            lo = hi
    return blocks


def _layout(m: _Member) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (t.shape, TORCH_NAMES[t.dtype]) for k, t in m.tensors.items()}


class StreamingAverage:
    """Uniform average of safetensors members, one block of the parameters at a time.

    The parameters (the first member's tensors in file order) are cut into blocks of at most
    ``block_elems`` floating elements. For each block, every member's bytes for it are read
    (``opener(member_index, start, end)`` gives a ``readinto`` stream of exactly those file
    bytes), checked finite and added into a float64 accumulator the size of one block; then the
    block's mean is cast back to each tensor's dtype and emitted. Memory is one block's
    accumulator plus a piece buffer, whatever the model size or the member count; each member
    byte is read once; the result is bit-identical to one float64 sum per element in member
    order (the same additions, one division, the same casts).

    A member whose names, shapes or dtypes differ from the first member's is refused: local
    members before any weight is read, S3 members (given as futures of their headers) when their
    turn comes. ``gap``: member bytes between two wanted segments that are read and dropped
    rather than opening a new read (the same value orders the reads and the S3 prefetch).
    """

    def __init__(self, members: Sequence[Any], opener: Callable[[int, int, int], Any], *,
                 piece_bytes: int = PIECE, block_elems: int = BLOCK_ELEMS,
                 names: Sequence[str] | None = None, gap: int = 0) -> None:
        if not members:
            raise AveragingError("no members to average")
        # a member is a _Member, or a future of one (S3: its header is still on its way; it is
        # waited for, and checked against the first member, when its turn comes)
        self._given = list(members)
        self._members: list[_Member | None] = [None] * len(members)
        self._lock = threading.Lock()
        first = self.member(0)
        if not first.tensors:
            raise AveragingError(f"member {first.name!r}: state dict is empty")
        for mi, m in enumerate(members):
            if isinstance(m, _Member):
                self.member(mi)
        self.names = list(names) if names is not None else [m.name for m in members]
        self._order = sorted(first.tensors.values(), key=lambda t: (t.start, t.end))
        self.opener = opener
        self.gap = gap
        self.piece = max(8, piece_bytes // 8 * 8)
        self.block_elems = max(1, int(block_elems))
        self.blocks = _plan_blocks(self._order, self.block_elems)
        width = max(sum(it.hi - it.lo for it in b if it.acc >= 0) for b in self.blocks)
        self._acc = np.zeros(width, dtype=np.float64)
        self._buf = bytearray(self.piece)
        self._arrays: dict[str, np.ndarray] | None = None
        self.bytes_read = 0
        self._ran = False

    def member(self, mi: int) -> _Member:
        """Member ``mi`` (waiting for its header if needed), checked against the first."""
        m = self._members[mi]
        if m is not None:
            return m
        given = self._given[mi]
        m = given if isinstance(given, _Member) else given.result()
        with self._lock:
            if self._members[mi] is None:
                if mi:
                    first = self.member(0)
                    _check_like(m.name, _layout(m), first.name, _layout(first))
                self._members[mi] = m
        return m

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def parameters(self) -> int:
        return int(sum(t.numel for t in self._order))

    @property
    def accumulator_bytes(self) -> int:
        return int(self._acc.nbytes)

    # -- what is read, in order -----------------------------------------------------------------
    def ranges(self, b: int, mi: int) -> list[tuple[int, int, list]]:
        """[(start, end, [(seg_start, nbytes, item)])]: member ``mi``'s file ranges for block
        ``b`` in file order; segments closer than ``self.gap`` bytes share a range (the bytes
        between them are read and dropped). Integer tensors are read from the first member only."""
        member = self.member(mi)
        segs = []
        for it in self.blocks[b]:
            if it.acc < 0 and mi:
                continue
            t = member.tensors[it.key]
            item = DTYPES[it.dtype][0]
            n = (it.hi - it.lo) * item
            if n:
                segs.append((member.data_start + t.start + it.lo * item, n, it))
        segs.sort(key=lambda s: s[0])
        out: list[list] = []
        for s in segs:
            if out and s[0] - out[-1][1] <= self.gap:
                out[-1][1] = s[0] + s[1]
                out[-1][2].append(s)
            else:
                out.append([s[0], s[0] + s[1], [s]])
        return [(a, e, segs) for a, e, segs in out]

    def schedule(self) -> Iterator[tuple[int, int, int]]:
        """(member index, start, end) of every read, in the order :meth:`run` makes them."""
        for b in range(len(self.blocks)):
            for mi in range(self.count):
                for start, end, _ in self.ranges(b, mi):
                    yield mi, start, end

    # -- the pass -------------------------------------------------------------------------------
    def _add(self, rd: Reader, name: str, it: _Item, acc: np.ndarray, first: bool) -> None:
        """Read item ``it``'s elements and add them into ``acc``, a piece at a time (the
        prefetched bytes themselves when the reader can lend them, else through one buffer)."""
        item, npdt, _ = DTYPES[it.dtype]
        per = self.piece // item
        total = it.hi - it.lo
        done = 0
        readview = getattr(rd.raw, "readview", None)
        while done < total:
            k = min(per, total - done)
            view = readview(k * item, item) if readview is not None else None
            if view is not None:
                k = len(view) // item
                rd.pos += len(view)
                x = np.frombuffer(view, dtype=npdt, count=k)
            else:
                rd.read_into(memoryview(self._buf)[:k * item])
                x = np.frombuffer(self._buf, dtype=npdt, count=k)
            _add_piece(acc[it.acc + done: it.acc + done + k], x, it.dtype, first, (name, it.key))
            done += k

    def run(self, emit: Callable[[_Item, int, np.ndarray], None]) -> None:
        """One pass over every block; ``emit(item, element_offset, values)`` receives the mean
        in output order (integer tensors: their raw bytes as uint8, offset 0); ``values`` is
        reused by the next call."""
        if self._ran:
            raise RuntimeError("a StreamingAverage runs once")
        self._ran = True
        start = getattr(self.opener, "start", None)
        if start is not None:
            start(self)
        n = float(self.count)
        mv = memoryview(self._buf)
        per_out = max(1, self.piece // 8)
        outs = {tag: np.empty(per_out, dtype=dt) for tag, dt in _STORED.items()}
        for b, block in enumerate(self.blocks):
            width = sum(it.hi - it.lo for it in block if it.acc >= 0)
            acc = self._acc[:width]  # every element is set by the first member
            kept: dict[str, bytes] = {}
            for mi in range(self.count):
                member = self.member(mi)
                for start, end, segs in self.ranges(b, mi):
                    stream = self.opener(mi, start, end, member)
                    try:
                        rd = Reader(stream, member.name)
                        pos = start
                        for seg_start, nbytes, it in segs:
                            left = seg_start - pos
                            while left:
                                k = min(left, self.piece)
                                rd.read_into(mv[:k])
                                left -= k
                            if it.acc < 0:
                                kept[it.key] = rd.read(nbytes)
                            else:
                                self._add(rd, member.name, it, acc, first=mi == 0)
                            pos = seg_start + nbytes
                    except BaseException:
                        # release without draining (a prefetch stream may be what failed)
                        (getattr(stream, "abort", None) or stream.close)()
                        raise
                    stream.close()
                    self.bytes_read += end - start
            for it in block:
                if it.acc < 0:
                    emit(it, 0, np.frombuffer(kept.get(it.key, b""), dtype=np.uint8))
                    continue
                for i in range(0, it.hi - it.lo, per_out):
                    k = min(per_out, it.hi - it.lo - i)
                    out = outs[it.dtype][:k]
                    _mean_into(acc[it.acc + i: it.acc + i + k], n, it.dtype, out)
                    emit(it, it.lo + i, out)
        # before the caller keeps anything (write() renames only after this returns)
        for mi in range(self.count):
            self.member(mi).check_unchanged()

    def close(self) -> None:
        """Close the local members' files (S3 bodies are the opener's)."""
        for m in self._members:
            if m is not None:
                m.close()

    # -- results --------------------------------------------------------------------------------
    def compute(self) -> dict[str, np.ndarray]:
        """Run, keeping the mean in memory: numpy arrays of each tensor's shape (bfloat16 as its
        uint16 bits); integer and bool tensors as their raw bytes (uint8, first member's)."""
        arrays: dict[str, np.ndarray] = {}
        for t in self._order:
            if DTYPES[t.dtype][2]:
                arrays[t.key] = np.empty(t.numel, dtype=_STORED[t.dtype])

        def emit(it: _Item, off: int, values: np.ndarray) -> None:
            if it.acc < 0:
                arrays[it.key] = values.copy()
            else:
                arrays[it.key][off: off + len(values)] = values

        self.run(emit)
        for t in self._order:
            if DTYPES[t.dtype][2]:
                arrays[t.key] = arrays[t.key].reshape(t.shape)
        self._arrays = arrays
        return arrays

    def mean_arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise RuntimeError("the average was not kept in memory (see compute())")
        return self._arrays

    def write(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
        """Run, writing the average as safetensors atomically (temporary file, fsync, rename;
        nothing is left on error); returns its sha256 (hex)."""
        return write_streamed(path, self._order, metadata, lambda out: self.run(
            lambda it, off, values: out(memoryview(np.ascontiguousarray(values)).cast("B"))))


# ------------------------------------------------------------------------------ sources

def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _local_member(name: str, path: str) -> _Member:
    """Open a local member once and read its header; its weights are read later from the same
    open file (one snapshot, whatever happens to the path meanwhile)."""
    f = open(path, "rb", buffering=0)
    st = os.fstat(f.fileno())
    return _read_member(name, f, st.st_size, path=path, file=f, identity=_identity(st))


def _read_member(name: str, raw, size: int, **where: Any) -> _Member:
    """Read a member's header from the front of ``raw`` (closed on error)."""
    try:
        rd = Reader(raw, name)
        tensors, meta, _ = read_header(rd, size)
    except BaseException:
        raw.close()
        raise
    return _Member(name, {t.key: t for t in tensors}, rd.pos, size, meta, **where)


class _FileRange:
    """``readinto`` from an open file at an offset (pread: the file's position is not shared)."""

    def __init__(self, fd: int, pos: int) -> None:
        self.fd = fd
        self.pos = pos

    def readinto(self, mv: memoryview) -> int:
        n = os.preadv(self.fd, [mv], self.pos)
        self.pos += n
        return n

    def close(self) -> None:
        pass


def _s3_member(storage, uri: str) -> _Member:
    """Open one GET of the whole object (``Storage.open_read``) and read its header from the
    front of the body. The body stays open: the weights are read from it later, block by block."""
    stream = storage.open_read(uri)
    return _read_member(uri, stream, stream.size, uri=uri, etag=stream.etag, stream=stream)


class _Opener:
    """Gives the engine its byte ranges: local files by seek and read; S3 objects from one
    :class:`S3Prefetcher` that reads every range, in the engine's order, ahead of the
    arithmetic, from each member's one open GET."""

    def __init__(self, remote: bool = False, storage=None, *,
                 prefetch_bytes: int = PREFETCH_BYTES, max_streams: int = MAX_STREAMS,
                 piece: int = PIECE) -> None:
        self.remote = remote
        self.piece = piece
        self.storage = storage
        self.prefetch_bytes = prefetch_bytes
        self.max_streams = max_streams
        self.pre: S3Prefetcher | None = None
        self._closed = False

    def start(self, engine: "StreamingAverage") -> None:
        if self.remote:
            self.pre = S3Prefetcher(self.storage, engine, max_bytes=self.prefetch_bytes,
                                    piece=self.piece, max_streams=self.max_streams)

    def __call__(self, mi: int, start: int, end: int, member: _Member):
        if member.uri is None:
            return _FileRange(member.file.fileno(), start)
        return self.pre.reader((mi, start, end))

    @property
    def gets(self) -> int:
        return self.pre.gets if self.pre else 0

    @property
    def transferred(self) -> int:
        return self.pre.bytes if self.pre else 0

    def close(self) -> None:
        if self.pre is not None and not self._closed:
            self._closed = True
            self.pre.close()


# ------------------------------------------------------------------------------ S3 prefetch

class _Stop(Exception):
    pass


class S3Prefetcher:
    """Streams byte ranges of S3 members, in the engine's order, into a bounded ring of buffers
    from a background thread.

    ``jobs`` are ``(member index, start, end)``; ``reader(i)`` gives a ``readinto`` stream of
    job ``i``'s bytes, and jobs must be consumed in order. Each member is read through one open
    GET (``streams``: those opened to read the headers): a job that starts where the member's
    stream stands continues it, a small gap is read and dropped, anything else (a member laid
    out in another order, a stream that was closed) costs a ranged GET. The unread rest of each
    body waits in the connection (TCP flow control), not in memory. The thread reads each body
    straight into one of ``max_bytes // piece`` preallocated buffers (recycled once the consumer
    has copied them out), so at most ``max_bytes`` are held ahead of the arithmetic. A ranged
    GET is pinned to the ETag the header was read from (``IfMatch``): an object replaced
    meanwhile fails the average instead of mixing two versions. A transfer that breaks part way
    is resumed from the byte it reached, under the storage's retry policy.
    """

    def __init__(self, storage, engine: "StreamingAverage", *, piece: int = PIECE,
                 max_bytes: int = PREFETCH_BYTES, max_streams: int = MAX_STREAMS) -> None:
        self.storage = storage
        self.engine = engine
        self.max_streams = max(1, max_streams)
        self.streams: dict[int, Any] = {}           # member -> its open ObjectStream
        self.piece = piece
        slots = max(2, max_bytes // piece)
        self.q: queue.Queue = queue.Queue()          # filled buffers (and markers), in order
        self.free: queue.Queue = queue.Queue()       # empty buffers
        for _ in range(slots):
            self.free.put(bytearray(piece))
        self.stop = threading.Event()
        self.gets = 0          # GET requests of the streams read here (counted when closed)
        self.bytes = 0         # bytes received here (dropped gap bytes included)
        self.thread = threading.Thread(target=self._run, name="ratatouille-s3-prefetch", daemon=True)
        self.thread.start()

    def _take_free(self) -> bytearray:
        while True:
            if self.stop.is_set():
                raise _Stop()
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue

    def _fill(self, st, mv: memoryview) -> None:
        """Read exactly len(mv) bytes of the member's stream into mv (a transfer that breaks is
        resumed by the stream itself, under the storage's retry policy)."""
        got = 0
        while got < len(mv):
            n = st.readinto(mv[got:])
            if not n:
                raise ConnectionError(f"{st.uri}: stream ended at byte {st.pos}")
            got += n
        self.bytes += got

    def _close_stream(self, mi: int) -> None:
        st = self.streams.pop(mi, None)
        if st is not None:
            self.gets += st.gets
            st.close()

    def _position(self, mi: int, at: int):
        """The member's stream, standing at byte ``at``: the open one continued (a small gap
        read and dropped), else a ranged GET pinned to the header's ETag. At most
        ``max_streams`` stay open: the least recently used gives way."""
        st = self.streams.pop(mi, None)
        m = self.engine.member(mi)
        if st is None and m.stream is not None:  # the GET its header came from
            st, m.stream = m.stream, None
        if st is not None and not st.pos <= at <= st.pos + self.engine.gap:
            self.gets += st.gets
            st.close()
            st = None
        if st is None:
            st = self.storage.open_read(m.uri, at, etag=m.etag)
        while len(self.streams) >= self.max_streams:
            self._close_stream(next(iter(self.streams)))
        self.streams[mi] = st
        if st.pos < at:
            scratch = self._take_free()
            try:
                while st.pos < at:
                    self._fill(st, memoryview(scratch)[:min(self.piece, at - st.pos)])
            finally:
                self.free.put(scratch)
        return st

    def _stream(self, mi: int, start: int, end: int) -> None:
        st = self._position(mi, start)
        self.q.put(("begin", (mi, start, end), end - start))
        pos = start
        while pos < end:
            buf = self._take_free()
            n = min(self.piece, end - pos)
            try:
                self._fill(st, memoryview(buf)[:n])
            except BaseException:
                self.free.put(buf)
                raise
            self.q.put(("data", buf, n))
            pos += n
        self.q.put(("end", (mi, start, end), end - start))

    def _run(self) -> None:
        try:
            for mi, start, end in self.engine.schedule():
                if self.engine.member(mi).uri is not None:
                    self._stream(mi, start, end)
        except _Stop:
            return
        except BaseException as exc:  # handed to the consumer
            self.q.put(("error", -1, exc))
        finally:
            for mi in list(self.streams):
                self._close_stream(mi)

    def _get(self):
        item = self.q.get()
        if item[0] == "error":
            raise item[2]
        return item

    def reader(self, job: tuple[int, int, int]) -> "_PrefetchReader":
        """The next range's bytes; ``job`` = (member index, start, end) must be the next one."""
        kind, got, total = self._get()
        if kind != "begin" or got != job:  # pragma: no cover - protocol invariant
            raise RuntimeError(f"prefetch stream out of order: {got} instead of {job}")
        return _PrefetchReader(self, job, total)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _PrefetchReader:
    def __init__(self, owner: S3Prefetcher, index: int, size: int) -> None:
        self.owner = owner
        self.index = index
        self.size = size
        self._buf: bytearray | None = None
        self._view = memoryview(b"")
        self._done = False

    def _release(self) -> None:
        if self._buf is not None:
            self.owner.free.put(self._buf)
            self._buf = None

    def _refill(self) -> bool:
        if not len(self._view):
            self._release()
            if self._done:
                return False
            kind, buf, n = self.owner._get()
            if kind == "end":
                self._done = True
                return False
            self._buf = buf
            self._view = memoryview(buf)[:n]
        return True

    def readinto(self, mv: memoryview) -> int:
        if not self._refill():
            return 0
        n = min(len(mv), len(self._view))
        mv[:n] = self._view[:n]
        self._view = self._view[n:]
        return n

    def readview(self, n: int, unit: int = 1) -> memoryview | None:
        """Up to ``n`` bytes, a whole number of ``unit``-byte elements, as a view of the
        prefetched buffer itself (valid until the next read); None when not even one element
        lies in the current buffer (then ``readinto`` copies across buffers)."""
        if not self._refill():
            return None
        take = min(n, len(self._view))
        take -= take % unit
        if not take:
            return None
        out = self._view[:take]
        self._view = self._view[take:]
        return out

    def close(self) -> None:
        """Consume what is left of this range, up to its end marker (to reach the next one)."""
        scratch = memoryview(bytearray(1 << 16))
        while self.readinto(scratch):
            pass
        self._release()

    def abort(self) -> None:
        """Give the buffer back without draining (after an error: the prefetcher may be what
        failed, and it is being stopped)."""
        self._release()


# ------------------------------------------------------------------------------ entry points

def _meta(sa: StreamingAverage, extra: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", "ratatouille.averaged": str(sa.count), "ratatouille.selection": "uniform"}
    meta.update(extra or {})
    return meta


def _local_paths(in_uris: Sequence[str]) -> dict[int, str]:
    """Index -> path of the members that are local files (checked to exist), once every input
    was refused by name if it is a pickle (before anything is fetched)."""
    from .storage import split_uri

    if not in_uris:
        raise AveragingError("no input checkpoints to average")
    for uri in in_uris:
        refuse_pickle(uri)
    paths: dict[int, str] = {}
    for i, uri in enumerate(in_uris):
        scheme, root, key = split_uri(uri)
        if scheme != "s3":
            path = os.path.join(root, key)
            refuse_pickle(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such weights file: {path}")
            paths[i] = path
    return paths


def _write_average(sa: "StreamingAverage", out_uri: str, metadata, opener, out_storage) -> str:
    """Write the average to ``out_uri`` (for s3://, locally first, then one upload); its sha256."""
    from .storage import split_uri

    if split_uri(out_uri)[0] == "s3":
        with tempfile.TemporaryDirectory(prefix="ratatouille-average-") as scratch:
            tmp_out = os.path.join(scratch, "average.safetensors")
            sha = sa.write(tmp_out, _meta(sa, metadata))
            opener.close()
            out_storage().upload(tmp_out, out_uri)
            return sha
    _, root, key = split_uri(out_uri)
    return sa.write(os.path.join(root, key), _meta(sa, metadata))


def _start_members(in_uris: Sequence[str], paths: Mapping[int, str], pool, store, futures: dict,
                   local: list) -> list:
    """Every member in order: an S3 one as the future of its opened GET (all started at once, in
    ``futures``), a local one opened (also kept in ``local``, to be closed)."""
    for i, uri in enumerate(in_uris):
        if i not in paths:
            futures[i] = pool.submit(_s3_member, store, uri)
    members = []
    for i, uri in enumerate(in_uris):
        if i in futures:
            members.append(futures[i])
        else:
            local.append(_local_member(uri, paths[i]))
            members.append(local[-1])
    return members


def _close_unread(futures) -> int:
    """Close the S3 bodies no block was read from (e.g. after an error); the GETs they cost."""
    gets = 0
    for fut in futures:
        if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result().stream is not None:
            gets += fut.result().stream.gets
            fut.result().stream.close()
            fut.result().stream = None
    return gets


def average_uris(out_uri: str | None, in_uris: Sequence[str], *, endpoint: str | None = None,
                 metadata: Mapping[str, str] | None = None, storage=None,
                 block_elems: int = BLOCK_ELEMS, prefetch_bytes: int = PREFETCH_BYTES,
                 max_streams: int = MAX_STREAMS, piece_bytes: int = PIECE) -> dict:
    """`ratatouille average OUT IN IN...` for paths or URIs (file://, s3://), streaming.

    An S3 member is one GET of the whole object: all are opened at once (a few threads), each
    reads its header from the front of its body and leaves the body open. The blocks start as
    soon as the first member's header is in; each later member is waited for, and checked
    against the first, when its turn comes, so the server preparing the later objects overlaps
    the arithmetic. S3 bytes are read by one :class:`S3Prefetcher` that continues each member's
    GET ahead of the arithmetic (each byte fetched once, no scratch files); local ones from
    disk. The output is written (locally first for s3://) only when every member was added.
    ``out_uri=None`` computes the average without writing it (benchmarks, tests).
    """
    from concurrent.futures import ThreadPoolExecutor

    from .storage import open_storage, split_uri

    paths = _local_paths(in_uris)
    remote = [i for i in range(len(in_uris)) if i not in paths]
    store = storage
    if remote and store is None:
        store = open_storage(in_uris[remote[0]], endpoint=endpoint)
    pool = ThreadPoolExecutor(max_workers=min(8, len(remote)), thread_name_prefix="ratatouille-head") \
        if remote else None
    if out_uri is not None and split_uri(out_uri)[0] == "file":
        check_output_path(os.path.join(*split_uri(out_uri)[1:]))
    futures = {}
    opener = None
    unread_gets = 0
    local: list[_Member] = []
    try:
        members = _start_members(in_uris, paths, pool, store, futures, local)
        gap = PIECE if remote else 0   # S3: read and drop small gaps rather than re-open
        opener = _Opener(bool(remote), store, prefetch_bytes=prefetch_bytes,
                         max_streams=max_streams, piece=piece_bytes)
        sa = StreamingAverage(members, opener, block_elems=block_elems, names=list(in_uris),
                              piece_bytes=piece_bytes, gap=gap)
        summary = {"path": out_uri, "count": sa.count, "members": list(in_uris),
                   "tensors": len(sa._order), "parameters": sa.parameters, "sha256": None,
                   "blocks": len(sa.blocks), "accumulatorBytes": sa.accumulator_bytes}
        if out_uri is None:
            sa.compute()
            summary["average"] = sa
        else:
            summary["sha256"] = _write_average(sa, out_uri, metadata, opener,
                                               lambda: store or open_storage(out_uri, endpoint=endpoint))
    finally:
        for m in local:
            m.close()
        if opener is not None:
            opener.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            unread_gets = _close_unread(futures.values())
    headers = [sa.member(i).data_start for i in range(sa.count)]
    summary.update(bytesRead=sa.bytes_read + sum(headers), gets=opener.gets + unread_gets,
                   bytesTransferred=opener.transferred + sum(headers[i] for i in remote))
    return summary


def average_files(out_path: str | os.PathLike | None, in_paths: Sequence[str | os.PathLike],
                  metadata: Mapping[str, str] | None = None, *, block_elems: int = BLOCK_ELEMS) -> dict:
    """Uniformly average local safetensors files into ``out_path`` (:func:`average_uris`):
    every input checked for pickle content, then every header, before any weight is read; the
    output written atomically once every member was added. Returns a summary dict
    (``out_path=None``: the engine, its mean in memory, as ``summary["average"]``)."""
    paths = [os.fspath(p) for p in in_paths]
    out = os.fspath(out_path) if out_path is not None else None
    summary = average_uris(out, paths, metadata=metadata, block_elems=block_elems)
    keys = ("path", "count", "members", "sha256", "tensors", "parameters", "average")
    return {k: summary[k] for k in keys if k in summary}
