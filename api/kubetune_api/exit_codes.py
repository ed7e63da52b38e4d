"""Exit codes of the job: an API between the job, the operator's podFailurePolicy and the user.

Permanent codes fail the Kubernetes Job at once (retrying cannot help); every other non-zero code
is retried up to runPolicy.maxRetries. Keep this table and the README's exit-code table in step.
"""

from __future__ import annotations

from enum import IntEnum


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
