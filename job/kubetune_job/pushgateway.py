"""The job's group on a Prometheus Pushgateway: where it lives, what it holds, how to replace or delete it.

One group per FineTuneJob, keyed {namespace, finetunejob} under the job label ``kubetune``; never a
pod or attempt label, so a retried pod replaces its predecessor's values instead of adding series.
The requests are prometheus_client's push_to_gateway and delete_from_gateway (and so its escaping of
grouping-key values), imported where they are called: the operator, which deletes a job's group after
the job ended, imports this module without loading anything but the standard library.
What the job pushes is the contract's metric catalog (kubetune_api.metrics.CATALOG).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: The Pushgateway's mandatory ``job`` label for every kubetune group.
JOB = "kubetune"


def grouping_key(namespace: str, finetunejob: str) -> dict[str, str]:
    """The labels that identify a FineTuneJob's group (besides ``job``)."""
    return {"namespace": namespace, "finetunejob": finetunejob}


def group_url(url: str, namespace: str, finetunejob: str) -> str:
    """The URL of a FineTuneJob's group, as prometheus_client spells it for a push or a delete.

    Asked of the client itself (a handler that records the URL and sends nothing), so that the URL
    shown here and the one requested are built by one piece of code.
    """
    from prometheus_client import delete_from_gateway

    seen: list[str] = []

    def record(
        url: str, method: str, timeout: float | None, headers: Sequence[object], data: bytes
    ) -> Callable[[], None]:
        return lambda: seen.append(url)

    delete_from_gateway(url.strip(), job=JOB, grouping_key=grouping_key(namespace, finetunejob), handler=record)
    return seen[0]


def put_group(url: str, namespace: str, finetunejob: str, *, registry: CollectorRegistry, timeout: float) -> None:
    """Replace the group with what ``registry`` collects now; raise on any failure."""
    from prometheus_client import push_to_gateway

    push_to_gateway(
        url.strip(), job=JOB, registry=registry, grouping_key=grouping_key(namespace, finetunejob), timeout=timeout
    )


def delete_group(url: str, namespace: str, finetunejob: str, *, timeout: float = 5.0) -> None:
    """Delete a FineTuneJob's group and every series in it (a missing group too); raise on any failure."""
    from prometheus_client import delete_from_gateway

    delete_from_gateway(url.strip(), job=JOB, grouping_key=grouping_key(namespace, finetunejob), timeout=timeout)
