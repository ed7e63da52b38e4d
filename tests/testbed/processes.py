"""Local processes for the test bed: start with a log file, wait until ready, stop without leftovers.

Every component runs in its own session (process group), so stopping it also stops whatever it
spawned. Processes started here are remembered until stopped, and an ``atexit`` hook stops the
rest: an interrupted test run leaves nothing listening behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_live: set[Process] = set()
_live_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks it; another process could take it before ours binds, which is rare enough on
    a test machine that a retry-free helper is the right trade.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, *, lines: int = 40, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log file (at most ``max_bytes`` read), or '' if it is absent."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


@dataclass(eq=False)
class Process:
    """A running component: its name, its process and the file its output goes to."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: Sequence[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited: a readiness wait then fails fast."""
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}; log {self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines=lines)

    def stop(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` seconds; return the exit code."""
        code = stop_group(self.popen.pid, grace=grace, wait=self.popen.wait)
        with _live_lock:
            _live.discard(self)
        return code


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Process:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_dir/<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,  # own process group: stop() reaches its children too
        )
    proc = Process(name=name, popen=popen, log_path=log_path, argv=list(argv))
    with _live_lock:
        _live.add(proc)
    return proc


def stop_group(pid: int, *, grace: float, wait: Callable[[float], int] | None = None) -> int | None:
    """Stop the process group led by ``pid``: SIGTERM, then SIGKILL after ``grace`` seconds.

    ``wait`` reaps our own child (``Popen.wait``); without it (a PID read from a state file) the
    group is polled until it is gone. Returns the exit code when it is known.
    """
    if not _signal_group(pid, signal.SIGTERM):
        return _wait_gone(pid, 1.0, wait)
    code = _wait_gone(pid, grace, wait)
    if code is None and _group_exists(pid):
        _signal_group(pid, signal.SIGKILL)
        code = _wait_gone(pid, 5.0, wait)
    # The leader may be gone while children it left in the group still run.
    if _group_exists(pid):
        _signal_group(pid, signal.SIGKILL)
    return code


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from /proc: also those that left its process group for a
    session of their own (torchrun's workers do), which a signal to the group misses."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant, wherever its group: what a container
    runtime's kill of a container's cgroup does. The descendants are read before anything dies (an
    orphan's parent is no longer ``pid``'s line)."""
    tree = descendants(pid)
    _signal_group(pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # not a group leader we own: fall back to the process itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _wait_gone(pid: int, timeout: float, wait: Callable[[float], int] | None) -> int | None:
    if wait is not None:
        try:
            return wait(timeout)
        except subprocess.TimeoutExpired:
            return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_exists(pid):
            return None
        time.sleep(0.1)
    return None


def stop_all() -> None:
    """Stop every process this module started and that is still running (newest first)."""
    with _live_lock:
        procs = sorted(_live, key=lambda p: p.pid, reverse=True)
    for proc in procs:
        proc.stop(grace=5.0)


atexit.register(stop_all)


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    check: Callable[[], None] | None = None,
) -> None:
    """Poll ``predicate`` until it is true; ``check`` runs before each poll and may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_ok(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 2.0,
) -> bool:
    """True if a GET on ``url`` answers 2xx; connection errors and other statuses are False."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ssl_context) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_for_http(
    url: str,
    *,
    process: Process | None = None,
    timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Wait until ``url`` answers 2xx; fail at once, with the log tail, if ``process`` exits."""
    wait_until(
        lambda: http_ok(url, ssl_context=ssl_context, headers=headers),
        timeout=timeout,
        what=f"{process.name if process else url} to answer {url}",
        check=process.check_alive if process else None,
    )


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0
