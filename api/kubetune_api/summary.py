"""What the job reports when it ends: the JSON summary in the pod's termination message (and in
`kubetune run`'s summary.json), which the operator copies into status.

The job builds a Summary; the operator parses the termination message with Summary.parse, which
answers None for a message that is not a summary (a crash's last words, a truncated write). Keys are
camelCase on the wire, as before this model existed; unknown keys are ignored, so an operator older
than the job still reads what it knows.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

#: Kubernetes keeps at most 4096 bytes of a termination message.
LIMIT = 4096
#: Warnings kept when the whole summary does not fit.
_FEW_WARNINGS = 2
#: Bytes kept free below the limit when the message is cut: the ellipsis and JSON's quoting of it.
_MARGIN = 8


class Summary(BaseModel):
    """The outcome of one attempt of the job, as its first process (node 0's, for the run) reports it."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    #: The fields status needs when nothing else fits in the termination message.
    ESSENTIAL: ClassVar[tuple[str, ...]] = ("phase", "exit_code", "reason", "final_step", "output_uri")

    phase: str = Field(description="Succeeded, Failed or Preempted.")
    exit_code: int | None = Field(None, description="The exit code of a failed or preempted attempt.")
    reason: str | None = Field(None, description="Why it failed: InvalidConfig, DataError, Preempted...")
    message: str | None = Field(None, description="What happened, in words.")
    field: str | None = Field(None, description="The spec field or setting at fault, when one is.")
    final_step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    resumed_from_step: int | None = Field(None, description="The checkpoint step this attempt resumed from (0: none).")
    attempt: int | None = Field(None, description="1 + the attempts this one resumed through.")
    steps_this_run: int | None = Field(None, description="Optimizer steps this attempt trained.")
    samples_this_run: int | None = Field(None, description="Samples this attempt trained.")
    last_checkpoint_step: int | None = Field(None, description="The newest committed checkpoint's step.")
    checkpoint_wait_seconds: float | None = None
    checkpoint_upload_seconds: float | None = None
    warnings: list[str] | None = None
    metrics: dict[str, float] | None = Field(None, description="Final metrics, by their API names (trainLoss, ...).")
    train_samples_per_second: float | None = Field(None, description="Over the whole run, across resumes.")
    train_tokens_per_second: float | None = Field(
        None, description="Input tokens (padding excluded) per second over the whole run; text-generation."
    )
    train_seconds: float | None = Field(None, description="Training seconds of the whole run, across resumes.")
    train_seconds_this_run: float | None = None
    output_uri: str | None = None
    labels: list[str] | None = None
    metrics_push_failures: int | None = None

    def wire(self) -> dict[str, Any]:
        """The JSON object on the wire: camelCase keys, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def encode(self, limit: int = LIMIT) -> str:
        """Compact JSON within `limit` bytes. Too long, it keeps the first warnings and as much of the
        message as fits; still too long, only the ESSENTIAL fields."""
        text = _dumps(self.wire())
        if len(text.encode()) <= limit:
            return text
        trimmed = self.model_copy(update={"warnings": (self.warnings or [])[:_FEW_WARNINGS] or self.warnings})
        if self.message is not None:
            budget = limit - len(_dumps(trimmed.model_copy(update={"message": ""}).wire()).encode()) - _MARGIN
            cut = self.message.encode()[: max(budget, 0)].decode(errors="ignore") + "…" if budget > 0 else ""
            trimmed = trimmed.model_copy(update={"message": cut})
        text = _dumps(trimmed.wire())
        if len(text.encode()) > limit:
            essential = type(self).model_validate({k: getattr(trimmed, k) for k in self.ESSENTIAL})
            text = _dumps(essential.wire())
        return text

    @classmethod
    def parse(cls, text: str | None) -> Summary | None:
        """The summary in a termination message, or None when the message is not one."""
        try:
            data = json.loads(text or "")
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        try:
            return cls.model_validate(data)
        except ValidationError:
            return None


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)
