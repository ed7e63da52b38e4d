"""The metric catalog (what the job pushes to its Pushgateway group: docs/metrics.md documents it row
for row) and the one spelling of a Trainer metric's name in status and in the API (trainLoss, evalF1)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


def api_name(name: str) -> str:
    """A Trainer metric name (train_loss, eval_f1, eval_matthews_correlation) in the API's camelCase
    (trainLoss, evalF1, evalMatthewsCorrelation): status.metrics keys and the summary's."""
    first, *rest = [p for p in re.split(r"_+", name) if p]
    return first + "".join(p.upper() if p == "f1" else p.capitalize() for p in rest)


def eval_name(metric: str) -> str:
    """The API name of an evaluation metric the spec names (f1 -> evalF1)."""
    return api_name(f"eval_{metric}")


@dataclass(frozen=True)
class Metric:
    """One metric the job pushes: its full exposed name, type, labels (beyond the group's) and help."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()
    #: Pushed only when the job trains on a GPU.
    gpu: bool = False


CATALOG: tuple[Metric, ...] = (
    Metric("kubetune_job_start_time_seconds", "gauge", "Unix time at which this attempt of the job started."),
    Metric("kubetune_job_running", "gauge", "1 while this attempt runs, 0 once it has ended."),
    Metric(
        "kubetune_job_outcome",
        "gauge",
        "1 once the attempt ended: its phase (Succeeded, Failed, Preempted), reason, and whether it is retried.",
        ("phase", "reason", "retryable"),
    ),
    Metric(
        "kubetune_train_progress_timestamp_seconds",
        "gauge",
        "Unix time of the training loop's last optimizer step or evaluation batch.",
    ),
    Metric("kubetune_train_global_step", "gauge", "Optimizer steps done, counting those before a resume."),
    Metric("kubetune_train_total_steps", "gauge", "Optimizer steps the run will make in all."),
    Metric("kubetune_train_epoch", "gauge", "Epochs done, fractional."),
    Metric("kubetune_train_eta_seconds", "gauge", "Estimated seconds of training left, from the recent step rate."),
    Metric("kubetune_train_loss", "gauge", "Training loss, as last logged by the Trainer."),
    Metric("kubetune_train_learning_rate", "gauge", "Learning rate, as last logged by the Trainer."),
    Metric("kubetune_train_grad_norm", "gauge", "Gradient norm before clipping, as last logged by the Trainer."),
    Metric("kubetune_train_samples_per_second", "gauge", "Training samples per second over the last push interval."),
    Metric(
        "kubetune_train_tokens_per_second",
        "gauge",
        "Training tokens per second over the last push interval (samples/s times mean tokens per example, "
        "or counted exactly when include_num_input_tokens_seen is on).",
    ),
    Metric("kubetune_eval_loss", "gauge", "Evaluation loss of the last evaluation."),
    Metric(
        "kubetune_eval_metric",
        "gauge",
        "Each spec.metrics score (accuracy, f1...) of the last evaluation.",
        ("metric",),
    ),
    Metric("kubetune_eval_step", "gauge", "Global step of the last evaluation."),
    Metric("kubetune_checkpoint_step", "gauge", "Global step of the last committed checkpoint."),
    Metric("kubetune_checkpoint_timestamp_seconds", "gauge", "Unix time at which the last checkpoint was committed."),
    Metric("kubetune_checkpoint_upload_seconds", "gauge", "Seconds the last checkpoint upload took."),
    Metric("kubetune_checkpoint_upload_bytes", "gauge", "Bytes the last checkpoint upload wrote."),
    Metric(
        "kubetune_checkpoint_upload_wait_seconds_total",
        "counter",
        "Seconds training waited on checkpoint uploads in this attempt.",
    ),
    Metric(
        "kubetune_gpu_memory_allocated_bytes",
        "gauge",
        "GPU memory held by tensors of the job's main process.",
        ("gpu",),
        gpu=True,
    ),
    Metric(
        "kubetune_gpu_memory_reserved_bytes",
        "gauge",
        "GPU memory reserved by the main process's caching allocator.",
        ("gpu",),
        gpu=True,
    ),
    Metric(
        "kubetune_gpu_utilization_ratio",
        "gauge",
        "Fraction of the last sample period in which a kernel ran, per GPU visible to the pod (NVML).",
        ("gpu",),
        gpu=True,
    ),
    Metric(
        "kubetune_push_failures_total",
        "counter",
        "Pushes of this attempt that failed; arrives with the next push that succeeds.",
    ),
)

#: Series the Pushgateway itself adds to every group: Unix time of its last successful and failed push.
GATEWAY_METRICS = ("push_time_seconds", "push_failure_time_seconds")

BY_NAME = {m.name: m for m in CATALOG}
