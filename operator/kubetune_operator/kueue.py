"""Kueue's Workload of a FineTuneJob's Job: what it says, in the user's words, and the one thing the
operator asks of it. Pure functions over plain dicts (API objects in their JSON spelling).

Kueue admits a Job by unsuspending it and preempts it by suspending it again, and it unsuspends an
admitted Job that anyone else suspends: so the operator never touches the suspend flag of a Job that
names a queue. A user's runPolicy.suspend goes through the Workload instead: spec.active false makes
Kueue evict and suspend the Job, true makes it queue the Job again. The operator marks the Workloads it
deactivates (DEACTIVATED_BY), so that it reactivates only those and leaves Kueue's own deactivations
(a requeuing limit) and an admin's alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
#: On a Workload the operator deactivated for runPolicy.suspend, naming the FineTuneJob's uid.
DEACTIVATED_BY = "kubetune.io/deactivated-for"
CONDITION_KEYS = ("type", "status", "reason", "message")


def job_owner(references: Iterable[Any] | None) -> Any:
    """The batch/v1 Job that controls a Workload (Kueue sets it as the controller), if one does: another
    ownerReference, which anyone who may create Workloads could add, never counts."""
    for ref in references or ():
        if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1" and ref.get("controller"):
            return ref
    return None


def workload_view(body: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a Workload the operator reads, with the Job it belongs to; None for a Workload of
    anything but a batch/v1 Job."""
    meta = body.get("metadata") or {}
    owner = job_owner(meta.get("ownerReferences"))
    if owner is None:
        return None
    notes = meta.get("annotations") or {}
    status = body.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "creationTimestamp": meta.get("creationTimestamp") or "",
            **({"deactivatedFor": notes[DEACTIVATED_BY]} if DEACTIVATED_BY in notes else {}),
        },
        "job": {"name": owner.get("name"), "uid": owner.get("uid")},
        "active": (body.get("spec") or {}).get("active") is not False,
        "conditions": [{k: c.get(k) for k in CONDITION_KEYS} for c in status.get("conditions") or ()],
    }


def of_job(workloads: Iterable[dict[str, Any]], job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The Job's Workload: the newest of those that name the Job's uid (Kueue may keep an old one a while;
    equal creation seconds are told apart by name, so every round picks the same)."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    mine = [w for w in workloads if uid and w["job"]["uid"] == uid]
    return max(mine, key=lambda w: (w["metadata"]["creationTimestamp"], w["metadata"]["name"]), default=None)


def _condition(workload: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in workload["conditions"] if c.get("type") == kind), None)


def explain(workload: dict[str, Any] | None, queue: str) -> tuple[str, str]:
    """(reason, message) of a FineTuneJob whose Job waits for Kueue in ``queue``, from its Workload:
    deactivated, preempted, evicted (pods not ready in time, a stopped queue...), or queued (with Kueue's
    own words on what it lacks: quota, a missing LocalQueue...). Kueue keeps an eviction's condition until
    it admits the Workload again, so an inactive Workload is told first, whatever evicted it, and the
    eviction of a Workload made active again (a resumed suspend) explains nothing any more."""
    again = f"queued again in Kueue's queue {queue}; it resumes from its last checkpoint when Kueue admits it"
    if workload is None:
        return "Queued", f"waiting in Kueue's queue {queue} until Kueue admits it"
    evicted = _condition(workload, "Evicted") or {}
    said = evicted.get("message") or ""
    if not workload["active"]:
        name = workload["metadata"]["name"]
        why = f" ({said})" if said else ""
        return "Deactivated", f"Kueue's Workload {name} is deactivated{why}: Kueue admits it once it is active again"
    why = str(evicted.get("reason") or "") if evicted.get("status") == "True" else ""
    if why == "Preempted":
        preempted = _condition(workload, "Preempted") or {}
        return "Preempted", f"preempted by Kueue ({preempted.get('message') or said}); {again}"
    if why == "PodsReadyTimeout":
        return "PodsReadyTimeout", f"evicted by Kueue: its pods were not ready in time ({said}); {again}"
    if why and why != "Deactivated":
        return "Evicted", f"evicted by Kueue ({why}: {said}); {again}"
    reserved = _condition(workload, "QuotaReserved")
    if reserved and reserved.get("status") == "False" and reserved.get("message"):
        return "Queued", f"waiting in Kueue's queue {queue}: {reserved['message']}"
    return "Queued", f"waiting in Kueue's queue {queue} until Kueue admits it"


def held(workload: dict[str, Any] | None, queue: str, *, suspend: bool, support: bool) -> tuple[str, str] | None:
    """(reason, message) of a FineTuneJob in ``queue`` whose Job is suspended, as Kueue holds it; None when
    it is its user's suspend (runPolicy.suspend, carried out through the Workload: the FineTuneJob is
    Suspended). Without the operator's Kueue support a user's suspend cannot stop a Job that Kueue holds,
    and the status says so rather than Suspended."""
    if suspend and support:
        return None
    reason, message = explain(workload, queue)
    if suspend:
        message += (
            "; runPolicy.suspend does not hold a Job that Kueue manages without the operator's Kueue support "
            "(the chart's kueue.enabled)"
        )
    return reason, message


def activation(workload: dict[str, Any] | None, *, suspend: bool, owner_uid: str) -> dict[str, Any] | None:
    """The merge patch that makes the Workload follow runPolicy.suspend, or None when it does already
    (or when it was not the operator that deactivated it: an admin's or Kueue's own stays)."""
    if workload is None:
        return None
    if suspend and workload["active"]:
        return {"metadata": {"annotations": {DEACTIVATED_BY: owner_uid}}, "spec": {"active": False}}
    if not suspend and not workload["active"] and workload["metadata"].get("deactivatedFor") == owner_uid:
        return {"metadata": {"annotations": {DEACTIVATED_BY: None}}, "spec": {"active": True}}
    return None
