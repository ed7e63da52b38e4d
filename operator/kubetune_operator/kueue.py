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


def workload_view(body: dict[str, Any]) -> dict[str, Any] | None:
    """The fields of a Workload the operator reads, with the Job it belongs to; None for a Workload of
    anything but a batch/v1 Job."""
    meta = body.get("metadata") or {}
    owner = next(
        (r for r in meta.get("ownerReferences") or () if r.get("kind") == "Job" and r.get("apiVersion") == "batch/v1"),
        None,
    )
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
    """The Job's Workload: the newest of those that name the Job's uid (Kueue may keep an old one a while)."""
    uid = ((job or {}).get("metadata") or {}).get("uid")
    mine = [w for w in workloads if uid and w["job"]["uid"] == uid]
    return max(mine, key=lambda w: w["metadata"]["creationTimestamp"], default=None)


def _condition(workload: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in workload["conditions"] if c.get("type") == kind), None)


def explain(workload: dict[str, Any] | None, queue: str) -> tuple[str, str]:
    """(reason, message) of a FineTuneJob whose Job waits for Kueue in ``queue``, from its Workload:
    preempted, evicted (pods not ready in time, a stopped queue...), deactivated, or queued (with
    Kueue's own words on what it lacks: quota, a missing LocalQueue...)."""
    again = f"queued again in Kueue's queue {queue}; it resumes from its last checkpoint when Kueue admits it"
    if workload is None:
        return "Queued", f"waiting in Kueue's queue {queue} until Kueue admits it"
    evicted = _condition(workload, "Evicted")
    if evicted and evicted.get("status") == "True":
        why, said = str(evicted.get("reason") or ""), evicted.get("message") or ""
        if why == "Preempted":
            preempted = _condition(workload, "Preempted") or {}
            return "Preempted", f"preempted by Kueue ({preempted.get('message') or said}); {again}"
        if why == "PodsReadyTimeout":
            return "PodsReadyTimeout", f"evicted by Kueue: its pods were not ready in time ({said}); {again}"
        if why.startswith("Deactivated") or not workload["active"]:
            name = workload["metadata"]["name"]
            return "Deactivated", f"Kueue deactivated its Workload {name} ({said}): it waits until that is active"
        return "Evicted", f"evicted by Kueue ({why}: {said}); {again}"
    reserved = _condition(workload, "QuotaReserved")
    if reserved and reserved.get("status") == "False" and reserved.get("message"):
        return "Queued", f"waiting in Kueue's queue {queue}: {reserved['message']}"
    return "Queued", f"waiting in Kueue's queue {queue} until Kueue admits it"


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
