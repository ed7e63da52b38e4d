"""What the trainer benchmarks share: each run is a fresh Python process, measured from outside.

`measure(script, config)` runs ``python -c script '<config as JSON, plus "out": a scratch directory>'`` with
the repository on PYTHONPATH and the Hub offline, and returns the JSON of the script's last ``RESULT `` line
with the run's wall time (``wall_s``) and peak RSS (``peak_rss_mib``, the child's own ru_maxrss). The
scripts import it as a sibling module (they run as ``python tests/bench/<name>.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def environment(threads: int | None = None) -> dict[str, str]:
    """The children's environment: this repository importable, the Hub offline, ``threads`` CPU threads if given."""
    limit = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}
    return {
        **os.environ,
        **limit,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def measure(script: str, config: dict[str, Any], *, threads: int | None = None) -> dict[str, Any]:
    """One run in a fresh process: its RESULT line, its wall time and its peak RSS (the child's ru_maxrss)."""
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as out, tempfile.TemporaryFile("w+") as log:
        argv = [sys.executable, "-c", script, json.dumps({**config, "out": out})]
        started = time.monotonic()
        child = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=environment(threads), cwd=ROOT, text=True
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        log.seek(0)
        output = log.read()
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    if child.returncode or not lines:
        sys.exit(f"benchmark run failed (exit code {child.returncode}):\n{output[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result
