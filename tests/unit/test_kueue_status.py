"""What a FineTuneJob's status says of Kueue's Workload, and how the operator makes the Workload follow
runPolicy.suspend (kubetune_operator.kueue): pure functions, on Workloads shaped as Kueue v0.19 writes them."""

from __future__ import annotations

from typing import Any

from kubetune_operator.kueue import DEACTIVATED_BY, activation, explain, of_job, workload_view

JOB = {"metadata": {"name": "bert", "uid": "job-uid"}}


def workload(*conditions: dict[str, Any], active: bool | None = None, **meta: Any) -> dict[str, Any]:
    body = {
        "metadata": {
            "name": "job-bert-1a2b3",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "bert", "uid": "job-uid"}],
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


def test_the_jobs_workload_is_the_newest_naming_its_uid() -> None:
    old, new = workload(), workload(creationTimestamp="2026-01-02T00:00:00Z")
    other = {**new, "job": {"name": "bert", "uid": "an-earlier-job"}}
    assert of_job([old, new, other], JOB) is new
    assert of_job([other], JOB) is None and of_job([old], None) is None


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
    limit = workload(
        cond("Evicted", "True", "DeactivatedDueToRequeuingLimitExceeded", "exceeded the requeuing limit"), active=False
    )
    assert explain(limit, "team")[0] == "Deactivated"
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
