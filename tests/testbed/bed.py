"""The whole test bed at once, held by one background process: what ``tests/testbed/up`` and ``down`` run.

``up`` starts ``python -m tests.testbed.bed serve`` detached; that process starts the control
plane, the test kubelet with its GPU node(s), SeaweedFS, the Pushgateway and Prometheus, writes
``state.json`` (its PID, every component's PID, the environment) in the state directory and
waits for SIGTERM. ``up`` then prints ``export`` lines for a shell; ``down`` stops it all.

State directory: ``$KUBETUNE_TESTBED_DIR``, else ``${XDG_RUNTIME_DIR:-/tmp}/kubetune-testbed``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.testbed import binaries, processes
from tests.testbed.cluster import ControlPlane
from tests.testbed.kubelet import NodeSpec, TestKubelet
from tests.testbed.kueue import Kueue
from tests.testbed.prometheus import Prometheus, Pushgateway
from tests.testbed.s3 import SeaweedS3

REPO = Path(__file__).resolve().parent.parent.parent
READY_TIMEOUT = 300.0


def state_dir() -> Path:
    explicit = os.environ.get("KUBETUNE_TESTBED_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "kubetune-testbed"


def pod_env() -> dict[str, str]:
    """Env the kubelet adds to every pod: the checkout's job package on PYTHONPATH, so `python -m
    kubetune_job` runs this working tree even where the project is not installed."""
    job = REPO / "job"
    return {"PYTHONPATH": str(job)} if job.is_dir() else {}


@dataclass
class Bed:
    """Every part, started in ``workdir``."""

    plane: ControlPlane
    kubelet: TestKubelet
    s3: SeaweedS3
    pushgateway: Pushgateway
    prometheus: Prometheus
    kueue: Kueue | None = None

    @classmethod
    def start(cls, workdir: Path, *, nodes: int = 1, gpus: int = 8, kueue: bool = False) -> Bed:
        started: list[ControlPlane | TestKubelet | SeaweedS3 | Pushgateway | Prometheus | Kueue] = []
        manager = None
        try:
            plane = ControlPlane.start(workdir / "cluster")
            started.append(plane)
            if kueue:
                manager = Kueue.start(workdir / "kueue", plane)
                started.append(manager)
            kubelet = TestKubelet(plane.api_client(), workdir=workdir / "kubelet", extra_env=pod_env()).start()
            started.append(kubelet)
            for i in range(nodes):
                kubelet.add_node(NodeSpec(f"gpu-node-{i}", gpus=gpus))
            s3 = SeaweedS3.start(workdir / "s3")
            started.append(s3)
            gateway = Pushgateway.start(workdir / "pushgateway")
            started.append(gateway)
            prom = Prometheus.start(workdir / "prometheus", targets=[gateway.address])
            started.append(prom)
        except BaseException:
            for part in reversed(started):
                part.stop()
            raise
        return cls(plane, kubelet, s3, gateway, prom, manager)

    def stop(self) -> None:
        for part in (self.prometheus, self.pushgateway, self.s3, self.kubelet, self.kueue, self.plane):
            if part is not None:
                part.stop()

    def env(self) -> dict[str, str]:
        """What a shell needs to use the bed: kubeconfig, S3 endpoint and keys, metrics URLs."""
        return {
            "KUBECONFIG": str(self.plane.kubeconfig),
            **self.s3.env(),
            "PUSHGATEWAY_URL": self.pushgateway.url,
            "PROMETHEUS_URL": self.prometheus.url,
        }

    def pids(self) -> dict[str, int]:
        """Every component process, for ``down`` to clean up if the holder itself is gone."""
        found = {name: proc.pid for name, proc in self.plane.components.items()}
        for part in (self.s3, self.pushgateway, self.prometheus, self.kueue):
            if part is not None:
                found[part.process.name] = part.process.pid
        return found


@dataclass(frozen=True)
class State:
    """What the holder writes once the bed is up."""

    pid: int
    env: dict[str, str]
    components: dict[str, int]


def _write_state(path: Path, state: State) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": state.pid, "env": state.env, "components": state.components}, indent=2))
    tmp.replace(path)


def _read_state(directory: Path) -> State | None:
    try:
        raw = json.loads((directory / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return State(pid=int(raw["pid"]), env=dict(raw["env"]), components=dict(raw["components"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def serve(directory: Path, *, nodes: int, gpus: int, kueue: bool) -> int:
    """Hold the bed until SIGTERM or SIGINT; the state file exists exactly while it is up."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bed = Bed.start(directory / "work", nodes=nodes, gpus=gpus, kueue=kueue)
    try:
        _write_state(directory / "state.json", State(pid=os.getpid(), env=bed.env(), components=bed.pids()))
        print("test bed up", flush=True)
        stop.wait()
    finally:
        (directory / "state.json").unlink(missing_ok=True)
        bed.stop()
    return 0


def exports(env: dict[str, str]) -> str:
    """Shell ``export`` lines, PATH with the testbin directory in front."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f'export PATH={shlex.quote(str(binaries.testbin_dir()))}:"$PATH"')
    return "\n".join(lines)


def up(directory: Path, *, nodes: int, gpus: int, kueue: bool) -> int:
    """Start the holder in the background (unless one runs) and print the export lines."""
    state = _read_state(directory)
    if state is not None and _alive(state.pid):
        print(exports(state.env))
        return 0
    shutil.rmtree(directory / "work", ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "bed.log"
    with log.open("wb") as out:
        holder = subprocess.Popen(
            [sys.executable, "-m", "tests.testbed.bed", "serve", f"--nodes={nodes}", f"--gpus={gpus}"]
            + (["--kueue"] if kueue else []),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while (state := _read_state(directory)) is None:
        if holder.poll() is not None or time.monotonic() > deadline:
            print(f"the test bed did not come up; {log}:\n{processes.log_tail(log)}", file=sys.stderr)
            processes.stop_group(holder.pid, grace=30.0, wait=holder.wait)
            return 1
        time.sleep(0.5)
    print(f"# test bed up (logs under {directory / 'work'}); stop it with tests/testbed/down", file=sys.stderr)
    print(exports(state.env))
    return 0


def down(directory: Path) -> int:
    """Stop the holder (it stops every part); then make sure no recorded process is left."""
    state = _read_state(directory)
    if state is None:
        print("no test bed is up", file=sys.stderr)
        return 0
    processes.stop_group(state.pid, grace=60.0)
    for name, pid in state.components.items():
        if _alive(pid):
            print(f"stopping leftover {name} ({pid})", file=sys.stderr)
            processes.stop_group(pid, grace=5.0)
    (directory / "state.json").unlink(missing_ok=True)
    print("test bed down", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/testbed/up", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "serve"])
    parser.add_argument("--nodes", type=int, default=1, help="fake GPU nodes (gpu-node-0, gpu-node-1, ...)")
    parser.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node")
    parser.add_argument("--kueue", action="store_true", help="also Kueue's controller manager and webhooks")
    args = parser.parse_args(argv)
    directory = state_dir()
    if args.command == "up":
        return up(directory, nodes=args.nodes, gpus=args.gpus, kueue=args.kueue)
    if args.command == "serve":
        return serve(directory, nodes=args.nodes, gpus=args.gpus, kueue=args.kueue)
    return down(directory)


if __name__ == "__main__":
    sys.exit(main())
