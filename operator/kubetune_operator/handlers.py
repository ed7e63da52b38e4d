"""The kopf handlers: thin I/O around manifests.children() and status.derive().

Level-triggered and idempotent: every FineTuneJob event, and a periodic round over all of them,
reconciles; every Job and pod event refreshes, that is writes the status that the FineTuneJob's Job and
pods imply. The FineTuneJobs, Jobs and pods come from kopf indices that its watches keep current (no
GET or LIST per event), trimmed to what status.derive() reads; a refresh starts from the status this
operator last wrote (it is status's only writer), which an index may not show yet. The operator writes
nothing but status (no finalizers, no kopf annotations), so deleting a FineTuneJob never waits for it.
Child names are deterministic, so a replayed event or an operator restarted between creating the Job
and writing status creates nothing twice. The operator never reads Secrets: pods get credentials
through secretKeyRef.

What the handlers share (settings, the API client, the status last written, kopf's indices) is one
`State`, built by the startup handler and kept in kopf's memo: no module-level mutable state.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.config import incluster_config

from kubetune_api.spec import FineTuneJobSpec, SpecError, parse_spec
from kubetune_api.status import TIMESTAMP

from . import kueue, observability
from .crd import GROUP, PLURAL, VERSION
from .manifests import FTJ_LABEL, InvalidSpec, Owner, children, desired_suspend
from .progress import delete_group, parse_groups, read_groups
from .settings import OperatorSettings
from .status import (
    ENDED,
    claim,
    derive,
    ended_by_operator,
    job_view,
    newest_create_failure,
    parse_time,
    pod_view,
)

log = logging.getLogger(__name__)
FTJ = (GROUP, VERSION, PLURAL)
#: (namespace, FineTuneJob name) -> the values indexed for it (kopf.Index).
Index = Mapping[tuple[str, str], Any]


def now() -> str:
    return datetime.now(UTC).strftime(TIMESTAMP)


def plain(value: Any) -> Any:
    """kopf's body views as plain JSON data."""
    return json.loads(json.dumps(value, default=dict))


class Cluster:
    """The few API calls the operator makes, returning objects in their JSON spelling."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(api)
        self.batch = k8s.BatchV1Api(api)
        self.core = k8s.CoreV1Api(api)

    @staticmethod
    def _raw(response: Any) -> Any:
        return json.loads(response.data)

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """Create a child; if one of that name exists already (a replay, a restart, an earlier FineTuneJob
        of the same name), return it, and whether it was created now. (None, False): it existed, and was
        gone by the time it was read (being garbage-collected)."""
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        create, read = (
            (self.batch.create_namespaced_job, self.batch.read_namespaced_job)
            if obj["kind"] == "Job"
            else (self.core.create_namespaced_service, self.core.read_namespaced_service)
        )
        try:
            return self._raw(create(namespace, obj, _preload_content=False)), True
        except ApiException as e:
            if e.status != 409:
                raise
        return self.read(read, name, namespace), False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job, or None when there is none."""
        return self.read(self.batch.read_namespaced_job, name, namespace)

    def read(self, method: Any, name: str, namespace: str) -> dict[str, Any] | None:
        try:
            return dict(self._raw(method(name, namespace, _preload_content=False)))
        except ApiException as e:
            if e.status != 404:
                raise
        return None

    def event(self, obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event about `obj` (a FineTuneJob), from the operator."""
        meta, stamp = obj["metadata"], datetime.now(UTC)
        involved = {k: obj.get(k) for k in ("apiVersion", "kind")} | {
            k: meta.get(k) for k in ("name", "namespace", "uid")
        }
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": involved,
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetune-operator"},
            "firstTimestamp": stamp.strftime(TIMESTAMP),
            "lastTimestamp": stamp.strftime(TIMESTAMP),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False)
        except ApiException as e:  # an Event is a nicety: never a reason to fail a reconcile
            log.warning("cannot post the %s Event of %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)

    def create_failure(self, namespace: str, job: dict[str, Any]) -> str | None:
        """Why the Job controller cannot create a pod: its newest FailedCreate Event since the Job started."""
        meta = job["metadata"]
        selector = f"involvedObject.uid={meta['uid']},reason=FailedCreate"
        try:
            response = self.core.list_namespaced_event(namespace, field_selector=selector, _preload_content=False)
        except ApiException as e:  # a missing explanation must not stop the round (an older Role: no events list)
            log.warning("cannot read the Events of Job %s/%s: %s", namespace, meta["name"], e.reason)
            return None
        return newest_create_failure(self._raw(response).get("items") or [], job)

    def patch_workload(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Merge `patch` into a Kueue Workload; one gone meanwhile is left to its deletion event."""
        try:
            self.custom.patch_namespaced_custom_object(
                kueue.GROUP, kueue.VERSION, namespace, kueue.PLURAL, name, patch, _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        """Set the Job's suspend flag; a Job gone meanwhile is left to its deletion event."""
        try:
            self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge `status` into the FineTuneJob's; returns the whole status as stored, or None when the
        FineTuneJob is gone (deleted meanwhile: its deletion event cleans up)."""
        try:
            response = self.custom.patch_namespaced_custom_object_status(
                *FTJ[:2], namespace, PLURAL, name, {"status": status}, _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                raise
            return None
        return dict(self._raw(response).get("status") or {})


#: API errors that no retry mends: the request itself is refused (invalid, too large, unprocessable).
PERMANENT_API_ERRORS = (400, 413, 422)


def api_message(error: ApiException) -> str:
    """The API server's own words for a refused request (its Status message), else the HTTP reason."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or f"{error.status} {error.reason}")


class Written:
    """The status this operator last wrote to each FineTuneJob (by uid), and a lock per FineTuneJob so
    that refreshes started by its Job's and its pods' events do not interleave."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._status: dict[str, dict[str, Any]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def lock(self, namespace: str, name: str) -> threading.Lock:
        return self._locks.setdefault((namespace, name), threading.Lock())

    def status(self, ftj: dict[str, Any]) -> dict[str, Any]:
        """The newest status known: the one written here, else the one the API server sent."""
        return self._status.get(ftj["metadata"]["uid"]) or dict(ftj.get("status") or {})

    def write(self, ftj: dict[str, Any], status: dict[str, Any]) -> None:
        meta = ftj["metadata"]
        stored = self._cluster.patch_status(meta["namespace"], meta["name"], status)
        if stored is not None:
            self._status[meta["uid"]] = stored

    def forget(self, namespace: str, name: str, uid: str) -> None:
        self._status.pop(uid, None)
        self._locks.pop((namespace, name), None)


def api_configuration(settings: OperatorSettings) -> k8s.Configuration:
    """In a pod: the mounted ServiceAccount token; elsewhere: the kubeconfig (KUBECONFIG)."""
    config = k8s.Configuration()
    account = settings.service_account_dir
    if (account / "token").is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        loader = incluster_config.InClusterConfigLoader(
            token_filename=str(account / "token"), cert_filename=str(account / "ca.crt")
        )
        loader.load_and_set(config)
    else:
        k8s_config.load_kube_config(client_configuration=config)
    config.connection_pool_maxsize = settings.workers  # one kept-alive connection per handler thread
    return config


@kopf.on.login()
def login(memo: kopf.Memo, **kwargs: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as the operator's own client."""
    config = api_configuration(memo.settings)
    header = (config.get_api_key_with_prefix("BearerToken", alias="authorization") or "").strip()
    scheme, _, rest = header.partition(" ")
    token = rest if scheme.lower() == "bearer" else header
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        scheme="Bearer" if token else None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    """kopf's settings, and the operator's State in the memo (memo.settings comes from kopf.run)."""
    # Event handlers only: kopf writes no bookkeeping of its own (annotations, finalizers) to objects.
    # The operator posts its own Events (phase transitions); kopf's per-handler chatter stays in the log.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    # kopf waits this long for more events of an object before handling it (default 0.1 s, added to
    # every creation's latency); a reconcile of an unchanged object costs no API call, so batching saves little.
    settings.batching.batch_window = 0.01
    # Handler threads are bounded, and with them the client's connections. kopf's per-object workers
    # are not: every object's worker must be able to start, for the indices to fill.
    ours: OperatorSettings = memo.settings
    settings.execution.max_workers = ours.workers
    observability.serve(ours.metrics_port)
    api = Cluster(k8s.ApiClient(api_configuration(ours)))
    # kopf creates its indices before the startup handlers run and fills them in place: the ones passed
    # here are those every later handler gets, so the ticker thread can keep them.
    state = State(settings=ours, cluster=api, written=Written(api), indices=Indices.of(kwargs))
    memo.state = state  # kopf hands each object's handlers a shallow copy of the memo: the same State
    threading.Thread(target=_ticker, args=(state,), name="ticker", daemon=True).start()


def _owner(body: Any) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"])


def _owner_name(body: Any) -> str | None:
    return (body.get("metadata", {}).get("labels") or {}).get(FTJ_LABEL)


@kopf.index(*FTJ)
def finetunejobs(body: Any, namespace: str, name: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Each FineTuneJob's identity, spec and status, for refreshes that its Job's and pods' events start."""
    meta = body["metadata"]
    keep = ("name", "namespace", "uid", "generation", "creationTimestamp", "deletionTimestamp")
    view = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }
    return {(namespace, name): plain(view)}


@kopf.index("batch", "v1", "jobs", labels={FTJ_LABEL: kopf.PRESENT})
def jobs_by_owner(body: Any, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Each FineTuneJob's Job, as derive() reads it."""
    return {(namespace, str(_owner_name(body))): plain(job_view(body))}


@kopf.index("v1", "pods", labels={FTJ_LABEL: kopf.PRESENT})
def pods_by_owner(body: Any, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Each FineTuneJob's pods, as derive() reads them."""
    return {(namespace, str(_owner_name(body))): plain(pod_view(body))}


def _workload_view(body: Any) -> dict[str, Any] | None:
    """A Workload's view (kueue.workload_view); the copy is made only for one a Job controls."""
    if kueue.job_owner(body.get("metadata", {}).get("ownerReferences")) is None:
        return None
    return kueue.workload_view(plain(body))


def workloads_by_job(body: Any, namespace: str, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Kueue's Workloads of Jobs, by the Job's name (a FineTuneJob's Job has its name). Registered by
    register_kueue(), with Kueue support on."""
    view = _workload_view(body)
    return {(namespace, str(view["job"]["name"])): view} if view else {}


def workload_changed(body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """A Workload's change reconciles its Job's FineTuneJob: the Workload may need to follow
    runPolicy.suspend, and status explains the wait."""
    if view := _workload_view(body):
        state: State = memo.state
        if ftj := state.indices.first(state.indices.finetunejobs, (namespace, str(view["job"]["name"]))):
            reconcile(ftj, state)


def register_kueue() -> None:
    """Watch Kueue's Workloads (kueue.x-k8s.io/v1beta2): called before kopf runs, with Kueue support on."""
    kopf.index(kueue.GROUP, kueue.VERSION, kueue.PLURAL)(workloads_by_job)
    kopf.on.event(kueue.GROUP, kueue.VERSION, kueue.PLURAL)(workload_changed)


@dataclass(frozen=True)
class Indices:
    """kopf's indices, as every handler receives them (by the indexing functions' names)."""

    finetunejobs: Index
    jobs: Index
    pods: Index
    workloads: Index

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indices:
        """From a handler's keyword arguments (kopf's indices live as long as the operator); the
        Workloads' is empty without Kueue support."""
        workloads = kwargs.get(workloads_by_job.__name__, {})
        return cls(kwargs["finetunejobs"], kwargs["jobs_by_owner"], kwargs["pods_by_owner"], workloads)

    @staticmethod
    def first(index: Index, key: tuple[str, str]) -> dict[str, Any] | None:
        return next(iter(index.get(key, ())), None)


@dataclass(frozen=True)
class State:
    """Everything the handlers share, built once by the startup handler and kept in kopf's memo."""

    settings: OperatorSettings
    cluster: Cluster
    written: Written
    indices: Indices


@kopf.on.event(*FTJ)
def finetunejob_changed(
    body: Any, namespace: str, name: str, uid: str, type: str | None, memo: kopf.Memo, **_: Any
) -> None:
    """Every FineTuneJob event (the initial listing too) reconciles it. No kopf bookkeeping is written:
    children exist or not (the Job index says which), and status holds the rest."""
    state: State = memo.state
    if type == "DELETED":
        deleted(namespace, name, uid, state)
    else:
        # kopf indexes an event before handling it: the index holds this body, already trimmed and copied.
        reconcile(state.indices.first(state.indices.finetunejobs, (namespace, name)) or plain(body), state)


def reconcile(ftj: dict[str, Any], state: State) -> None:
    """Create the Job (and Service) of a FineTuneJob if it has none, keep suspend in step, write status.

    Idempotent, and cheap when nothing changed (no API call): it runs for each of the FineTuneJob's
    events, its own status writes included, and in each periodic round (so a failed create is retried).
    An ended FineTuneJob is final: it never gets a new Job, whatever became of the old one (a TTL, a
    hand). A Job that vanished before the run was seen to end ends the FineTuneJob too."""
    started = time.monotonic()
    if ftj["metadata"].get("deletionTimestamp"):
        return  # being deleted (foreground): its children go first, and that is no loss to report
    owner = _owner(ftj)
    job = _own_job(ftj, state.indices)
    known = state.written.status(ftj)
    if known.get("phase") in ENDED:
        return  # final: no new Job, no suspend flips; its Job's and pods' events may still fill in the summary
    try:
        spec = parse_spec(ftj.get("spec") or {})
        objects = children(owner, spec, state.settings)
    except (SpecError, InvalidSpec) as e:
        _end(ftj, state, "InvalidSpec", "; ".join(e.problems) if isinstance(e, SpecError) else str(e))
        observability.reconciled("invalid", started)
        return
    if job is None and known.get("jobName"):
        job = _job_if_still_there(ftj, state)
        if job is None:
            observability.reconciled("lost", started)
            return
    if job is None and spec.scheduling.queue_name and spec.run_policy.suspend:
        # Suspended before it started: no Job, so no Workload that Kueue could admit before the operator
        # deactivates it. The Job is created, queued, when runPolicy.suspend is false.
        why = f"suspended before it started: its Job joins Kueue's queue {spec.scheduling.queue_name} when "
        _waiting(ftj, state, unstarted=why + "runPolicy.suspend is false")
        observability.reconciled("suspended", started)
        return
    if job is None:
        job, outcome = _create(ftj, state, objects)
        if job is None:
            observability.reconciled(outcome, started)
            return
    suspend = desired_suspend(spec, job["spec"]["suspend"])
    if suspend is not None:
        state.cluster.suspend_job(owner.namespace, owner.name, suspend)
    workload = _workload(ftj, job, state) if spec.scheduling.queue_name else None
    if workload is not None and (
        patch := kueue.activation(workload, suspend=spec.run_policy.suspend, owner_uid=owner.uid)
    ):
        state.cluster.patch_workload(owner.namespace, workload["metadata"]["name"], patch)
    refresh(owner.namespace, owner.name, state, event_job=job)
    observability.reconciled("ok", started)


def _workload(ftj: dict[str, Any], job: dict[str, Any] | None, state: State) -> dict[str, Any] | None:
    """Kueue's Workload of the FineTuneJob's Job, as indexed (None without Kueue support)."""
    meta, indices = ftj["metadata"], state.indices
    return kueue.of_job(indices.workloads.get((meta["namespace"], meta["name"]), ()), job)


def _own_job(ftj: dict[str, Any], indices: Indices) -> dict[str, Any] | None:
    """The FineTuneJob's Job as indexed; None when there is none, or the one of its name is an earlier
    FineTuneJob's or someone else's (creating ours tells which)."""
    meta = ftj["metadata"]
    job = indices.first(indices.jobs, (meta["namespace"], meta["name"]))
    return job if job is not None and meta["uid"] in job["metadata"]["owners"] else None


def _job_if_still_there(ftj: dict[str, Any], state: State) -> dict[str, Any] | None:
    """The Job the status names, read from the API server when the index has none (it may lag); when it
    is gone, the run ended unseen or was cut short: the FineTuneJob ends, and never trains again."""
    owner = _owner(ftj)
    found = state.cluster.read_job(owner.namespace, owner.name)
    if found is not None and claim(found, owner.uid, owner.name) == "ours":
        return job_view(found)
    message = (
        f"its Job {owner.name} was deleted before the operator saw the run end (by hand, or by "
        "runPolicy.ttlSecondsAfterFinished while the operator was away); a FineTuneJob never trains twice: "
        "look for the model at the output location, or create a new FineTuneJob to train again"
    )
    _end(ftj, state, "JobDeleted", message)
    return None


def _create(ftj: dict[str, Any], state: State, objects: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """Create the FineTuneJob's children, in order. Returns the Job's view when the Job is ours and was
    there already, else None and what happened: created (its ADDED event writes status), waiting (an
    earlier FineTuneJob's child is still being deleted, or the API server failed for now: status says
    so, and the next round retries), refused or conflict (the FineTuneJob ends, status says why)."""
    owner, api = _owner(ftj), state.cluster
    for obj in objects:
        what = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            existing, created = api.create(obj)
        except ApiException as e:
            if e.status in PERMANENT_API_ERRORS:
                _end(ftj, state, "InvalidSpec", f"the API server refused its {what}: {api_message(e)}")
                return None, "refused"
            log.warning("cannot create the %s of %s/%s yet: %s", what, owner.namespace, owner.name, api_message(e))
            _waiting(ftj, state, f"cannot create its {what} yet: {api_message(e)}")
            return None, "waiting"
        whose = "previous" if existing is None else claim(existing, owner.uid, owner.name)
        if whose == "foreign":
            _end(
                ftj,
                state,
                "InvalidSpec",
                f"a {what} exists and does not belong to this FineTuneJob: delete it, or rename",
            )
            return None, "conflict"
        if whose == "previous":
            _waiting(ftj, state, f"waiting for the {what} of an earlier FineTuneJob of this name to be deleted")
            return None, "waiting"
        if obj["kind"] == "Job":
            return (None, "created") if created else (job_view(existing or {}), "ok")
    return None, "created"


def _end(ftj: dict[str, Any], state: State, reason: str, message: str) -> None:
    """End a FineTuneJob the operator refuses or has lost, with an Event; an ended status is never rewritten."""
    meta, written = ftj["metadata"], state.written
    with written.lock(meta["namespace"], meta["name"]):
        previous = written.status(ftj)
        if previous.get("phase") in ENDED:
            return
        status = ended_by_operator(reason, message, generation=meta.get("generation", 1), previous=previous, now=now())
        if _changed(previous, status):
            written.write(ftj, status)
            state.cluster.event(ftj, "Warning", reason, message)
            observability.transition(ftj, previous.get("phase"), "Failed")


def _waiting(ftj: dict[str, Any], state: State, message: str | None = None, *, unstarted: str | None = None) -> None:
    """Say in status why the FineTuneJob has no Job yet: its create failed (``message``; the periodic round
    tries again), or its user suspended it before it started (``unstarted``)."""
    meta, written = ftj["metadata"], state.written
    with written.lock(meta["namespace"], meta["name"]):
        previous = written.status(ftj)
        status = derive(
            job=None,
            pods=[],
            metrics=[],
            generation=meta.get("generation", 1),
            previous=previous,
            now=now(),
            create_failure=message,
            unstarted=unstarted,
        )
        if _changed(previous, status):
            written.write(ftj, status)


def refresh(
    namespace: str,
    name: str,
    state: State,
    *,
    progress: dict[str, Any] | None = None,
    event_pod: dict[str, Any] | None = None,
    event_job: dict[str, Any] | None = None,
    create_failure: str | None = None,
) -> dict[str, Any] | None:
    """Patch the status that the FineTuneJob's Job and pods imply; post an Event on a new phase.

    event_job, event_pod: what a create call or an event just returned, newer than the index may be.
    create_failure: why the Job controller cannot create a pod, just read from its Events.
    """
    key, indices, written = (namespace, name), state.indices, state.written
    with written.lock(namespace, name):
        ftj = indices.first(indices.finetunejobs, key)
        if ftj is None:
            return None
        previous = written.status(ftj)
        if any(
            c.get("reason") == "InvalidSpec" and c.get("status") == "True" for c in previous.get("conditions") or []
        ):
            return previous
        try:
            spec = parse_spec(ftj.get("spec") or {})
        except SpecError:
            return previous
        job = event_job or indices.first(indices.jobs, key)
        if job is None and previous.get("jobName"):
            return previous  # its Job is gone: reconcile() decides what that means
        pods = list(indices.pods.get(key, ()))
        if event_pod and all(p["metadata"].get("uid") != event_pod["metadata"].get("uid") for p in pods):
            pods.append(event_pod)  # already deleted: its last state still counts (a preempted pod)
        status = derive(
            job=job,
            pods=pods,
            metrics=spec.eval_metrics,
            generation=ftj["metadata"].get("generation", 1),
            previous=previous,
            now=now(),
            progress=progress or previous.get("progress"),
            create_failure=create_failure,
            queued=_queued(spec, ftj, job, state),
        )
        if _changed(previous, status):
            written.write(ftj, status)
            if status["phase"] != previous.get("phase"):
                observability.transition(ftj, previous.get("phase"), status["phase"])
                kind = "Warning" if status["phase"] == "Failed" else "Normal"
                state.cluster.event(ftj, kind, status["phase"], status.get("message") or status["phase"])
    observability.record_phase(namespace, name, status["phase"])
    return status


def _queued(
    spec: FineTuneJobSpec, ftj: dict[str, Any], job: dict[str, Any] | None, state: State
) -> tuple[str, str] | None:
    """Why Kueue holds the suspended Job of a FineTuneJob in a queue (kueue.held)."""
    if not (queue := spec.scheduling.queue_name):
        return None
    workload = _workload(ftj, job, state)
    return kueue.held(workload, queue, suspend=spec.run_policy.suspend, support=state.settings.kueue)


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


@kopf.on.event("batch", "v1", "jobs", labels={FTJ_LABEL: kopf.PRESENT})
def job_changed(body: Any, namespace: str, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A Job's change refreshes its FineTuneJob's status. A Job that is gone, or is an earlier
    FineTuneJob's of the same name, reconciles instead: the FineTuneJob may now get its Job, or end."""
    if name := _owner_name(body):
        state: State = memo.state
        ftj = state.indices.first(state.indices.finetunejobs, (namespace, name))
        owners = {r.get("uid") for r in body.get("metadata", {}).get("ownerReferences") or ()}
        if ftj is not None and (type == "DELETED" or ftj["metadata"]["uid"] not in owners):
            reconcile(ftj, state)
        else:
            refresh(namespace, name, state)


@kopf.on.event("v1", "pods", labels={FTJ_LABEL: kopf.PRESENT})
def pod_changed(body: Any, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if name := _owner_name(body):
        refresh(namespace, name, memo.state, event_pod=plain(pod_view(body)))


def tick(state: State, groups: list[dict[str, Any]] | None) -> None:
    """One round over every FineTuneJob: progress (from `groups`, the Pushgateway's answer) while it
    runs; a reconcile while it has no Job (its create may have failed); while its Job has no pod, the
    Job's FailedCreate Events (a quota); its metrics group removed a while after it ended."""
    for key, values in _snapshot(state.indices.finetunejobs):
        if (ftj := next(iter(values), None)) is None:
            continue
        try:
            _tick_one(ftj, state, groups)
        except Exception:  # one FineTuneJob's trouble never stops the round for the others
            log.exception("periodic reconcile of %s/%s failed", *key)


def _tick_one(ftj: dict[str, Any], state: State, groups: list[dict[str, Any]] | None) -> None:
    namespace, name = key = (ftj["metadata"]["namespace"], ftj["metadata"]["name"])
    settings, written = state.settings, state.written
    status = written.status(ftj)
    phase, job = status.get("phase"), _own_job(ftj, state.indices)
    if phase == "Running":
        progress = parse_groups(groups, namespace, name) if groups is not None else None
        refresh(namespace, name, state, progress=progress)
    elif phase not in ENDED and job is None:
        reconcile(ftj, state)
    elif phase == "Pending" and job and not job["spec"]["suspend"] and not state.indices.pods.get(key):
        if failure := state.cluster.create_failure(namespace, job):
            refresh(namespace, name, state, create_failure=failure)
    elif phase in ENDED and settings.pushgateway_url and not status.get("metricsDeleted"):
        ended = status.get("completionTime")
        if ended and _age(ended) >= settings.pushgateway_group_ttl_seconds:
            delete_group(settings.pushgateway_url, namespace, name)
            with written.lock(namespace, name):
                written.write(ftj, {"metricsDeleted": True})


def _snapshot(index: Index) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
    """The index's entries, copied from this thread while kopf's loop may be changing it."""
    for _ in range(10):
        try:
            return [(key, list(values)) for key, values in list(index.items())]
        except RuntimeError:  # changed size during the copy: try again
            continue
    return []


def _ticker(state: State) -> None:
    """tick() every progress interval, with one read of the Pushgateway for all FineTuneJobs. A thread
    of the operator's, not a kopf timer: those put a finalizer on every object."""
    url = state.settings.pushgateway_url
    while True:
        time.sleep(state.settings.progress_interval_seconds)
        try:
            tick(state, read_groups(url) if url else None)
        except Exception:  # a bad round must not stop the next ones
            log.exception("periodic reconcile failed")


def _age(stamp: str) -> float:
    return (datetime.now(UTC) - parse_time(stamp)).total_seconds()


def deleted(namespace: str, name: str, uid: str, state: State) -> None:
    """Children go through ownerReferences; the metrics group is removed here (no finalizer)."""
    observability.forget(namespace, name)
    state.written.forget(namespace, name, uid)
    if state.settings.pushgateway_url:
        delete_group(state.settings.pushgateway_url, namespace, name)
        # A pod stopping now pushes its outcome on the way out: remove the group again once the pods are gone.
        args = (namespace, name, state)
        threading.Thread(target=_delete_group_after_pods, args=args, daemon=True).start()


def _delete_group_after_pods(namespace: str, name: str, state: State) -> None:
    deadline = time.monotonic() + state.settings.termination_grace_seconds + 30
    while any(key == (namespace, name) and pods for key, pods in _snapshot(state.indices.pods)):
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    assert state.settings.pushgateway_url
    delete_group(state.settings.pushgateway_url, namespace, name)
