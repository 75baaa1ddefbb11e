"""Uniform averaging of safetensors members straight from their byte streams (no torch).

What ``ratatouille average`` and :func:`ratatouille_trainer.averaging.average_uris` run. Each
member is read once, front to back, in 1 MiB pieces into one reused buffer; every piece is
checked (finite) and added to a single flat float64 accumulator while it is still in cache. So:

- memory is the accumulator (8 bytes per averaged element: 2x an fp32 member) plus a few MiB,
  however many members, and the process never imports torch (~650 MB of RSS on its own);
- from S3, a prefetch thread streams the objects (member ``i+1`` while ``i`` is being added)
  into a bounded queue of pieces, so download and arithmetic overlap; an interrupted transfer is
  resumed with a ranged GET pinned to the object's ETag, never restarted into the sum;
- the result is bit-identical to :class:`~ratatouille_trainer.averaging.RunningSum` (float64
  sum, one division, cast back to each tensor's dtype the way torch casts: float64 -> float32 ->
  float16/bfloat16 with round-to-nearest-even);
- the output is written as safetensors piece by piece (temporary file, fsync, rename) and its
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
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .storage import atomic_write

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

    def at_eof(self) -> bool:
        probe = bytearray(1)
        return not self.raw.readinto(memoryview(probe))


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
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UnsafeWeightsError(f"refusing {rd.name}: not a safetensors file (bad header JSON)") from None
    if not isinstance(header, dict):
        raise UnsafeWeightsError(f"refusing {rd.name}: not a safetensors file (bad header JSON)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UnsafeWeightsError(f"refusing {rd.name}: bad safetensors metadata")
    tensors = []
    for key, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {key!r} has a bad header entry") from None
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
        if t.start < pos:
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {t.key!r} overlaps another")
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


@dataclass
class _Run:
    """Tensors that are contiguous both in a member's file and in the accumulator."""
    dtype: str
    start: int              # byte offset in the member's data section
    acc: int                # element offset in the accumulator
    numel: int
    tensors: list           # [(element offset within the run, key)]

    def key_at(self, elem: int) -> str:
        key = self.tensors[0][1]
        for off, k in self.tensors:
            if off > elem:
                break
            key = k
        return key


class StreamingAverage:
    """Running float64 sum of safetensors members fed as byte streams, in constant memory.

    ``add(name, stream)``: ``stream`` has ``readinto`` (a file opened ``rb``, a prefetch
    reader). The first member fixes keys, shapes and dtypes; floating tensors (F64/F32/F16/BF16)
    are summed, integer and bool tensors are kept from the first member. A member that does not
    match, or holds NaN/Inf, raises :class:`AveragingError` (the sum is then unusable: averaging
    stops, nothing is written).
    """

    def __init__(self, piece_bytes: int = PIECE) -> None:
        self.piece = max(8, piece_bytes // 8 * 8)
        self._buf = bytearray(self.piece)
        self._spec: dict[str, _Tensor] = {}
        self._order: list[_Tensor] = []       # first member's tensors in file order
        self._acc_off: dict[str, int] = {}
        self._kept: dict[str, bytes] = {}
        self._acc: np.ndarray | None = None
        self.names: list[str] = []
        self.metadata: dict[str, str] = {}
        self.bytes_read = 0

    @property
    def count(self) -> int:
        return len(self.names)

    # -- layout ---------------------------------------------------------------------------------
    def _fix_layout(self, tensors: list[_Tensor], meta: Mapping[str, str]) -> None:
        if not tensors:
            raise AveragingError(f"member {self._pending!r}: state dict is empty")
        total = 0
        for t in tensors:
            self._spec[t.key] = t
            if _DTYPES[t.dtype][2]:
                self._acc_off[t.key] = total
                total += t.numel
        self._order = list(tensors)
        self._acc = np.zeros(total, dtype=np.float64)
        self.metadata = dict(meta)

    def _check(self, name: str, tensors: list[_Tensor]) -> None:
        first = self.names[0]
        keys = {t.key: t for t in tensors}
        check_same_keys(name, keys, first, self._spec)
        for key, ref in self._spec.items():
            t = keys[key]
            if t.shape != ref.shape:
                raise AveragingError(f"member {name!r}: tensor {key!r} has shape "
                                     f"{_fmt_shape(t.shape)}, expected {_fmt_shape(ref.shape)}")
            if t.dtype != ref.dtype:
                raise AveragingError(f"member {name!r}: tensor {key!r} has dtype "
                                     f"{_TORCH_NAMES[t.dtype]}, expected {_TORCH_NAMES[ref.dtype]}")

    def _plan(self, tensors: list[_Tensor]) -> list:
        """[("skip", nbytes) | ("keep", key, nbytes) | ("add", _Run)] in the member's file order."""
        ops: list = []
        pos = 0
        for t in tensors:
            if t.start > pos:
                ops.append(("skip", t.start - pos))
            nbytes = t.end - t.start
            if not _DTYPES[t.dtype][2]:
                ops.append(("keep", t.key, nbytes))
            else:
                acc = self._acc_off[t.key]
                last = ops[-1] if ops else None
                if (last is not None and last[0] == "add" and last[1].dtype == t.dtype
                        and last[1].start + last[1].numel * _DTYPES[t.dtype][0] == t.start
                        and last[1].acc + last[1].numel == acc):
                    run = last[1]
                    run.tensors.append((run.numel, t.key))
                    run.numel += t.numel
                else:
                    ops.append(("add", _Run(t.dtype, t.start, acc, t.numel, [(0, t.key)])))
            pos = t.end
        return ops

    # -- accumulation ---------------------------------------------------------------------------
    def add(self, name: str, stream, size: int | None = None) -> None:
        rd = _Reader(stream, name)
        self._pending = name
        tensors, meta, _data_len = _read_header(rd, size)
        if self._acc is None:
            self._fix_layout(tensors, meta)
            keep_values = True
        else:
            self._check(name, tensors)
            keep_values = False
        acc = self._acc
        mv = memoryview(self._buf)
        for op in self._plan(tensors):
            kind = op[0]
            if kind == "skip":
                left = op[1]
                while left:
                    k = min(left, self.piece)
                    rd.read_into(mv[:k])
                    left -= k
            elif kind == "keep":
                _, key, nbytes = op
                data = rd.read(nbytes)
                if keep_values:
                    self._kept[key] = data
            else:
                run: _Run = op[1]
                item, npdt, _ = _DTYPES[run.dtype]
                per = self.piece // item
                done = 0
                while done < run.numel:
                    k = min(per, run.numel - done)
                    rd.read_into(mv[:k * item])
                    x = np.frombuffer(self._buf, dtype=npdt, count=k)
                    if run.dtype == "BF16":
                        x = _bf16_to_f32(x)
                    # quick test (one vectorised sum, in cache); the exact one only on suspicion
                    with np.errstate(over="ignore", invalid="ignore"):
                        s = x.sum(dtype=np.float32) if run.dtype == "F16" else x.sum()
                    if not math.isfinite(float(s)):
                        bad = ~np.isfinite(x)
                        if bad.any():
                            key = run.key_at(done + int(np.argmax(bad)))
                            raise AveragingError(f"member {name!r}: tensor {key!r} contains NaN or Inf")
                    dst = acc[run.acc + done: run.acc + done + k]
                    np.add(dst, x, out=dst)
                    done += k
        if size is None and not rd.at_eof():
            raise UnsafeWeightsError(f"refusing {name}: not a safetensors file (trailing bytes)")
        self.bytes_read += rd.pos
        self.names.append(name)

    # -- results --------------------------------------------------------------------------------
    def _require(self) -> None:
        if not self.names:
            raise AveragingError("no members to average")

    def _mean_pieces(self, t: _Tensor) -> Iterator[np.ndarray]:
        n = float(self.count)
        if not _DTYPES[t.dtype][2]:
            yield np.frombuffer(self._kept[t.key], dtype=np.uint8)
            return
        off = self._acc_off[t.key]
        per = max(1, self.piece // 8)
        for i in range(0, t.numel, per):
            k = min(per, t.numel - i)
            yield _cast_mean(self._acc[off + i: off + i + k] / n, t.dtype)

    def mean_arrays(self) -> dict[str, np.ndarray]:
        """The average as numpy arrays of each tensor's shape (bfloat16 as its uint16 bits);
        integer and bool buffers as their raw bytes (uint8, from the first member)."""
        self._require()
        out = {}
        for t in self._order:
            parts = list(self._mean_pieces(t))
            if not parts:
                out[t.key] = np.zeros(t.shape, dtype=np.float64).astype(_cast_mean(np.zeros(0), t.dtype).dtype)
                continue
            arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out[t.key] = arr.reshape(t.shape) if _DTYPES[t.dtype][2] else arr
        return out

    def write(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
        """Write the average as safetensors atomically; returns its sha256 (hex)."""
        self._require()
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

        def emit(f) -> None:
            for block in (struct.pack("<Q", len(raw)), raw):
                f.write(block)
                h.update(block)
            for t in self._order:
                for arr in self._mean_pieces(t):
                    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
                    f.write(mv)
                    h.update(mv)

        # the project's one atomic writer: temporary file beside it, fsync, rename, or nothing left
        atomic_write(os.fspath(path), emit)
        return h.hexdigest()

    def mean_keys(self) -> list[str]:
        return [t.key for t in self._order]

    @property
    def parameters(self) -> int:
        return int(sum(t.numel for t in self._order))


# ------------------------------------------------------------------------------ S3 prefetch

class _Stop(Exception):
    pass


class S3Prefetcher:
    """Streams S3 objects, in order, into a bounded ring of buffers from a background thread.

    ``reader(i)`` gives a ``readinto`` stream for object ``i``; objects must be consumed in
    order. The thread reads the HTTP body straight into one of ``max_bytes // piece``
    preallocated buffers (recycled once the consumer has copied them out), so at most
    ``max_bytes`` are held ahead of the arithmetic: member ``i+1`` downloads while member ``i``
    is being added, without a second member in memory. A transfer that breaks part way is
    resumed from the byte it reached (a ranged GET with ``IfMatch`` on the first response's
    ETag), under the storage's retry policy.
    """

    def __init__(self, storage, uris: Sequence[str], *, piece: int = PIECE,
                 max_bytes: int = PREFETCH_BYTES) -> None:
        self.storage = storage
        self.uris = list(uris)
        self.piece = piece
        slots = max(2, max_bytes // piece)
        self.q: queue.Queue = queue.Queue()          # filled buffers (and markers), in order
        self.free: queue.Queue = queue.Queue()       # empty buffers
        for _ in range(slots):
            self.free.put(bytearray(piece))
        self.stop = threading.Event()
        self.gets = 0          # GET requests issued (resumes included)
        self.thread = threading.Thread(target=self._run, name="ratatouille-s3-prefetch", daemon=True)
        self._next = 0
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
    def _fill(body, mv: memoryview) -> tuple[int, BaseException | None]:
        """Read up to len(mv) bytes of the body into mv (fewer only at the end of the body or
        on an error, which is returned so the bytes already read are kept)."""
        raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
        got = 0
        try:
            if raw is not None and hasattr(raw, "readinto"):
                # http.client's response: straight into our buffer (botocore asks urllib3 for
                # the undecoded bytes too, so this is the same content without two copies)
                while got < len(mv):
                    n = raw.readinto(mv[got:])
                    if not n:
                        break
                    got += n
            else:
                while got < len(mv):
                    data = body.read(len(mv) - got)
                    if not data:
                        break
                    mv[got:got + len(data)] = data
                    got += len(data)
        except Exception as exc:
            return got, exc
        return got, None

    def _stream(self, index: int, uri: str) -> None:
        from .storage import TransientStorageError, _is_transient, _s3_error

        s3 = self.storage._for(uri)
        bucket, key = s3._object_bk(uri)
        policy = s3.retry
        pos, total, etag, failures = 0, None, None, 0
        while True:
            try:
                kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
                if pos:
                    kwargs["Range"] = f"bytes={pos}-"
                    kwargs["IfMatch"] = etag
                self.gets += 1
                resp = s3.client.get_object(**kwargs)
                body = resp["Body"]
                if total is None:
                    total = int(resp["ContentLength"])
                    etag = resp.get("ETag")
                    self.q.put(("begin", index, total))
                try:
                    while pos < total:
                        buf = self._take_free()
                        want = min(self.piece, total - pos)
                        n, error = self._fill(body, memoryview(buf)[:want])
                        if n:
                            pos += n
                            self.q.put(("data", buf, n))
                        else:
                            self.free.put(buf)
                        if error is not None:
                            raise error
                        if n < want:
                            raise ConnectionError(f"{uri}: stream ended at byte {pos} of {total}")
                finally:
                    body.close()
                self.q.put(("end", index, pos))
                return
            except _Stop:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise _s3_error(uri, "read", exc) from None
                failures += 1
                if failures >= policy.attempts:
                    raise TransientStorageError(f"{uri}: read failed after {failures} attempts: "
                                                f"{type(exc).__name__}: {exc}") from None
                with s3._lock:
                    s3.retries += 1
                policy.sleep(policy.delay(failures))

    def _run(self) -> None:
        try:
            for i, uri in enumerate(self.uris):
                self._stream(i, uri)
        except _Stop:
            return
        except BaseException as exc:  # handed to the consumer
            self.q.put(("error", -1, exc))

    def _get(self):
        item = self.q.get()
        if item[0] == "error":
            raise item[2]
        return item

    def reader(self, index: int) -> "_PrefetchReader":
        if index != self._next:
            raise ValueError("prefetched objects must be read in order")
        self._next += 1
        kind, i, total = self._get()
        if kind != "begin" or i != index:  # pragma: no cover - protocol invariant
            raise RuntimeError("prefetch stream out of order")
        return _PrefetchReader(self, index, total)

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

    def readinto(self, mv: memoryview) -> int:
        if not len(self._view):
            self._release()
            if self._done:
                return 0
            kind, buf, n = self.owner._get()
            if kind == "end":
                self._done = True
                return 0
            self._buf = buf
            self._view = memoryview(buf)[:n]
        n = min(len(mv), len(self._view))
        mv[:n] = self._view[:n]
        self._view = self._view[n:]
        return n

    def drain(self) -> None:
        """Consume what is left of this object (to reach the next one)."""
        scratch = memoryview(bytearray(1 << 16))
        while self.readinto(scratch):
            pass


# ------------------------------------------------------------------------------ entry points

def average_paths(out_path: str | os.PathLike | None, in_paths: Sequence[str | os.PathLike],
                  metadata: Mapping[str, str] | None = None) -> tuple[StreamingAverage, str | None]:
    """Average local safetensors files (each checked for pickle content before anything is read)
    into ``out_path`` (None: keep the result in memory only). Returns the sum and the sha256."""
    paths = [os.fspath(p) for p in in_paths]
    if not paths:
        raise AveragingError("no input checkpoints to average")
    for p in paths:
        refuse_pickle(p)
        if not os.path.isfile(p):
            raise FileNotFoundError(f"no such weights file: {p}")
    sa = StreamingAverage()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            sa.add(p, f, size=os.fstat(f.fileno()).st_size)
    digest = None
    if out_path is not None:
        digest = sa.write(out_path, _meta(sa, metadata))
    return sa, digest


def _meta(sa: StreamingAverage, extra: Mapping[str, str] | None) -> dict[str, str]:
    meta = {"format": "pt", "ratatouille.averaged": str(sa.count), "ratatouille.selection": "uniform"}
    meta.update(extra or {})
    return meta


def average_uris(out_uri: str | None, in_uris: Sequence[str], *, endpoint: str | None = None,
                 metadata: Mapping[str, str] | None = None, storage=None) -> dict:
    """`ratatouille average OUT IN IN...` for paths or URIs (file://, s3://), streaming.

    S3 members are streamed through an :class:`S3Prefetcher` (no scratch files); local ones are
    read from disk. The output is written (locally first for s3://) only when every member was
    added. ``out_uri=None`` computes the average without writing it (benchmarks).
    """
    from .storage import open_storage, split_uri

    if not in_uris:
        raise AveragingError("no input checkpoints to average")
    for uri in in_uris:
        refuse_pickle(uri)  # by name before anything is fetched
    remote = [u for u in in_uris if split_uri(u)[0] == "s3"]
    store = storage
    if remote and store is None:
        store = open_storage(remote[0], endpoint=endpoint)
    pre = S3Prefetcher(store, remote) if remote else None
    sa = StreamingAverage()
    try:
        r = 0
        for uri in in_uris:
            scheme, root, key = split_uri(uri)
            if scheme == "s3":
                reader = pre.reader(r)
                r += 1
                sa.add(uri, reader, size=reader.size)
                reader.drain()
            else:
                path = os.path.join(root, key)
                refuse_pickle(path)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"no such weights file: {path}")
                with open(path, "rb", buffering=0) as f:
                    sa.add(uri, f, size=os.fstat(f.fileno()).st_size)
    finally:
        if pre is not None:
            pre.close()
    summary = {"path": out_uri, "count": sa.count, "members": list(in_uris),
               "tensors": len(sa._order), "parameters": sa.parameters, "sha256": None,
               "bytesRead": sa.bytes_read, "gets": pre.gets if pre is not None else 0}
    if out_uri is None:
        summary["average"] = sa
        return summary
    meta = _meta(sa, metadata)
    if split_uri(out_uri)[0] == "s3":
        with tempfile.TemporaryDirectory(prefix="ratatouille-average-") as scratch:
            tmp_out = os.path.join(scratch, "average.safetensors")
            summary["sha256"] = sa.write(tmp_out, meta)
            (store or open_storage(out_uri, endpoint=endpoint)).upload(tmp_out, out_uri)
    else:
        _, root, key = split_uri(out_uri)
        summary["sha256"] = sa.write(os.path.join(root, key), meta)
    return summary
