"""How a FineTuneJob's status is derived from its Job, its pods and its metrics. Pure functions
over plain dicts (API objects in their JSON spelling), so every rule is unit-tested without a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from kubetune_api.exit_codes import ExitCode
from kubetune_api.metrics import eval_name
from kubetune_api.summary import Summary

WAITING_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError")
CONDITION_TYPES = ("Created", "Running", "Suspended", "Succeeded", "Failed")
#: Why the Job controller could not create a pod (its FailedCreate Event): a ResourceQuota, or anything else
#: the API server refused (a LimitRange, Pod Security admission...).
CREATE_FAILURES = ("QuotaExceeded", "FailedCreate")
#: The pod annotation that holds an Indexed Job pod's completion index: its node rank.
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
#: The Job's own record of an index's earlier pods, on each replacement pod (Indexed Jobs with
#: backoffLimitPerIndex): how many failed and counted, and how many failed and were ignored (preemptions).
FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
IGNORED_FAILURE_COUNT = "batch.kubernetes.io/job-index-ignored-failure-count"
POD_ANNOTATIONS = (COMPLETION_INDEX, FAILURE_COUNT, IGNORED_FAILURE_COUNT)
#: Phases after which nothing changes: an ended FineTuneJob is final, whatever becomes of its Job.
ENDED = ("Succeeded", "Failed")


def _true(conditions: Sequence[dict[str, Any]] | None, kind: str) -> dict[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in pod.get("status", {}).get("containerStatuses") or ():
        state = cs.get("state", {}).get("terminated")
        if state:
            return dict(state)
    return None


def summary_of(pod: dict[str, Any]) -> Summary | None:
    """The job's summary from a pod's termination message, if it wrote one."""
    return Summary.parse((_terminated(pod) or {}).get("message"))


def restart_reason(pod: dict[str, Any]) -> str:
    """Why a pod ended in failure: Preempted (its own disruption, or the job's exit code for a stop it
    agreed with a preempted peer), OOMKilled or Error."""
    state = _terminated(pod) or {}
    if (
        _true(pod.get("status", {}).get("conditions"), "DisruptionTarget")
        or state.get("exitCode") == ExitCode.PREEMPTED
    ):
        return "Preempted"
    return "OOMKilled" if state.get("reason") == "OOMKilled" or state.get("exitCode") == 137 else "Error"


def failed(pod: dict[str, Any]) -> bool:
    """A pod that ended in failure, or is being preempted (it may be deleted before it reports)."""
    status = pod.get("status", {})
    return status.get("phase") == "Failed" or _true(status.get("conditions"), "DisruptionTarget") is not None


def failures(pods: Sequence[dict[str, Any]], previous: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The pod failures seen so far (the newest 20 kept), and the reasons of those seen for the first time.

    Pods that failed are often deleted soon after (preemption, a replacement), so the record lives in
    status: each refresh adds the failed pods it has not seen before, by uid.
    """
    known = list(previous.get("failures") or [])
    seen = {f.get("uid") for f in known}
    new = [
        {"pod": p["metadata"]["name"], "uid": p["metadata"].get("uid"), "reason": restart_reason(p)}
        for p in sorted(pods, key=_created)
        if failed(p) and p["metadata"].get("uid") not in seen
    ]
    return (known + new)[-20:], [f["reason"] for f in new]


def failure_record(pods: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(counted, ignored) pod failures of the Job so far, from its own record: each replacement pod carries
    its index's earlier failures (FAILURE_COUNT, IGNORED_FAILURE_COUNT), and a failed pod not yet replaced
    adds itself. Holds failures that happened while the operator was not watching, whose pods are gone."""
    per_index: dict[str, tuple[int, int]] = {}
    for pod in pods:
        notes = (pod.get("metadata") or {}).get("annotations") or {}
        counted, ignored = _count(notes.get(FAILURE_COUNT)), _count(notes.get(IGNORED_FAILURE_COUNT))
        if failed(pod):
            preempted = restart_reason(pod) == "Preempted"
            counted, ignored = counted + (not preempted), ignored + preempted
        index = notes.get(COMPLETION_INDEX, "0")
        before = per_index.get(index, (0, 0))
        per_index[index] = (max(before[0], counted), max(before[1], ignored))
    return sum(c for c, _ in per_index.values()), sum(i for _, i in per_index.values())


def _count(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def restart_counts(
    pods: Sequence[dict[str, Any]], previous: dict[str, Any], *, phase: str
) -> tuple[dict[str, Any], str | None]:
    """The failure fields of status (failureCount, preemptions, restarts, failures) and the reason of the
    last restart. Counts never go down: the previous status and the Job's record (failure_record) each
    hold failures the other may have missed."""
    seen, new = failures(pods, previous)
    counted, ignored = failure_record(pods)
    before_ignored = int(previous.get("preemptions") or 0)
    before_counted = int(previous.get("failureCount") or 0) - before_ignored
    preemptions, errors = max(before_ignored, ignored), max(before_counted, counted)
    count = preemptions + errors
    restarts = max(count - 1, 0) if phase == "Failed" else count
    # The newest failure of an ended run is its end, not a restart.
    restarted = new[:-1] if phase == "Failed" else new
    # Failures the Job's record holds beyond those seen now happened while the operator was not watching.
    missed_preemptions = preemptions - before_ignored - new.count("Preempted")
    missed_errors = errors - before_counted - (len(new) - new.count("Preempted"))
    reason: str | None
    if restarted:
        reason = restarted[-1]
    elif missed_preemptions > 0:
        reason = "Preempted"
    elif missed_errors > 0:
        reason = "Error"
    else:
        reason = previous.get("lastRestartReason")
    fields: dict[str, Any] = {"restarts": restarts, "failureCount": count, "preemptions": preemptions}
    if seen:
        fields["failures"] = seen
    return fields, (reason if restarts else None)


def _created(pod: dict[str, Any]) -> str:
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def waiting(pods: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) that explains why pods are not running yet, if any does."""
    for pod in pods:
        status = pod.get("status", {})
        scheduled = next((c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), None)
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            return "Unschedulable", scheduled.get("message", "")
        for cs in status.get("containerStatuses") or ():
            w = cs.get("state", {}).get("waiting") or {}
            if w.get("reason") in WAITING_REASONS:
                return w["reason"], w.get("message", "")
    return None


def parse_time(stamp: str) -> datetime:
    """A Kubernetes timestamp (RFC 3339, seconds or microseconds, UTC) as an aware datetime."""
    return datetime.fromisoformat(stamp).astimezone(UTC)


def newest_create_failure(events: Sequence[dict[str, Any]], job: dict[str, Any]) -> str | None:
    """The message of the newest of a Job's FailedCreate Events that is not older than the Job's
    startTime. The Job controller sets startTime anew on every resume, so an Event from before it
    tells of a refusal that may long be over."""
    started = (job.get("status") or {}).get("startTime")
    since = parse_time(started) if started else datetime.min.replace(tzinfo=UTC)
    dated = [(e.get("lastTimestamp") or e.get("eventTime"), e.get("message")) for e in events]
    fresh = [(when, m) for t, m in dated if t and m and (when := parse_time(t)) >= since]
    return max(fresh)[1] if fresh else None


def create_failure_reason(message: str) -> str:
    """QuotaExceeded or FailedCreate, from the message of a Job's FailedCreate Event."""
    return "QuotaExceeded" if "exceeded quota" in message else "FailedCreate"


def previous_create_failure(previous: dict[str, Any]) -> str | None:
    """The pod-creation failure the last status reported, kept until pods appear or a newer one is read."""
    if previous.get("phase") != "Pending":
        return None
    running: dict[str, Any] = next((c for c in previous.get("conditions") or () if c.get("type") == "Running"), {})
    return running.get("message") if running.get("reason") in CREATE_FAILURES else None


def phase_of(
    job: dict[str, Any] | None,
    pods: Sequence[dict[str, Any]],
    create_failure: str | None = None,
    queued: tuple[str, str] | None = None,
    unstarted: str | None = None,
) -> tuple[str, str, str]:
    """(phase, reason, message) of a FineTuneJob from its Job and pods, and why the Job controller could
    not create a pod (the message of the Job's newest FailedCreate Event), if it could not. ``queued``:
    for a FineTuneJob in a Kueue queue that its user has not suspended, why Kueue holds its Job while
    the Job is suspended (kueue.held). ``unstarted``: why a FineTuneJob its user suspended before it
    started has no Job yet."""
    if job is None:
        if unstarted:
            return "Suspended", "Suspended", unstarted
        if create_failure:
            return "Pending", create_failure_reason(create_failure), create_failure
        return "Pending", "Creating", "the Job is being created"
    conditions = job.get("status", {}).get("conditions")
    if done := _true(conditions, "Complete") or _true(conditions, "SuccessCriteriaMet"):
        return "Succeeded", "Completed", done.get("message") or "training finished"
    if failed := _true(conditions, "Failed") or _true(conditions, "FailureTarget"):
        return "Failed", failed.get("reason") or "Failed", failed.get("message") or ""
    if job.get("spec", {}).get("suspend"):
        if queued:
            return "Pending", *queued
        return "Suspended", "Suspended", "the Job is suspended"
    if any(p.get("status", {}).get("phase") == "Running" for p in pods):
        return "Running", "Running", "training"
    if why := waiting(pods):
        return "Pending", why[0], why[1]
    if create_failure and not pods:
        return "Pending", create_failure_reason(create_failure), create_failure
    return "Pending", "Starting", "waiting for a pod to start"


def conditions_for(
    phase: str,
    reason: str,
    message: str,
    *,
    created: bool,
    previous: Sequence[dict[str, Any]],
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """metav1.Conditions for a phase; lastTransitionTime only moves when a status flips."""
    active = {"Created": created, "Running": phase == "Running", "Suspended": phase == "Suspended"}
    active |= {"Succeeded": phase == "Succeeded", "Failed": phase == "Failed"}
    old = {c["type"]: c for c in previous}
    out = []
    for kind in CONDITION_TYPES:
        status = "True" if active[kind] else "False"
        why = reason if (active[kind] and kind != "Created") or (kind == "Running" and phase == "Pending") else kind
        if kind == "Created":
            why = "JobCreated" if created else reason
        text = message if why == reason else ""
        before = old.get(kind, {})
        since = before.get("lastTransitionTime") if before.get("status") == status else now
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": why,
                "message": text,
                "lastTransitionTime": since or now,
                "observedGeneration": generation,
            }
        )
    return out


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The fields of a Job that derive() reads, and its owners' uids: what the operator keeps per Job."""
    meta = job.get("metadata") or {}
    owners = [r.get("uid") for r in meta.get("ownerReferences") or ()]
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "owners": owners},
        "spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))},
        "status": job.get("status") or {},
    }


def pod_view(pod: dict[str, Any]) -> dict[str, Any]:
    """The fields of a pod that derive() reads: what the operator keeps in memory per pod."""
    meta = pod.get("metadata") or {}
    keep = ("name", "uid", "creationTimestamp", "deletionTimestamp")
    view = {k: meta[k] for k in keep if k in meta}
    notes = meta.get("annotations") or {}
    if kept := {k: notes[k] for k in POD_ANNOTATIONS if k in notes}:
        view["annotations"] = kept
    return {"metadata": view, "status": pod.get("status") or {}}


def _leads(pod: dict[str, Any]) -> bool:
    """Whether the pod is node 0's: an Indexed Job pod of completion index 0, or a single-node job's pod."""
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX, "0") == "0"


def derive(
    *,
    job: dict[str, Any] | None,
    pods: Sequence[dict[str, Any]],
    metrics: list[str],
    generation: int,
    previous: dict[str, Any],
    now: str,
    progress: dict[str, Any] | None = None,
    create_failure: str | None = None,
    queued: tuple[str, str] | None = None,
    unstarted: str | None = None,
) -> dict[str, Any]:
    """The status of a FineTuneJob (what a merge patch of .status sets).

    create_failure: the message of the Job's newest FailedCreate Event (or of the operator's refused
    create of the Job), when one was just read; without it, the failure the previous status reported
    holds until a pod exists. queued, unstarted: why Kueue holds the suspended Job, why there is no Job
    yet (see phase_of).
    An ended FineTuneJob keeps its phase, conditions and times: only its job's summary may still fill
    in what the first write lacked."""
    ordered = sorted(pods, key=_created)
    # The run's summary is node 0's (each node's first process writes one; node 0's is the run's).
    leading = sorted(ordered, key=_leads)
    final = next((s for p in reversed(leading) if (s := summary_of(p))), None)
    if previous.get("phase") in ENDED:
        phase = previous["phase"]
        return {"phase": phase, **(from_summary(final, metrics, phase) if final else {})}
    phase, reason, message = phase_of(job, pods, create_failure or previous_create_failure(previous), queued, unstarted)
    counts, restart_reason_now = restart_counts(ordered, previous, phase=phase)
    status: dict[str, Any] = {
        "phase": phase,
        "message": message,
        "observedGeneration": generation,
        **counts,
        "conditions": conditions_for(
            phase,
            reason,
            message,
            created=job is not None,
            previous=previous.get("conditions") or [],
            now=now,
            generation=generation,
        ),
    }
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
        job_status = job.get("status", {})
        if start := previous.get("startTime") or job_status.get("startTime"):
            status["startTime"] = start
        if phase in ENDED:
            status["completionTime"] = job_status.get("completionTime") or previous.get("completionTime") or now
    if restart_reason_now:
        status["lastRestartReason"] = restart_reason_now
    progress = dict(progress or {})
    live = progress.pop("metrics", None)
    if checkpoint := progress.pop("lastCheckpoint", None) or previous.get("lastCheckpoint"):
        status["lastCheckpoint"] = checkpoint
    if progress:
        status["progress"] = progress
    if final:
        status |= from_summary(final, metrics, phase)
    elif live:
        status |= metric_fields(live, metrics)
    return status


def metric_fields(values: dict[str, float], metrics: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"metrics": values}
    if metrics:
        key = eval_name(metrics[0])
        if key in values:
            out["eval"] = f"{metrics[0]}={values[key]:.4f}"
    return out


def from_summary(summary: Summary, metrics: list[str], phase: str) -> dict[str, Any]:
    """Status fields from the job's own summary (final metrics, output, or the error)."""
    out: dict[str, Any] = {}
    if summary.metrics:
        out |= metric_fields(summary.metrics, metrics)
    if summary.phase == "Succeeded" and phase == "Succeeded":
        out["outputUri"] = summary.output_uri
        out["progress"] = {
            "step": summary.final_step,
            "totalSteps": summary.total_steps,
            "percent": 100,
            "epoch": summary.epoch,
        }
        if summary.train_samples_per_second:
            out["progress"]["samplesPerSecond"] = summary.train_samples_per_second
        if summary.train_tokens_per_second:
            out["progress"]["tokensPerSecond"] = summary.train_tokens_per_second
    if summary.phase == "Failed" and phase == "Failed":
        field = f" ({summary.field})" if summary.field else ""
        out["message"] = f"{summary.reason or 'Error'}{field}: {summary.message or ''}"
    if summary.last_checkpoint_step:
        out["lastCheckpoint"] = {"step": summary.last_checkpoint_step}
    return out


def ended_by_operator(
    reason: str, message: str, *, generation: int, previous: dict[str, Any], now: str
) -> dict[str, Any]:
    """The status of a FineTuneJob the operator ends itself: Failed, with reason InvalidSpec (a spec it
    or the API server refuses) or JobDeleted (its Job vanished before the run was seen to end)."""
    return {
        "phase": "Failed",
        "message": message,
        "observedGeneration": generation,
        "completionTime": previous.get("completionTime") or now,
        "conditions": conditions_for(
            "Failed",
            reason,
            message,
            created=bool(previous.get("jobName")),
            previous=previous.get("conditions") or [],
            now=now,
            generation=generation,
        ),
    }


def claim(existing: dict[str, Any], owner_uid: str, owner_name: str) -> str:
    """Whose an existing child with the FineTuneJob's deterministic name is: "ours"; "previous" (an
    earlier FineTuneJob of the same name, deleted, whose child the garbage collector has yet to remove,
    or a child already being deleted); or "foreign" (anything else: never touched)."""
    meta = existing.get("metadata") or {}
    refs = meta.get("ownerReferences") or ()
    if any(r.get("uid") == owner_uid for r in refs):
        return "ours"
    if meta.get("deletionTimestamp") or any(
        r.get("kind") == "FineTuneJob" and r.get("name") == owner_name for r in refs
    ):
        return "previous"
    return "foreign"
