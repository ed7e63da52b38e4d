"""The test bed's kill of a container's processes (processes.kill_tree): like a runtime's, it reaches the
processes that left the container's process group for a session of their own, as torchrun's workers do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.testbed.processes import descendants, kill_tree

#: A parent in its own session that starts a grandchild in yet another session, prints its pid, and waits.
PARENT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not reaped
    except FileNotFoundError:
        return False


def test_kill_tree_reaches_a_worker_in_its_own_session() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert os.getpgid(worker) != os.getpgid(parent.pid)  # a signal to the parent's group would miss it
        assert worker in descendants(parent.pid)
        kill_tree(parent.pid)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(worker)
    finally:
        parent.kill()
