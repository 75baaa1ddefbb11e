"""A loopback TCP proxy that breaks connections on purpose, to test storage retries.

Put it between a client and a server (e.g. boto3 and moto_server). Chosen connections are cut:
the first N after `configure()`, and/or every k-th one. How a connection is cut:
- "accept":   reset as soon as it is accepted;
- "request":  forward part of the first request chunk to the server, then reset both sides;
- "response": forward the request, then half of the server's first reply chunk, then reset;
- "mixed":    cycle through request, response and accept.
Counters (`connections`, `dropped`) say what really happened. Standard library only; threads.
It stops when its context exits, or by itself after `lifetime` seconds so a failed test cannot
leave it running.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit

MODES = ("accept", "request", "response", "mixed")
_MIXED = ("request", "response", "accept")


def _reset(sock: socket.socket | None) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees 'connection reset', not a clean EOF."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        # close() alone would not wake a thread blocked in recv() on this socket (the kernel
        # keeps it open until that call returns); shutdown() does, and the close then resets.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, upstream: str, *, drop_first: int = 0, drop_every: int = 0,
                 mode: str = "mixed", lifetime: float = 300.0):
        parts = urlsplit(upstream if "://" in upstream else f"tcp://{upstream}")
        self.upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80))
        self.lifetime = lifetime
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self.connections = 0
        self.dropped = 0
        self.dropped_by_mode = {"accept": 0, "request": 0, "response": 0}
        self.configure(drop_first=drop_first, drop_every=drop_every, mode=mode)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self, *, drop_first: int = 0, drop_every: int = 0,
                  mode: str | None = None) -> None:
        """Drop the next `drop_first` connections, and every `drop_every`-th one after that
        (0 = never)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self._budget = int(drop_first)
            self._every = int(drop_every)
            if mode is not None:
                self.mode = mode
            self._since_config = 0

    # --- lifecycle ---
    def start(self) -> "FaultProxy":
        self._deadline = time.monotonic() + self.lifetime
        self._thread = threading.Thread(target=self._serve, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals ---
    def _serve(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    client, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break
                fault = self._decide()
                threading.Thread(target=self._handle, args=(client, fault), daemon=True).start()
        finally:
            self._listener.close()
            self._stop.set()

    def _decide(self) -> str | None:
        with self._lock:
            self.connections += 1
            self._since_config += 1
            victim = False
            if self._budget > 0:
                self._budget -= 1
                victim = True
            elif self._every and self._since_config % self._every == 0:
                victim = True
            if not victim:
                return None
            mode = self.mode
            if mode == "mixed":
                mode = _MIXED[self.dropped % len(_MIXED)]
            self.dropped += 1
            self.dropped_by_mode[mode] += 1
            return mode

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.add(sock)

    def _handle(self, client: socket.socket, fault: str | None) -> None:
        self._track(client)
        if fault == "accept":
            _reset(client)
            return
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        client.settimeout(None)
        self._track(server)
        if fault == "request":
            try:
                first = client.recv(65536)
                if len(first) > 1:
                    server.sendall(first[: len(first) // 2])
            except OSError:
                pass
            _reset(server)
            _reset(client)
            return
        up = threading.Thread(target=self._pipe, args=(client, server, False), daemon=True)
        up.start()
        self._pipe(server, client, fault == "response")
        up.join(timeout=30)
        with self._lock:
            self._socks.discard(client)
            self._socks.discard(server)
        for s in (client, server):
            try:
                s.close()
            except OSError:
                pass

    def _pipe(self, src: socket.socket, dst: socket.socket, cut_first_chunk: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if cut_first_chunk:
                    dst.sendall(data[: max(1, len(data) // 2)])
                    _reset(dst)
                    _reset(src)
                    return
                dst.sendall(data)
        except OSError:
            _reset(dst)
            _reset(src)
