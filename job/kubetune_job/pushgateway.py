"""The job's group on a Prometheus Pushgateway: where it lives, what it holds, how to replace or delete it.

One group per FineTuneJob, keyed {namespace, finetunejob} under the job label ``kubetune``; never a
pod or attempt label, so a retried pod replaces its predecessor's values instead of adding series.
Standard library only: the operator, which reads a job's group and deletes it after the job ended,
imports this module without the job's heavy dependencies (no prometheus_client, no torch).
What the job pushes is the contract's metric catalog (kubetune_api.metrics.CATALOG).
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request

#: The Pushgateway's mandatory ``job`` label for every kubetune group.
JOB = "kubetune"
#: The text exposition format the job pushes (the Pushgateway reads it; so does ``promtool check metrics``).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def base_url(url: str) -> str:
    """The gateway's URL with a scheme and without a trailing slash (``host:9091`` -> ``http://host:9091``)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


def grouping_key(namespace: str, finetunejob: str) -> dict[str, str]:
    """The labels that identify a FineTuneJob's group (besides ``job``)."""
    return {"namespace": namespace, "finetunejob": finetunejob}


def _segment(name: str, value: str) -> str:
    # A value with a slash (or an empty one) cannot be a path segment: the gateway takes it base64url-encoded.
    if value and "/" not in value:
        return f"{name}/{urllib.parse.quote(value, safe='')}"
    return f"{name}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"


def group_url(url: str, namespace: str, finetunejob: str) -> str:
    """The URL of a FineTuneJob's group: PUT replaces it, DELETE removes it."""
    labels = {"job": JOB, **grouping_key(namespace, finetunejob)}
    return base_url(url) + "/metrics/" + "/".join(_segment(k, v) for k, v in labels.items())


def _send(request: urllib.request.Request, timeout: float) -> int:
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


def put_group(url: str, namespace: str, finetunejob: str, *, body: bytes, timeout: float) -> None:
    """Replace the group with ``body`` (text exposition format); raise on any failure."""
    target = group_url(url, namespace, finetunejob)
    request = urllib.request.Request(target, data=body, method="PUT", headers={"Content-Type": CONTENT_TYPE})
    _send(request, timeout)


def delete_group(url: str, namespace: str, finetunejob: str, *, timeout: float = 5.0) -> None:
    """Delete a FineTuneJob's group and every series in it (a missing group too); raise on any failure."""
    target = group_url(url, namespace, finetunejob)
    _send(urllib.request.Request(target, method="DELETE"), timeout)
