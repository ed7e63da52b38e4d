"""Run the trainer job (`python -m kubetune_job`) as a pod would: a subprocess configured by its environment.

Shared by the integration tests that train: a FineTuneJob manifest for the tiny model, starting the
job with its log in the work directory, and waiting for its exit code and JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml


def manifest(
    *,
    model: str,
    data: str,
    checkpoints: str,
    output: str,
    every: int | str = 20,
    keep: int = 2,
    metrics: tuple[str, ...] = ("accuracy",),
    storage: Mapping[str, str] | None = None,
    **hyper: Any,
) -> dict[str, Any]:
    """A FineTuneJob for the tiny model and pair data of tests/models.py (hyper: hyperparameters)."""
    spec: dict[str, Any] = {
        "model": {"uri": model},
        "dataset": {"uri": data, "maxLength": 32},
        "hyperparameters": {"epochs": 2, "batchSize": 8, "learningRate": 1e-3, **hyper},
        "metrics": list(metrics),
        "checkpoints": {"uri": checkpoints, "every": every, "keep": keep},
        "output": {"uri": output},
    }
    if storage:
        spec["storage"] = dict(storage)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "tiny"}, "spec": spec}


def start(job: dict[str, Any], work: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the job on this manifest; its log goes to work/job.log, its summary to work/summary.json."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.yaml").write_text(yaml.safe_dump(job))
    (work / "summary.json").unlink(missing_ok=True)
    full = {
        **os.environ,
        "KUBETUNE_SPEC_FILE": str(work / "job.yaml"),
        "KUBETUNE_WORK_DIR": str(work / "scratch"),
        "KUBETUNE_SUMMARY_PATH": str(work / "summary.json"),
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    log = (work / "job.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "kubetune_job"], env=full, stdout=log, stderr=log)


def log_tail(work: Path, chars: int = 3000) -> str:
    return (work / "job.log").read_text(errors="replace")[-chars:]


def finish(proc: subprocess.Popen[bytes], work: Path, *, expect: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Wait for the job; check its exit code; return its summary."""
    code = proc.wait(timeout=timeout)
    assert code == expect, f"exit code {code}, expected {expect}:\n{log_tail(work)}"
    summary: dict[str, Any] = json.loads((work / "summary.json").read_text())
    return summary


def run_job(
    job: dict[str, Any], work: Path, env: Mapping[str, str] | None = None, *, expect: int = 0
) -> dict[str, Any]:
    """Run the job to its end; check its exit code; return its summary."""
    return finish(start(job, work, env), work, expect=expect)


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], work: Path, *, timeout: float = 300, what: str
) -> None:
    """Poll until condition holds while the job runs; fail if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended (code {proc.returncode}) before {what}:\n{log_tail(work)}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s:\n{log_tail(work)}"
        time.sleep(0.02)
