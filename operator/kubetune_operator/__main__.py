"""`python -m kubetune_operator`: run the operator (kopf) with the settings from the environment.

With leader election, a replica first waits as a standby (answering /healthz, running no handler)
until it holds the Lease, then runs kopf while a thread renews the Lease; on the way out (SIGTERM
stops kopf gracefully) it releases the Lease so that a standby takes over at once."""

from __future__ import annotations

import logging
import os

import kopf
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from . import (
    handlers,  # noqa: F401  (registers the handlers)
    kueue,
)
from .handlers import api_configuration, register_kueue
from .leader import Elector, standby_health
from .settings import OperatorSettings


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Strict mode: serve the namespaces given (or the whole cluster) and the CRDs present at start. The
    # operator's RBAC grants no list/watch on namespaces or CRDs, and kopf retries each 403 of its
    # observers for about a minute (its error backoffs): a namespaced install would handle nothing for
    # that long. The chart installs the CRD before the operator starts.
    settings.scanning.disabled = True
    return settings


def require_kueue(api: k8s.CustomObjectsApi) -> None:
    """With Kueue support on, the API server must serve Kueue's Workloads when kopf starts: kopf watches
    only what exists then (scanning is off), so without them the support would be off, silently."""
    try:
        served = [r.name for r in api.get_api_resources(kueue.GROUP, kueue.VERSION).resources]
    except ApiException as e:
        if e.status != 404:
            raise
        served = []
    if kueue.PLURAL not in served:
        raise SystemExit(
            f"KUBETUNE_OPERATOR_KUEUE is on, but the API server serves no {kueue.GROUP}/{kueue.VERSION} "
            f"{kueue.PLURAL}: install Kueue (v0.19 or newer) first, or turn the chart's kueue.enabled off"
        )


def main() -> None:
    logging.basicConfig(level=os.environ.get("KUBETUNE_OPERATOR_LOG_LEVEL", "INFO"))
    settings = OperatorSettings()  # read from the environment once; the handlers get it through kopf's memo
    health = settings.health_port
    if settings.kueue:
        require_kueue(k8s.CustomObjectsApi(k8s.ApiClient(api_configuration(settings))))
        register_kueue()
    elector = (
        Elector.from_settings(k8s.ApiClient(api_configuration(settings)), settings)
        if settings.leader_election
        else None
    )
    if elector is not None:
        with standby_health(health):
            elector.acquire()
        elector.keep()
    try:
        kopf.run(
            settings=kopf_settings(),
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{health}/healthz" if health else None,
            memo=kopf.Memo(settings=settings),
        )
    finally:
        if elector is not None:
            elector.release()


if __name__ == "__main__":
    main()
