"""Several GPUs in one pod: `python -m kubetune_job` re-executes itself under torchrun.

With KUBETUNE_NPROC_PER_NODE > 1 (or KUBETUNE_NNODES > 1) and no LOCAL_RANK in the environment
(so not already a torchrun worker), the pod's first process becomes a launcher: it runs
`python -m torch.distributed.run ... -m kubetune_job`, one worker per GPU, each running the normal
job as one rank of a DistributedDataParallel run (distributed.py says what a worker does differently).

Exit codes are an API, and torchrun turns any worker failure into its own generic 1. So the workers
write their summary to a private file (each node's first process writes it: rank 0 on node 0), and
the launcher exits with the code recorded there and copies the summary to KUBETUNE_SUMMARY_PATH (the
termination message) itself: a permanent error stays permanent, and a stop for preemption stays 21 on
every node. The launcher imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune_api.exit_codes import ExitCode
from kubetune_api.settings import JobSettings

from .errors import ConfigError
from .summary import failure
from .summary import write as write_summary

log = logging.getLogger(__name__)

#: Where, under the work directory, the node's first worker writes the summary that the launcher reads.
WORKER_SUMMARY = "rank0-summary.json"
#: Seconds torchrun lets workers finish after it forwards SIGTERM (a checkpoint commit can take a
#: while); the pod's terminationGracePeriodSeconds is the real bound, so this one never cuts first.
SHUTDOWN_TIMEOUT_S = 3600
#: Signals the launcher passes on to torchrun, which passes them on to every worker.
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def needed(settings: JobSettings, environ: Mapping[str, str]) -> bool:
    """Whether this process must launch workers: several processes wanted, and not a worker itself."""
    return (settings.nproc_per_node > 1 or settings.nnodes > 1) and "LOCAL_RANK" not in environ


def torchrun_argv(settings: JobSettings, python: str = sys.executable) -> list[str]:
    """The torchrun command line that runs `python -m kubetune_job` once per process (pure)."""
    argv = [python, "-m", "torch.distributed.run", f"--nproc-per-node={settings.nproc_per_node}"]
    if settings.nnodes == 1:
        argv.append("--standalone")  # a local rendezvous on a free port: nothing to configure
    else:
        if not settings.master_addr:
            raise ConfigError(
                "KUBETUNE_MASTER_ADDR", f"{settings.nnodes} nodes need the address of node 0 for the rendezvous"
            )
        if settings.node_rank >= settings.nnodes:
            raise ConfigError(
                "KUBETUNE_NODE_RANK", f"node rank {settings.node_rank} is not below the node count {settings.nnodes}"
            )
        argv += [
            f"--nnodes={settings.nnodes}",
            f"--node-rank={settings.node_rank}",
            f"--master-addr={settings.master_addr}",
            f"--master-port={settings.master_port}",
        ]
    # Restarts are the Kubernetes Job's business (backoffLimit, podFailurePolicy), never torchrun's.
    return [*argv, "--max-restarts=0", "-m", "kubetune_job"]


def worker_environment(settings: JobSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The workers' environment: the launcher's, with the summary sent to a private file."""
    return {
        **environ,
        "KUBETUNE_SUMMARY_PATH": str(settings.work_dir / WORKER_SUMMARY),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S),
    }


def outcome(returncode: int, first: dict[str, Any] | None, *, node_rank: int) -> tuple[dict[str, Any], int]:
    """The summary and exit code of the whole pod, from torchrun's exit code and the summary of this
    node's first worker (rank 0's on node 0), pure. Another node's success says only that it ended: the
    run's summary is node 0's. Its failures keep their own code, so a stop for preemption agreed with a
    preempted peer stays exit code 21 there too."""
    if first is None:
        if returncode:
            message = f"a training process failed (torchrun exit code {returncode}) before writing a summary"
        else:
            message = "torchrun ended without a summary from the first process"
        return failure(ExitCode.RETRYABLE, "Error", f"{message}; see the pod log").wire(), ExitCode.RETRYABLE
    code = ExitCode.SUCCEEDED if first.get("phase") == "Succeeded" else int(first.get("exitCode", ExitCode.RETRYABLE))
    if code != ExitCode.SUCCEEDED:
        return first, code
    if returncode != 0:
        log.warning("the first process succeeded but torchrun exited with %d; its summary decides", returncode)
    if node_rank > 0:
        return {"phase": "Succeeded", "message": f"node {node_rank}: the summary is node 0's"}, code
    return first, code


def read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def launch(settings: JobSettings, environ: Mapping[str, str] = os.environ) -> int:
    """Run the job as nproc_per_node torchrun workers; return the exit code of this node's first one."""
    try:
        argv = torchrun_argv(settings)
    except ConfigError as e:
        log.error("%s: %s", e.field, e.message)
        write_summary(settings.summary_path, failure(e.code, e.reason, e.message, e.field))
        return int(e.code)
    env = worker_environment(settings, environ)
    private = Path(env["KUBETUNE_SUMMARY_PATH"])
    private.parent.mkdir(parents=True, exist_ok=True)
    private.unlink(missing_ok=True)  # a summary left by an earlier attempt in the same pod says nothing
    log.info("launching %d processes per node: %s", settings.nproc_per_node, " ".join(argv))
    proc = subprocess.Popen(argv, env=env)

    def forward(signum: int, frame: FrameType | None) -> None:
        log.warning("got signal %d: passing it on to the workers", signum)
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary, code = outcome(returncode, read_summary(private), node_rank=settings.node_rank)
    if code != ExitCode.SUCCEEDED:
        log.error("%s: %s", summary.get("reason", "Error"), summary.get("message", ""))
    write_summary(settings.summary_path, summary)
    return code
