"""Exit codes of the job: an API between the job, the operator's podFailurePolicy and the user.

Permanent codes fail the Kubernetes Job at once (retrying cannot help); every other non-zero code
is retried up to runPolicy.maxRetries. Keep this table and docs/exit-codes.md in step.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    SUCCEEDED = 0
    #: Anything unexpected: retried.
    RETRYABLE = 1
    #: The configuration is invalid (bad field, unknown TrainingArguments key...). Permanent.
    INVALID_CONFIG = 10
    #: The model cannot be found or loaded. Permanent.
    MODEL_ERROR = 11
    #: The dataset cannot be found, or is unusable (missing column, empty split...). Permanent.
    DATA_ERROR = 12
    #: Storage refused access (wrong credentials, no permission, no such bucket). Permanent.
    STORAGE_DENIED = 13
    #: Storage could not be reached (network, timeouts, 5xx). Retried.
    STORAGE_UNAVAILABLE = 20
    #: Stopped by SIGTERM (preemption, drain) after committing a checkpoint. Retried.
    PREEMPTED = 21


PERMANENT_EXIT_CODES = (
    ExitCode.INVALID_CONFIG,
    ExitCode.MODEL_ERROR,
    ExitCode.DATA_ERROR,
    ExitCode.STORAGE_DENIED,
)


class JobError(Exception):
    """An error the user can act on; `code` decides whether the run is retried."""

    code: ExitCode = ExitCode.RETRYABLE
    reason = "Error"
    #: The summary's phase for this outcome.
    phase = "Failed"

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        #: Extra summary fields (progress at the time of the error).
        self.details: dict[str, Any] = {}
        super().__init__(f"{field}: {message}" if field else message)


class ConfigError(JobError):
    code = ExitCode.INVALID_CONFIG
    reason = "InvalidConfig"


class ModelError(JobError):
    code = ExitCode.MODEL_ERROR
    reason = "ModelError"


class DataError(JobError):
    code = ExitCode.DATA_ERROR
    reason = "DataError"


class StorageDenied(JobError):
    code = ExitCode.STORAGE_DENIED
    reason = "StorageDenied"


class StorageUnavailable(JobError):
    code = ExitCode.STORAGE_UNAVAILABLE
    reason = "StorageUnavailable"


class Preempted(JobError):
    """SIGTERM (preemption, drain): stopped, with the newest checkpoint committed if the grace allowed."""

    code = ExitCode.PREEMPTED
    reason = "Preempted"
    phase = "Preempted"
