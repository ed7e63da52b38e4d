"""Fixtures for the operator's integration tests: the operator process under the chart's RBAC (module
scope, restartable by a test), a tiny model and data, and `run` to apply a FineTuneJob."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_binaries
from tests.kube import apply, get, install_crd, kubectl, operator_account, operator_process, wait_for
from tests.models import build_tiny_bert, write_pairs
from tests.testbed import binaries


class Operator:
    """The operator process, restartable by a test."""

    def __init__(self, kubeconfig: Path, workdir: Path, **settings: str) -> None:
        self.kubeconfig, self.workdir, self.settings = kubeconfig, workdir, settings
        self._ctx: Any = None
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        self._ctx = operator_process(self.kubeconfig, self.workdir, **self.settings)
        self.info = self._ctx.__enter__()

    def stop(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def kill(self) -> None:
        """SIGKILL, as a node failure or the OOM killer would: no shutdown of any kind."""
        self.info["process"].kill()
        self.info["process"].wait()
        self.stop()


@pytest.fixture(scope="module")
def assets() -> Iterator[Path]:
    # Not under /tmp: the test kubelet maps a pod's /tmp to its own directory, so paths under the
    # host's /tmp inside the spec would be rewritten.
    base = Path(tempfile.mkdtemp(prefix="kubetune-operator-", dir="/var/tmp"))
    build_tiny_bert(base / "model")
    write_pairs(base / "data", train=800, validation=40)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def operator(
    control_plane: Any, kubelet: Any, pushgateway: Any, testbed_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Operator]:
    """The operator for one module, under the operator's RBAC rules; a module that sets ``KUEUE = True``
    gets it with its Kueue support on (it watches Workloads, under rbac.rules(kueue=True)), started once
    the module's Kueue serves its CRDs."""
    kueue = bool(getattr(request.module, "KUEUE", False))
    if kueue:
        request.getfixturevalue("kueue")
    install_crd(control_plane)
    settings = {
        "allowed_image_prefixes": '["registry.test/"]',
        "pushgateway_url": pushgateway.url,
        "progress_interval_seconds": "2",
        "pushgateway_group_ttl_seconds": "3600",
        "kueue": str(kueue).lower(),
    }
    account = operator_account(control_plane, testbed_dir, kueue=kueue)
    op = Operator(account, testbed_dir / "operator", **settings)
    op.start()
    yield op
    op.stop()


def ftj(name: str, assets: Path, **spec: Any) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=assets))
    body: dict[str, Any] = {
        "model": {"uri": str(assets / "model")},
        "dataset": {"uri": str(assets / "data"), "maxLength": 32},
        "hyperparameters": {"epochs": 1, "batchSize": 8, "learningRate": 1e-3},
        "checkpoints": {"uri": str(run / "checkpoints"), "every": 20},
        "output": {"uri": str(run / "output")},
        "resources": {"gpus": 1},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}


def status(plane: Any, namespace: str, name: str) -> dict[str, Any]:
    return (get(plane, "ftj", name, namespace) or {}).get("status") or {}


def wait_phase(plane: Any, namespace: str, name: str, phase: str, timeout: float = 240) -> dict[str, Any]:
    return wait_for(
        f"{name} to be {phase}",
        lambda: (s := status(plane, namespace, name)).get("phase") == phase and s,
        timeout=timeout,
    )


def pods(plane: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    out = kubectl(plane, "get", "pods", "-n", namespace, "-l", f"kubetune.io/finetunejob={name}", "-o", "json")
    return sorted(json.loads(out.stdout)["items"], key=lambda p: p["metadata"]["creationTimestamp"])


def pod_summary(pod: dict[str, Any]) -> dict[str, Any]:
    """The job's summary as the pod ended: its container's termination message."""
    return dict(json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]))


def committed(doc: dict[str, Any]) -> list[int]:
    root = Path(doc["spec"]["checkpoints"]["uri"])
    return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("checkpoint-*/kubetune-manifest.json"))


@pytest.fixture
def run(control_plane: Any, operator: Operator, namespace: str, assets: Path) -> Any:
    """Apply a FineTuneJob in the test's namespace; return the manifest."""

    def go(name: str, **spec: Any) -> dict[str, Any]:
        doc = ftj(name, assets, **spec)
        done = apply(control_plane, doc, namespace=namespace)
        assert done.returncode == 0, done.stderr
        return doc

    return go


#: Kueue's waitForPodsReady timeout on the test bed: an admitted workload whose pods are not all ready
#: by then is evicted (PodsReadyTimeout) and queued again. Long enough for every pod the tests expect to run.
PODS_READY_TIMEOUT = 40


@pytest.fixture(scope="module")
def kueue(control_plane: Any, testbed_dir: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Kueue for one module only (its webhooks see every Job while it runs), with waitForPodsReady."""
    require_binaries(binaries.KUEUE, "Kueue")
    from tests.testbed.kueue import Kueue

    workdir = testbed_dir / "kueue" / request.module.__name__.rpartition(".")[2]
    manager = Kueue.start(workdir, control_plane, pods_ready_timeout=PODS_READY_TIMEOUT)
    yield manager
    manager.stop()


def workload_of(plane: Any, namespace: str, job: str) -> dict[str, Any] | None:
    """Kueue's Workload of the Job ``job`` (by the Job's uid, which Kueue puts in a label)."""
    uid = ((get(plane, "job", job, namespace) or {}).get("metadata") or {}).get("uid")
    out = kubectl(plane, "get", "workloads", "-n", namespace, "-l", f"kueue.x-k8s.io/job-uid={uid}", "-o", "json")
    return next(iter(json.loads(out.stdout)["items"]), None) if uid else None
