"""A gateway that never answers: a TCP listener on 127.0.0.1 that accepts connections and holds them silent."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Blackhole:
    """Accepts every connection and never reads or writes, as a hung server would."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, name="blackhole", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@contextmanager
def blackhole() -> Iterator[str]:
    """The URL of a Blackhole for the block's duration."""
    hole = Blackhole()
    try:
        yield hole.url
    finally:
        hole.close()
