"""FineTuneJobs under Kueue (its real controller manager and webhooks) on the real control plane:
quota, queueing, and who flips a Job's suspend flag."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch

from tests.conftest import require_binaries
from tests.integration.conftest import status, wait_phase
from tests.kube import apply, get, wait_for
from tests.testbed import binaries

pytestmark = pytest.mark.integration
API = "kueue.x-k8s.io/v1beta2"
FLAVOR = "gpu"


@pytest.fixture(scope="module")
def kueue(control_plane: Any, testbed_dir: Any) -> Iterator[Any]:
    """Kueue for this module only: its webhooks see every Job while it runs."""
    require_binaries(binaries.KUEUE, "Kueue")
    from tests.testbed.kueue import Kueue

    manager = Kueue.start(testbed_dir / "kueue", control_plane)
    yield manager
    manager.stop()


@pytest.fixture
def queue(control_plane: Any, kueue: Any, namespace: str) -> str:
    """A LocalQueue ``team`` in the test's namespace, on a ClusterQueue with a quota of one GPU."""
    cluster_queue = f"cq-{namespace}"[:63]
    apply(control_plane, {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}})
    quota = [("cpu", "64"), ("memory", "256Gi"), ("nvidia.com/gpu", "1")]
    apply(
        control_plane,
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": [name for name, _ in quota],
                        "flavors": [{"name": FLAVOR, "resources": [{"name": n, "nominalQuota": q} for n, q in quota]}],
                    }
                ],
            },
        },
    )
    local = {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": "team"}}
    apply(control_plane, {**local, "spec": {"clusterQueue": cluster_queue}}, namespace=namespace)
    return "team"


class SuspendFlips:
    """Every change of a Job's spec.suspend in a namespace, with the field manager that made it."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.batch, self.namespace = k8s.BatchV1Api(api), namespace
        self.flips: list[tuple[str, bool, str]] = []
        self._last: dict[str, bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> SuspendFlips:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        stream = watch.Watch()
        while not self._stop.is_set():
            for event in stream.stream(self.batch.list_namespaced_job, self.namespace, timeout_seconds=2):
                job = event["raw_object"]
                name, suspend = job["metadata"]["name"], bool(job["spec"].get("suspend"))
                if name in self._last and self._last[name] != suspend:
                    self.flips.append((name, suspend, suspend_manager(job)))
                self._last[name] = suspend


def suspend_manager(job: dict[str, Any]) -> str:
    """The field manager that owns spec.suspend (the last to set it), from managedFields."""
    owners = [
        (entry.get("time") or "", entry["manager"])
        for entry in job["metadata"].get("managedFields") or ()
        if "f:suspend" in json.dumps((entry.get("fieldsV1") or {}).get("f:spec") or {})
    ]
    return max(owners)[1] if owners else ""


def test_second_job_waits_for_the_quota_and_starts_when_the_first_ends(
    control_plane: Any, kube_admin: Any, run: Any, queue: str, namespace: str
) -> None:
    """Two FineTuneJobs that each need the whole GPU quota: the first runs, the second waits queued and
    starts when the first ends; every flip of either Job's suspend flag is Kueue's, never the operator's."""
    with SuspendFlips(kube_admin, namespace) as watcher:
        run("first", hyperparameters={"epochs": 3}, scheduling={"queueName": queue})
        wait_phase(control_plane, namespace, "first", "Running", timeout=180)
        run("second", hyperparameters={"epochs": 1}, scheduling={"queueName": queue})
        job = wait_for("the second Job", lambda: get(control_plane, "job", "second", namespace))
        assert job["spec"]["suspend"] is True
        waiting = wait_for(
            "the second to say it is queued",
            lambda: (s := status(control_plane, namespace, "second")).get("phase") == "Pending" and s,
            timeout=60,
        )
        assert queue in waiting["message"] and "Kueue" in waiting["message"], waiting
        running = {c["type"]: c for c in waiting["conditions"]}["Running"]
        assert running["status"] == "False" and running["reason"] == "Queued", waiting
        assert status(control_plane, namespace, "first")["phase"] == "Running"
        wait_phase(control_plane, namespace, "first", "Succeeded", timeout=300)
        wait_phase(control_plane, namespace, "second", "Succeeded", timeout=300)
    assert {(name, suspend) for name, suspend, _ in watcher.flips} == {("first", False), ("second", False)}
    assert all("kueue" in manager.lower() for _, _, manager in watcher.flips), watcher.flips
