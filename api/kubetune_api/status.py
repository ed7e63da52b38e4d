"""What the operator writes to a FineTuneJob's status: the model the CRD's status schema is generated from.

The operator derives status as plain dicts (merge patches of .status); this model is their shape. The
API server prunes whatever the CRD's schema lacks, silently, so the schema comes from here and a test
writes every status the operator's decisions produce through the API server and reads it back whole.
Fields are camelCase on the wire, snake_case in Python, as in the spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

#: RFC 3339 timestamps, as Kubernetes writes them.
TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
_DATE_TIME: JsonDict = {"format": "date-time"}


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Status):
    """A metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = Field(None, json_schema_extra=_DATE_TIME)
    observed_generation: int | None = None


class PodFailure(_Status):
    """A pod that ended in failure (or was preempted)."""

    pod: str
    uid: str | None = None
    reason: str = Field(description="Preempted, OOMKilled or Error.")


class Progress(_Status):
    """Training progress, from the job's metrics."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: int | None = None
    eta_seconds: int | None = None
    samples_per_second: float | None = Field(
        None, description="Training throughput; once the run ended, over the whole run, across resumes."
    )
    tokens_per_second: float | None = Field(
        None, description="Training tokens per second (text-generation's throughput figure), as samplesPerSecond."
    )


class Checkpoint(_Status):
    """A committed checkpoint."""

    step: int
    time: str | None = Field(None, description="When it was committed.", json_schema_extra=_DATE_TIME)


class FineTuneJobStatus(_Status):
    """Written by the operator."""

    phase: str | None = Field(None, description="Pending, Running, Succeeded, Failed or Suspended.")
    message: str | None = Field(None, description="What happened last, in words.")
    observed_generation: int | None = Field(None, description="The spec generation this status describes.")
    job_name: str | None = Field(None, description="The batch/v1 Job running this FineTuneJob.")
    start_time: str | None = Field(None, description="When the first pod started.", json_schema_extra=_DATE_TIME)
    completion_time: str | None = Field(None, description="When the job ended.", json_schema_extra=_DATE_TIME)
    restarts: int | None = Field(None, description="Pods replaced after a failure or preemption.")
    last_restart_reason: str | None = Field(None, description="Preempted, OOMKilled or Error.")
    failure_count: int | None = Field(None, description="Pod failures seen, the last one included.")
    preemptions: int | None = Field(
        None, description="Pod failures that were preemptions (never counted against maxRetries), of failureCount."
    )
    failures: list[PodFailure] | None = Field(None, description="The newest pod failures: pod, uid and reason.")
    metrics_deleted: bool | None = Field(None, description="The job's Pushgateway group was removed.")
    progress: Progress | None = Field(None, description="Training progress, from the job's metrics.")
    last_checkpoint: Checkpoint | None = Field(None, description="The newest committed checkpoint.")
    metrics: dict[str, float] | None = Field(
        None,
        description="Latest training and evaluation metrics (trainLoss, evalAccuracy, ...); once the run "
        "ended, trainLoss is the mean over all of its steps, across resumes.",
    )
    eval: str | None = Field(None, description="The first evaluation metric, as name=value (a column).")
    output_uri: str | None = Field(None, description="Where the final model is.")
    conditions: list[Condition] | None = Field(
        None,
        description="Created, Running, Suspended, Succeeded, Failed, with reasons.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
