"""Two training processes in one pod (torchrun, DDP over gloo on CPU): train, resume, report once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_job import manifest
from tests.models import build_tiny_bert, write_pairs

pytestmark = pytest.mark.integration

#: 800 examples, batch 8 per process, 2 processes: 50 steps an epoch, 100 in 2 epochs.
FINAL_STEP = 100


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {"model": build_tiny_bert(base / "model"), "data": write_pairs(base / "data", train=800, validation=80)}


class Gateway(BaseHTTPRequestHandler):
    """A Pushgateway stand-in that records the body of every push."""

    bodies: list[str]

    def do_PUT(self) -> None:
        self.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[str]]]:
    bodies: list[str] = []
    handler = type("RecordingGateway", (Gateway,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    server.shutdown()
    server.server_close()


def start(work: Path, spec_doc: dict[str, Any], **env: str) -> subprocess.Popen[bytes]:
    """`python -m kubetune_job` with two processes per pod, in its own process group."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.yaml").write_text(yaml.safe_dump(spec_doc))
    full_env = {
        **os.environ,
        "KUBETUNE_SPEC_FILE": str(work / "job.yaml"),
        "KUBETUNE_WORK_DIR": str(work / "scratch"),
        "KUBETUNE_SUMMARY_PATH": str(work / "summary.json"),
        "KUBETUNE_NPROC_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    log = (work / "job.log").open("ab")
    cmd = [sys.executable, "-m", "kubetune_job"]
    return subprocess.Popen(cmd, env=full_env, stdout=log, stderr=log, start_new_session=True)


def finish(proc: subprocess.Popen[bytes], work: Path) -> tuple[int, dict[str, Any]]:
    code = proc.wait(timeout=600)
    return code, json.loads((work / "summary.json").read_text())


def committed_files(checkpoints: Path, step: int) -> set[str]:
    manifest_file = checkpoints / f"checkpoint-{step}" / "kubetune-manifest.json"
    return {f["path"] for f in json.loads(manifest_file.read_text())["files"]}


def first_commit(proc: subprocess.Popen[bytes], work: Path) -> None:
    """Wait, while the job runs, for its first committed checkpoint (step 20)."""
    first = work / "checkpoints" / "checkpoint-20" / "kubetune-manifest.json"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists() and proc.poll() is None, (work / "job.log").read_text()[-3000:]


def test_two_processes_train_once_and_report_from_rank0(
    tiny: dict[str, Path], tmp_path: Path, gateway: tuple[str, list[str]]
) -> None:
    """The run completes; checkpoints hold both ranks' RNG state; one process pushes metrics and writes the summary."""
    url, bodies = gateway
    proc = start(tmp_path, manifest(tiny, tmp_path), KUBETUNE_PUSHGATEWAY_URL=url, KUBETUNE_PUSH_INTERVAL_SECONDS="1")
    code, summary = finish(proc, tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert code == 0, log[-3000:]
    assert summary["phase"] == "Succeeded" and summary["finalStep"] == summary["totalSteps"] == FINAL_STEP
    assert summary == json.loads((tmp_path / "scratch" / "rank0-summary.json").read_text())
    assert 0.6 < summary["metrics"]["trainLoss"] < 0.8  # a mean per example, not scaled by the process count
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= committed_files(tmp_path / "checkpoints", FINAL_STEP)
    assert json.loads((tmp_path / "output" / "metrics.json").read_text())["finalStep"] == FINAL_STEP
    assert len(re.findall(r"committed checkpoint-100 ", log)) == 1
    assert "global batch 16" in log
    starts = {m for body in bodies for m in re.findall(r"^kubetune_job_start_time_seconds\S* (\S+)$", body, re.M)}
    assert bodies and len(starts) == 1, f"pushes from {len(starts)} processes"


def test_two_processes_resume_after_the_pod_is_killed(tiny: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL to the launcher, torchrun and workers after the first commit; the rerun resumes and finishes."""
    work = tmp_path / "killed"
    proc = start(work, manifest(tiny, work))
    first_commit(proc, work)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    code, summary = finish(start(work, manifest(tiny, work)), work)
    assert code == 0, (work / "job.log").read_text()[-3000:]
    assert summary["resumedFromStep"] >= 20 and summary["finalStep"] == FINAL_STEP
    assert summary["stepsThisRun"] == FINAL_STEP - summary["resumedFromStep"]


def worker(root: int, rank: int) -> int | None:
    """The pid of the training process with this RANK among the descendants of `root`."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    for pid in parents:
        ancestor = pid
        while ancestor in parents and ancestor != root:
            ancestor = parents[ancestor]
        if ancestor != root or pid == root:
            continue
        try:
            env = dict(v.split("=", 1) for v in (Path(f"/proc/{pid}") / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return pid
    return None


def test_a_sigterm_that_reaches_one_process_stops_both_at_one_committed_step(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    """SIGTERM to rank 1 alone: both processes stop at the same step, rank 0 commits it, the pod exits 21
    (Preempted) rather than hanging in a collective; the rerun resumes from that step."""
    work = tmp_path / "term"
    proc = start(work, manifest(tiny, work))
    first_commit(proc, work)
    pid = worker(proc.pid, 1)
    assert pid, (work / "job.log").read_text()[-3000:]
    os.kill(pid, signal.SIGTERM)
    code, summary = finish(proc, work)
    log = (work / "job.log").read_text()
    assert code == 21, log[-3000:]
    stopped = summary["finalStep"]
    assert summary["reason"] == "Preempted" and 20 < stopped < FINAL_STEP, summary
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= committed_files(work / "checkpoints", stopped)

    code, summary = finish(start(work, manifest(tiny, work)), work)
    assert code == 0, (work / "job.log").read_text()[-3000:]
    assert summary["resumedFromStep"] == stopped and summary["finalStep"] == FINAL_STEP


def test_a_permanent_error_of_rank0_is_the_pod_exit_code(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A missing label column exits 12 (data error) through torchrun, not torchrun's generic 1."""
    doc = manifest(tiny, tmp_path)
    doc["spec"]["dataset"]["labelField"] = "verdict"
    code, summary = finish(start(tmp_path, doc), tmp_path)
    assert code == 12, (tmp_path / "job.log").read_text()[-3000:]
    assert summary["reason"] == "DataError" and summary["field"] == "spec.dataset.labelField"


AGREE = """
import sys
from pathlib import Path
import torch.distributed as dist
from kubetune_job.distributed import any_rank, from_main, rank
dist.init_process_group("gloo")
agreed = any_rank(rank() == 1), any_rank(False), from_main(f"from {rank()}")
# One file per rank: two processes printing to one pipe can interleave their lines.
Path(sys.argv[1], f"rank-{rank()}").write_text(f"any {agreed[0]} none {agreed[1]} main {agreed[2]}")
dist.destroy_process_group()
"""


def test_processes_agree_on_a_flag_and_on_rank0_value(tmp_path: Path) -> None:
    """any_rank is true everywhere when one process says so; from_main hands every process rank 0's value."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*run, str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "job")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {path.name: path.read_text() for path in tmp_path.glob("rank-*")}
    assert results == {"rank-0": "any True none False main from 0", "rank-1": "any True none False main from 0"}
