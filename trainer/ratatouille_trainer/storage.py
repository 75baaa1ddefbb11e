"""One storage interface over a local filesystem and S3-compatible object stores.

Every stage, the averaging and the local executor read and write results through this module, so
the same key layout (docs/contract.md, "Storage layout") works on `file://` and on `s3://`. Methods
take full URIs rather than keys relative to a root, so a weights URI in another bucket (or on the
local disk) can be read with the same object.

Design notes:
- No torch here (the operator imports this module too); boto3 is imported only when an S3
  backend is first used.
- Writes are atomic: the file backend writes a hidden temporary file and `os.replace`s it; an S3
  PUT or a completed multipart upload is atomic on the server. An upload that fails part way is
  retried from the start; the object only ever appears complete, and uploads are checked against
  the local size afterwards.
- Transient failures (connection resets, timeouts, 5xx, SlowDown, throttling) are retried here
  with exponential backoff and full jitter, on top of botocore's own retries, because s3transfer
  gives up on a multipart transfer after one failed part. Everything else becomes a
  `StorageError` whose one-line message names the URI.
- `DONE` is a completion marker: `mark_done` writes it after everything else and can check that
  the files it vouches for exist first. A prefix without `DONE` is not a result.
- Conditional writes (`read_versioned`, `write_if`, `delete_if`) are compare-and-swap on one
  small object, what `lease.py` builds its exclusive leases on: on S3 a PUT with
  `If-None-Match: *` (create only) or `If-Match: <ETag>` (replace only that version) and a DELETE
  with `If-Match`; locally a hard link of a complete temporary file (exclusive create, like
  O_EXCL but never seen half-written) and an in-place rewrite under `flock`.
"""
from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import http.client
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar
from urllib.parse import unquote

from ratatouille_contract.layout import DONE, SCHEME, join

__all__ = [
    "NotFound",
    "RetryPolicy",
    "Storage",
    "StorageError",
    "SyncStats",
    "TransientStorageError",
    "cache_dir_for",
    "local_cache_dir",
    "open_storage",
    "split_uri",
]

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 8 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MiB
_CHUNK = 1 * MiB
_TMP_PREFIX = ".ratatouille-tmp-"
SYNC_MANIFEST = ".ratatouille-sync.json"
#: Seconds between the progress saves of a sync's manifest (an interrupted sync resumes from the last).
SYNC_PROGRESS_EVERY_S = 10.0
#: Objects a sync fetches at once (``RATATOUILLE_SYNC_WORKERS``): a dataset is many small objects,
#: and one at a time the round trips, not the bytes, set the pace.
DEFAULT_SYNC_WORKERS = 8

T = TypeVar("T")
# --------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed; the message is one line and names the URI."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class NotFound(StorageError):
    """The object (or local file) does not exist."""


class TransientStorageError(StorageError):
    """A transient failure that persisted through every retry."""


# ------------------------------------------------------------------------------------------ URIs


def split_uri(uri: str) -> tuple[str, str, str]:
    """Split a storage URI into `(scheme, bucket_or_root, key)`.

    `s3://bucket/a/b` -> `("s3", "bucket", "a/b")`; `file:///abs/p` and plain paths (relative
    ones are made absolute) -> `("file", "/", "abs/p")`, so `os.path.join(root, key)` is the path.
    """
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"{uri!r}: not a storage URI")
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise StorageError(f"{uri}: S3 URI without a bucket")
        return "s3", bucket, key.strip("/")
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        host, sep, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"{uri}: file URIs must be local (file:///path)")
        path = unquote("/" + path) if sep else "/"
    elif SCHEME.match(uri):
        raise StorageError(f"{uri}: unsupported scheme (use file://, s3:// or a path)")
    else:
        path = uri
    path = os.path.abspath(os.path.expanduser(path))
    return "file", "/", path.lstrip("/")


def _scheme(uri: str) -> str:
    return split_uri(uri)[0]


def _local_path(uri: str) -> str:
    scheme, root, key = split_uri(uri)
    if scheme != "file":
        raise StorageError(f"{uri}: not a local path")
    return os.path.join(root, key)


def _relative_key(prefix_key: str, key: str) -> str:
    if not prefix_key:
        return key
    return key[len(prefix_key):].lstrip("/")


def _safe_relpath(rel: str, uri: str) -> str:
    """Refuse object keys that would escape the local directory they are synced into."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise StorageError(f"{uri}: unsafe object key for a local copy")
    return os.path.join(*parts)


def local_cache_dir() -> Path:
    """Where downloaded datasets and weights are cached: `$RATATOUILLE_CACHE_DIR` or
    `~/.cache/ratatouille` (not created here)."""
    env = os.environ.get("RATATOUILLE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ratatouille"


def cache_dir_for(uri: str) -> Path:
    """A stable local directory under `local_cache_dir()` for a copy of `uri`'s objects."""
    scheme, bucket, key = split_uri(uri)
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    tail = (key.rstrip("/").rsplit("/", 1)[-1] or bucket).replace(os.sep, "_") or "root"
    return local_cache_dir() / "sync" / f"{tail}-{digest}"


# ----------------------------------------------------------------------------------------- retry


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter (delay ~ U(0, min(max, base * 2**n)))."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 8.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        raw = os.environ.get("RATATOUILLE_STORAGE_ATTEMPTS")
        if raw:
            try:
                return cls(attempts=max(1, int(raw)))
            except ValueError:
                raise StorageError(f"RATATOUILLE_STORAGE_ATTEMPTS={raw!r}: not an integer")
        return cls()

    def delay(self, failures: int) -> float:
        cap = min(self.max_delay, self.base_delay * (2 ** max(0, failures - 1)))
        return self.rng.uniform(0, cap)


# ------------------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class SyncStats:
    local_dir: str
    copied: int
    skipped: int


class Storage:
    """The storage interface. Every method takes a full URI; a URI of the other scheme is
    handed to a sibling backend, so `s3://` and `file://` URIs can both be read from one object.
    """

    scheme = ""

    def __init__(self, root: str, *, endpoint: str | None = None, retry: RetryPolicy | None = None,
                 **options: Any):
        self.root = root
        self.endpoint = endpoint
        self.retry = retry or RetryPolicy.from_env()
        self.options = options
        self.retries = 0  # transient failures retried so far (observability and tests)
        self._siblings: dict[str, Storage] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def _for(self, uri: str) -> "Storage":
        scheme = _scheme(uri)
        if scheme == self.scheme:
            return self
        with self._lock:
            if scheme not in self._siblings:
                cls = _BACKENDS[scheme]
                self._siblings[scheme] = cls(uri, endpoint=self.endpoint, retry=self.retry,
                                             **self.options)
            return self._siblings[scheme]

    # --- public API (dispatch) ---
    def exists(self, uri: str) -> bool:
        return self._for(uri)._exists(uri)

    def read_bytes(self, uri: str) -> bytes:
        return self._for(uri)._read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._for(uri)._write_bytes(uri, bytes(data))

    def read_text(self, uri: str) -> str:
        data = self.read_bytes(uri)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise StorageError(f"{uri}: not UTF-8 text")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        data = self.read_bytes(uri)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise StorageError(f"{uri}: invalid JSON ({exc})")

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def download(self, uri: str, local_path: str | os.PathLike) -> str:
        """Copy one object to `local_path` (atomically replaced); returns the local path."""
        local_path = os.fspath(local_path)
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self._for(uri)._download(uri, local_path)
        return local_path

    def upload(self, local_path: str | os.PathLike, uri: str) -> None:
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise NotFound(f"{local_path}: local file not found (uploading to {uri})")
        self._for(uri)._upload(local_path, uri)

    def list(self, prefix_uri: str) -> list[str]:
        """Every object under the prefix (recursively), as URIs in the prefix's style, sorted."""
        return [join(prefix_uri, rel) for rel, _, _ in self._for(prefix_uri)._walk(prefix_uri)]

    def entries(self, prefix_uri: str) -> list[tuple[str, int, str]]:
        """Every object under the prefix as ``(relative key, size, ETag or mtime)``, sorted
        (one LIST per 1000 objects on S3)."""
        return self._for(prefix_uri)._walk(prefix_uri)

    def delete_prefix(self, prefix_uri: str) -> int:
        """Delete every object under the prefix; returns how many were deleted."""
        return self._for(prefix_uri)._delete_prefix(prefix_uri)

    def delete(self, uri: str) -> None:
        self._for(uri)._delete(uri)

    def size(self, uri: str) -> int:
        return self._for(uri)._stat(uri)[0]

    def open_read(self, uri: str, start: int = 0, *, etag: str | None = None) -> "ObjectStream":
        """An S3 object's bytes from ``start``, read as they are consumed (:class:`ObjectStream`:
        one GET held open, a broken transfer resumed); ``etag`` pins the version to read."""
        return self._for(uri)._open_read(uri, start, etag)

    def etag_or_mtime(self, uri: str) -> str:
        """A version token that changes when the object changes (S3 ETag, or mtime+size)."""
        return self._for(uri)._stat(uri)[1]

    def sha256_of(self, uri: str) -> str:
        return self._for(uri)._sha256(uri)

    def sync_to_local(self, prefix_uri: str, local_dir: str | os.PathLike | None = None) -> str:
        """Make the objects under `prefix_uri` available locally; returns the local directory
        (for a local prefix, the directory itself: nothing is copied)."""
        return self.sync_to_local_stats(prefix_uri, local_dir).local_dir

    def sync_to_local_stats(self, prefix_uri: str,
                            local_dir: str | os.PathLike | None = None) -> SyncStats:
        if local_dir is None:
            local_dir = cache_dir_for(prefix_uri)
        return self._for(prefix_uri)._sync(prefix_uri, os.fspath(local_dir))

    def mark_done(self, prefix_uri: str, payload: dict | None = None, *,
                  require: Iterable[str] = ()) -> str:
        """Write `<prefix>/DONE` (JSON payload). Call it after everything else is written;
        names in `require` are checked to exist first, so DONE never vouches for missing work."""
        for name in require:
            target = join(prefix_uri, name)
            if not self.exists(target):
                raise StorageError(f"{target}: missing, refusing to mark {prefix_uri} done")
        done = join(prefix_uri, DONE)
        body = dict(payload or {})
        body.setdefault("doneAt", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.write_json(done, body)
        return done

    def is_done(self, prefix_uri: str) -> bool:
        return self.exists(join(prefix_uri, DONE))

    def read_done(self, prefix_uri: str) -> dict | None:
        done = join(prefix_uri, DONE)
        try:
            payload = self.read_json(done)
        except NotFound:
            return None
        return payload if isinstance(payload, dict) else {}

    # --- conditional writes (compare-and-swap on one small object; lease.py) ---
    def read_versioned(self, uri: str) -> tuple[bytes, str, float] | None:
        """``(data, version, age)`` of the object, or None when it does not exist. ``version``
        changes with every write; ``age`` is seconds since its last write by the store's own
        clock (S3: the response's Date minus Last-Modified, 1 s resolution; a file: its mtime)."""
        return self._for(uri)._read_versioned(uri)

    def write_if(self, uri: str, data: bytes, *, match: str | None) -> str | None:
        """Write ``data`` only if the object does not exist (``match=None``) or is still at
        version ``match``; returns the new version, or None when the condition does not hold."""
        return self._for(uri)._write_if(uri, bytes(data), match)

    def delete_if(self, uri: str, match: str) -> bool:
        """Delete the object only if it is still at version ``match``; True when deleted."""
        return self._for(uri)._delete_if(uri, match)

    # --- backend primitives ---
    def _read_versioned(self, uri: str) -> tuple[bytes, str, float] | None: raise NotImplementedError
    def _write_if(self, uri: str, data: bytes, match: str | None) -> str | None: raise NotImplementedError
    def _delete_if(self, uri: str, match: str) -> bool: raise NotImplementedError
    def _exists(self, uri: str) -> bool: raise NotImplementedError
    def _read_bytes(self, uri: str) -> bytes: raise NotImplementedError
    def _write_bytes(self, uri: str, data: bytes) -> None: raise NotImplementedError
    def _download(self, uri: str, local_path: str) -> None: raise NotImplementedError
    def _upload(self, local_path: str, uri: str) -> None: raise NotImplementedError
    def _walk(self, prefix_uri: str) -> list[tuple[str, int, str]]: raise NotImplementedError
    def _delete_prefix(self, prefix_uri: str) -> int: raise NotImplementedError
    def _delete(self, uri: str) -> None: raise NotImplementedError
    def _stat(self, uri: str) -> tuple[int, str]: raise NotImplementedError
    def _sha256(self, uri: str) -> str: raise NotImplementedError
    def _open_read(self, uri: str, start: int, etag: str | None) -> "ObjectStream":
        raise StorageError(f"{uri}: streamed reads are for s3:// objects; open a local file directly")
    def _sync(self, prefix_uri: str, local_dir: str) -> SyncStats: raise NotImplementedError


# ---------------------------------------------------------------------------------- local files


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under the process umask (0666 & ~umask): what an
    output written through a private temporary file must get before it is renamed into place."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write: Callable[[Any], None], *, durable: bool = True) -> None:
    """Write ``path`` through a temporary file renamed into place (with the umask's mode);
    ``durable=False`` skips the fsync, for local copies that a later sync can fetch again."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), new_file_mode())  # mkstemp made it 0600: honour the umask
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _os_error(uri: str, exc: OSError) -> StorageError:
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        return NotFound(f"{uri}: not found")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri}: is a directory")
    if isinstance(exc, NotADirectoryError):
        return NotFound(f"{uri}: not found (a parent is not a directory)")
    return StorageError(f"{uri}: {exc.strerror or exc}")


class LocalStorage(Storage):
    """`file://` URIs and plain paths."""

    scheme = "file"

    def _exists(self, uri: str) -> bool:
        return os.path.isfile(_local_path(uri))

    def _read_bytes(self, uri: str) -> bytes:
        try:
            with open(_local_path(uri), "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise _os_error(uri, exc) from None

    def _write_bytes(self, uri: str, data: bytes) -> None:
        try:
            atomic_write(_local_path(uri), lambda fh: fh.write(data))
        except OSError as exc:
            raise _os_error(uri, exc) from None

    def _copy(self, src: str, dst: str, src_name: str, dst_name: str) -> None:
        try:
            src_fh = open(src, "rb")
        except OSError as exc:
            raise _os_error(src_name, exc) from None
        try:
            with src_fh:
                atomic_write(dst, lambda fh: shutil.copyfileobj(src_fh, fh, _CHUNK))
        except OSError as exc:
            raise _os_error(dst_name, exc) from None

    def _download(self, uri: str, local_path: str) -> None:
        src = _local_path(uri)
        if os.path.abspath(src) == os.path.abspath(local_path):
            if not os.path.isfile(src):
                raise NotFound(f"{uri}: not found")
            return
        self._copy(src, local_path, uri, local_path)

    def _upload(self, local_path: str, uri: str) -> None:
        dst = _local_path(uri)
        if os.path.abspath(dst) == os.path.abspath(local_path):
            return
        self._copy(local_path, dst, local_path, uri)

    def _walk(self, prefix_uri: str) -> list[tuple[str, int, str]]:
        base = _local_path(prefix_uri)
        out = []
        if not os.path.isdir(base):
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue  # an atomic write in progress (or abandoned), never an object
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                out.append((rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
        out.sort()
        return out

    def _delete_prefix(self, prefix_uri: str) -> int:
        path = _local_path(prefix_uri)
        if not os.path.isdir(path):
            return 0
        count = len(self._walk(prefix_uri))
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise _os_error(prefix_uri, exc) from None
        return count

    def _delete(self, uri: str) -> None:
        try:
            os.unlink(_local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _os_error(uri, exc) from None

    def _stat(self, uri: str) -> tuple[int, str]:
        path = _local_path(uri)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _os_error(uri, exc) from None
        if not os.path.isfile(path):
            raise StorageError(f"{uri}: is a directory")
        return st.st_size, f"{st.st_mtime_ns}-{st.st_size}"

    def _sha256(self, uri: str) -> str:
        digest = hashlib.sha256()
        try:
            with open(_local_path(uri), "rb") as fh:
                for block in iter(lambda: fh.read(_CHUNK), b""):
                    digest.update(block)
        except OSError as exc:
            raise _os_error(uri, exc) from None
        return digest.hexdigest()

    # Conditional writes. Every reader and writer of such an object takes flock on it (shared
    # to read, exclusive to change), and a changer checks, under its lock, that the path still
    # names the inode it locked (a deleted or replaced file is a failed condition). A new object
    # appears with link(2) of a complete temporary file: exclusive (EEXIST when it exists) and
    # never seen half-written. The version is a digest of the content.
    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:32]

    def _locked(self, uri: str, mode: int):
        """``(fd, data, version, age)`` with ``mode`` (LOCK_SH/LOCK_EX) held, or None when absent."""
        path = _local_path(uri)
        while True:
            try:
                fd = os.open(path, os.O_RDWR if mode == fcntl.LOCK_EX else os.O_RDONLY)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _os_error(uri, exc) from None
            try:
                fcntl.flock(fd, mode)
                st = os.fstat(fd)
                try:
                    same = os.stat(path).st_ino == st.st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    data = b""
                    while True:
                        block = os.pread(fd, _CHUNK, len(data))
                        if not block:
                            break
                        data += block
                    return fd, data, self._version(data), max(0.0, time.time() - st.st_mtime)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # deleted or replaced while we waited for the lock: look again

    def _read_versioned(self, uri: str) -> tuple[bytes, str, float] | None:
        got = self._locked(uri, fcntl.LOCK_SH)
        if got is None:
            return None
        os.close(got[0])
        return got[1], got[2], got[3]

    def _write_if(self, uri: str, data: bytes, match: str | None) -> str | None:
        path = _local_path(uri)
        if match is None:
            directory = os.path.dirname(path)
            try:
                os.makedirs(directory, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        os.fchmod(fh.fileno(), new_file_mode())
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.link(tmp, path)
                except FileExistsError:
                    return None
                finally:
                    os.unlink(tmp)
            except OSError as exc:
                raise _os_error(uri, exc) from None
            return self._version(data)

        def rewrite(fd: int) -> str:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            return self._version(data)
        return self._swap(uri, match, rewrite)

    def _delete_if(self, uri: str, match: str) -> bool:
        return bool(self._swap(uri, match, lambda fd: os.unlink(_local_path(uri)) or True))

    def _swap(self, uri: str, match: str, change: Callable[[int], T]) -> T | None:
        """``change(fd)`` under the exclusive lock if the object is still at version ``match``;
        None when it is not (or is gone)."""
        got = self._locked(uri, fcntl.LOCK_EX)
        if got is None:
            return None
        fd, _, version, _ = got
        try:
            return change(fd) if version == match else None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error(uri, exc) from None
        finally:
            os.close(fd)

    def _sync(self, prefix_uri: str, local_dir: str) -> SyncStats:
        path = _local_path(prefix_uri)
        if not os.path.isdir(path):
            raise NotFound(f"{prefix_uri}: not found (no such directory)")
        return SyncStats(local_dir=path, copied=0, skipped=len(self._walk(prefix_uri)))


# -------------------------------------------------------------------------------------------- S3

_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException", "TooManyRequests",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "InternalError",
    "ServiceUnavailable", "ServerBusy", "BandwidthLimitExceeded", "RequestLimitExceeded",
    "EC2ThrottledException", "IDPCommunicationError", "PriorRequestNotComplete", "500", "502",
    "503", "504",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled"}


class _Truncated(Exception):
    """An upload or download whose size does not match: treated as transient."""


class _MalformedResponse(_Truncated):
    """A response whose headers were cut off by a dropped connection."""


def _reject_unframed_response(response_dict: dict, **_: Any) -> None:
    """A 2xx S3 response always carries Content-Length or chunked encoding. One with neither
    means the connection dropped inside the header block: http.client then stops at EOF, and
    botocore would parse the missing headers and empty body as a successful, empty answer
    (an empty object, a multipart upload without an UploadId). Treat it as a transient error."""
    status = int(response_dict.get("status_code") or 0)
    if not 200 <= status < 300 or status in (204, 205):
        return
    headers = response_dict.get("headers") or {}
    if "content-length" in headers or "transfer-encoding" in headers:
        return
    raise _MalformedResponse(f"HTTP {status} response without framing headers (truncated)")


def _drop_expect_continue(request: Any, **_: Any) -> None:
    """Send bodies without `Expect: 100-continue`. botocore reads the interim response with a
    loop that spins forever on EOF, so a connection dropped inside "HTTP/1.1 100 Continue"
    hangs the process at 100% CPU. The header is not signed (SigV4 skips it); the cost is
    sending a body the server then rejects (auth errors), at most one part."""
    request.headers.pop("Expect", None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _expand(exc: BaseException) -> list[BaseException]:
    """The exception, its causes, and the `.last_exception` s3transfer keeps on retry errors."""
    out = []
    for e in _chain(exc):
        out.append(e)
        last = getattr(e, "last_exception", None)
        if isinstance(last, BaseException):
            out.extend(_chain(last))
    return out


def _client_error_info(exc: BaseException) -> tuple[str, int, str] | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict) or "Error" not in response and "ResponseMetadata" not in response:
        return None
    err = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    code = str(err.get("Code") or status or "")
    return code, status, str(err.get("Message") or "")


def _is_transient(exc: BaseException) -> bool:
    from botocore import exceptions as bce

    transient_types: tuple[type, ...] = (
        bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError, bce.ChecksumError,
        ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException, _Truncated,
    )
    try:
        from urllib3 import exceptions as u3e
        transient_types += (u3e.ProtocolError, u3e.TimeoutError, u3e.IncompleteRead)
    except ImportError:  # pragma: no cover
        pass
    try:
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded
        from boto3.exceptions import RetriesExceededError
        transient_types += (TransferRetriesExceeded, RetriesExceededError)
    except ImportError:  # pragma: no cover
        pass
    for e in _expand(exc):
        info = _client_error_info(e)
        if info is not None:
            code, status, _ = info
            # a definite answer from the server decides it, whatever wraps it
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, transient_types):
            return True
    return False


def _s3_error(uri: str, op: str, exc: BaseException) -> StorageError:
    for e in _expand(exc):
        info = _client_error_info(e)
        if info is None:
            continue
        code, status, message = info
        bucket = split_uri(uri)[1] if uri.startswith("s3://") else ""
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"{uri}: not found")
        if code in _DENIED_CODES or status == 403:
            return StorageError(f"{uri}: access denied ({code}); check the storage credentials")
        return StorageError(f"{uri}: {op} failed: {code} {message}".rstrip())
    from botocore import exceptions as bce
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
        return StorageError(f"{uri}: no S3 credentials (set AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY or RATATOUILLE_CREDENTIALS_DIR)")
    return StorageError(f"{uri}: {op} failed: {type(exc).__name__}: {exc}")


def _read_secret_dir(directory: str) -> dict[str, str]:
    """Read a mounted Kubernetes Secret holding AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY files."""
    out = {}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_DEFAULT_REGION"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
            if value:
                out[name] = value
    if "AWS_ACCESS_KEY_ID" in out and "AWS_SECRET_ACCESS_KEY" in out:
        return out
    return {}


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    for value in (endpoint, os.environ.get("RATATOUILLE_S3_ENDPOINT"),
                  os.environ.get("AWS_ENDPOINT_URL")):
        if value:
            return value
    return None


class S3Storage(Storage):
    """`s3://bucket/key` on AWS S3 or any S3-compatible endpoint (MinIO, Ceph RGW, moto).

    Options: `multipart_threshold`, `multipart_chunksize`, `max_concurrency`,
    `botocore_attempts` (botocore's own retries, under ours), `connect_timeout`, `read_timeout`.
    """

    scheme = "s3"

    def __init__(self, root: str, *, endpoint: str | None = None,
                 retry: RetryPolicy | None = None, **options: Any):
        super().__init__(root, endpoint=resolve_endpoint(endpoint), retry=retry, **options)
        self._client = None
        self._client_lock = threading.Lock()

    # --- client ---
    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        creds: dict[str, str] = {}
        secret_dir = os.environ.get("RATATOUILLE_CREDENTIALS_DIR")
        if secret_dir and os.path.isdir(secret_dir):
            creds = _read_secret_dir(secret_dir)
        region = (creds.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or os.environ.get("AWS_REGION") or "us-east-1")
        # The default chain covers AWS_* env vars, AWS_SHARED_CREDENTIALS_FILE and AWS_PROFILE.
        session = boto3.session.Session(
            aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=creds.get("AWS_SESSION_TOKEN"),
            region_name=region,
        )
        opts = self.options
        config = Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": int(opts.get("botocore_attempts", 3)),
                     "mode": "standard"},
            connect_timeout=float(opts.get("connect_timeout", 10)),
            read_timeout=float(opts.get("read_timeout", 60)),
            # streaming averages keep one GET open per member (up to averaging.MAX_STREAMS = 64)
            max_pool_connections=max(72, int(opts.get("max_concurrency", 4)) * 2),
            # Only send/validate flexible checksums when an operation needs them: several
            # S3-compatible servers reject the newer default trailers. Integrity is kept by
            # Content-MD5 on PUTs and a size check after transfers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = session.client("s3", endpoint_url=self.endpoint, config=config)
        client.meta.events.register("before-parse.s3.*", _reject_unframed_response)
        client.meta.events.register("before-send.s3.*", _drop_expect_continue)
        return client

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        opts = self.options
        return TransferConfig(
            multipart_threshold=int(opts.get("multipart_threshold", DEFAULT_MULTIPART_THRESHOLD)),
            multipart_chunksize=int(opts.get("multipart_chunksize", DEFAULT_MULTIPART_CHUNKSIZE)),
            max_concurrency=int(opts.get("max_concurrency", 4)),
            num_download_attempts=3,
        )

    # --- retry ---
    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        policy = self.retry
        failures = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:  # classified below; nothing is swallowed
                if not _is_transient(exc):
                    raise _s3_error(uri, op, exc) from None
                failures += 1
                if failures >= policy.attempts:
                    raise TransientStorageError(
                        f"{uri}: {op} failed after {failures} attempts: "
                        f"{type(exc).__name__}: {exc}") from None
                with self._lock:
                    self.retries += 1
                policy.sleep(policy.delay(failures))

    @staticmethod
    def _bk(uri: str) -> tuple[str, str]:
        scheme, bucket, key = split_uri(uri)
        if scheme != "s3":
            raise StorageError(f"{uri}: not an s3:// URI")
        return bucket, key

    def _object_bk(self, uri: str) -> tuple[str, str]:
        bucket, key = self._bk(uri)
        if not key:
            raise StorageError(f"{uri}: names a bucket, not an object")
        return bucket, key

    @staticmethod
    def _prefix_key(key: str) -> str:
        return key.rstrip("/") + "/" if key else ""

    # --- primitives ---
    def _head(self, uri: str) -> dict | None:
        bucket, key = self._object_bk(uri)

        def head():
            from botocore.exceptions import ClientError
            try:
                return self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                info = _client_error_info(exc)
                if info and (info[0] in _NOT_FOUND_CODES) and info[0] != "NoSuchBucket":
                    return None
                raise
        return self._call("head", uri, head)

    def _exists(self, uri: str) -> bool:
        return self._head(uri) is not None

    def _open_read(self, uri: str, start: int, etag: str | None) -> "ObjectStream":
        return ObjectStream(self, uri, start, etag)

    def _read_bytes(self, uri: str) -> bytes:
        bucket, key = self._object_bk(uri)

        def get():
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
            expected = resp.get("ContentLength")
            if expected is not None and len(data) != int(expected):
                raise _Truncated(f"read {len(data)} of {expected} bytes")
            return data
        return self._call("read", uri, get)

    def _write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = self._object_bk(uri)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        self._call("write", uri, lambda: self.client.put_object(
            Bucket=bucket, Key=key, Body=data, ContentMD5=md5))

    def _download(self, uri: str, local_path: str) -> None:
        bucket, key = self._object_bk(uri)
        directory = os.path.dirname(os.path.abspath(local_path))

        def get():
            head = self.client.head_object(Bucket=bucket, Key=key)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
            os.close(fd)
            try:
                self.client.download_file(bucket, key, tmp, Config=self._transfer_config())
                got = os.path.getsize(tmp)
                if got != int(head["ContentLength"]):
                    raise _Truncated(f"downloaded {got} of {head['ContentLength']} bytes")
                os.replace(tmp, local_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self._call("download", uri, get)

    def _upload(self, local_path: str, uri: str) -> None:
        bucket, key = self._object_bk(uri)
        expected = os.path.getsize(local_path)

        def put():
            # An interrupted multipart upload is aborted by s3transfer and never becomes an
            # object; a retry starts over. The size check catches any server that disagrees.
            self.client.upload_file(local_path, bucket, key, Config=self._transfer_config())
            head = self.client.head_object(Bucket=bucket, Key=key)
            if int(head["ContentLength"]) != expected:
                raise _Truncated(f"stored {head['ContentLength']} of {expected} bytes")
        self._call("upload", uri, put)

    def _walk(self, prefix_uri: str) -> list[tuple[str, int, str]]:
        bucket, key = self._bk(prefix_uri)
        prefix = self._prefix_key(key)

        def walk():
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", ()):
                    rel = _relative_key(prefix, obj["Key"])
                    if rel and not obj["Key"].endswith("/"):
                        out.append((rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
            out.sort()
            return out
        return self._call("list", prefix_uri, walk)

    def _delete_prefix(self, prefix_uri: str) -> int:
        bucket, key = self._bk(prefix_uri)
        prefix = self._prefix_key(key)
        entries = self._walk(prefix_uri)
        keys = [prefix + rel for rel, _, _ in entries]
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]

            def delete(batch=batch):
                resp = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                errors = resp.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise StorageError(f"s3://{bucket}/{first.get('Key')}: delete failed: "
                                       f"{first.get('Code')} {first.get('Message', '')}")
            self._call("delete", prefix_uri, delete)
        return len(keys)

    def _delete(self, uri: str) -> None:
        bucket, key = self._object_bk(uri)
        self._call("delete", uri, lambda: self.client.delete_object(Bucket=bucket, Key=key))

    # --- conditional writes ---
    def _conditional(self, op: str, uri: str, fn: Callable[[], T]) -> T | None:
        """``fn`` through the retries; None when its condition does not hold: 412
        PreconditionFailed, 409 ConditionalRequestConflict (a concurrent conditional write; the
        caller reads again) or, for If-Match, an object that no longer exists."""
        from botocore.exceptions import ClientError

        def call():
            try:
                return fn()
            except ClientError as exc:
                info = _client_error_info(exc)
                if info and (info[1] in (409, 412) or info[0] in ("PreconditionFailed",
                                                                  "ConditionalRequestConflict")
                             or (info[0] in _NOT_FOUND_CODES and info[0] != "NoSuchBucket")):
                    return None
                raise
        return self._call(op, uri, call)

    def _read_versioned(self, uri: str) -> tuple[bytes, str, float] | None:
        import email.utils

        bucket, key = self._object_bk(uri)

        def get():
            from botocore.exceptions import ClientError
            try:
                resp = self.client.get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                info = _client_error_info(exc)
                if info and info[0] in _NOT_FOUND_CODES and info[0] != "NoSuchBucket":
                    return None
                raise
            with resp["Body"] as body:
                data = body.read()
            if len(data) != int(resp.get("ContentLength", len(data))):
                raise _Truncated(f"read {len(data)} of {resp['ContentLength']} bytes")
            age = 0.0
            date = (resp.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
            if date and resp.get("LastModified") is not None:
                now = email.utils.parsedate_to_datetime(date)
                age = max(0.0, (now - resp["LastModified"]).total_seconds())
            return data, str(resp.get("ETag", "")), age
        return self._call("read", uri, get)

    def _write_if(self, uri: str, data: bytes, match: str | None) -> str | None:
        bucket, key = self._object_bk(uri)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        cond = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        resp = self._conditional("conditional write", uri, lambda: self.client.put_object(
            Bucket=bucket, Key=key, Body=data, ContentMD5=md5, **cond))
        return None if resp is None else str(resp.get("ETag", ""))

    def _delete_if(self, uri: str, match: str) -> bool:
        bucket, key = self._object_bk(uri)
        resp = self._conditional("conditional delete", uri, lambda: self.client.delete_object(
            Bucket=bucket, Key=key, IfMatch=match))
        return resp is not None

    def _stat(self, uri: str) -> tuple[int, str]:
        head = self._head(uri)
        if head is None:
            raise NotFound(f"{uri}: not found")
        return int(head["ContentLength"]), str(head.get("ETag", "")).strip('"')

    def _sha256(self, uri: str) -> str:
        bucket, key = self._object_bk(uri)

        def digest():
            h = hashlib.sha256()
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"]
            n = 0
            try:
                for block in body.iter_chunks(_CHUNK):
                    h.update(block)
                    n += len(block)
            finally:
                body.close()
            if n != int(resp["ContentLength"]):
                raise _Truncated(f"read {n} of {resp['ContentLength']} bytes")
            return h.hexdigest()
        return self._call("sha256", uri, digest)

    def _sync(self, prefix_uri: str, local_dir: str) -> SyncStats:
        entries = self._walk(prefix_uri)
        if not entries:
            raise NotFound(f"{prefix_uri}: not found (no objects under this prefix)")
        os.makedirs(local_dir, exist_ok=True)
        manifest_path = os.path.join(local_dir, SYNC_MANIFEST)
        manifest: dict[str, dict] = {}
        if os.path.isfile(manifest_path):
            try:
                with open(manifest_path, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                if isinstance(loaded, dict) and loaded.get("source") == prefix_uri.rstrip("/"):
                    manifest = dict(loaded.get("objects") or {})
            except (OSError, ValueError):
                manifest = {}  # a damaged manifest only costs a re-download
        skipped = 0
        todo = []
        for rel, size, etag in entries:
            local = os.path.join(local_dir, _safe_relpath(rel, join(prefix_uri, rel)))
            recorded = manifest.get(rel) or {}
            if (os.path.isfile(local) and os.path.getsize(local) == size
                    and recorded.get("etag", etag) == etag):
                skipped += 1
                manifest[rel] = {"size": size, "etag": etag}
            else:
                todo.append((rel, size, etag, local))
        copied = self._fetch_all(prefix_uri, todo, manifest,
                                 lambda: _write_manifest(manifest_path, prefix_uri, manifest))
        # Objects deleted upstream go locally too: the copy mirrors the prefix, no more.
        wanted = {rel for rel, _, _ in entries}
        for rel in [r for r in manifest if r not in wanted]:
            del manifest[rel]
        _write_manifest(manifest_path, prefix_uri, manifest)
        _prune_local(local_dir, {os.path.join(local_dir, _safe_relpath(r, prefix_uri)) for r in wanted})
        return SyncStats(local_dir=local_dir, copied=copied, skipped=skipped)

    def _fetch_all(self, prefix_uri: str, todo: list, manifest: dict, save: Callable[[], None]) -> int:
        """Fetch ``(rel, size, etag, local)`` objects with a few threads, recording each one in
        ``manifest`` as it lands and saving it every :data:`SYNC_PROGRESS_EVERY_S` seconds (it is
        rewritten whole: saving it every k objects made a large sync quadratic). On an error the
        fetches not yet started are dropped, those running finish, what landed is saved, and
        the first error is raised."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        workers = max(1, int(os.environ.get("RATATOUILLE_SYNC_WORKERS") or DEFAULT_SYNC_WORKERS))
        saved, copied, error = time.monotonic(), 0, None
        with ThreadPoolExecutor(workers, thread_name_prefix="ratatouille-sync") as pool:
            pending: dict = {}
            queue = iter(todo)
            while True:
                for item in queue:                  # keep a bounded number of fetches queued
                    rel, size, etag, local = item
                    pending[pool.submit(self._fetch, join(prefix_uri, rel), _ensure_parent(local),
                                        size, etag)] = item
                    if len(pending) >= 4 * workers:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    rel, size, etag, _ = pending.pop(fut)
                    if fut.exception() is not None:
                        error = error or fut.exception()
                        continue
                    manifest[rel] = {"size": size, "etag": etag}
                    copied += 1
                if error is not None:
                    for fut in pending:
                        fut.cancel()
                    wait(pending)
                    for fut, (rel, size, etag, _) in pending.items():
                        if not fut.cancelled() and fut.exception() is None:
                            manifest[rel] = {"size": size, "etag": etag}
                    save()
                    raise error
                if time.monotonic() - saved >= SYNC_PROGRESS_EVERY_S:
                    save()
                    saved = time.monotonic()
        return copied

    def _fetch(self, uri: str, local_path: str, size: int, etag: str) -> None:
        """One object of a sync: objects under the multipart threshold in one GET, pinned to
        the listed ETag (an object replaced since the listing fails rather than being recorded
        under the old one), checked against the listed size; larger ones as :meth:`_download`."""
        threshold = int(self.options.get("multipart_threshold", DEFAULT_MULTIPART_THRESHOLD))
        if size >= threshold or not etag:
            return self._download(uri, local_path)
        bucket, key = self._object_bk(uri)

        def get() -> None:
            resp = self.client.get_object(Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
            with resp["Body"] as body:
                data = body.read()
            if len(data) != size:
                raise _Truncated(f"read {len(data)} of the {size} bytes listed")
            atomic_write(local_path, lambda fh: fh.write(data), durable=False)
        self._call("download", uri, get)


class ObjectStream:
    """``readinto`` over one S3 object from byte ``start``: one GET, read as it is consumed (the
    unread rest waits in the connection, not in memory). A transfer that breaks part way resumes
    from the byte it reached with a ranged GET pinned to the first answer's ETag (an object
    replaced meanwhile fails with PreconditionFailed rather than mixing two versions), under the
    storage's retry policy. ``size`` is the object's, ``pos`` the next byte, ``gets`` the GETs made."""

    def __init__(self, s3: "S3Storage", uri: str, start: int = 0, etag: str | None = None) -> None:
        self._s3, self.uri, self.pos, self.etag = s3, uri, int(start), etag
        self.size: int | None = None
        self.gets = 0
        self._body: Any = None
        self._raw: Any = None
        s3._call("read", uri, self._open)

    def _open(self) -> None:
        bucket, key = self._s3._object_bk(self.uri)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if self.pos:
            kwargs["Range"] = f"bytes={self.pos}-" + (str(self.size - 1) if self.size else "")
        if self.etag:
            kwargs["IfMatch"] = self.etag
        self.gets += 1
        resp = self._s3.client.get_object(**kwargs)
        body, length = resp["Body"], int(resp["ContentLength"])
        total = str(resp.get("ContentRange") or "").rpartition("/")[2]
        size = int(total) if total.isdigit() else self.pos + length
        if (self.size is not None and size != self.size) or self.pos + length != size:
            body.close()
            raise StorageError(f"{self.uri}: the server answered a read from byte {self.pos} "
                               f"with {length} bytes of {size}")
        self.size, self.etag = size, self.etag or resp.get("ETag")
        # straight into the caller's buffer when the body exposes http.client's response
        # (botocore asks urllib3 for the undecoded bytes: the same content, one copy less)
        raw = getattr(getattr(body, "_raw_stream", None), "_fp", None)
        self._body, self._raw = body, raw if hasattr(raw, "readinto") else None

    def _read_once(self, mv: memoryview) -> int:
        try:
            if self._body is None:
                self._open()
            if self._raw is not None:
                n = self._raw.readinto(mv) or 0
            else:
                data = self._body.read(len(mv))
                n = len(data)
                mv[:n] = data
            if not n and len(mv) and self.pos < self.size:
                raise _Truncated(f"stream ended at byte {self.pos} of {self.size}")
        except Exception:
            self.close()  # resumed, if at all, by a ranged GET from self.pos
            raise
        self.pos += n
        return n

    def readinto(self, mv: memoryview) -> int:
        return self._s3._call("read", self.uri, lambda: self._read_once(mv))

    def close(self) -> None:
        body, self._body, self._raw = self._body, None, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection: nothing left to lose
                pass


def _prune_local(local_dir: str, keep: set[str]) -> None:
    """Remove every file under ``local_dir`` that is not in ``keep`` (nor the sync manifest),
    then the directories left empty. Links are removed, never followed."""
    keep = keep | {os.path.join(local_dir, SYNC_MANIFEST)}
    for dirpath, dirnames, filenames in os.walk(local_dir, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            if full not in keep:
                try:
                    os.unlink(full)
                except OSError:
                    pass
        if dirpath != local_dir:
            try:
                os.rmdir(dirpath)  # only succeeds when empty
            except OSError:
                pass


def _ensure_parent(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _write_manifest(path: str, prefix_uri: str, objects: dict) -> None:
    payload = json.dumps({"source": prefix_uri.rstrip("/"), "objects": objects}, sort_keys=True)
    atomic_write(path, lambda fh: fh.write(payload.encode("utf-8")))


_BACKENDS: dict[str, type[Storage]] = {"file": LocalStorage, "s3": S3Storage}


def open_storage(uri: str, endpoint: str | None = None, *, retry: RetryPolicy | None = None,
                 **options: Any) -> Storage:
    """The backend for `uri`'s scheme: `file:///abs`, a plain path, or `s3://bucket/prefix`
    (endpoint from the argument, `RATATOUILLE_S3_ENDPOINT` or `AWS_ENDPOINT_URL`)."""
    return _BACKENDS[_scheme(uri)](uri, endpoint=endpoint, retry=retry, **options)
