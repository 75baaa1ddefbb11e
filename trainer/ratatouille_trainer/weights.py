"""Weight files: safetensors only, never a pickle (recycled weights are untrusted input).

Reading (a header checked before any weight: JSON, bounds, overlaps, sizes against shapes; the
pickle refusal by name and by content), loading into torch, writing (atomic, canonical header so
equal tensors give equal bytes and sha256 in every process) and hashing. torch is imported only
by the functions that need it, so ``ratatouille average`` runs without it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .storage import new_file_mode

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "AveragingError", "UnsafeWeightsError", "PICKLE_SUFFIXES", "DTYPES", "TORCH_NAMES",
    "TensorEntry", "Reader", "describe_head", "refuse_pickle", "read_header", "check_output_path",
    "load_safetensors_file", "load_safetensors_bytes", "save_state_dict", "canonical_header",
    "sha256_file", "header_bytes", "write_streamed",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 * 1000 * 1000   # the safetensors library's own limit

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
DTYPES: dict[str, tuple[int, Any, bool]] = {
    "F64": (8, np.dtype("<f8"), True),
    "F32": (4, np.dtype("<f4"), True),
    "F16": (2, np.dtype("<f2"), True),
    "BF16": (2, np.dtype("<u2"), True),
    "I64": (8, None, False), "I32": (4, None, False), "I16": (2, None, False),
    "I8": (1, None, False), "U64": (8, None, False), "U32": (4, None, False),
    "U16": (2, None, False), "U8": (1, None, False), "BOOL": (1, None, False),
}
TORCH_NAMES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16",
                "BF16": "torch.bfloat16", "I64": "torch.int64", "I32": "torch.int32",
                "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
                "U16": "torch.uint16", "U32": "torch.uint32", "U64": "torch.uint64",
                "BOOL": "torch.bool"}


def fmt_shape(shape: tuple[int, ...]) -> str:
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
class TensorEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int      # byte offsets in the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Reader:
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


def read_header(rd: Reader, size: int | None) -> tuple[list[TensorEntry], dict[str, str], int]:
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
        if dtype not in DTYPES:
            raise AveragingError(f"member {rd.name!r}: tensor {key!r} has dtype {dtype}, "
                                 "which is not supported for averaging")
        if any(d < 0 for d in shape) or start < 0 or end < start \
                or end - start != math.prod(shape) * DTYPES[dtype][0]:
            raise UnsafeWeightsError(f"refusing {rd.name}: tensor {key!r}: offsets do not match "
                                     "its shape and dtype")
        tensors.append(TensorEntry(key, dtype, shape, start, end))
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


# ------------------------------------------------------------------------------ torch

def load_safetensors_file(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Load a local safetensors file onto the CPU (after :func:`refuse_pickle`)."""
    from safetensors.torch import load_file

    refuse_pickle(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {os.fspath(path)}")
    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UnsafeWeightsError(f"cannot read {os.fspath(path)} as safetensors: {e}") from e


def load_safetensors_bytes(data: bytes, name: str = "<bytes>") -> dict[str, "torch.Tensor"]:
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


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _independent_tensors(state: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Contiguous CPU tensors, none sharing storage with another (what safetensors requires)."""
    import torch

    seen: set[int] = set()
    out: dict[str, "torch.Tensor"] = {}
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


def header_bytes(header: Mapping[str, Any]) -> bytes:
    """A safetensors header as canonical bytes: sorted, compact JSON, padded with spaces so the
    data section stays 8-byte aligned."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; got {k!r}: {v!r}")
    return meta


def write_streamed(path: str | os.PathLike, entries: Sequence[TensorEntry],
                   metadata: Mapping[str, str] | None,
                   fill: Callable[[Callable[[Any], None]], None]) -> str:
    """Write a safetensors file whose tensors (``entries``, in this order, back to back) are
    produced piece by piece: ``fill(out)`` calls ``out(bytes_like)`` with the data section in
    order. Atomic (temporary file, fsync, rename; nothing left on error), canonical header;
    returns the file's sha256 (hex), computed while writing."""
    from .storage import atomic_write

    meta = _checked_metadata(metadata)
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    pos = 0
    for t in entries:
        nbytes = t.end - t.start
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = header_bytes(header)
    h = hashlib.sha256()

    def emit_file(f) -> None:
        def out(block) -> None:
            f.write(block)
            h.update(block)

        out(struct.pack("<Q", len(raw)))
        out(raw)
        fill(out)

    atomic_write(os.fspath(path), emit_file)  # the temporary file gets the umask's mode
    return h.hexdigest()


def canonical_header(path: str) -> None:
    """Rewrite a safetensors header as sorted, compact JSON so that equal tensors and metadata
    give equal bytes (and sha256) in every process: the library writes its metadata map in a
    per-process hash order. Offsets are relative to the data section, so only the header moves;
    when the canonical header has the same padded length it is overwritten in place."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        text = header_bytes(json.loads(f.read(n)))
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


def save_state_dict(state: Mapping[str, "torch.Tensor"], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` as safetensors atomically: a temporary file in the same folder, renamed
    over ``path`` only once complete, so a failure never leaves a half-written file."""
    from safetensors.torch import save_file

    meta = _checked_metadata(metadata) or None
    tensors = _independent_tensors(state)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        canonical_header(tmp)
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


