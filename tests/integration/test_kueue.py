"""FineTuneJobs under Kueue (its real controller manager and webhooks) and the operator with its Kueue
support on, on the real control plane: quota and queueing, priority preemption and resume, gang
admission of a two-node run, a user's suspend while Kueue holds the Job, and, over every test, who
flips a Job's suspend flag (Kueue, never the operator)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import watch

from tests.integration.conftest import (
    PODS_READY_TIMEOUT,
    committed,
    pod_summary,
    pods,
    status,
    wait_phase,
    workload_of,
)
from tests.kube import apply, get, wait_for

pytestmark = pytest.mark.integration
#: The operator runs with its Kueue support on (tests/integration/conftest.py's operator fixture).
KUEUE = True
API = "kueue.x-k8s.io/v1beta2"
FLAVOR = "gpu"


def make_queue(plane: Any, namespace: str, *, gpus: int) -> str:
    """A LocalQueue ``team`` in ``namespace`` on a ClusterQueue of its own with a quota of ``gpus`` GPUs,
    where a workload of higher priority preempts one of lower priority."""
    cluster_queue = f"cq-{namespace}"[:63]
    apply(plane, {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}})
    quota = [("cpu", "64"), ("memory", "256Gi"), ("nvidia.com/gpu", str(gpus))]
    apply(
        plane,
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
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
    apply(plane, {**local, "spec": {"clusterQueue": cluster_queue}}, namespace=namespace)
    return "team"


@pytest.fixture
def queue(control_plane: Any, kueue: Any, namespace: str) -> str:
    """A LocalQueue ``team`` on a ClusterQueue with a quota of one GPU."""
    return make_queue(control_plane, namespace, gpus=1)


@pytest.fixture(scope="module")
def priorities(control_plane: Any) -> dict[str, str]:
    """PriorityClasses ``low`` and ``high`` (Kueue takes a workload's priority from its pods')."""
    names = {"low": "kubetune-test-low", "high": "kubetune-test-high"}
    for level, value in (("low", 100), ("high", 1000)):
        apply(
            control_plane,
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": names[level]}}
            | {"value": value, "preemptionPolicy": "Never"},
        )
    return names


def wait_reason(plane: Any, namespace: str, name: str, reason: str, *, timeout: float) -> dict[str, Any]:
    """The FineTuneJob's status once its Running condition has ``reason`` (why it is not running)."""

    def seen() -> dict[str, Any] | None:
        st = status(plane, namespace, name)
        running = {c["type"]: c for c in st.get("conditions") or ()}.get("Running", {})
        return st if running.get("reason") == reason else None

    return wait_for(f"{name} to say {reason}", seen, timeout=timeout)


def running_pods(plane: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods(plane, namespace, name) if p["status"].get("phase") in ("Pending", "Running")]


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
        # The queue, and Kueue's own words from the Workload: what the quota lacks.
        assert queue in waiting["message"] and "insufficient unused quota" in waiting["message"], waiting
        running = {c["type"]: c for c in waiting["conditions"]}["Running"]
        assert running["status"] == "False" and running["reason"] == "Queued", waiting
        assert status(control_plane, namespace, "first")["phase"] == "Running"
        wait_phase(control_plane, namespace, "first", "Succeeded", timeout=300)
        wait_phase(control_plane, namespace, "second", "Succeeded", timeout=300)
    assert {(name, suspend) for name, suspend, _ in watcher.flips} == {("first", False), ("second", False)}
    assert all("kueue" in manager.lower() for _, _, manager in watcher.flips), watcher.flips


def assert_flips_are_kueues(watcher: SuspendFlips) -> None:
    assert watcher.flips and all("kueue" in manager.lower() for _, _, manager in watcher.flips), watcher.flips


def test_higher_priority_preempts_a_running_job_which_resumes_from_its_checkpoint(
    control_plane: Any, kube_admin: Any, run: Any, queue: str, namespace: str, priorities: dict[str, str]
) -> None:
    """A higher-priority FineTuneJob preempts a running lower one through Kueue: the lower one's pod stops
    at a committed checkpoint, its status says Preempted by Kueue (Pending, not Failed, no retry used),
    and once the higher one ends it resumes from that checkpoint and ends at the uninterrupted final step."""
    with SuspendFlips(kube_admin, namespace) as watcher:
        low = run(
            "low",
            hyperparameters={"epochs": 10},  # 1000 steps: still training when the higher one comes
            scheduling={"queueName": queue, "priorityClassName": priorities["low"]},
            runPolicy={"maxRetries": 0},  # a preemption that used a retry would fail the run
        )
        wait_phase(control_plane, namespace, "low", "Running", timeout=180)
        wait_for("a committed checkpoint", lambda: committed(low), timeout=180, every=0.2)
        run("high", scheduling={"queueName": queue, "priorityClassName": priorities["high"]})
        preempted = wait_reason(control_plane, namespace, "low", "Preempted", timeout=120)
        assert preempted["phase"] == "Pending" and "preempted by Kueue" in preempted["message"], preempted
        assert "prioritization" in preempted["message"] and queue in preempted["message"], preempted
        wait_for("the lower one's pod to stop", lambda: not running_pods(control_plane, namespace, "low"), timeout=90)
        stopped_at = max(committed(low))  # its SIGTERM checkpoint, committed before the pod ended
        wait_phase(control_plane, namespace, "high", "Succeeded", timeout=300)
        done = wait_phase(control_plane, namespace, "low", "Succeeded", timeout=400)
    assert ("low", True) in {(n, s) for n, s, _ in watcher.flips}
    assert_flips_are_kueues(watcher)
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == 1000, done
    assert done["preemptions"] >= 1 and done["failureCount"] == done["preemptions"], done  # no error counted
    assert done["lastRestartReason"] == "Preempted", done
    job = get(control_plane, "job", "low", namespace) or {}
    assert not job["status"].get("failed"), job["status"]  # the Job's retries were not touched
    resumed = pod_summary(pods(control_plane, namespace, "low")[-1])
    assert resumed["resumedFromStep"] == stopped_at >= 20 and resumed["finalStep"] == 1000, resumed


def test_two_node_job_is_admitted_as_one_unit(
    control_plane: Any, kube_admin: Any, run: Any, kueue: Any, namespace: str
) -> None:
    """A two-node FineTuneJob (one GPU per node) with one GPU of a two-GPU quota in use waits with no pod at
    all (Kueue admits both pods or none), then starts both at once and trains as one run."""
    team = make_queue(control_plane, namespace, gpus=2)
    with SuspendFlips(kube_admin, namespace) as watcher:
        run("single", hyperparameters={"epochs": 3}, scheduling={"queueName": team})
        wait_phase(control_plane, namespace, "single", "Running", timeout=180)
        run("pair", resources={"nodes": 2, "gpus": 1}, scheduling={"queueName": team})
        waiting = wait_for(
            "the pair to be queued for quota",
            lambda: (
                "insufficient unused quota" in (s := status(control_plane, namespace, "pair")).get("message", "") and s
            ),
            timeout=60,
        )
        assert waiting["phase"] == "Pending", waiting
        while status(control_plane, namespace, "single").get("phase") == "Running":
            assert pods(control_plane, namespace, "pair") == []  # not one pod while only one GPU is free
            time.sleep(0.5)
        done = wait_phase(control_plane, namespace, "pair", "Succeeded", timeout=400)
    assert_flips_are_kueues(watcher)
    assert {(n, s) for n, s, _ in watcher.flips} == {("single", False), ("pair", False)}
    assert done["progress"]["step"] == 50, done  # 800 examples, 8 per process, 2 processes
    ran = pods(control_plane, namespace, "pair")
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in ran) == ["0", "1"]
    admitted = workload_of(control_plane, namespace, "pair") or {}
    (podset,) = admitted["status"]["admission"]["podSetAssignments"]
    assert podset["count"] == 2 and podset["resourceUsage"]["nvidia.com/gpu"] == "2", podset


def test_user_suspend_while_kueue_holds_the_job_stays_suspended_and_resumes(
    control_plane: Any, kube_admin: Any, run: Any, queue: str, namespace: str
) -> None:
    """runPolicy.suspend on a running FineTuneJob that Kueue admitted: the operator deactivates its Workload,
    Kueue stops the Job (it would unsuspend a Job anyone else suspended), the FineTuneJob stays Suspended,
    also while another job takes the quota; suspend: false queues it again (status says for what, in Kueue's
    words), and once the quota is free it resumes from its checkpoint."""
    with SuspendFlips(kube_admin, namespace) as watcher:
        doc = run("pausable", hyperparameters={"epochs": 6}, scheduling={"queueName": queue})
        wait_phase(control_plane, namespace, "pausable", "Running", timeout=180)
        wait_for("a committed checkpoint", lambda: committed(doc), timeout=180, every=0.2)
        doc["spec"]["runPolicy"] = {"suspend": True}
        assert apply(control_plane, doc, namespace=namespace).returncode == 0
        wait_phase(control_plane, namespace, "pausable", "Suspended", timeout=90)
        wait_for("the pod to stop", lambda: not running_pods(control_plane, namespace, "pausable"), timeout=90)
        stopped_at = max(committed(doc))
        workload = workload_of(control_plane, namespace, "pausable") or {}
        assert workload["spec"]["active"] is False, workload
        # The quota it freed goes to another job; it stays suspended: Kueue does not admit an inactive
        # Workload, and nobody unsuspends the Job.
        run("filler", hyperparameters={"epochs": 4}, scheduling={"queueName": queue})
        wait_phase(control_plane, namespace, "filler", "Running", timeout=180)
        for _ in range(10):
            assert status(control_plane, namespace, "pausable")["phase"] == "Suspended"
            assert (get(control_plane, "job", "pausable", namespace) or {})["spec"]["suspend"] is True
            time.sleep(1)
        doc["spec"]["runPolicy"] = {"suspend": False}
        assert apply(control_plane, doc, namespace=namespace).returncode == 0
        # Queued (not Deactivated: Kueue keeps that eviction's condition until it admits the Workload again),
        # with what it waits for once Kueue's scheduler has looked at it again.
        queued = wait_for(
            "pausable to wait for the quota",
            lambda: (
                "insufficient unused quota" in (st := status(control_plane, namespace, "pausable"))["message"] and st
            ),
            timeout=60,
        )
        running = {c["type"]: c for c in queued["conditions"]}["Running"]
        assert queued["phase"] == "Pending" and running["reason"] == "Queued", queued
        wait_phase(control_plane, namespace, "filler", "Succeeded", timeout=300)
        wait_phase(control_plane, namespace, "pausable", "Succeeded", timeout=300)
    assert [(n, s) for n, s, _ in watcher.flips if n == "pausable"] == [
        ("pausable", False),
        ("pausable", True),
        ("pausable", False),
    ]
    assert_flips_are_kueues(watcher)
    resumed = pod_summary(pods(control_plane, namespace, "pausable")[-1])
    assert resumed["resumedFromStep"] == stopped_at >= 20 and resumed["finalStep"] == 600, resumed


def test_created_suspended_gets_no_job_until_resumed(
    control_plane: Any, kube_admin: Any, run: Any, queue: str, namespace: str
) -> None:
    """A FineTuneJob created with runPolicy.suspend and a queue gets no Job (so no Workload that Kueue could
    admit before anyone deactivates it): it is Suspended; suspend: false creates the Job, Kueue admits it."""
    with SuspendFlips(kube_admin, namespace) as watcher:
        doc = run("later", scheduling={"queueName": queue}, runPolicy={"suspend": True})
        st = wait_phase(control_plane, namespace, "later", "Suspended", timeout=60)
        assert "suspended before it started" in st["message"] and queue in st["message"], st
        time.sleep(5)
        assert get(control_plane, "job", "later", namespace) is None
        doc["spec"]["runPolicy"] = {"suspend": False}
        assert apply(control_plane, doc, namespace=namespace).returncode == 0
        wait_phase(control_plane, namespace, "later", "Succeeded", timeout=300)
    assert [(n, s) for n, s, _ in watcher.flips] == [("later", False)]
    assert_flips_are_kueues(watcher)


def test_pods_not_ready_in_time_are_evicted_and_status_says_so(
    control_plane: Any, run: Any, queue: str, namespace: str
) -> None:
    """Kueue admits a FineTuneJob whose pod can never run (no node has the label it requires); after
    waitForPodsReady's timeout Kueue evicts it and queues it again, and status says why, in the user's words."""
    run("stuck", scheduling={"queueName": queue, "nodeSelector": {"example.com/no-such-pool": "true"}})
    wait_reason(control_plane, namespace, "stuck", "Unschedulable", timeout=120)
    evicted = wait_reason(control_plane, namespace, "stuck", "PodsReadyTimeout", timeout=PODS_READY_TIMEOUT + 60)
    assert evicted["phase"] == "Pending" and "not ready in time" in evicted["message"] and queue in evicted["message"]
    assert (get(control_plane, "job", "stuck", namespace) or {})["spec"]["suspend"] is True
