"""The status schema in the CRD is generated from FineTuneJobStatus, and every derived status fits it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune_api.status import FineTuneJobStatus
from kubetune_operator.crd import crd, status_schema
from tests.status_cases import derived_statuses, without_nulls

CHART_CRD = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "files" / "crd.json"


def _stored_status(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def test_status_schema_is_generated_from_the_model() -> None:
    """The CRD's status schema is status_schema(), whose fields are FineTuneJobStatus's, camelCased."""
    schema = _stored_status(crd())
    assert schema == status_schema()
    fields = {info.alias or name for name, info in FineTuneJobStatus.model_fields.items()}
    assert set(schema["properties"]) == fields
    assert "x-kubernetes-preserve-unknown-fields" not in schema  # what the model lacks is pruned, and tested
    conditions = schema["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"] and conditions["items"]["required"] == [
        "type",
        "status",
    ]


def test_chart_crd_status_is_the_models() -> None:
    """The chart's copy of the CRD carries the status schema generated from FineTuneJobStatus."""
    chart = json.loads(CHART_CRD.read_text())
    assert _stored_status(chart) == json.loads(json.dumps(status_schema())), "stale: regenerate the chart's crd.json"
    assert chart == json.loads(json.dumps(crd()))


def test_every_derived_status_fits_the_model() -> None:
    """Each status derive() and ended_by_operator() produce in the decision tests is a FineTuneJobStatus."""
    statuses = derived_statuses()
    assert len(statuses) >= 15
    for status in statuses:
        model = FineTuneJobStatus.model_validate(status)
        assert model.model_dump(mode="json", by_alias=True, exclude_none=True) == without_nulls(status)
