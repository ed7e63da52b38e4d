"""The operator's own metrics (/metrics): reconciles by result, reconcile latency, FineTuneJobs by
phase, and the time from creation to Running."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .status import parse_time

RECONCILES = Counter("kubetune_operator_reconciles_total", "FineTuneJob reconciles, by result.", ["result"])
RECONCILE_SECONDS = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Time to reconcile a FineTuneJob (create children, write status).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_TO_RUNNING = Histogram(
    "kubetune_operator_time_to_running_seconds",
    "Time from a FineTuneJob's creation to its first Running phase.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


class _PhaseCollector(Collector):
    def collect(self) -> Any:
        family = GaugeMetricFamily("kubetune_operator_finetunejobs", "FineTuneJobs by phase.", labels=["phase"])
        with _lock:
            counts: dict[str, int] = {}
            for phase in _phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        for phase in ("Pending", "Running", "Succeeded", "Failed", "Suspended"):
            family.add_metric([phase], counts.get(phase, 0))
        yield family


REGISTRY.register(_PhaseCollector())
_served = False


def serve(port: int) -> None:
    global _served
    if not _served and port:
        start_http_server(port)
        _served = True


def reconciled(result: str, started: float) -> None:
    RECONCILES.labels(result).inc()
    RECONCILE_SECONDS.observe(time.monotonic() - started)


def record_phase(namespace: str, name: str, phase: str) -> None:
    with _lock:
        _phases[(namespace, name)] = phase


def forget(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)


def transition(ftj: dict[str, Any], old: str | None, new: str) -> None:
    if new == "Running" and old != "Running":
        created = ftj["metadata"].get("creationTimestamp")
        if created:
            TIME_TO_RUNNING.observe((datetime.now(UTC) - parse_time(created)).total_seconds())
