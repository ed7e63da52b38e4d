"""The job's errors: each carries the exit code (kubetune_api.exit_codes) that decides whether it is retried."""

from __future__ import annotations

from typing import Any

from kubetune_api.exit_codes import ExitCode


class JobError(Exception):
    """An error the user can act on; `code` decides whether the run is retried."""

    code: ExitCode = ExitCode.RETRYABLE
    reason = "Error"
    #: The summary's phase for this outcome.
    phase = "Failed"

    def __init__(self, field: str | None, message: str) -> None:
        self.field = field
        self.message = message
        #: Summary fields to add (kubetune_api.summary.Summary, by field name): progress at the time of the error.
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
