"""The test kubelet: fake GPU nodes whose pods run as local processes, reported like a real kubelet.

:class:`TestKubelet` registers Nodes (capacity and allocatable with ``nvidia.com/gpu``, a Ready
condition, a Lease in ``kube-node-lease`` renewed every few seconds, so the node-lifecycle
controller removes the not-ready taint and never evicts). It watches pods bound to its nodes and
runs each container as a process group on this machine: the image becomes a command through the
table in :mod:`tests.testbed.images`, env and volumes are resolved as in :mod:`tests.testbed.containers`.
A container whose image podman holds (the project's images, ``make images``) runs as a real container
instead (:mod:`tests.testbed.podman`): the pod's securityContext, limits, volumes and termination
message mapped to podman's flags (:func:`tests.testbed.containers.podman_args`), OOMKilled read from
the runtime.

Status follows a real kubelet: Pending (ContainerCreating, or CreateContainerConfigError /
ErrImagePull / ImagePullBackOff while something is missing), Running with podIP 127.0.0.1 and
Ready conditions, then Succeeded or Failed with ``state.terminated`` (exitCode, reason Completed /
Error / OOMKilled, message from the termination-message file or, with FallbackToLogsOnError, the
log tail). A terminated container never runs again unless the restartPolicy restarts it. A deleted
pod gets SIGTERM, SIGKILL after its grace period, a terminal phase, then the grace-0 delete that
lets the API server remove it.

Faults for tests: :meth:`TestKubelet.preempt` (DisruptionTarget + delete, as the scheduler
preempts), :meth:`TestKubelet.oom_kill` (exit 137, OOMKilled), :meth:`TestKubelet.delete_node`
(the node vanishes with its processes; the pod GC controller cleans up, as after a node loss).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubernetes import client as k8s
from kubernetes import watch
from kubernetes.client.rest import ApiException

from tests.testbed import containers, images, podman, processes

log = logging.getLogger("kubetune.testbed.kubelet")

GPU_RESOURCE = "nvidia.com/gpu"
LEASE_NAMESPACE = "kube-node-lease"
KUBELET_VERSION = "v1.36.3"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# A real kubelet caps each message at 4096 bytes; the log fallback takes at most 80 lines / 2048 bytes.
MESSAGE_MAX_BYTES = 4096
FALLBACK_LINES, FALLBACK_MAX_BYTES = 80, 2048
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Host variables a pod's process inherits; a container otherwise sees only what its spec sets.
HOST_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
RETRY_SECONDS = 2.0
_PULL_ERRORS = ("ErrImagePull", "ImagePullBackOff")


def now() -> str:
    """The current time as the API's RFC 3339 second-precision timestamp."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class NodeSpec:
    """A fake node: its name, labels and what it offers to the scheduler."""

    name: str
    gpus: int = 8
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    gpu_resource: str = GPU_RESOURCE
    labels: Mapping[str, str] = field(default_factory=dict)

    def resources(self) -> dict[str, str]:
        """Capacity, also used as allocatable (nothing is reserved for system daemons here)."""
        offered = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "100Gi"}
        if self.gpus:
            offered[self.gpu_resource] = str(self.gpus)
        return offered


# --- one container


@dataclass(frozen=True)
class Launch:
    """How to start a container: a process (argv, env, cwd), or ``podman create`` arguments (``podman_args``)."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = Path("/")
    podman_args: list[str] | None = None
    container_name: str = ""


@dataclass(eq=False)  # identity, not field equality: two runs of the same spec are different containers
class ContainerRun:
    """One container of a pod: its spec, its files, its state as the status reports it."""

    spec: k8s.V1Container
    log_path: Path
    message_path: Path
    restart_count: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    oom: bool = False
    container_id: str | None = None  # under podman

    @property
    def name(self) -> str:
        return str(self.spec.name)

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> dict[str, Any] | None:
        return self.state.get("terminated")

    def waiting(self, reason: str, message: str = "") -> None:
        self.state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}

    def start(self, launch: Launch) -> None:
        self.message_path.write_text("")  # a restarted container starts with an empty message
        self.message_path.chmod(0o666)  # whatever user the container runs as writes it
        if launch.podman_args is not None:
            name = f"{launch.container_name}-{self.restart_count}"  # each run of a restarted container is a new one
            self.container_id = podman.create(["--name", name, *launch.podman_args])
            self.popen = podman.start(self.container_id, self.log_path)
        else:
            with self.log_path.open("ab") as out:
                self.popen = subprocess.Popen(
                    launch.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=launch.env,
                    cwd=launch.cwd,
                    start_new_session=True,
                )
        self.oom = False
        self.state = {"running": {"startedAt": now()}}

    def poll(self) -> int | None:
        """The container's exit code once its process has ended, as a runtime reports it (signal N -> 128+N)."""
        if self.popen is None:
            return None
        code = self.popen.poll()
        if code is None:
            return None
        return 128 - code if code < 0 else code

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            if self.container_id is not None:
                podman.kill(self.container_id, sig.name)
                return
            if sig == signal.SIGKILL:  # a runtime kills the container's every process, in any session
                processes.kill_tree(self.popen.pid)
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def finish(self, exit_code: int) -> None:
        """Record the ended process as ``state.terminated``, and reap what is left of its group."""
        started = self.state.get("running", {}).get("startedAt", now())
        if self.popen is not None:
            processes.stop_group(self.popen.pid, grace=0.0, wait=self.popen.wait)
        if self.container_id is not None:
            self.oom = self.oom or podman.oom_killed(self.container_id)  # the kernel's kill under a memory limit
            podman.remove(self.container_id)
        reason = "OOMKilled" if self.oom else ("Completed" if exit_code == 0 else "Error")
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now()}
        message = self.termination_message(exit_code)
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}

    def termination_message(self, exit_code: int) -> str:
        """The termination-message file; with FallbackToLogsOnError and a failure, the log tail if it is empty."""
        try:
            with self.message_path.open("rb") as f:
                message = f.read(MESSAGE_MAX_BYTES).decode(errors="replace")
        except FileNotFoundError:
            message = ""
        if not message and exit_code != 0 and self.spec.termination_message_policy == "FallbackToLogsOnError":
            message = processes.log_tail(self.log_path, lines=FALLBACK_LINES, max_bytes=FALLBACK_MAX_BYTES)
            message = message.encode()[-FALLBACK_MAX_BYTES:].decode(errors="ignore")
        return message

    def restart(self) -> None:
        """Keep the ended run as lastState and wait to start again (CrashLoopBackOff after a failure)."""
        self.last_state = self.state
        self.restart_count += 1
        code = (self.terminated or {}).get("exitCode", 0)
        self.waiting("CrashLoopBackOff" if code else "ContainerCreating")

    def status(self) -> dict[str, Any]:
        pid = self.popen.pid if self.popen is not None else None
        runtime = "podman" if self.container_id else "testkubelet"
        container_id = self.container_id or (str(pid) if pid else None)
        return {
            "name": self.name,
            "image": self.spec.image,
            "imageID": f"{runtime}://{self.spec.image}",
            **({"containerID": f"{runtime}://{container_id}"} if container_id else {}),
            "ready": self.running,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


# --- one pod


class PodWorker:
    """Runs one pod from first sight to its terminal status (and its final delete), in its own thread."""

    def __init__(self, kubelet: TestKubelet, pod: k8s.V1Pod) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.uid: str = pod.metadata.uid
        self.namespace: str = pod.metadata.namespace
        self.name: str = pod.metadata.name
        self.node: str = pod.spec.node_name
        self.dir = kubelet.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.start_time = now()
        self.phase = "Pending"
        self.sandbox_ready = False
        self.init_runs = [self._container(c) for c in pod.spec.init_containers or ()]
        self.runs = [self._container(c) for c in pod.spec.containers]
        self._conditions: dict[str, dict[str, str | None]] = {}
        self._stop = threading.Event()
        self._grace = 30.0
        self._abandoned = threading.Event()
        self._finalized = False
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._main, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    def _container(self, spec: k8s.V1Container) -> ContainerRun:
        for sub in ("logs", "termination"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        return ContainerRun(spec, self.dir / "logs" / f"{spec.name}.log", self.dir / "termination" / spec.name)

    # called from other threads

    def observe(self, pod: k8s.V1Pod) -> None:
        """A newer version of the pod: a deletion timestamp starts the graceful stop."""
        self.pod = pod
        if pod.metadata.deletion_timestamp is not None:
            grace = pod.metadata.deletion_grace_period_seconds
            self.request_stop(float(grace if grace is not None else 30))

    def request_stop(self, grace: float) -> None:
        with self._lock:
            self._grace = min(self._grace, grace) if self._stop.is_set() else grace
            self._stop.set()

    def abandon(self, *, grace: float = 0.0) -> None:
        """Stop the processes and report nothing more: the node is gone or the pod no longer exists."""
        self._abandoned.set()
        self.request_stop(grace)

    def oom_kill(self, container: str | None = None) -> None:
        run = self.container(container)
        run.oom = True
        run.signal(signal.SIGKILL)

    def container(self, container: str | None) -> ContainerRun:
        """The container named ``container``, or the first one."""
        for run in self.runs:
            if container is None or run.name == container:
                return run
        raise KeyError(f"pod {self.namespace}/{self.name} has no container {container!r}")

    # the pod's thread

    def _main(self) -> None:
        try:
            self._run()
        except Exception:  # a bug here must not take the kubelet down; the log says what happened
            log.exception("pod %s/%s: worker failed", self.namespace, self.name)
            self._kill_all(signal.SIGKILL)
        finally:
            self.done.set()
            self.finalize_if_deleted()

    def finalize_if_deleted(self) -> None:
        """Once the containers stopped, a deleted pod gets the kubelet's grace-0 delete (once)."""
        with self._lock:
            if self._finalized or not self._stop.is_set() or self._abandoned.is_set():
                return
            self._finalized = True
        self.kubelet.finalize_deletion(self.namespace, self.name, self.uid)

    def _run(self) -> None:
        self._report()
        volumes = self._wait_for(self._prepare_volumes, reason="ContainerCreating", runs=self.runs)
        if volumes is not None:
            self.sandbox_ready = True
            if self._run_init_containers(volumes):
                self._run_containers(volumes)
        self._kill_all(signal.SIGKILL)
        if self._abandoned.is_set():
            return
        self.phase = self._final_phase()
        self._report()

    def _prepare_volumes(self) -> dict[str, Path]:
        core = self.kubelet.core
        lookups = containers.Lookups(core, self.namespace)
        claims = self.kubelet.workdir / "claims"
        return containers.prepare_volumes(self.pod, pod_dir=self.dir, claims_dir=claims, lookups=lookups)

    def _wait_for(self, attempt: Any, *, reason: str, runs: Sequence[ContainerRun]) -> Any:
        """Call ``attempt`` until it succeeds, reporting why the containers wait; None if stopped first."""
        while not self._stop.is_set():
            try:
                return attempt()
            except containers.ConfigError as e:
                self._set_waiting(runs, reason, str(e))
            except images.ImageNotFound as e:
                # ErrImagePull on the first failure, then ImagePullBackOff: a real kubelet spends
                # almost all of its (exponential) retry wait in the latter.
                failed_before = any("waiting" in r.state and r.state["waiting"]["reason"] in _PULL_ERRORS for r in runs)
                self._set_waiting(runs, "ImagePullBackOff" if failed_before else "ErrImagePull", str(e))
            self._stop.wait(RETRY_SECONDS)
        return None

    def _set_waiting(self, runs: Sequence[ContainerRun], reason: str, message: str) -> None:
        changed = False
        for run in runs:
            if run.state != {"waiting": {"reason": reason, "message": message}}:
                run.waiting(reason, message)
                changed = True
        if changed:
            self._report()

    def _run_init_containers(self, volumes: Mapping[str, Path]) -> bool:
        """Each init container in turn, to success; False if one fails for good or the pod stops."""
        for run in self.init_runs:
            if not self._supervise([run], volumes) or run.terminated is None or run.terminated["exitCode"] != 0:
                return False
        return True

    def _run_containers(self, volumes: Mapping[str, Path]) -> None:
        for run in self.runs:
            run.waiting("ContainerCreating")
        self._supervise(self.runs, volumes)

    def _supervise(self, runs: Sequence[ContainerRun], volumes: Mapping[str, Path]) -> bool:
        """Start ``runs``, restart them as the policy says, until all ended; False if stopped before starting."""
        commands = self._wait_for(
            lambda: [self._command(r, volumes) for r in runs], reason="CreateContainerConfigError", runs=runs
        )
        if commands is None:
            return False
        for run, launch in zip(runs, commands, strict=True):
            run.start(launch)
        self._report()
        restart_at: dict[str, float] = {}
        kill_at: float | None = None
        while any(r.running for r in runs) or restart_at:
            time.sleep(0.1)
            if self._stop.is_set():
                restart_at.clear()
                kill_at = self._stop_signals(runs, kill_at)
            changed = self._reap(runs, restart_at)
            changed |= self._restart_due(runs, commands, restart_at)
            if changed and not self._abandoned.is_set():
                self._report()
        return True

    def _stop_signals(self, runs: Sequence[ContainerRun], kill_at: float | None) -> float:
        """SIGTERM on the first call; SIGKILL once the grace period is over."""
        if kill_at is None:
            for run in runs:
                run.signal(signal.SIGTERM)
            return time.monotonic() + self._grace
        if time.monotonic() >= kill_at:
            for run in runs:
                run.signal(signal.SIGKILL)
        return kill_at

    def _reap(self, runs: Sequence[ContainerRun], restart_at: dict[str, float]) -> bool:
        changed = False
        for run in runs:
            code = run.poll() if run.running else None
            if code is None:
                continue
            run.finish(code)
            changed = True
            log.info("pod %s/%s container %s exited %s", self.namespace, self.name, run.name, code)
            if not self._stop.is_set() and self._restarts(code, init=run in self.init_runs):
                run.restart()
                restart_at[run.name] = time.monotonic() + min(10.0, 2.0**run.restart_count / 2)
        return changed

    def _restarts(self, exit_code: int, *, init: bool) -> bool:
        """Never: no restart. OnFailure: after a failure. Always: always, but an init container only after a failure."""
        policy = self.pod.spec.restart_policy or "Always"
        if policy == "Never":
            return False
        return exit_code != 0 or (policy == "Always" and not init)

    def _restart_due(
        self, runs: Sequence[ContainerRun], commands: Sequence[Launch], restart_at: dict[str, float]
    ) -> bool:
        changed = False
        for run, launch in zip(runs, commands, strict=True):
            due = restart_at.get(run.name)
            if due is not None and time.monotonic() >= due:
                del restart_at[run.name]
                run.start(launch)
                changed = True
        return changed

    def _command(self, run: ContainerRun, volumes: Mapping[str, Path]) -> Launch:
        """How to start a container: under podman when podman holds its image, else as a process."""
        if self.kubelet.in_podman(run.spec.image):
            return self._podman_launch(run, volumes)
        return self._process_launch(run, volumes)

    def _podman_launch(self, run: ContainerRun, volumes: Mapping[str, Path]) -> Launch:
        """``podman create`` arguments: the container sees its own paths, so nothing is rewritten."""
        spec = run.spec
        env = {
            k: containers.resolve_peer(v, self.pod)
            for k, v in self._env(spec, self.kubelet.service_env(self.name)).items()
        }
        args = containers.podman_args(
            self.pod,
            spec,
            env=env,
            volumes=volumes,
            message_path=run.message_path,
            image_user=podman.image_user(spec.image),
        )
        return Launch(podman_args=args, container_name=f"k8s_{run.name}_{self.name}_{self.namespace}_{self.uid[:8]}")

    def _env(self, spec: k8s.V1Container, base: Mapping[str, str]) -> dict[str, str]:
        """The container's env resolved over ``base``, as a kubelet resolves it."""
        lookups = containers.Lookups(self.kubelet.core, self.namespace)
        return containers.container_env(
            self.pod, spec, lookups=lookups, base=base, allocatable=self.kubelet.allocatable(self.node)
        )

    def _process_launch(self, run: ContainerRun, volumes: Mapping[str, Path]) -> Launch:
        """The argv, env and working directory of a process, with container paths mapped to this pod's."""
        spec = run.spec
        paths = containers.PathMap.of(self._path_map(run, volumes))
        base = self.kubelet.base_env(self.dir, self.name)
        env = self._env(spec, base)
        # Only what the pod spec says is a container path. Host paths the kubelet supplies itself (the
        # interpreter, the base env: HOME, PYTHONPATH...) stay as they are, even when the host's
        # checkout or test directory lives under /tmp, which the pod's /tmp would otherwise capture.
        env = {
            k: v if base.get(k) == v else containers.resolve_peer(paths.rewrite(v), self.pod) for k, v in env.items()
        }
        env["KUBETUNE_SUMMARY_PATH"] = str(run.message_path)
        argv = images.command_line(spec.image, spec.command, spec.args, self.kubelet.image_table)
        argv = [w if w == images.PYTHON else paths.rewrite(containers.expand(w, env)) for w in argv]
        cwd = Path(paths.rewrite(spec.working_dir)) if spec.working_dir else self.dir
        cwd.mkdir(parents=True, exist_ok=True)
        return Launch(argv, env, cwd)

    def _path_map(self, run: ContainerRun, volumes: Mapping[str, Path]) -> dict[str, Path]:
        mapping: dict[str, Path] = {"/tmp": self.dir / "tmp"}
        mapping.update(containers.mount_map(run.spec, volumes))
        mapping[run.spec.termination_message_path or DEFAULT_TERMINATION_MESSAGE_PATH] = run.message_path
        return mapping

    def _kill_all(self, sig: signal.Signals) -> None:
        for run in [*self.init_runs, *self.runs]:
            run.signal(sig)
            if run.popen is not None:
                processes.stop_group(run.popen.pid, grace=0.0, wait=run.popen.wait)
            if run.container_id is not None:
                podman.remove(run.container_id)

    def _final_phase(self) -> str:
        ended = [r.terminated for r in self.runs]
        return "Succeeded" if all(t is not None and t["exitCode"] == 0 for t in ended) else "Failed"

    # status

    def _report(self) -> None:
        if self._abandoned.is_set():
            return
        if self.phase == "Pending" and self.runs and all(r.running or r.terminated for r in self.runs):
            self.phase = "Running"
        self.kubelet.patch_status(self.namespace, self.name, self._status())

    def _status(self) -> dict[str, Any]:
        waiting_for_init = any(r.terminated is None or r.terminated["exitCode"] != 0 for r in self.init_runs)
        containers_status = []
        for run in self.runs:
            reported = run.status()
            if waiting_for_init and "waiting" in run.state:
                reported["state"] = {"waiting": {"reason": "PodInitializing"}}
            containers_status.append(reported)
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": containers.HOST_IP,
            "hostIPs": [{"ip": containers.HOST_IP}],
            "podIP": containers.POD_IP,
            "podIPs": [{"ip": containers.POD_IP}],
            "startTime": self.start_time,
            "conditions": self._condition_list(initialized=not waiting_for_init),
            "containerStatuses": containers_status,
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        return status

    def _condition_list(self, *, initialized: bool) -> list[dict[str, str | None]]:
        terminal = self.phase in ("Succeeded", "Failed")
        unready = [r.name for r in self.runs if not r.running]
        ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        ready_message = "" if terminal else f"containers with unready status: [{' '.join(unready)}]"
        wanted = {
            "PodReadyToStartContainers": (self.sandbox_ready and not terminal, "", ""),
            "Initialized": (initialized, "" if initialized else "ContainersNotInitialized", ""),
            "ContainersReady": (not unready, "" if not unready else ready_reason, "" if not unready else ready_message),
            "Ready": (not unready, "" if not unready else ready_reason, "" if not unready else ready_message),
        }
        for kind, (true, reason, message) in wanted.items():
            value = "True" if true else "False"
            previous = self._conditions.get(kind)
            since = previous["lastTransitionTime"] if previous and previous["status"] == value else now()
            condition: dict[str, str | None] = {
                "type": kind,
                "status": value,
                "lastTransitionTime": since,
                "lastProbeTime": None,
            }
            if reason:
                condition["reason"] = reason
            if message:
                condition["message"] = message
            self._conditions[kind] = condition
        return list(self._conditions.values())


# --- the kubelet


class TestKubelet:
    """Fake nodes and the pods bound to them. :meth:`start`, add nodes, run tests, :meth:`stop`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        workdir: Path,
        extra_env: Mapping[str, str] | None = None,
        image_table: Sequence[images.Image] = images.IMAGES,
        lease_seconds: float = 5.0,
    ) -> None:
        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)
        self.coordination = k8s.CoordinationV1Api(api_client)
        self.workdir = workdir
        self.extra_env = dict(extra_env or {})
        self.image_table = image_table
        self.lease_seconds = lease_seconds
        self.nodes: dict[str, NodeSpec] = {}
        self._workers: dict[str, PodWorker] = {}
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log_handler: logging.Handler | None = None
        self._podman_ready = shutil.which("podman") is not None
        self._podman_images: dict[str, bool] = {}

    @property
    def log_path(self) -> Path:
        return self.workdir / "kubelet.log"

    # lifecycle

    def start(self) -> TestKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.log_path)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)
        log.setLevel(logging.INFO)
        for target, name in ((self._watch_pods, "kubelet-pods"), (self._renew_leases, "kubelet-leases")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop watching and renewing, and end every pod process (SIGTERM, 2 s, SIGKILL) without reporting."""
        self._stopped.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.abandon(grace=2.0)
        for worker in workers:
            worker.done.wait(10.0)
        for thread in self._threads:
            thread.join(timeout=1.0)
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()

    # nodes

    def add_node(self, spec: NodeSpec | str, *, timeout: float = 60.0) -> NodeSpec:
        """Register a node, report it Ready, renew its Lease; return once the scheduler may use it."""
        node = NodeSpec(spec) if isinstance(spec, str) else spec
        labels = {
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **({"nvidia.com/gpu.present": "true"} if node.gpus else {}),
            **node.labels,
        }
        try:
            self.core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name=node.name, labels=labels)))
        except ApiException as e:
            if e.status != 409:
                raise
        self.core.patch_node_status(node.name, self._node_status(node), _content_type=STRATEGIC)
        with self._lock:
            self.nodes[node.name] = node
        self._renew_lease(node.name)
        # TaintNodesByCondition gives a new node the not-ready taint; the node-lifecycle controller
        # removes it once it sees the node Ready. Until then nothing schedules here.
        processes.wait_until(lambda: self._schedulable(node.name), timeout=timeout, what=f"node {node.name} untainted")
        log.info("node %s registered: %s", node.name, node.resources())
        return node

    def delete_node(self, name: str) -> None:
        """The node is lost: its processes die at once, its Lease stops, its Node object is deleted.

        Its pods are left as they are; the pod GC controller deletes pods bound to a missing node
        (40 s of quarantine; 53 s in all here), as in a cluster that lost a machine.
        """
        with self._lock:
            self.nodes.pop(name, None)
            workers = [w for w in self._workers.values() if w.node == name]
        for worker in workers:
            worker.abandon(grace=0.0)
        try:
            self.core.delete_node(name)
        except ApiException as e:
            if e.status != 404:
                raise

    def allocatable(self, node: str) -> dict[str, str]:
        spec = self.nodes.get(node)
        return spec.resources() if spec else {}

    def _node_status(self, node: NodeSpec) -> dict[str, Any]:
        stamp = now()
        healthy = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            ("Ready", "True", "KubeletReady", "test kubelet is posting ready status"),
        ]
        conditions = [
            {"type": kind, "status": status, "reason": reason, "message": message}
            | {"lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
            for kind, status, reason, message in healthy
        ]
        addresses = [{"type": "InternalIP", "address": containers.HOST_IP}, {"type": "Hostname", "address": node.name}]
        info = {
            "kubeletVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": "amd64",
            "containerRuntimeVersion": "testkubelet://1",
            "osImage": "kubetune test kubelet",
            "kernelVersion": "",
            "kubeProxyVersion": "",
            "machineID": node.name,
            "systemUUID": node.name,
            "bootID": node.name,
        }
        return {
            "status": {
                "capacity": node.resources(),
                "allocatable": node.resources(),
                "conditions": conditions,
                "addresses": addresses,
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": info,
            }
        }

    def _schedulable(self, name: str) -> bool:
        taints = self.core.read_node(name).spec.taints or []
        return not any(t.key.startswith("node.kubernetes.io/not-ready") for t in taints)

    def _renew_leases(self) -> None:
        while not self._stopped.wait(self.lease_seconds):
            with self._lock:
                names = list(self.nodes)
            for name in names:
                try:
                    self._renew_lease(name)
                except Exception:  # the API may blip; the next round renews
                    log.exception("renewing lease of %s", name)

    def _renew_lease(self, name: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            self.coordination.patch_namespaced_lease(
                name, LEASE_NAMESPACE, {"spec": {"renewTime": stamp}}, _content_type=MERGE
            )
        except ApiException as e:
            if e.status != 404:
                raise
            node = self.core.read_node(name)
            lease = {
                "metadata": {
                    "name": name,
                    "namespace": LEASE_NAMESPACE,
                    # Owned by the Node, as the kubelet does it: deleting the node collects the lease.
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.metadata.uid}],
                },
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": stamp},
            }
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)

    # pods

    def _watch_pods(self) -> None:
        """List, then watch from the last resourceVersion seen; relist on expiry (410) or any error."""
        selector = "spec.nodeName!="
        resource_version: str | None = None
        while not self._stopped.is_set():
            try:
                if resource_version is None:
                    listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                    self._resync(listed.items)
                    resource_version = listed.metadata.resource_version
                resource_version = self._follow(selector, resource_version)
            except Exception as e:
                resource_version = None
                if self._stopped.is_set():
                    return
                if not (isinstance(e, ApiException) and e.status == 410):
                    log.warning("pod watch failed, relisting: %s", e)
                self._stopped.wait(1.0)

    def _follow(self, selector: str, resource_version: str) -> str:
        """Dispatch events until the server ends the watch; return the resourceVersion to resume from."""
        stream = watch.Watch()
        # A short server-side timeout bounds how long stop() waits for this thread.
        for event in stream.stream(
            self.core.list_pod_for_all_namespaces,
            field_selector=selector,
            resource_version=resource_version,
            timeout_seconds=5,
            allow_watch_bookmarks=True,
        ):
            if self._stopped.is_set():
                stream.stop()
                break
            if event["type"] != "BOOKMARK":
                self._dispatch(event["object"], deleted=event["type"] == "DELETED")
        return stream.resource_version or resource_version

    def _resync(self, pods: Sequence[k8s.V1Pod]) -> None:
        seen = {p.metadata.uid for p in pods}
        with self._lock:
            gone = [w for uid, w in self._workers.items() if uid not in seen]
        for worker in gone:
            self._forget(worker)
        for pod in pods:
            self._dispatch(pod, deleted=False)

    def _dispatch(self, pod: k8s.V1Pod, *, deleted: bool) -> None:
        if pod.spec.node_name not in self.nodes or self._stopped.is_set():
            return
        with self._lock:
            worker = self._workers.get(pod.metadata.uid)
            if deleted:
                if worker is not None:
                    self._forget(worker)
                return
            if worker is None:
                worker = self._adopt(pod)
                if worker is None:
                    return
        worker.observe(pod)
        if worker.done.is_set():
            worker.finalize_if_deleted()

    def _adopt(self, pod: k8s.V1Pod) -> PodWorker | None:
        """A pod seen for the first time: run it, or just finish deleting it if it already ended."""
        phase = pod.status.phase if pod.status else None
        if phase in ("Succeeded", "Failed"):
            if pod.metadata.deletion_timestamp is not None:
                self.finalize_deletion(pod.metadata.namespace, pod.metadata.name, pod.metadata.uid)
            return None
        worker = PodWorker(self, pod)
        self._workers[worker.uid] = worker
        log.info("pod %s/%s: starting on %s", worker.namespace, worker.name, worker.node)
        worker.thread.start()
        return worker

    def _forget(self, worker: PodWorker) -> None:
        """The pod object is gone: end its processes if they still run, and drop the worker."""
        worker.abandon(grace=0.0)
        with self._lock:
            self._workers.pop(worker.uid, None)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Strategic merge: conditions merge by type, so others' (PodScheduled, DisruptionTarget) stay."""
        try:
            self.core.patch_namespaced_pod_status(name, namespace, {"status": status}, _content_type=STRATEGIC)
        except ApiException as e:
            if e.status != 404:
                log.warning("pod %s/%s: status patch failed: %s", namespace, name, e)

    def finalize_deletion(self, namespace: str, name: str, uid: str) -> None:
        """The grace-0 delete a kubelet sends once a deleted pod's containers have stopped."""
        options = k8s.V1DeleteOptions(grace_period_seconds=0, preconditions=k8s.V1Preconditions(uid=uid))
        try:
            self.core.delete_namespaced_pod(name, namespace, body=options)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    def base_env(self, pod_dir: Path, pod_name: str) -> dict[str, str]:
        """What every container starts with, before its own env: a home, a /tmp, and the API's address."""
        for sub in ("home", "tmp"):
            (pod_dir / sub).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k in HOST_ENV}
        env.update(HOME=str(pod_dir / "home"), TMPDIR=str(pod_dir / "tmp"), **self.service_env(pod_name))
        env.update(self.extra_env)
        return env

    def service_env(self, pod_name: str) -> dict[str, str]:
        """What a kubelet tells every container, process or not: its hostname and the API's address."""
        api = urlparse(self.api_client.configuration.host)
        return {
            "HOSTNAME": pod_name,
            "KUBERNETES_SERVICE_HOST": api.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api.port or 443),
        }

    def in_podman(self, image: str) -> bool:
        """Whether podman holds this image (checked once per image and kubelet; a later build is not seen).

        Asked from the pods' threads; the podman call runs outside the kubelet's lock, which the watch
        thread also takes."""
        known = self._podman_images.get(image)
        if known is None:
            known = self._podman_ready and podman.image_exists(image)
            self._podman_images[image] = known  # a race only asks podman twice
        return known

    # faults and inspection

    def preempt(
        self, namespace: str, name: str, *, reason: str = "PreemptionByScheduler", grace: float | None = None
    ) -> None:
        """Preempt a pod as the scheduler does: DisruptionTarget condition, then a graceful delete.

        The kubelet side then follows: SIGTERM, SIGKILL after the grace period, phase Failed.
        """
        pod = self.core.read_namespaced_pod(name, namespace)
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": reason,
            "lastTransitionTime": now(),
            "message": "the test kubelet preempted this pod, as the scheduler does for a higher-priority pod",
        }
        self.core.patch_namespaced_pod_status(
            name, namespace, {"status": {"conditions": [condition]}}, _content_type=STRATEGIC
        )
        seconds = int(grace if grace is not None else (pod.spec.termination_grace_period_seconds or 30))
        self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=seconds)

    def oom_kill(self, namespace: str, name: str, *, container: str | None = None) -> None:
        """SIGKILL a running container and report it OOMKilled with exit code 137."""
        self._worker(namespace, name).oom_kill(container)

    def pod_dir(self, namespace: str, name: str) -> Path:
        """Where a pod's logs, termination messages, home, /tmp and volumes live."""
        return self._worker(namespace, name).dir

    def logs(self, namespace: str, name: str, *, container: str | None = None) -> str:
        """A container's output (stdout and stderr together), like ``kubectl logs``."""
        worker = self._worker(namespace, name)
        return worker.container(container).log_path.read_text(errors="replace")

    def _worker(self, namespace: str, name: str) -> PodWorker:
        """The newest worker for a pod name (a Job's replacement pods get new names, so this is rarely ambiguous)."""
        deadline = time.monotonic() + 10.0
        while True:
            with self._lock:
                found = [w for w in self._workers.values() if w.namespace == namespace and w.name == name]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise KeyError(f"the test kubelet runs no pod {namespace}/{name}")
            time.sleep(0.2)

    def log_files(self) -> dict[str, Path]:
        """The kubelet's own log and each container's log, for failure reports."""
        files = {"kubelet": self.log_path}
        with self._lock:
            for w in self._workers.values():
                for run in [*w.init_runs, *w.runs]:
                    files[f"{w.namespace}/{w.name}/{run.name}"] = run.log_path
        return files
