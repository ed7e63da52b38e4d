"""What a FineTuneJob's status says of Kueue's Workload, and how the operator makes the Workload follow
runPolicy.suspend (kubetune_operator.kueue): pure functions, on Workloads shaped as Kueue v0.19 writes them."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kubetune_operator.__main__ import require_kueue
from kubetune_operator.kueue import DEACTIVATED_BY, activation, explain, held, of_job, workload_view

JOB = {"metadata": {"name": "bert", "uid": "job-uid"}}


def workload(*conditions: dict[str, Any], active: bool | None = None, **meta: Any) -> dict[str, Any]:
    body = {
        "metadata": {
            "name": "job-bert-1a2b3",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "bert", "uid": "job-uid", "controller": True}
            ],
            **meta,
        },
        "spec": {"queueName": "team", **({} if active is None else {"active": active})},
        "status": {"conditions": [{"lastTransitionTime": "2026-01-01T00:00:00Z", **c} for c in conditions]},
    }
    view = workload_view(body)
    assert view is not None
    return view


def cond(kind: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_a_workload_of_anything_but_a_job_is_not_read() -> None:
    pod_owned = {"metadata": {"name": "pod-x", "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "x"}]}}
    assert workload_view(pod_owned) is None
    assert workload_view({"metadata": {"name": "bare"}}) is None
    # Only the Job that controls it (Kueue's reference): another ownerReference anyone could add.
    claimed = {"metadata": {"name": "w", "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "x"}]}}
    assert workload_view(claimed) is None


def test_the_jobs_workload_is_the_newest_naming_its_uid() -> None:
    old, new = workload(), workload(creationTimestamp="2026-01-02T00:00:00Z")
    other = {**new, "job": {"name": "bert", "uid": "an-earlier-job"}}
    assert of_job([old, new, other], JOB) is new
    assert of_job([other], JOB) is None and of_job([old], None) is None
    twin = {**new, "metadata": {**new["metadata"], "name": "job-bert-zzzzz"}}  # created in the same second
    assert of_job([twin, new], JOB) is twin and of_job([new, twin], JOB) is twin


def test_waiting_for_quota_says_the_queue_and_kueues_words() -> None:
    lacking = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu"
    reason, message = explain(workload(cond("QuotaReserved", "False", "Pending", lacking)), "team")
    assert reason == "Queued" and "team" in message and lacking in message
    assert explain(None, "team") == ("Queued", "waiting in Kueue's queue team until Kueue admits it")
    assert explain(workload(), "team")[0] == "Queued"


def test_preemption_says_preempted_by_kueue_and_that_it_comes_back() -> None:
    why = "Preempted to accommodate a workload (UID: u, JobUID: j) due to prioritization in the ClusterQueue"
    preempted = workload(
        cond("QuotaReserved", "False", "Pending", "Preempted"),
        cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload"),
        cond("Preempted", "True", "InClusterQueue", why),
    )
    reason, message = explain(preempted, "team")
    assert reason == "Preempted" and why in message and "resumes from its last checkpoint" in message


def test_other_evictions_name_their_cause() -> None:
    slow = workload(cond("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout ns/bert"))
    assert explain(slow, "team")[0] == "PodsReadyTimeout" and "not ready in time" in explain(slow, "team")[1]
    stopped = workload(cond("Evicted", "True", "ClusterQueueStopped", "The ClusterQueue is stopped"))
    assert explain(stopped, "team") == (
        "Evicted",
        "evicted by Kueue (ClusterQueueStopped: The ClusterQueue is stopped); queued again in Kueue's queue team; "
        "it resumes from its last checkpoint when Kueue admits it",
    )
    limit = workload(cond("Evicted", "True", "Deactivated", "exceeded the maximum number of re-queuing retries"))
    limit["active"] = False
    assert explain(limit, "team") == (
        "Deactivated",
        "Kueue's Workload job-bert-1a2b3 is deactivated (exceeded the maximum number of re-queuing retries): "
        "Kueue admits it once it is active again",
    )
    # An eviction that is over (admitted again: Kueue resets the condition) explains nothing.
    assert explain(workload(cond("Evicted", "False", "QuotaReserved")), "team")[0] == "Queued"


def test_suspend_deactivates_the_workload_and_marks_it() -> None:
    patch = activation(workload(), suspend=True, owner_uid="ftj-uid")
    assert patch == {"metadata": {"annotations": {DEACTIVATED_BY: "ftj-uid"}}, "spec": {"active": False}}
    ours = workload(active=False, annotations={DEACTIVATED_BY: "ftj-uid"})
    assert activation(ours, suspend=True, owner_uid="ftj-uid") is None
    assert activation(workload(), suspend=False, owner_uid="ftj-uid") is None
    assert activation(None, suspend=True, owner_uid="ftj-uid") is None


def test_resume_reactivates_only_what_the_operator_deactivated() -> None:
    ours = workload(active=False, annotations={DEACTIVATED_BY: "ftj-uid"})
    assert activation(ours, suspend=False, owner_uid="ftj-uid") == {
        "metadata": {"annotations": {DEACTIVATED_BY: None}},
        "spec": {"active": True},
    }
    # Kueue's own deactivation (a requeuing limit), an admin's, or an earlier FineTuneJob's mark stays.
    assert activation(workload(active=False), suspend=False, owner_uid="ftj-uid") is None
    earlier = workload(active=False, annotations={DEACTIVATED_BY: "another-uid"})
    assert activation(earlier, suspend=False, owner_uid="ftj-uid") is None


def test_an_inactive_workload_is_deactivated_whatever_evicted_it_first() -> None:
    """Kueue keeps the Preempted eviction on a Workload an admin then deactivates: it waits for its
    activation, not for Kueue."""
    preempted = cond("Evicted", "True", "Preempted", "Preempted to accommodate a workload")
    assert explain(workload(preempted, active=False), "team")[0] == "Deactivated"


def test_a_reactivated_workload_waits_in_the_queue_again() -> None:
    """Resumed after a suspend: the Deactivated eviction stays until Kueue admits it, and it is queued."""
    lacking = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor gpu"
    resumed = workload(
        cond("Evicted", "True", "Deactivated", "The workload is deactivated"),
        cond("QuotaReserved", "False", "Pending", lacking),
        active=True,
    )
    assert explain(resumed, "team") == ("Queued", f"waiting in Kueue's queue team: {lacking}")


def test_held_is_none_for_a_suspend_the_operator_carries_out() -> None:
    assert held(workload(), "team", suspend=True, support=True) is None
    assert held(workload(), "team", suspend=False, support=True) == explain(workload(), "team")
    assert held(workload(), "team", suspend=False, support=False) == explain(workload(), "team")
    # Without the operator's Kueue support a suspend cannot hold: it says so, instead of Suspended.
    reason, message = held(None, "team", suspend=True, support=False) or ("", "")
    assert reason == "Queued" and "kueue.enabled" in message


class Discovery:
    """The API server's discovery of kueue.x-k8s.io/v1beta2, as CustomObjectsApi answers it."""

    def __init__(self, served: list[str] | None) -> None:
        self.served = served

    def get_api_resources(self, group: str, version: str) -> Any:
        assert (group, version) == ("kueue.x-k8s.io", "v1beta2")
        if self.served is None:
            raise ApiException(status=404, reason="Not Found")
        return type("List", (), {"resources": [type("Resource", (), {"name": n}) for n in self.served]})


def test_kueue_support_needs_kueues_workloads_served() -> None:
    require_kueue(Discovery(["workloads", "workloads/status", "clusterqueues"]))  # type: ignore[arg-type]
    for served in (None, ["clusterqueues"]):
        with pytest.raises(SystemExit, match="install Kueue"):
            require_kueue(Discovery(served))  # type: ignore[arg-type]
