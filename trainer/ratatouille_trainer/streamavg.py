"""Uniform averaging of safetensors members straight from their byte streams (no torch).

What ``ratatouille average`` and :func:`ratatouille_trainer.averaging.average_uris` run.

Every member's header is read and checked against the first member's before any weight is read.
Then the parameters are averaged **one block at a time** (``BLOCK_ELEMS`` floating elements, a
32 MiB float64 accumulator): for each block, each member's bytes for it are read in 1 MiB
pieces into one reused buffer, checked (finite) and added while in cache; the block's mean is
cast back and written; the accumulator is reused for the next block. So:

- memory is one block's accumulator plus a few MiB, whatever the model size or member count
  (an accumulator for the whole model would be 2x an fp32 member), and the process never
  imports torch (~650 MB of RSS on its own);
- each member byte is read once. From S3, each member is one GET of the whole object, opened
  (in parallel) to read its header and then left open: a prefetch thread continues each body
  block by block, ahead of the arithmetic, into a bounded ring of buffers, so download and
  arithmetic overlap; the unread rest of a body waits in its connection. A transfer that breaks
  is resumed with a ranged GET pinned to the object's ETag, never restarted into the sum;
- the result is bit-identical to :class:`~ratatouille_trainer.averaging.RunningSum` (per element,
  a float64 sum in member order, one division, cast back to each tensor's dtype the way torch
  casts: float64 -> float32 -> float16/bfloat16 with round-to-nearest-even), whatever the block
  size;
- the output is written as safetensors block by block (temporary file, fsync, rename) and its
  sha256 is computed while writing.

Weights are untrusted: only the safetensors format is parsed (header JSON, bounds and overlap
checks, sizes against shapes), never a pickle. Member errors name the member and the tensor, with
the same messages as ``RunningSum``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .storage import atomic_write, new_file_mode  # noqa: F401  (new_file_mode: re-exported)

__all__ = [
    "AveragingError",
    "UnsafeWeightsError",
    "PICKLE_SUFFIXES",
    "refuse_pickle",
    "describe_head",
    "StreamingAverage",
    "average_paths",
    "average_uris",
    "S3Prefetcher",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
PIECE = 1 << 20                  # bytes read, checked and added at a time (fits in L2)
MAX_HEADER = 100 * 1000 * 1000   # the safetensors library's own limit
PREFETCH_BYTES = 16 << 20        # S3: at most this much downloaded ahead of the arithmetic
BLOCK_ELEMS = 4 << 20            # floating elements per block: a 32 MiB float64 accumulator
MAX_STREAMS = 64                 # S3: members read through an open GET at once (the others re-open)


class AveragingError(ValueError):
    """Members cannot be averaged; the message names the member and the tensor."""


class UnsafeWeightsError(ValueError):
    """A weights file is (or may be) a pickle: refused, never loaded."""


# ------------------------------------------------------------------------------ safe reading

def describe_head(head: bytes, size: int | None) -> str | None:
    """Why ``head`` (the first bytes of a file) is not safetensors, or None if it looks fine."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save format)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a pickle"
    if len(head) < 9:
        return "not a safetensors file (too short)"
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or head[8:9] != b"{" or (size is not None and 8 + n > size):
        return "not a safetensors file (bad header)"
    return None


def refuse_pickle(path_or_uri: str | os.PathLike, head: bytes | None = None) -> None:
    """Raise :class:`UnsafeWeightsError` unless ``path_or_uri`` may be read as safetensors.

    Refused: names ending in a pickle suffix (.pt .pth .bin .ckpt .pkl .pickle), and content
    whose first bytes are a pickle, a zip (torch.save) or anything else than a safetensors header
    (8-byte little-endian header length, then ``{``). The content is checked from ``head`` when
    given (e.g. the first bytes a storage adapter fetched), otherwise from the file when
    ``path_or_uri`` is an existing local path (``file://`` URIs included).
    """
    name = os.fspath(path_or_uri)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeWeightsError(f"refusing {name}: pickle-format weights are never loaded; "
                                 "convert them to safetensors")
    size = None
    if head is None:
        local = name[len("file://"):] if name.startswith("file://") else name
        if "://" in local or not os.path.isfile(local):
            return
        size = os.path.getsize(local)
        with open(local, "rb") as f:
            head = f.read(16)
    why = describe_head(bytes(head[:16]), size)
    if why is not None:
        raise UnsafeWeightsError(f"refusing {name}: {why}; only safetensors weights are loaded")


# dtype tag -> (itemsize, numpy dtype of the stored bytes, averaged?)
_DTYPES: dict[str, tuple[int, Any, bool]] = {
    "F64": (8, np.dtype("<f8"), True),
    "F32": (4, np.dtype("<f4"), True),
    "F16": (2, np.dtype("<f2"), True),
    "BF16": (2, np.dtype("<u2"), True),
    "I64": (8, None, False), "I32": (4, None, False), "I16": (2, None, False),
    "I8": (1, None, False), "U64": (8, None, False), "U32": (4, None, False),
    "U16": (2, None, False), "U8": (1, None, False), "BOOL": (1, None, False),
}
_TORCH_NAMES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16",
                "BF16": "torch.bfloat16", "I64": "torch.int64", "I32": "torch.int32",
                "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
                "U16": "torch.uint16", "U32": "torch.uint32", "U64": "torch.uint64",
                "BOOL": "torch.bool"}


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_same_keys(name: str, keys, first: str, expected) -> None:
    """Refuse a member whose tensor names differ from the first member's, naming one of them."""
    missing = [k for k in expected if k not in keys]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise AveragingError(f"member {name!r}: tensor {missing[0]!r} is missing{more}; "
                             f"member {first!r} has it")
    extra = [k for k in keys if k not in expected]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise AveragingError(f"member {name!r}: unexpected tensor {extra[0]!r}{more}; "
                             f"member {first!r} has no such tensor")


@dataclass(frozen=True)
class _Tensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int      # byte offsets in the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Reader:
    """Exact reads from a ``readinto``-capable stream, counting bytes."""

    def __init__(self, raw, name: str):
        self.raw = raw
        self.name = name
        self.pos = 0

    def read_into(self, mv: memoryview) -> None:
        want = len(mv)
        got = 0
        while got < want:
            n = self.raw.readinto(mv[got:])
            if not n:
                raise UnsafeWeightsError(f"refusing {self.name}: not a safetensors file "
                                         f"(truncated at byte {self.pos + got})")
            got += n
        self.pos += want

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.read_into(memoryview(buf))
        return bytes(buf)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return out


class _DuplicateKey(ValueError):
    pass


def _parse_header_json(raw: bytes, name: str) -> dict:
    """The header JSON as a dict, refusing duplicate keys (json.loads would keep the last one;
    the safetensors library refuses them) and nesting too deep to parse (a header is at most
    three levels deep; a deeper one must not end in a RecursionError)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise UnsafeWeightsError(f"refusing {name}: tensor {e.args[0]!r} appears twice in the header") from None
    except RecursionError:
        raise UnsafeWeightsError(f"refusing {name}: not a safetensors file (header nested too deeply)") from None
    except (UnicodeDecodeError, ValueError):
        raise UnsafeWeightsError(f"refusing {name}: not a safetensors file (bad header JSON)") from None
    if not isinstance(header, dict):
        raise UnsafeWeightsError(f"refusing {name}: not a safetensors file (bad header JSON)")
    return header


def _read_header(rd: _Reader, size: int | None) -> tuple[list[_Tensor], dict[str, str], int]:
    """Parse and check a safetensors header: tensors sorted by offset, metadata, data length."""
    first = rd.read(8)
    (n,) = struct.unpack("<Q", first)
    if n > MAX_HEADER or n < 2 or (size is not None and 8 + n > size):
        why = describe_head(first + b"\x00", size) or "not a safetensors file (bad header)"
        raise UnsafeWeightsError(f"refusing {rd.name}: {why}; only safetensors weights are loaded")
    raw = rd.read(n)
    why = describe_head(first + raw[:8], size)
    if why is not None:
        raise UnsafeWeightsError(f"refusing {rd.name}: {why}; only safetensors weights are loaded")
    header = _parse_header_json(raw, rd.name)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UnsafeWeightsError(f"refusing {rd.name}: bad safetensors metadata")
    tensors = []
    for key, info in header.items():
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
                and isinstance(info["dtype"], str) and _int_list(info["shape"])
                and _int_list(info["data_offsets"]) and len(info["data_offsets"]) == 2):
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {key!r} has a bad header entry")
        dtype = info["dtype"]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        if dtype not in _DTYPES:
            raise AveragingError(f"member {rd.name!r}: tensor {key!r} has dtype {dtype}, "
                                 "which is not supported for averaging")
        if any(d < 0 for d in shape) or start < 0 or end < start \
                or end - start != math.prod(shape) * _DTYPES[dtype][0]:
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {key!r}: offsets do not match "
                                     "its shape and dtype")
        tensors.append(_Tensor(key, dtype, shape, start, end))
    tensors.sort(key=lambda t: (t.start, t.end))
    pos = 0
    for t in tensors:
        # the data section is the tensors back to back, as the safetensors library requires
        if t.start < pos:
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {t.key!r} overlaps another")
        if t.start > pos:
            raise UnsafeWeightsError(f"refusing {rd.name}: a hole of {t.start - pos} bytes before "
                                     f"tensor {t.key!r} in the data section")
        pos = t.end
    data_len = pos
    if size is not None and 8 + n + data_len != size:
        raise UnsafeWeightsError(f"refusing {rd.name}: not a safetensors file (size does not "
                                 "match its header)")
    return tensors, meta, data_len


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


def _cast_mean(y: np.ndarray, dtype: str) -> np.ndarray:
    """float64 mean -> the tensor's dtype, as ``torch.Tensor.to`` does it (via float32)."""
    if dtype == "F64":
        return y
    y32 = y.astype(np.float32)
    if dtype == "F32":
        return y32
    if dtype == "F16":
        return y32.astype(np.float16)
    return _f32_to_bf16(y32)


# ------------------------------------------------------------------------------ the block plan

@dataclass
class _Member:
    """One member as its header describes it, and where its bytes come from."""
    name: str                       # as given (messages name it)
    tensors: dict[str, _Tensor]
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


def _plan_blocks(order: Sequence[_Tensor], block_elems: int) -> list[list[_Item]]:
    """Cut the first member's tensors, in file order, into blocks (:func:`_block_sizes`) of
    floating elements (a tensor may span blocks; integer tensors ride along whole)."""
    total = sum(t.numel for t in order if _DTYPES[t.dtype][2])
    sizes = _block_sizes(total, block_elems)
    blocks: list[list[_Item]] = [[]]
    used = 0
    for t in order:
        if not _DTYPES[t.dtype][2]:
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


def _check_like(first: _Member, m: _Member) -> None:
    """Refuse a member whose tensors differ from the first member's (names, shapes, dtypes)."""
    check_same_keys(m.name, m.tensors, first.name, first.tensors)
    for key, ref in first.tensors.items():
        t = m.tensors[key]
        if t.shape != ref.shape:
            raise AveragingError(f"member {m.name!r}: tensor {key!r} has shape "
                                 f"{_fmt_shape(t.shape)}, expected {_fmt_shape(ref.shape)}")
        if t.dtype != ref.dtype:
            raise AveragingError(f"member {m.name!r}: tensor {key!r} has dtype "
                                 f"{_TORCH_NAMES[t.dtype]}, expected {_TORCH_NAMES[ref.dtype]}")


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
        self.metadata = dict(first.meta)
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
                    _check_like(self.member(0), m)
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

    def mean_keys(self) -> list[str]:
        return [t.key for t in self._order]

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
            item = _DTYPES[it.dtype][0]
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
    def _add(self, rd: _Reader, name: str, it: _Item, acc: np.ndarray, first: bool) -> None:
        """Read item ``it``'s elements, check them, and add them into ``acc`` (the first member
        copies them in: its values start the sum, as in RunningSum, so no zeroing pass)."""
        item, npdt, _ = _DTYPES[it.dtype]
        per = self.piece // item
        total = it.hi - it.lo
        done = 0
        readview = getattr(rd.raw, "readview", None)
        while done < total:
            k = min(per, total - done)
            view = readview(k * item, item) if readview is not None else None
            if view is not None:  # the prefetched bytes themselves, no copy
                k = len(view) // item
                rd.pos += len(view)
                x = np.frombuffer(view, dtype=npdt, count=k)
            else:
                rd.read_into(memoryview(self._buf)[:k * item])
                x = np.frombuffer(self._buf, dtype=npdt, count=k)
            if it.dtype == "BF16":
                x = _bf16_to_f32(x)
            # quick test (one vectorised sum, in cache); the exact one only on suspicion
            with np.errstate(over="ignore", invalid="ignore"):
                s = x.sum(dtype=np.float32) if it.dtype == "F16" else x.sum()
            if not math.isfinite(float(s)) and not np.isfinite(x).all():
                raise AveragingError(f"member {name!r}: tensor {it.key!r} contains NaN or Inf")
            dst = acc[it.acc + done: it.acc + done + k]
            if first:
                np.copyto(dst, x)
            else:
                np.add(dst, x, out=dst)
            done += k

    def run(self, emit: Callable[[_Item, int, np.ndarray], None]) -> None:
        """One pass over every block; ``emit(item, element_offset, values)`` receives the mean
        in output order (integer tensors: their raw bytes as uint8, offset 0)."""
        if self._ran:
            raise RuntimeError("a StreamingAverage runs once")
        self._ran = True
        start = getattr(self.opener, "start", None)
        if start is not None:
            start(self)
        n = float(self.count)
        mv = memoryview(self._buf)
        per_out = max(1, self.piece // 8)
        for b, block in enumerate(self.blocks):
            width = sum(it.hi - it.lo for it in block if it.acc >= 0)
            acc = self._acc[:width]  # every element is set by the first member
            kept: dict[str, bytes] = {}
            for mi in range(self.count):
                member = self.member(mi)
                for start, end, segs in self.ranges(b, mi):
                    stream = self.opener(mi, start, end, member)
                    try:
                        rd = _Reader(stream, member.name)
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
                    a = it.acc + i
                    emit(it, it.lo + i, _cast_mean(acc[a:a + k] / n, it.dtype))
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
            if _DTYPES[t.dtype][2]:
                dt = _cast_mean(np.zeros(0), t.dtype).dtype
                arrays[t.key] = np.empty(t.numel, dtype=dt)

        def emit(it: _Item, off: int, values: np.ndarray) -> None:
            if it.acc < 0:
                arrays[it.key] = values.copy()
            else:
                arrays[it.key][off: off + len(values)] = values

        self.run(emit)
        for t in self._order:
            if _DTYPES[t.dtype][2]:
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
        meta = dict(metadata or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
        header: dict[str, Any] = {}
        if meta:
            header["__metadata__"] = meta
        pos = 0
        for t in self._order:
            nbytes = t.end - t.start
            header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        h = hashlib.sha256()

        def emit_file(f) -> None:
            os.fchmod(f.fileno(), new_file_mode())  # the temporary file was created 0600

            def out(block) -> None:
                f.write(block)
                h.update(block)

            out(struct.pack("<Q", len(raw)))
            out(raw)
            self.run(lambda it, off, values: out(memoryview(np.ascontiguousarray(values)).cast("B")))

        # the project's one atomic writer: temporary file beside it, fsync, rename, or nothing left
        atomic_write(os.fspath(path), emit_file)
        return h.hexdigest()


# ------------------------------------------------------------------------------ sources

def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _local_member(name: str, path: str) -> _Member:
    """Open a local member once and read its header; its weights are read later from the same
    open file (one snapshot, whatever happens to the path meanwhile)."""
    f = open(path, "rb", buffering=0)
    try:
        st = os.fstat(f.fileno())
        rd = _Reader(f, name)
        tensors, meta, _ = _read_header(rd, st.st_size)
    except BaseException:
        f.close()
        raise
    return _Member(name, {t.key: t for t in tensors}, rd.pos, st.st_size, meta, path=path,
                   file=f, identity=_identity(st))


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


class _BodyReader:
    """``readinto`` over a botocore body (straight into the caller's buffer when the body
    exposes http.client's response: botocore asks urllib3 for the undecoded bytes too, so this
    is the same content without a second copy)."""

    def __init__(self, body) -> None:
        self.body = body
        raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
        self.raw = raw if raw is not None and hasattr(raw, "readinto") else None

    def readinto(self, mv: memoryview) -> int:
        if self.raw is not None:
            return self.raw.readinto(mv) or 0
        data = self.body.read(len(mv))
        mv[:len(data)] = data
        return len(data)


@dataclass
class _Stream:
    """An open GET of one member: its body, and the object offset of the next byte it gives."""
    body: Any
    reader: _BodyReader
    pos: int


def _s3_member(storage, uri: str) -> _Member:
    """Open one GET of the whole object and read its header from the front of the body. The
    body stays open: the weights are read from it later, block by block (one GET per member)."""
    s3 = storage._for(uri)
    bucket, key = s3._object_bk(uri)

    def get():
        return s3.client.get_object(Bucket=bucket, Key=key)

    resp = s3._call("read", uri, get)  # retried like every storage call
    body = resp["Body"]
    try:
        size = int(resp["ContentLength"])
        rd = _Reader(_BodyReader(body), uri)
        tensors, meta, _ = _read_header(rd, size)
    except BaseException:
        body.close()
        raise
    return _Member(uri, {t.key: t for t in tensors}, rd.pos, size, meta, uri=uri,
                   etag=resp.get("ETag"), stream=_Stream(body, rd.raw, rd.pos))


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
            if member.file is None:  # a member described by hand (tests, benchmarks)
                f = open(member.path, "rb", buffering=0)
                f.seek(start)
                return f
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
        self.streams: dict[int, _Stream] = {}
        self.piece = piece
        slots = max(2, max_bytes // piece)
        self.q: queue.Queue = queue.Queue()          # filled buffers (and markers), in order
        self.free: queue.Queue = queue.Queue()       # empty buffers
        for _ in range(slots):
            self.free.put(bytearray(piece))
        self.stop = threading.Event()
        self.gets = 0          # GET requests issued here (ranged re-opens and resumes)
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

    @staticmethod
    def _fill(reader: _BodyReader, mv: memoryview) -> tuple[int, BaseException | None]:
        """Read up to len(mv) bytes into mv (fewer only at the end of the body or on an error,
        which is returned so the bytes already read are kept)."""
        got = 0
        try:
            while got < len(mv):
                n = reader.readinto(mv[got:])
                if not n:
                    break
                got += n
        except Exception as exc:
            return got, exc
        return got, None

    def _close_stream(self, mi: int) -> None:
        st = self.streams.pop(mi, None)
        if st is not None:
            try:
                st.body.close()
            except Exception:  # closing a broken connection: nothing left to lose
                pass

    def _open(self, mi: int, at: int) -> _Stream:
        m = self.engine.member(mi)
        s3 = self.storage._for(m.uri)
        bucket, key = s3._object_bk(m.uri)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={at}-{m.size - 1}"}
        if m.etag:
            kwargs["IfMatch"] = m.etag
        self.gets += 1
        resp = s3.client.get_object(**kwargs)
        st = _Stream(resp["Body"], _BodyReader(resp["Body"]), at)
        if int(resp["ContentLength"]) != m.size - at:
            st.body.close()
            from .storage import StorageError
            raise StorageError(f"{m.uri}: the server answered a ranged read with "
                               f"{resp['ContentLength']} bytes, not {m.size - at}")
        self._keep(mi, st)
        return st

    def _keep(self, mi: int, st: _Stream) -> None:
        """Hold member ``mi``'s open body (at most ``max_streams``: the least recently used
        gives way)."""
        while len(self.streams) >= self.max_streams:
            self._close_stream(next(iter(self.streams)))
        self.streams[mi] = st

    def _position(self, mi: int, at: int) -> _Stream:
        """The member's stream, standing at byte ``at``."""
        st = self.streams.pop(mi, None)
        m = self.engine.member(mi)
        if st is None and m.stream is not None:  # the GET its header came from
            st, m.stream = m.stream, None
        if st is not None:
            self._keep(mi, st)  # most recently used last
        if st is not None and st.pos <= at <= st.pos + self.engine.gap:
            scratch = self._take_free()
            try:
                while st.pos < at:
                    n, error = self._fill(st.reader, memoryview(scratch)[:min(self.piece, at - st.pos)])
                    st.pos += n
                    self.bytes += n
                    if error is not None:
                        raise error
                    if not n:
                        raise ConnectionError(f"{m.uri}: stream ended at byte {st.pos}")
            finally:
                self.free.put(scratch)
            return st
        self._close_stream(mi)
        return self._open(mi, at)

    def _stream(self, mi: int, start: int, end: int) -> None:
        from .storage import StorageError, TransientStorageError, _is_transient, _s3_error

        m = self.engine.member(mi)
        s3 = self.storage._for(m.uri)
        policy = s3.retry
        total = end - start
        pos, failures = 0, 0
        self.q.put(("begin", (mi, start, end), total))
        while True:
            try:
                st = self._position(mi, start + pos)
                while pos < total:
                    buf = self._take_free()
                    want = min(self.piece, total - pos)
                    n, error = self._fill(st.reader, memoryview(buf)[:want])
                    if n:
                        pos += n
                        st.pos += n
                        self.bytes += n
                        self.q.put(("data", buf, n))
                    else:
                        self.free.put(buf)
                    if error is not None:
                        raise error
                    if n < want:
                        raise ConnectionError(f"{m.uri}: stream ended at byte {start + pos} of {end}")
                self.q.put(("end", (mi, start, end), pos))
                return
            except (_Stop, StorageError):
                raise
            except Exception as exc:
                self._close_stream(mi)  # resumed, if at all, by a ranged GET from `pos`
                if not _is_transient(exc):
                    raise _s3_error(m.uri, "read", exc) from None
                failures += 1
                if failures >= policy.attempts:
                    raise TransientStorageError(f"{m.uri}: read failed after {failures} attempts: "
                                                f"{type(exc).__name__}: {exc}") from None
                with s3._lock:
                    s3.retries += 1
                policy.sleep(policy.delay(failures))

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

def check_output_path(path: str) -> None:
    """The output is written by rename over ``path``: refuse to replace anything but a regular
    file (a directory, a device node, a pipe, a socket, a symbolic link)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a named pipe" if stat.S_ISFIFO(st.st_mode) else "not a regular file")
        raise AveragingError(f"refusing to write the average to {path}: it is {kind}; "
                             "give a new path or an existing regular file")


def _meta(sa: StreamingAverage, extra: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", "ratatouille.averaged": str(sa.count), "ratatouille.selection": "uniform"}
    meta.update(extra or {})
    return meta


def average_paths(out_path: str | os.PathLike | None, in_paths: Sequence[str | os.PathLike],
                  metadata: Mapping[str, str] | None = None, *,
                  block_elems: int = BLOCK_ELEMS) -> tuple[StreamingAverage, str | None]:
    """Average local safetensors files (each checked for pickle content, then every header
    checked, before any weight is read) into ``out_path`` (None: keep the mean in memory, see
    :meth:`StreamingAverage.mean_arrays`). Returns the engine and the output's sha256."""
    paths = [os.fspath(p) for p in in_paths]
    if not paths:
        raise AveragingError("no input checkpoints to average")
    if out_path is not None:
        check_output_path(os.fspath(out_path))
    for p in paths:
        refuse_pickle(p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no such weights file: {p}")
    members: list[_Member] = []
    try:
        for p in paths:
            members.append(_local_member(p, p))
        sa = StreamingAverage(members, _Opener(), block_elems=block_elems)
        if out_path is None:
            sa.compute()
            return sa, None
        return sa, sa.write(out_path, _meta(sa, metadata))
    finally:
        for m in members:
            m.close()


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

    if not in_uris:
        raise AveragingError("no input checkpoints to average")
    for uri in in_uris:
        refuse_pickle(uri)  # by name before anything is fetched
    remote = [i for i, u in enumerate(in_uris) if split_uri(u)[0] == "s3"]
    store = storage
    if remote and store is None:
        store = open_storage(in_uris[remote[0]], endpoint=endpoint)
    paths: dict[int, str] = {}
    for i, uri in enumerate(in_uris):
        scheme, root, key = split_uri(uri)
        if scheme != "s3":
            path = os.path.join(root, key)
            refuse_pickle(path)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such weights file: {path}")
            paths[i] = path
    pool = ThreadPoolExecutor(max_workers=min(8, len(remote)), thread_name_prefix="ratatouille-head") \
        if remote else None
    if out_uri is not None and split_uri(out_uri)[0] == "file":
        check_output_path(os.path.join(*split_uri(out_uri)[1:]))
    futures = {}
    opener = None
    local: list[_Member] = []
    try:
        for i in remote:
            futures[i] = pool.submit(_s3_member, store, in_uris[i])
        members = []
        for i, uri in enumerate(in_uris):
            if i in futures:
                members.append(futures[i])
            else:
                local.append(_local_member(uri, paths[i]))
                members.append(local[-1])
        gap = PIECE if remote else 0   # S3: read and drop small gaps rather than re-open
        opener = _Opener(bool(remote), store, prefetch_bytes=prefetch_bytes,
                         max_streams=max_streams, piece=piece_bytes)
        sa = StreamingAverage(members, opener, block_elems=block_elems, names=list(in_uris),
                              piece_bytes=piece_bytes, gap=gap)
        summary = {"path": out_uri, "count": sa.count, "members": list(in_uris),
                   "tensors": len(sa._order), "parameters": sa.parameters, "sha256": None,
                   "blocks": len(sa.blocks)}
        if out_uri is None:
            sa.compute()
            summary["average"] = sa
        elif split_uri(out_uri)[0] == "s3":
            with tempfile.TemporaryDirectory(prefix="ratatouille-average-") as scratch:
                tmp_out = os.path.join(scratch, "average.safetensors")
                summary["sha256"] = sa.write(tmp_out, _meta(sa, metadata))
                opener.close()
                (store or open_storage(out_uri, endpoint=endpoint)).upload(tmp_out, out_uri)
        else:
            _, root, key = split_uri(out_uri)
            summary["sha256"] = sa.write(os.path.join(root, key), _meta(sa, metadata))
    finally:
        for m in local:
            m.close()
        if opener is not None:
            opener.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            for fut in futures.values():  # bodies no block was read from (e.g. after an error)
                if fut.done() and not fut.cancelled() and fut.exception() is None \
                        and fut.result().stream is not None:
                    fut.result().stream.body.close()
                    fut.result().stream = None
    summary["bytesRead"] = sa.bytes_read + sum(sa.member(i).data_start for i in range(sa.count))
    summary["bytesTransferred"] = opener.transferred + sum(sa.member(i).data_start for i in remote)
    summary["gets"] = opener.gets + len(remote)
    return summary
