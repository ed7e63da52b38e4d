"""Kueue's controller manager against the test bed's control plane, with its webhooks.

``tests/testbed/build kueue`` builds the manager from its Go module (``sigs.k8s.io/kueue/cmd/kueue``, the
newest version the module proxy serves: see ``KUEUE_VERSION`` there) and copies the module's CRDs and
webhook manifests next to the binary (``kueue-<version>/``). :meth:`Kueue.start` installs the CRDs, runs
the manager (batch/v1 Jobs as its only integration, no leader election) and registers its webhooks.

Webhooks use the project's own pki, not Kueue's internal certificate management (which rotates a
certificate for an in-cluster Service that does not exist here): the manager serves with the control
plane's serving certificate (SAN 127.0.0.1), and the webhook configurations call
``https://127.0.0.1:<port><path>`` with the control plane's CA. Only the webhooks of what is enabled are
registered (Kueue's own kinds and batch/v1 Jobs): one for a disabled integration, pods above all, would
refuse every object of its kind.

Without internal certificate management the manager also reads its metrics server's certificate from a
fixed path, /etc/kueue/metrics/certs. It runs in a private mount namespace (``unshare``) where the same
certificate directory is bind-mounted there; the host keeps only the empty mount point.
"""

from __future__ import annotations

import base64
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed import binaries, processes
from tests.testbed.cluster import ControlPlane

#: The webhook paths kept: Kueue's own API and batch/v1 Jobs (the one integration enabled).
WEBHOOK_PATHS = ("-kueue-x-k8s-io-", "-batch-v1-job")
#: Where the manager reads its metrics certificate when it does not manage certificates itself (not configurable).
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
#: Bind-mount $1 at $2 in this (private) mount namespace, then run the rest.
IN_PRIVATE_MOUNTS = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def manifests_dir() -> Path:
    """Where the build put the module's CRDs and webhook manifests (next to the ``kueue`` binary)."""
    binary = binaries.require("kueue").resolve()  # kueue -> kueue-<version>
    return binary.parent / f"{binary.name}.manifests"


def webhook_configurations(manifests: list[dict[str, Any]], *, port: int, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations, calling the manager at 127.0.0.1:``port``, only for what is enabled."""
    out = []
    for doc in manifests:
        hooks = []
        for hook in doc.get("webhooks") or ():
            path = hook["clientConfig"]["service"]["path"]
            if any(p in path for p in WEBHOOK_PATHS):
                hook = {**hook, "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle}}
                hooks.append(hook)
        name = f"kubetune-testbed-kueue-{doc['metadata']['name']}"
        out.append({**doc, "metadata": {"name": name}, "webhooks": hooks})
    return out


def configuration(
    *, webhook_port: int, health_port: int, metrics_port: int, cert_dir: Path, pods_ready_timeout: float | None = None
) -> dict[str, Any]:
    """The manager's Configuration; with ``pods_ready_timeout`` (seconds), waitForPodsReady: a workload
    whose pods are not all ready that long after admission is evicted (PodsReadyTimeout) and requeued."""
    ready = {"waitForPodsReady": {"timeout": f"{pods_ready_timeout:g}s"}} if pods_ready_timeout else {}
    return ready | {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}", "enableClusterQueueResources": True},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


@dataclass
class Kueue:
    """A running Kueue manager: its process, its ports and the objects it installed."""

    workdir: Path
    plane: ControlPlane
    process: processes.Process
    webhook_port: int
    metrics_port: int
    webhooks: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls, workdir: Path, plane: ControlPlane, *, timeout: float = 120.0, pods_ready_timeout: float | None = None
    ) -> Kueue:
        manifests = manifests_dir()
        workdir.mkdir(parents=True, exist_ok=True)
        plane.kubectl("apply", "--server-side", "-f", str(manifests / "crds"), timeout=120)
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        if plane.kubectl("get", "namespace", "kueue-system", check=False).returncode != 0:
            plane.kubectl("create", "namespace", "kueue-system")
        certs = workdir / "certs"
        certs.mkdir(exist_ok=True)
        shutil.copy(plane.pki.serving_cert, certs / "tls.crt")
        shutil.copy(plane.pki.serving_key, certs / "tls.key")
        ports = {k: processes.free_port() for k in ("webhook", "health", "metrics")}
        config = workdir / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                configuration(
                    webhook_port=ports["webhook"],
                    health_port=ports["health"],
                    metrics_port=ports["metrics"],
                    cert_dir=certs,
                    pods_ready_timeout=pods_ready_timeout,
                )
            )
        )
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)  # the mount point
        manager = [str(binaries.require("kueue")), f"--config={config}", f"--kubeconfig={plane.kubeconfig}"]
        # No visibility API server (pending workloads on demand): it needs its own certificate and an APIService.
        manager.append("--feature-gates=VisibilityOnDemand=false")
        private = ["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_PRIVATE_MOUNTS, "sh"]
        argv = [*private, str(certs), str(METRICS_CERTS), *manager]
        proc = processes.start("kueue", argv, log_dir=workdir / "logs")
        kueue = cls(workdir, plane, proc, ports["webhook"], ports["metrics"])
        try:
            processes.wait_for_http(f"http://127.0.0.1:{ports['health']}/readyz", process=proc, timeout=timeout)
            kueue._register_webhooks(manifests)
        except BaseException:
            kueue.stop()
            raise
        return kueue

    def _register_webhooks(self, manifests: Path) -> None:
        docs = [d for d in yaml.safe_load_all((manifests / "webhooks.yaml").read_text()) if d]
        ca = base64.b64encode(self.plane.ca_file.read_bytes()).decode()
        configs = webhook_configurations(docs, port=self.webhook_port, ca_bundle=ca)
        path = self.workdir / "webhooks.yaml"
        path.write_text(yaml.safe_dump_all(configs))
        self.plane.kubectl("apply", "-f", str(path))
        self.webhooks = [f"{c['kind'].lower()}/{c['metadata']['name']}" for c in configs]

    def log_files(self) -> dict[str, Path]:
        return {"kueue": self.process.log_path}

    def stop(self) -> None:
        """Remove the webhooks first (a stopped manager would refuse every Job), then stop the manager."""
        for webhook in self.webhooks:
            self.plane.kubectl("delete", "--ignore-not-found", webhook, check=False)
        self.process.stop()
