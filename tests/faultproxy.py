"""A TCP proxy on 127.0.0.1 that slows and cuts connections to one server, for failure tests.

Put it between a client and a real server (here: the S3 gateway) and change its faults while
traffic flows: `latency` delays every chunk it forwards, `reset_every_bytes` resets (TCP RST) the
connection that carries each Nth byte from client to server, up to `max_resets` times. It counts
what it did, so a test can check that a fault really happened.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType


class FaultProxy:
    """Forward 127.0.0.1:<port> to target, adding latency and connection resets on a schedule."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        latency: float = 0.0,
        chunk_bytes: int = 65536,
        reset_every_bytes: int | None = None,
        max_resets: int = 0,
    ) -> None:
        self.target = target
        self.latency = latency
        self.chunk_bytes = chunk_bytes
        self.reset_every_bytes = reset_every_bytes
        self.max_resets = max_resets
        self.resets = 0
        self.connections = 0
        self.upstream_bytes = 0
        self._next_reset = reset_every_bytes
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _close(sock)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._open.update((client, server))
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...], upstream: bool) -> None:
        try:
            while True:
                data = src.recv(self.chunk_bytes)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if self.latency:
                    time.sleep(self.latency)
                if upstream and self._reset_due(len(data)):
                    self._reset(pair)
                    return
                dst.sendall(data)
        except OSError:
            self._reset(pair)

    def _reset_due(self, size: int) -> bool:
        with self._lock:
            self.upstream_bytes += size
            if self._next_reset is None or self.resets >= self.max_resets or self.upstream_bytes < self._next_reset:
                return False
            self.resets += 1
            self._next_reset += self.reset_every_bytes or 0
            return True

    def _reset(self, pair: tuple[socket.socket, ...]) -> None:
        """Close both ends with SO_LINGER 0, so each peer sees a connection reset, not a clean close."""
        with self._lock:
            for sock in pair:
                self._open.discard(sock)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
