"""Training progress read from the job's group on the Pushgateway, and the group's removal.

The Pushgateway's JSON API (/api/v1/metrics) lists every group with its metrics' latest values;
the operator reads the one with the FineTuneJob's grouping key. Errors are logged and ignored:
progress is a nicety, never a reason to fail a reconcile.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import UTC, datetime
from typing import Any

from kubetune_api.metrics import eval_name
from kubetune_api.status import TIMESTAMP
from kubetune_job import pushgateway

log = logging.getLogger(__name__)
TIMEOUT = 3.0

#: Pushgateway metric -> status.progress field.
PROGRESS = {
    "kubetune_train_global_step": "step",
    "kubetune_train_total_steps": "totalSteps",
    "kubetune_train_epoch": "epoch",
    "kubetune_train_samples_per_second": "samplesPerSecond",
    "kubetune_train_tokens_per_second": "tokensPerSecond",
    "kubetune_train_eta_seconds": "etaSeconds",
}


def _values(metric: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
    out = []
    for m in metric.get("metrics") or ():
        try:
            out.append((m.get("labels") or {}, float(m.get("value"))))
        except (TypeError, ValueError):
            continue
    return out


def _value(metric: dict[str, Any]) -> float | None:
    values = _values(metric)
    return values[0][1] if values else None


def live_metrics(group: dict[str, Any]) -> dict[str, float]:
    """trainLoss and eval<Metric> as the job last pushed them (status.metrics while it runs)."""
    out = {}
    if (loss := _value(group.get("kubetune_train_loss") or {})) is not None:
        out["trainLoss"] = round(loss, 6)
    for labels, value in _values(group.get("kubetune_eval_metric") or {}):
        if name := labels.get("metric"):
            out[eval_name(name)] = round(value, 6)
    return out


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
        if metrics := live_metrics(group):
            progress["metrics"] = metrics
        step = _value(group.get("kubetune_checkpoint_step") or {})
        if step:
            when = _value(group.get("kubetune_checkpoint_timestamp_seconds") or {})
            progress["lastCheckpoint"] = {"step": int(step), **({"time": _stamp(when)} if when else {})}
        return progress or None
    return None


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(TIMESTAMP)


def read_groups(url: str) -> list[dict[str, Any]] | None:
    """Every group on the Pushgateway (one request for all FineTuneJobs), or None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/metrics", timeout=TIMEOUT) as r:
            return list(json.load(r).get("data") or [])
    except (OSError, ValueError) as e:
        log.warning("cannot read progress from %s: %s", url, e)
        return None


def delete_group(url: str, namespace: str, name: str) -> None:
    try:
        pushgateway.delete_group(url, namespace, name, timeout=TIMEOUT)
    except OSError as e:
        log.warning("cannot delete the metrics group of %s/%s: %s", namespace, name, e)
