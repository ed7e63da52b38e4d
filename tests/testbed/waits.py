"""Waiting on the cluster in tests: poll until something holds, and say what was awaited when it never does."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.25, what: str = "") -> T:
    """Call ``probe`` until it returns something truthy, and return that; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what or probe}; last seen: {last!r}")


def read_pod(core: k8s.CoreV1Api, namespace: str, name: str) -> k8s.V1Pod | None:
    """The pod, or None once it no longer exists."""
    try:
        return core.read_namespaced_pod(name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def job_pods(core: k8s.CoreV1Api, namespace: str, job: str) -> list[k8s.V1Pod]:
    """The Job's pods (by the job-name label the Job controller sets), oldest first."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    return sorted(pods, key=lambda p: p.metadata.creation_timestamp)


def container_state(pod: k8s.V1Pod, container: int = 0) -> k8s.V1ContainerState | None:
    """The state of the pod's n-th container as its status reports it, if reported yet."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return statuses[container].state if len(statuses) > container else None


def condition(obj: k8s.V1Pod | k8s.V1Job, kind: str) -> object | None:
    """The status condition of type ``kind`` on a pod or Job, if present."""
    for c in (obj.status.conditions if obj.status else None) or []:
        if c.type == kind:
            return c
    return None
