"""Training progress read from the job's group on the Pushgateway, and the group's removal.

The Pushgateway's JSON API (/api/v1/metrics) lists every group with its metrics' latest values;
the operator reads the one with the FineTuneJob's grouping key. Errors are logged and ignored:
progress is a nicety, never a reason to fail a reconcile.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

from kubetune_job.pushgateway import group_url

log = logging.getLogger(__name__)
TIMEOUT = 3.0

#: Pushgateway metric -> status.progress field.
PROGRESS = {
    "kubetune_train_global_step": "step",
    "kubetune_train_total_steps": "totalSteps",
    "kubetune_train_epoch": "epoch",
    "kubetune_train_samples_per_second": "samplesPerSecond",
    "kubetune_train_eta_seconds": "etaSeconds",
}


def _value(metric: dict[str, Any]) -> float | None:
    for m in metric.get("metrics") or ():
        try:
            return float(m.get("value"))
        except (TypeError, ValueError):
            continue
    return None


def parse_groups(groups: list[dict[str, Any]], namespace: str, name: str) -> dict[str, Any] | None:
    """status.progress from the Pushgateway's /api/v1/metrics answer, or None if the group is absent."""
    for group in groups:
        labels = group.get("labels") or {}
        if labels.get("namespace") != namespace or labels.get("finetunejob") != name:
            continue
        progress: dict[str, Any] = {}
        for metric_name, field in PROGRESS.items():
            value = _value(group.get(metric_name) or {})
            if value is not None:
                progress[field] = value
        if "step" in progress:
            progress["step"] = int(progress["step"])
        if progress.get("totalSteps"):
            progress["totalSteps"] = int(progress["totalSteps"])
            progress["percent"] = int(100 * progress.get("step", 0) // progress["totalSteps"])
        if "etaSeconds" in progress:
            progress["etaSeconds"] = int(progress["etaSeconds"])
        return progress or None
    return None


def read_progress(url: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/metrics", timeout=TIMEOUT) as r:
            return parse_groups(json.load(r).get("data") or [], namespace, name)
    except (OSError, ValueError) as e:
        log.warning("cannot read progress from %s: %s", url, e)
        return None


def delete_group(url: str, namespace: str, name: str) -> None:
    request = urllib.request.Request(group_url(url, namespace, name), method="DELETE")
    try:
        urllib.request.urlopen(request, timeout=TIMEOUT).close()
    except (OSError, urllib.error.HTTPError) as e:
        log.warning("cannot delete the metrics group of %s/%s: %s", namespace, name, e)
