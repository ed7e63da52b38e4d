"""The job's group on a Prometheus Pushgateway: where it lives, what it holds, how to replace or delete it.

One group per FineTuneJob, keyed {namespace, finetunejob} under the job label ``kubetune``; never a
pod or attempt label, so a retried pod replaces its predecessor's values instead of adding series.
The requests are prometheus_client's push_to_gateway and delete_from_gateway (and so its escaping of
grouping-key values), imported where they are called: the operator, which deletes a job's group after
the job ended, imports this module for the catalog without loading anything but the standard library.
``METRICS`` is the one list of what the job pushes; docs/metrics.md documents it row for row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

#: The Pushgateway's mandatory ``job`` label for every kubetune group.
JOB = "kubetune"


def grouping_key(namespace: str, finetunejob: str) -> dict[str, str]:
    """The labels that identify a FineTuneJob's group (besides ``job``)."""
    return {"namespace": namespace, "finetunejob": finetunejob}


def group_url(url: str, namespace: str, finetunejob: str) -> str:
    """The URL of a FineTuneJob's group, as prometheus_client spells it for a push or a delete.

    Asked of the client itself (a handler that records the URL and sends nothing), so that the URL
    shown here and the one requested are built by one piece of code.
    """
    from prometheus_client import delete_from_gateway

    seen: list[str] = []

    def record(
        url: str, method: str, timeout: float | None, headers: Sequence[object], data: bytes
    ) -> Callable[[], None]:
        return lambda: seen.append(url)

    delete_from_gateway(url.strip(), job=JOB, grouping_key=grouping_key(namespace, finetunejob), handler=record)
    return seen[0]


def put_group(url: str, namespace: str, finetunejob: str, *, registry: CollectorRegistry, timeout: float) -> None:
    """Replace the group with what ``registry`` collects now; raise on any failure."""
    from prometheus_client import push_to_gateway

    push_to_gateway(
        url.strip(), job=JOB, registry=registry, grouping_key=grouping_key(namespace, finetunejob), timeout=timeout
    )


def delete_group(url: str, namespace: str, finetunejob: str, *, timeout: float = 5.0) -> None:
    """Delete a FineTuneJob's group and every series in it (a missing group too); raise on any failure."""
    from prometheus_client import delete_from_gateway

    delete_from_gateway(url.strip(), job=JOB, grouping_key=grouping_key(namespace, finetunejob), timeout=timeout)


@dataclass(frozen=True)
class Metric:
    """One metric the job pushes: its full exposed name, type, labels (beyond the group's) and help."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    labels: tuple[str, ...] = ()
    #: Pushed only when the job trains on a GPU.
    gpu: bool = False


METRICS: tuple[Metric, ...] = (
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

BY_NAME = {m.name: m for m in METRICS}
