"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

No container runtime and no kubelet: nodes and pods are served by ``kubelet.TestKubelet``. Every
component listens on a free loopback port, keeps its data and log in one work directory, and is
stopped as a process group.

Authentication is a static token file (admin in system:masters, plus the controller-manager and
scheduler users that the built-in RBAC bindings name). The node-lifecycle controller stays on: it
is what removes the ``node.kubernetes.io/not-ready`` taint from a new node once it reports Ready,
and it treats a node whose Lease stops being renewed the way a real cluster does. The test
kubelet therefore renews a Lease per node.
"""

from __future__ import annotations

import secrets
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kubernetes import client as k8s

from tests.testbed import binaries, processes
from tests.testbed.pki import Pki, make_pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "kubetune-admin"
# Users the bootstrap RBAC policy binds to the roles these components need.
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
SCHEDULER_USER = "system:kube-scheduler"


@dataclass(frozen=True)
class Credentials:
    """A static-token user: who it is and the bearer token that authenticates it."""

    user: str
    token: str
    groups: tuple[str, ...] = ()


@dataclass
class ControlPlane:
    """A running control plane. Build one with :meth:`start`; always :meth:`stop` it."""

    workdir: Path
    server: str
    ca_file: Path
    admin: Credentials
    kubeconfig: Path
    pki: Pki
    etcd_url: str = ""
    components: dict[str, processes.Process] = field(default_factory=dict)
    startup_seconds: float = 0.0

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 180.0) -> ControlPlane:
        """Start every component in ``workdir`` and return once the default namespace has its ServiceAccount."""
        began = time.monotonic()
        workdir.mkdir(parents=True, exist_ok=True)
        pki = make_pki(workdir / "pki")
        users = _users()
        token_file = _write_token_file(workdir / "tokens.csv", users.values())
        port = processes.free_port()
        server = f"https://127.0.0.1:{port}"
        plane = cls(
            workdir=workdir,
            server=server,
            ca_file=pki.ca_cert,
            admin=users["admin"],
            kubeconfig=write_kubeconfig(
                workdir / "admin.kubeconfig", server=server, ca=pki.ca_cert, user=users["admin"]
            ),
            pki=pki,
        )
        try:
            plane._start_etcd(timeout=timeout)
            plane._start_apiserver(port=port, token_file=token_file, timeout=timeout)
            plane._start_controllers(users, timeout=timeout)
            plane._wait_for_default_service_account(timeout=timeout)
        except BaseException:
            plane.stop()
            raise
        plane.startup_seconds = time.monotonic() - began
        return plane

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def log_files(self) -> dict[str, Path]:
        """Each component's log file, by component name."""
        return {name: proc.log_path for name, proc in self.components.items()}

    def api_client(self, token: str | None = None) -> k8s.ApiClient:
        """A client for this API server, as the admin or as the bearer of ``token``."""
        config = k8s.Configuration()
        config.host = self.server
        config.ssl_ca_cert = str(self.ca_file)
        config.api_key = {"authorization": token or self.admin.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return k8s.ApiClient(config)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane as the admin."""
        argv = [str(binaries.require("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        """Stop the components in reverse start order (etcd last)."""
        for proc in reversed(list(self.components.values())):
            proc.stop(grace=10.0)
        self.components.clear()

    def restart_apiserver(self, *, down: float, timeout: float = 180.0) -> None:
        """A fault: stop the API server for `down` seconds, then start it again on the same port."""
        self.components.pop("kube-apiserver").stop(grace=10.0)
        time.sleep(down)
        port = int(self.server.rsplit(":", 1)[1])
        self._start_apiserver(port=port, token_file=self.workdir / "tokens.csv", timeout=timeout)

    # --- the components, in start order

    def _spawn(self, name: str, argv: Sequence[str]) -> processes.Process:
        proc = processes.start(name, argv, log_dir=self.log_dir)
        self.components[name] = proc
        return proc

    def _start_etcd(self, *, timeout: float) -> None:
        client, peer = processes.free_port(), processes.free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        proc = self._spawn(
            "etcd",
            [
                str(binaries.require("etcd")),
                "--name=testbed",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=testbed=http://127.0.0.1:{peer}",
                # Test data need not survive a power cut; fsync makes every write wait on the disk.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        processes.wait_for_http(f"{self.etcd_url}/health", process=proc, timeout=timeout)

    def _start_apiserver(self, *, port: int, token_file: Path, timeout: float) -> None:
        proc = self._spawn(
            "kube-apiserver",
            [
                str(binaries.require("kube-apiserver")),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={self.pki.serving_cert}",
                f"--tls-private-key-file={self.pki.serving_key}",
                f"--client-ca-file={self.pki.ca_cert}",
                f"--token-auth-file={token_file}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.pki.sa_public_key}",
                f"--service-account-signing-key-file={self.pki.sa_private_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # No kubelet serves the "kubernetes" Service's endpoints; don't try to maintain them.
                "--endpoint-reconciler-type=none",
                # The front-proxy settings kubeadm sets: controllers read them from a ConfigMap the
                # API server publishes, and log errors every few seconds when they are missing.
                f"--requestheader-client-ca-file={self.pki.ca_cert}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        processes.wait_for_http(
            f"{self.server}/readyz",
            process=proc,
            timeout=timeout,
            ssl_context=ssl.create_default_context(cafile=str(self.ca_file)),
            headers={"Authorization": f"Bearer {self.admin.token}"},
        )

    def _start_controllers(self, users: Mapping[str, Credentials], *, timeout: float) -> None:
        cm_config = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig", server=self.server, ca=self.ca_file, user=users["cm"]
        )
        sched_config = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig", server=self.server, ca=self.ca_file, user=users["scheduler"]
        )
        cm_port, sched_port = processes.free_port(), processes.free_port()
        cm = self._spawn(
            "kube-controller-manager",
            [
                str(binaries.require("kube-controller-manager")),
                *self._serving_flags(cm_config, cm_port),
                # Each controller acts as its own ServiceAccount, so RBAC denials show up as in a real cluster.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki.sa_private_key}",
                f"--root-ca-file={self.ca_file}",
                f"--cluster-signing-cert-file={self.pki.ca_cert}",
                f"--cluster-signing-key-file={self.pki.ca_key}",
                # All default controllers: job, garbagecollector, podgc, serviceaccount, node-lifecycle, ...
                "--controllers=*",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
            ],
        )
        sched = self._spawn(
            "kube-scheduler", [str(binaries.require("kube-scheduler")), *self._serving_flags(sched_config, sched_port)]
        )
        context = ssl.create_default_context(cafile=str(self.ca_file))
        for proc, port in ((cm, cm_port), (sched, sched_port)):
            processes.wait_for_http(
                f"https://127.0.0.1:{port}/healthz", process=proc, timeout=timeout, ssl_context=context
            )

    def _serving_flags(self, kubeconfig: Path, port: int) -> list[str]:
        """Flags the controller-manager and scheduler share: identity, health endpoint, no leader election."""
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={self.pki.serving_cert}",
            f"--tls-private-key-file={self.pki.serving_key}",
            # One instance only: electing a leader just delays the start by a lease period.
            "--leader-elect=false",
        ]

    def _wait_for_default_service_account(self, *, timeout: float) -> None:
        """The serviceaccount controller is working once ``default/default`` exists; pods need it."""
        with self.api_client() as api:
            wait_for_service_account(k8s.CoreV1Api(api), "default", timeout=timeout, check=self._check_alive)

    def _check_alive(self) -> None:
        for proc in self.components.values():
            proc.check_alive()


def wait_for_service_account(
    core: k8s.CoreV1Api,
    namespace: str,
    *,
    name: str = "default",
    timeout: float = 60.0,
    check: Callable[[], None] | None = None,
) -> None:
    """Wait until the ServiceAccount exists; the ServiceAccount admission plugin rejects pods before that."""

    def exists() -> bool:
        return bool(core.list_namespaced_service_account(namespace, field_selector=f"metadata.name={name}").items)

    processes.wait_until(exists, timeout=timeout, what=f"ServiceAccount {namespace}/{name}", check=check)


def _users() -> dict[str, Credentials]:
    return {
        "admin": Credentials(ADMIN_USER, secrets.token_hex(16), ("system:masters",)),
        "cm": Credentials(CONTROLLER_MANAGER_USER, secrets.token_hex(16)),
        "scheduler": Credentials(SCHEDULER_USER, secrets.token_hex(16)),
    }


def _write_token_file(path: Path, users: Iterable[Credentials]) -> Path:
    """The static token file: ``token,user,uid,"group1,group2"`` per line."""
    lines = [f'{u.token},{u.user},{u.user},"{",".join(u.groups)}"' for u in users]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def write_kubeconfig(path: Path, *, server: str, ca: Path, user: Credentials, namespace: str = "default") -> Path:
    """A kubeconfig with one cluster, one token user and one current context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user.user, "user": {"token": user.token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user.user, "namespace": namespace}}],
        "current-context": "testbed",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
