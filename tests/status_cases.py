"""Every status the operator's decisions produce in the unit tests, collected for the tests that hold
them against FineTuneJobStatus and against the API server's copy of its schema.

The status tests in tests/unit/test_operator_decisions.py are the fixtures: each one that calls
derive() runs here with derive() recording what it returns, so a case added there is checked here
too. A few statuses that those tests do not derive (progress read from the Pushgateway with a
checkpoint time, the operator's own ending, the metrics cleanup) are added alongside.
"""

from __future__ import annotations

import inspect
from typing import Any

from kubetune_operator.progress import parse_groups
from kubetune_operator.status import derive, ended_by_operator


def _gauge(value: float, **labels: str) -> dict[str, Any]:
    return {"type": "GAUGE", "metrics": [{"labels": labels, "value": str(value)}]}


def _more() -> list[dict[str, Any]]:
    """Statuses from the operator's other sources of status fields."""
    values = {
        "kubetune_train_global_step": 459,
        "kubetune_train_total_steps": 1377,
        "kubetune_train_epoch": 1.33,
        "kubetune_train_samples_per_second": 41.5,
        "kubetune_train_tokens_per_second": 1328.0,
        "kubetune_train_eta_seconds": 140.4,
        "kubetune_train_loss": 0.33,
        "kubetune_checkpoint_step": 459,
        "kubetune_checkpoint_timestamp_seconds": 1_767_225_600,
    }
    group = {
        "labels": {"job": "kubetune", "namespace": "ml", "finetunejob": "bert"},
        **{name: _gauge(value) for name, value in values.items()},
        "kubetune_eval_metric": _gauge(0.855, metric="f1"),
    }
    job = {"metadata": {"name": "x"}, "spec": {}, "status": {"startTime": "2026-01-01T00:00:00Z"}}
    running = {"metadata": {"name": "p", "uid": "u", "creationTimestamp": "2026-01-01T00:00:00Z"}}
    running["status"] = {"phase": "Running"}
    now = "2026-01-01T00:10:00Z"
    live = derive(
        job=job,
        pods=[running],
        metrics=["f1"],
        generation=3,
        previous={},
        now=now,
        progress=parse_groups([group], "ml", "bert"),
    )
    ended = ended_by_operator("JobDeleted", "its Job was deleted", generation=3, previous=live, now=now)
    return [live, ended, {**ended, "metricsDeleted": True}]


def derived_statuses() -> list[dict[str, Any]]:
    """Every status derive() returns in the operator-decision unit tests, and those of _more()."""
    from tests.unit import test_operator_decisions as decisions

    seen: list[dict[str, Any]] = []
    real = decisions.derive

    def recording(**kwargs: Any) -> dict[str, Any]:
        status = real(**kwargs)
        seen.append(status)
        return status

    decisions.derive = recording  # type: ignore[assignment]
    try:
        for name, test in sorted(vars(decisions).items()):
            if name.startswith("test_") and "derive(" in inspect.getsource(test):
                test()
    finally:
        decisions.derive = real  # type: ignore[assignment]
    return seen + _more()


def without_nulls(value: Any) -> Any:
    """A status as a merge patch leaves it stored: null fields are removed, not set."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value
