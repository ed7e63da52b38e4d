"""What the operator creates for a FineTuneJob: a batch/v1 Job (and, for several nodes, a headless
Service), as plain dicts. Pure functions of the FineTuneJob, its spec and the operator's settings;
`kubetune render` prints exactly these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubetune_api.exit_codes import PERMANENT_EXIT_CODES, ExitCode
from kubetune_api.settings import pod_env, run_location
from kubetune_api.spec import API_VERSION, KIND, FineTuneJobSpec

from .settings import OperatorSettings
from .status import COMPLETION_INDEX

CONTAINER = "trainer"
FTJ_LABEL = "kubetune.io/finetunejob"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune"}
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Kueue's pod-template annotations that ask its topology-aware scheduling for one domain of a level.
TOPOLOGY_ANNOTATIONS = {
    "Required": "kueue.x-k8s.io/podset-required-topology",
    "Preferred": "kueue.x-k8s.io/podset-preferred-topology",
}
NODE_RANK_FIELD = f"metadata.annotations['{COMPLETION_INDEX}']"
SCRATCH = {"tmp": "/tmp", "cache": "/cache", "dshm": "/dev/shm"}


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob the objects belong to."""

    name: str
    namespace: str
    uid: str


class InvalidSpec(ValueError):
    """The spec passed the API server but not the operator's own checks."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


def resolve(owner: Owner, spec: FineTuneJobSpec, settings: OperatorSettings) -> FineTuneJobSpec:
    """The spec with the operator's defaults filled in: locations, storage, image."""
    where = {"namespace": owner.namespace, "name": owner.name}
    checkpoints = spec.checkpoints.uri or (settings.checkpoint_root and run_location(settings.checkpoint_root, **where))
    output = spec.output.uri or (settings.output_root and run_location(settings.output_root, **where))
    storage = spec.storage.model_copy(
        update={
            "endpoint": spec.storage.endpoint or settings.storage_endpoint,
            "region": spec.storage.region or settings.storage_region,
            "credentials_secret": spec.storage.credentials_secret or settings.credentials_secret,
        }
    )
    return spec.model_copy(
        update={
            "checkpoints": spec.checkpoints.model_copy(update={"uri": checkpoints or None}),
            "output": spec.output.model_copy(update={"uri": output or None}),
            "storage": storage,
            "image": spec.image or settings.job_image,
        }
    )


def check(spec: FineTuneJobSpec, settings: OperatorSettings) -> None:
    """The operator's own rules, beyond the schema; raise InvalidSpec naming the field."""
    if (
        spec.image
        and settings.allowed_image_prefixes
        and not spec.image.startswith(tuple(settings.allowed_image_prefixes))
    ):
        allowed = ", ".join(settings.allowed_image_prefixes)
        raise InvalidSpec("spec.image", f"{spec.image!r} is not allowed here; use an image under {allowed}")
    uris = [spec.model.uri, spec.dataset.uri, spec.checkpoints.uri, spec.output.uri]
    if any(u and u.startswith("s3://") for u in uris) and not spec.storage.endpoint:
        raise InvalidSpec("spec.storage.endpoint", "s3:// locations need an endpoint; set spec.storage.endpoint")


def labels(owner: Owner) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/name": "kubetune-job", FTJ_LABEL: owner.name}


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def service_name(owner: Owner) -> str:
    return f"{owner.name}-workers"


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def environment(owner: Owner, spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The job's whole configuration, passed in the pod: no API access needed."""
    several = spec.resources.nodes > 1
    job_settings: dict[str, Any] = {
        "spec": json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_none=True)),
        "name": owner.name,
        "namespace": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "nproc_per_node": max(spec.resources.gpus, 1),
        "pushgateway_url": settings.pushgateway_url or None,
    }
    if several:
        job_settings |= {
            "nnodes": spec.resources.nodes,
            "node_rank": {"fieldRef": {"fieldPath": NODE_RANK_FIELD}},
            "master_addr": f"{owner.name}-0.{service_name(owner)}",
            "master_port": settings.master_port,
        }
    env = [
        *pod_env(job_settings),
        {"name": "HOME", "value": "/tmp/home"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env += [
            {"name": "AWS_REGION", "value": storage.region},
            {"name": "AWS_DEFAULT_REGION", "value": storage.region},
        ]
    if storage.credentials_secret:
        env += [
            _secret_env("AWS_ACCESS_KEY_ID", storage.credentials_secret, "AWS_ACCESS_KEY_ID"),
            _secret_env("AWS_SECRET_ACCESS_KEY", storage.credentials_secret, "AWS_SECRET_ACCESS_KEY"),
        ]
    if spec.hub_token_secret:
        env.append(_secret_env("HF_TOKEN", spec.hub_token_secret, "HF_TOKEN"))
    return env


def resources(spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = limits["memory"] = spec.resources.memory
    if spec.resources.gpus:
        requests[settings.gpu_resource_name] = limits[settings.gpu_resource_name] = str(spec.resources.gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def pod_template(owner: Owner, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """Pods that satisfy the restricted Pod Security Standard and need no API access."""
    uid = settings.run_as_user
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "command": ["python", "-m", "kubetune_job"],
        "env": environment(owner, spec, settings),
        "resources": resources(spec, settings),
        "volumeMounts": [{"name": name, "mountPath": path} for name, path in SCRATCH.items()],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    sched = spec.scheduling
    if sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    if spec.resources.nodes > 1:
        pod["subdomain"] = service_name(owner)
    meta: dict[str, Any] = {"labels": labels(owner)}
    if sched.topology:
        meta["annotations"] = {TOPOLOGY_ANNOTATIONS[sched.topology.mode]: sched.topology.level}
    return {"metadata": meta, "spec": pod}


def failure_policy() -> dict[str, Any]:
    """Preemption never counts; the job's permanent exit codes fail the Job at once. Exit code 21 is a
    pod that stopped for preemption after committing a checkpoint: in a multi-node run, the other nodes'
    pods stop with it (their ranks agree to stop together), without the DisruptionTarget condition."""
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": _trainer_exits(sorted(int(c) for c in PERMANENT_EXIT_CODES))},
            {"action": "Ignore", "onExitCodes": _trainer_exits([int(ExitCode.PREEMPTED)])},
        ]
    }


def _trainer_exits(codes: list[int]) -> dict[str, Any]:
    return {"containerName": CONTAINER, "operator": "In", "values": codes}


def job(owner: Owner, spec: FineTuneJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job; its name is the FineTuneJob's, so a replayed event creates nothing new."""
    nodes = spec.resources.nodes
    meta: dict[str, Any] = {
        "name": owner.name,
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner_reference(owner)],
    }
    if spec.scheduling.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.scheduling.queue_name
    body: dict[str, Any] = {
        # Indexed, with retries counted per index, even for one node: each replacement pod then carries
        # the Job's own count of its index's earlier failures and preemptions (status.failure_record),
        # which outlives the failed pods and the operator's memory. One failed index fails the Job.
        "completionMode": "Indexed",
        "backoffLimitPerIndex": spec.run_policy.max_retries,
        "maxFailedIndexes": 0,
        "podFailurePolicy": failure_policy(),
        "podReplacementPolicy": "Failed",  # two pods never write the same checkpoints
        "completions": nodes,
        "parallelism": nodes,
        "suspend": spec.run_policy.suspend or bool(spec.scheduling.queue_name),
        "template": pod_template(owner, spec, settings),
    }
    if spec.run_policy.active_deadline_seconds:
        body["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    if spec.run_policy.ttl_seconds_after_finished is not None:
        body["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": body}


def service(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    """The headless Service that gives each pod of a multi-node job a stable name for rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(owner),
            "namespace": owner.namespace,
            "labels": labels(owner),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {FTJ_LABEL: owner.name},
            "ports": [{"name": "rendezvous", "port": settings.master_port}],
        },
    }


def children(owner: Owner, spec: FineTuneJobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Everything the operator creates for one FineTuneJob, in creation order."""
    resolved = resolve(owner, spec, settings)
    check(resolved, settings)
    objects = [job(owner, resolved, settings)]
    if resolved.resources.nodes > 1:
        objects.insert(0, service(owner, settings))
    return objects


def desired_suspend(spec: FineTuneJobSpec, current: bool) -> bool | None:
    """The Job's suspend flag to set, or None to leave it. A Job in a Kueue queue is Kueue's to suspend
    and unsuspend (runPolicy.suspend goes through its Workload: kueue.activation)."""
    wanted = spec.run_policy.suspend
    if spec.scheduling.queue_name:
        return None
    return wanted if wanted != current else None
