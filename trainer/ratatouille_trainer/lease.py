"""One writer per member prefix: an exclusive lease object, renewed while the writer works.

A trainer takes ``<prefix>/LEASE`` before it writes anything under its member's prefix, renews
it from a background thread every third of its TTL, and deletes it when it is done (or has
failed). Two trainers of one member (two ``ratatouille run`` of one manifest, two runs on a
cluster needing the same auxiliary at once) thus never train it together:

- The lease is created only if absent (S3: ``PUT`` with ``If-None-Match: *``; a file: a hard
  link of a complete temporary file, which fails when the lease exists, like ``O_EXCL``).
- A second writer that finds a live lease held by another **waits** for it, polling, up to
  ``RATATOUILLE_LEASE_WAIT`` seconds (default 6 hours; 0 fails at once). When the holder is done
  it deletes its lease; the waiter takes it, finds ``DONE`` and exits 0 as "already complete" (a
  cache hit): it trains nothing and deletes nothing. If the wait runs out it exits 1 with one
  line naming the prefix and the holder (:class:`LeaseBusy`). While it waits it uses no
  accelerator time beyond holding its allocation.
- A lease expires when it has not been renewed for its TTL (``RATATOUILLE_LEASE_TTL``, default
  60 s; the holder's own TTL, written in the lease, is what others apply), measured by the
  store's clock (S3 Last-Modified against the response's Date; a file's mtime), so a holder
  that died (SIGKILL, node lost) blocks the prefix at most one TTL. An expired lease is taken
  over with a compare-and-swap on the version read (S3 ``If-Match: <ETag>``; locally under
  ``flock``), so of two takers exactly one wins.
- A holder on this very host (same hostname, boot id and pid namespace) whose process is gone
  (no such pid, or a pid reused by a process started later) is taken over at once: an embedded
  run killed with SIGKILL resumes without waiting for the TTL.
- A holder that could not renew for a whole TTL (paused, partitioned) may have been taken over:
  it finds out at its next renewal or check and stops with :class:`LeaseLost` before writing
  more. Its checkpoints are under its own ``checkpoint/<attempt>/`` (ratatouille_contract.layout), so what it
  wrote meanwhile never deletes the new holder's.

Torch-free. Holder identity in the lease: host, pid, attempt id and a random token; nothing
secret.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Callable

from ratatouille_contract import layout

from .storage import StorageError

__all__ = ["DEFAULT_TTL", "DEFAULT_WAIT", "Lease", "LeaseBusy", "LeaseLost", "ttl_from_env",
           "wait_from_env"]

DEFAULT_TTL = 60.0
DEFAULT_WAIT = 6 * 3600.0
WAIT_REPORT_EVERY = 300.0  # a "still waiting" line on stderr this often


class LeaseBusy(RuntimeError):
    """Another live writer holds the prefix and did not finish within the wait."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over (it could not renew it for a whole TTL)."""


def _seconds_from_env(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: not a number of seconds") from None
    if not value >= minimum or value == float("inf"):
        raise ValueError(f"{name}={raw!r}: must be a finite number of seconds >= {minimum:g}")
    return value


def ttl_from_env() -> float:
    return _seconds_from_env("RATATOUILLE_LEASE_TTL", DEFAULT_TTL, 5.0)  # S3 ages have 1 s resolution


def wait_from_env() -> float:
    return _seconds_from_env("RATATOUILLE_LEASE_WAIT", DEFAULT_WAIT, 0.0)


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), "" if unknown."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _this_host() -> dict:
    return {"host": socket.gethostname(), "bootId": _read_first_line("/proc/sys/kernel/random/boot_id"),
            "pidNamespace": _pid_namespace()}


def holder_is_dead(body: dict) -> bool:
    """True only when the holder certainly was a process on this host that no longer runs."""
    here = _this_host()
    if not here["bootId"] or any(body.get(k) != v for k, v in here.items()):
        return False  # another host, boot or pid namespace: only the TTL can tell
    try:
        pid = int(body.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists (another user's process)
    start = body.get("pidStart")
    return bool(start) and _pid_start(pid) not in ("", start)  # the pid was reused since


def describe(body: dict | None, age: float | None = None) -> str:
    if not isinstance(body, dict):
        return "an unknown writer (unreadable lease)"
    who = f"{body.get('host', '?')} pid {body.get('pid', '?')}"
    what = " ".join(str(body[k]) for k in ("stage", "member") if body.get(k))
    bits = [f"attempt {body.get('attempt', '?')}"]
    if age is not None:
        bits.append(f"renewed {age:.0f}s ago, ttl {_ttl_of(body):.0f}s")
    return f"{who}{' (' + what + ')' if what else ''} [{', '.join(bits)}]"


def _ttl_of(body: dict | None) -> float:
    try:
        ttl = float((body or {}).get("ttlSeconds"))
    except (TypeError, ValueError):
        return DEFAULT_TTL
    return ttl if 0 < ttl < float("inf") else DEFAULT_TTL


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Lease:
    """The exclusive lease on one member prefix. ``acquire()`` (waits, bounded), then the
    heartbeat renews it; ``check()`` raises :class:`LeaseLost` once it is known lost,
    ``confirm()`` also reads it back; ``release()`` deletes it. A context manager."""

    def __init__(self, storage, prefix: str, *, stage: str = "", member: str = "",
                 ttl: float | None = None, wait: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None, heartbeat: bool = True):
        self.storage = storage
        self.prefix = prefix.rstrip("/")
        self.uri = layout.lease_uri(self.prefix)
        self.ttl = ttl_from_env() if ttl is None else float(ttl)
        self.wait = wait_from_env() if wait is None else float(wait)
        self.attempt = layout.new_attempt()
        self.token = os.urandom(8).hex()
        self.stage, self.member = stage, member
        self.clock, self.sleep = clock, sleep
        self.log = log or (lambda msg: print(f"ratatouille-trainer: {msg}", file=sys.stderr, flush=True))
        self.heartbeat = heartbeat
        self.waited = False          # another writer held it when we arrived
        self.took_over: str | None = None  # whom we took it over from (expired or dead)
        self._version: str | None = None
        self._seq = 0
        self._renewed = 0.0          # clock() of the last successful write of our lease
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ body
    def _body(self) -> bytes:
        self._seq += 1
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {"holder": self.token, "attempt": self.attempt, "pid": os.getpid(),
                "pidStart": _pid_start(os.getpid()), **_this_host(), "stage": self.stage,
                "member": self.member, "ttlSeconds": self.ttl, "seq": self._seq, "renewedAt": now}
        return json.dumps(body, sort_keys=True).encode()

    @staticmethod
    def _parse(data: bytes) -> dict | None:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    def _read(self) -> tuple[dict | None, str, float] | None:
        got = self.storage.read_versioned(self.uri)
        if got is None:
            return None
        data, version, age = got
        return self._parse(data), version, age

    def _mine(self, body: dict | None) -> bool:
        return isinstance(body, dict) and body.get("holder") == self.token

    # --------------------------------------------------------------------------- acquire
    def acquire(self) -> "Lease":
        deadline = self.clock() + self.wait
        next_report = 0.0
        while True:
            seen = self._read()
            if seen is None:
                version = self.storage.write_if(self.uri, self._body(), match=None)
                if version is not None:
                    return self._held(version)
                continue  # someone created it between our read and write: look again
            body, version, age = seen
            if self._mine(body):  # our own write whose answer was lost (retried request)
                return self._held(version)
            expired = age > _ttl_of(body)
            dead = body is not None and holder_is_dead(body)
            if expired or dead:
                new = self.storage.write_if(self.uri, self._body(), match=version)
                if new is not None:
                    self.took_over = (f"{describe(body, age)}: "
                                      f"{'its process is gone' if dead else 'lease expired'}")
                    self.log(f"{self._what()}: took over the lease on {self.prefix} from {self.took_over}")
                    return self._held(new)
                continue  # another taker won, or the holder renewed just now
            self.waited = True
            now = self.clock()
            if now >= deadline:
                raise LeaseBusy(
                    f"{self.prefix} is being written by {describe(body, age)}; waited "
                    f"{_fmt_seconds(self.wait)} (RATATOUILLE_LEASE_WAIT) for it to finish; nothing "
                    "was trained or deleted here")
            if now >= next_report:
                self.log(f"{self._what()}: {self.prefix} is being written by {describe(body, age)}; "
                         f"waiting up to {_fmt_seconds(max(0.0, deadline - now))} more for it to "
                         "finish (RATATOUILLE_LEASE_WAIT)")
                next_report = now + WAIT_REPORT_EVERY
            self.sleep(max(0.05, min(self._poll(body), deadline - now)))

    def _poll(self, body: dict | None) -> float:
        return min(5.0, max(0.2, _ttl_of(body) / 6))

    def _what(self) -> str:
        return " ".join(x for x in (self.stage, self.member) if x) or "trainer"

    def _held(self, version: str) -> "Lease":
        self._version = version
        self._renewed = self.clock()
        if self.heartbeat:
            self._thread = threading.Thread(target=self._beat, name="ratatouille-lease", daemon=True)
            self._thread.start()
        return self

    # --------------------------------------------------------------------------- holding
    def renew(self) -> None:
        """Rewrite our lease (compare-and-swap on the version we wrote last)."""
        with self._mutex:
            if self._lost is not None or self._version is None:
                return
            data = self._body()
            new = self.storage.write_if(self.uri, data, match=self._version)
            if new is None:
                seen = self._read()  # our own write whose answer was lost?
                if seen is not None and self._mine(seen[0]) and seen[0].get("seq") == self._seq:
                    new = seen[1]
                else:
                    holder = describe(seen[0], seen[2]) if seen is not None else "nobody (it was deleted)"
                    self._lose(f"the lease on {self.prefix} is now held by {holder}")
                    return
            self._version = new
            self._renewed = self.clock()

    def _lose(self, why: str) -> None:
        self._lost = why
        self._stop.set()
        self.log(f"warning: {self._what()}: {why}; this writer stops")

    def _beat(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except (StorageError, OSError) as e:
                self.log(f"warning: {self._what()}: could not renew the lease on {self.prefix}: {e}")
            if self._lost is None and self.clock() - self._renewed > self.ttl:
                with self._mutex:
                    self._lose(f"the lease on {self.prefix} was not renewed for {self.ttl:.0f}s "
                               "(ttl): another writer may have taken it over")
            if self._lost is not None:
                return

    def check(self) -> None:
        """Raise LeaseLost if the lease is known to be lost (no storage request)."""
        if self._lost is not None:
            raise LeaseLost(f"{self._what()}: {self._lost}; nothing more was written")

    def confirm(self) -> None:
        """check(), then read the lease back: still ours at the version we wrote? One request;
        call it before writing what others will trust (the model, DONE)."""
        self.check()
        with self._mutex:
            seen = self._read()
            if seen is None or not self._mine(seen[0]) or seen[1] != self._version:
                holder = describe(seen[0], seen[2]) if seen is not None else "nobody (it was deleted)"
                self._lose(f"the lease on {self.prefix} is now held by {holder}")
        self.check()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._mutex:
            if self._version is not None and self._lost is None:
                try:
                    self.storage.delete_if(self.uri, self._version)
                except (StorageError, OSError) as e:  # it expires on its own
                    self.log(f"warning: {self._what()}: could not delete the lease {self.uri}: {e}")
            self._version = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
