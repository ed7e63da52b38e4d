"""The kopf handlers: thin I/O around manifests.children() and status.derive().

Level-triggered and idempotent: every handler ends in `refresh`, which reads the Job and pods and
writes the status they imply. Child names are deterministic, so a replayed event or an operator
restarted between creating the Job and writing status creates nothing twice. The operator never
reads Secrets: pods get credentials through secretKeyRef.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException
from kubernetes.config import incluster_config

from kubetune_job.spec import FineTuneJobSpec, SpecError, parse_spec

from . import observability
from .crd import GROUP, PLURAL, VERSION
from .manifests import FTJ_LABEL, InvalidSpec, Owner, children, desired_suspend
from .progress import delete_group, read_progress
from .settings import OperatorSettings
from .status import derive, invalid

log = logging.getLogger(__name__)
SETTINGS = OperatorSettings()
FTJ = (GROUP, VERSION, PLURAL)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

    def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._raw(
                self.custom.get_namespaced_custom_object(*FTJ[:2], namespace, PLURAL, name, _preload_content=False)
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._raw(self.batch.read_namespaced_job(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        selector = f"{FTJ_LABEL}={name}"
        listing = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(self._raw(listing)["items"])

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create a child; if it exists already (a replay, a restart), return the existing one, and
        whether it was created now."""
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
        return self._raw(read(name, namespace, _preload_content=False)), False

    def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}})

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(*FTJ[:2], namespace, PLURAL, name, {"status": status})


_cluster: Cluster | None = None


def api_configuration() -> k8s.Configuration:
    """In a pod: the mounted ServiceAccount token; elsewhere: the kubeconfig (KUBECONFIG)."""
    config = k8s.Configuration()
    account = SETTINGS.service_account_dir
    if (account / "token").is_file() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        loader = incluster_config.InClusterConfigLoader(
            token_filename=str(account / "token"), cert_filename=str(account / "ca.crt")
        )
        loader.load_and_set(config)
    else:
        k8s_config.load_kube_config(client_configuration=config)
    return config


def cluster() -> Cluster:
    global _cluster
    if _cluster is None:
        _cluster = Cluster(k8s.ApiClient(api_configuration()))
    return _cluster


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as the operator's own client."""
    config = api_configuration()
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
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: status belongs to the FineTuneJob API.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubetune.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    observability.serve(SETTINGS.metrics_port)
    cluster()


def _spec(body: Any) -> FineTuneJobSpec:
    return parse_spec(plain(body.get("spec") or {}))


def _owner(body: Any) -> Owner:
    meta = body["metadata"]
    return Owner(meta["name"], meta["namespace"], meta["uid"])


@kopf.on.resume(*FTJ)
@kopf.on.create(*FTJ)
@kopf.on.update(*FTJ, field="spec")
def reconcile(body: Any, **_: Any) -> None:
    """Create the Job (and Service) for a FineTuneJob, keep suspend in step, then write status."""
    started = time.monotonic()
    owner, generation = _owner(body), body["metadata"].get("generation", 1)
    previous = plain(body.get("status") or {})
    try:
        spec = _spec(body)
        objects = children(owner, spec, SETTINGS)
    except (SpecError, InvalidSpec) as e:
        message = "; ".join(e.problems) if isinstance(e, SpecError) else str(e)
        cluster().patch_status(
            owner.namespace, owner.name, invalid(message, generation=generation, previous=previous, now=now())
        )
        kopf.warn(plain(body), reason="InvalidSpec", message=message)
        observability.reconciled("invalid", started)
        return
    api = cluster()
    created_job = False
    for obj in objects:
        existing, created = api.create(obj)
        created_job |= created and obj["kind"] == "Job"
        refs = existing["metadata"].get("ownerReferences") or []
        if not any(r.get("uid") == owner.uid for r in refs):
            message = f"a {obj['kind']} named {obj['metadata']['name']} exists and does not belong to this FineTuneJob"
            api.patch_status(
                owner.namespace, owner.name, invalid(message, generation=generation, previous=previous, now=now())
            )
            observability.reconciled("conflict", started)
            return
        if obj["kind"] == "Job":
            suspend = desired_suspend(spec, bool(existing.get("spec", {}).get("suspend")))
            if suspend is not None:
                api.suspend_job(owner.namespace, owner.name, suspend)
    if not created_job:  # a new Job's own ADDED event writes the status: no second round of reads
        refresh(owner.namespace, owner.name)
    observability.reconciled("ok", started)


def refresh(
    namespace: str,
    name: str,
    *,
    with_progress: bool = False,
    event_pod: dict[str, Any] | None = None,
    event_job: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Read the FineTuneJob's Job and pods and patch the status they imply; post an Event on change."""
    api = cluster()
    ftj = api.finetunejob(namespace, name)
    if ftj is None:
        return None
    previous = ftj.get("status") or {}
    if any(c.get("reason") == "InvalidSpec" and c.get("status") == "True" for c in previous.get("conditions") or []):
        return previous
    try:
        spec = parse_spec(ftj.get("spec") or {})
    except SpecError:
        return previous
    job, pods = event_job or api.job(namespace, name), api.pods(namespace, name)
    if event_pod and all(p["metadata"].get("uid") != event_pod["metadata"].get("uid") for p in pods):
        pods.append(event_pod)  # already deleted: its last state still counts (a preempted pod)
    progress = None
    if with_progress and SETTINGS.pushgateway_url:
        progress = read_progress(SETTINGS.pushgateway_url, namespace, name)
    status = derive(
        job=job,
        pods=pods,
        metrics=list(spec.metrics),
        generation=ftj["metadata"].get("generation", 1),
        previous=previous,
        now=now(),
        progress=progress or previous.get("progress"),
    )
    if _changed(previous, status):
        api.patch_status(namespace, name, status)
        if status["phase"] != previous.get("phase"):
            observability.transition(ftj, previous.get("phase"), status["phase"])
            kind = "Warning" if status["phase"] == "Failed" else "Normal"
            kopf.event(ftj, type=kind, reason=status["phase"], message=status.get("message") or status["phase"])
    observability.record_phase(namespace, name, status["phase"])
    return status


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


def _owner_name(body: Any) -> str | None:
    return (body.get("metadata", {}).get("labels") or {}).get(FTJ_LABEL)


@kopf.on.event("batch", "v1", "jobs", labels={FTJ_LABEL: kopf.PRESENT})
def job_changed(body: Any, namespace: str, type: str | None = None, **_: Any) -> None:
    if name := _owner_name(body):
        refresh(namespace, name, event_job=None if type == "DELETED" else plain(body))


@kopf.on.event("v1", "pods", labels={FTJ_LABEL: kopf.PRESENT})
def pod_changed(body: Any, namespace: str, **_: Any) -> None:
    if name := _owner_name(body):
        refresh(namespace, name, event_pod=plain(body))


@kopf.timer(*FTJ, interval=SETTINGS.progress_interval_seconds, initial_delay=5)
def tick(body: Any, namespace: str, name: str, **_: Any) -> None:
    """Progress from the Pushgateway while running; the job's metrics group removed after it ended."""
    status = plain(body.get("status") or {})
    phase = status.get("phase")
    if phase == "Running":
        refresh(namespace, name, with_progress=True)
    elif phase in ("Succeeded", "Failed") and SETTINGS.pushgateway_url and not status.get("metricsDeleted"):
        ended = status.get("completionTime")
        if ended and _age(ended) >= SETTINGS.pushgateway_group_ttl_seconds:
            delete_group(SETTINGS.pushgateway_url, namespace, name)
            cluster().patch_status(namespace, name, {"metricsDeleted": True})


def _age(stamp: str) -> float:
    return (datetime.now(UTC) - datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)).total_seconds()


@kopf.on.delete(*FTJ, optional=True)
def deleted(namespace: str, name: str, **_: Any) -> None:
    """Children go through ownerReferences; the metrics group is removed here (no finalizer)."""
    observability.forget(namespace, name)
    if SETTINGS.pushgateway_url:
        delete_group(SETTINGS.pushgateway_url, namespace, name)
        # A pod stopping now pushes its outcome on the way out: remove the group again once the pods are gone.
        threading.Thread(target=_delete_group_after_pods, args=(namespace, name), daemon=True).start()


def _delete_group_after_pods(namespace: str, name: str) -> None:
    deadline = time.monotonic() + SETTINGS.termination_grace_seconds + 30
    while cluster().pods(namespace, name) and time.monotonic() < deadline:
        time.sleep(2)
    assert SETTINGS.pushgateway_url
    delete_group(SETTINGS.pushgateway_url, namespace, name)
