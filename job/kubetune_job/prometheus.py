"""Training metrics for Prometheus: one registry, pushed to the job's Pushgateway group from a thread.

`JobMetrics` holds the attempt's latest values in one CollectorRegistry; the `TrainingMetrics`
callback feeds it from the Trainer with a few assignments on the training thread. A daemon thread
does everything else: it samples throughput, checkpoints and GPUs, renders the text format and PUTs
it to the group (pushgateway.py) every `interval` seconds, at once after an evaluation or a
checkpoint (at most one push a second), and a last time with the outcome. Only that thread touches
the network, with a short timeout, so a dead, slow or misconfigured gateway costs training nothing:
failed pushes are counted, logged at most once a minute, and reported in the summary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family
from transformers import TrainerCallback

from kubetune_api.exit_codes import PERMANENT_EXIT_CODES
from kubetune_api.metrics import BY_NAME, CATALOG
from kubetune_api.settings import JobSettings

from .distributed import is_main
from .pushgateway import put_group
from .summary import scores

log = logging.getLogger(__name__)

#: A gateway that keeps failing is reported at most this often.
LOG_EVERY_SECONDS = 60.0
#: Pushes that evaluations and checkpoints ask for come at most this often.
MIN_PUSH_GAP_SECONDS = 1.0
#: Throughput over a shorter window than this is too noisy to report; the window grows instead.
MIN_WINDOW_SECONDS = 1.0

Labels = tuple[str, ...]


class _Snapshot:
    """The registry's one collector: the current values, in catalog order, each family only once it has one."""

    def __init__(self, metrics: JobMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Family]:
        values = self.metrics.snapshot()
        for metric in CATALOG:
            series = values.get(metric.name)
            if not series:
                continue
            family: Family
            if metric.kind == "counter":
                family = CounterMetricFamily(metric.name.removesuffix("_total"), metric.help, labels=metric.labels)
            else:
                family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            for labels, value in series.items():
                family.add_metric(list(labels), value)
            yield family


class JobMetrics:
    """One attempt's metric values and the thread that pushes them to its Pushgateway group."""

    def __init__(
        self, url: str, *, namespace: str, finetunejob: str, interval: float = 10.0, timeout: float = 3.0
    ) -> None:
        self.url, self.namespace, self.finetunejob = url, namespace, finetunejob
        self.interval, self.timeout = interval, timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Snapshot(self))
        #: Called on the push thread before each push, to refresh sampled values.
        self.samplers: list[Callable[[], None]] = []
        self.pushes = 0
        self.failures = 0
        self._values: dict[str, dict[Labels, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubetune-metrics", daemon=True)
        self._failing = False
        self._last_log: float | None = None
        self._unreported = 0

    # Values: called from any thread.

    def set(self, name: str, value: float, labels: Labels = ()) -> None:
        self._check(name, labels)
        with self._lock:
            self._values.setdefault(name, {})[labels] = float(value)

    def replace(self, name: str, series: Mapping[Labels, float]) -> None:
        """Set every series of `name` at once, dropping those not given (e.g. the last evaluation's scores)."""
        for labels in series:
            self._check(name, labels)
        with self._lock:
            self._values[name] = {labels: float(v) for labels, v in series.items()}

    def snapshot(self) -> dict[str, dict[Labels, float]]:
        with self._lock:
            return {name: dict(series) for name, series in self._values.items()}

    @staticmethod
    def _check(name: str, labels: Labels) -> None:
        metric = BY_NAME.get(name)
        if metric is None or len(labels) != len(metric.labels):
            raise ValueError(f"{name}{labels}: not in the metric catalog (kubetune_api.metrics.CATALOG)")

    # Pushing.

    def start(self) -> JobMetrics:
        """Mark the attempt as started and running, and start pushing."""
        now = time.time()
        self.set("kubetune_job_start_time_seconds", now)
        self.set("kubetune_job_running", 1)
        self.set("kubetune_train_progress_timestamp_seconds", now)
        self._thread.start()
        self.push_soon()
        return self

    def push_soon(self) -> None:
        """Ask the thread for a push now (it coalesces requests and spaces pushes a second apart)."""
        self._wake.set()

    def finish(self, summary: Mapping[str, Any]) -> int:
        """Record the outcome from the run's summary, push it a last time, stop; return the failed pushes.

        Waits at most about two push timeouts: the push in flight, then the final one.
        """
        phase = str(summary.get("phase", "Failed"))
        retryable = phase != "Succeeded" and summary.get("exitCode") not in PERMANENT_EXIT_CODES
        self.set("kubetune_job_running", 0)
        self.set("kubetune_job_outcome", 1, (phase, str(summary.get("reason", "")), str(retryable).lower()))
        if phase == "Succeeded":
            self.set("kubetune_train_eta_seconds", 0)
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.timeout + 1)
            if self._thread.is_alive():
                log.warning("the last metrics push to %s did not finish in time; going on without it", self.url)
        else:
            self.push()
        return self.failures

    def push(self) -> bool:
        """Sample, render and PUT the group once; never raises."""
        for sample in self.samplers:
            try:
                sample()
            except Exception:  # a sampler's bug must not end the pushes
                log.exception("sampling metrics failed")
        self.set("kubetune_push_failures_total", self.failures)
        try:
            put_group(self.url, self.namespace, self.finetunejob, registry=self.registry, timeout=self.timeout)
        except Exception as e:  # any failure (refused, timeout, HTTP error, bad URL) only counts
            self._failed(e)
            return False
        self.pushes += 1
        if self._failing:
            log.info("metrics pushes to %s work again", self.url)
            self._failing = False
        return True

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        self._unreported += 1
        self._failing = True
        now = time.monotonic()
        if self._last_log is None or now - self._last_log >= LOG_EVERY_SECONDS:
            log.warning(
                "cannot push metrics to %s: %s (%d failed since the last report; training goes on)",
                self.url, error, self._unreported,
            )  # fmt: skip
            self._last_log, self._unreported = now, 0

    def _loop(self) -> None:
        while True:
            began = time.monotonic()
            self._wake.clear()  # before reading the stop flag: finish() sets the flag, then wakes
            stopping = self._stopping.is_set()
            self.push()
            if stopping:
                return
            # Requested pushes wait out the gap; the periodic one comes an interval after this one began.
            self._stopping.wait(max(0.0, began + min(MIN_PUSH_GAP_SECONDS, self.interval) - time.monotonic()))
            self._wake.wait(max(0.0, began + self.interval - time.monotonic()))

    def callback(self, commit: Any = None) -> TrainingMetrics:
        """The TrainerCallback that feeds these metrics; `commit` is the checkpoint-committing callback."""
        return TrainingMetrics(self, commit=commit)


def start(settings: JobSettings) -> JobMetrics | None:
    """The attempt's metrics, already pushing; None without a gateway or outside the main process."""
    if not settings.pushgateway_url or not is_main():
        return None
    return JobMetrics(
        settings.pushgateway_url,
        namespace=settings.namespace,
        finetunejob=settings.name,
        interval=settings.push_interval_seconds,
        timeout=settings.push_timeout_seconds,
    ).start()


def mean_tokens(dataloader: Any) -> float | None:
    """Mean tokens per training example, read once from the tokenized split's Arrow column; None if unknown."""
    try:
        import pyarrow.compute as pc

        column = dataloader.dataset.data.column("input_ids")
        mean = pc.mean(pc.list_value_length(column)).as_py()
    except Exception:  # not a datasets.Dataset of token ids: no tokens/s
        return None
    return float(mean) if mean else None


class TrainingMetrics(TrainerCallback):
    """Feeds JobMetrics from the Trainer: cheap assignments here, sampling on the push thread."""

    def __init__(self, metrics: JobMetrics, *, commit: Any = None, cuda: Any = None) -> None:
        self.metrics = metrics
        self.commit = commit
        self.cuda = cuda  # torch.cuda unless a test passes another
        #: (global step, epoch, input tokens seen, Unix time) after the latest optimizer step.
        self.progress: tuple[int, float, int, float] | None = None
        self.heartbeat = 0.0
        self.total_steps = 0
        self.samples_per_step = 0
        self.tokens_per_sample: float | None = None
        self.gpu: int | None = None
        self._mark: tuple[int, int, float] | None = None
        #: (global step, input tokens seen, Unix time) when this run's training began.
        self._start: tuple[int, int, float] | None = None
        self._seen_commit: tuple[int, float] | None = None
        self._utilization = True
        metrics.samplers.append(self.sample)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.total_steps = int(state.max_steps)
        self.samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.tokens_per_sample = mean_tokens(kwargs.get("train_dataloader"))
        device = getattr(args, "device", None)
        self.gpu = (device.index or 0) if device is not None and device.type == "cuda" else None
        self.progress = (state.global_step, float(state.epoch or 0), state.num_input_tokens_seen, time.time())
        self._mark = None
        self._start = (state.global_step, state.num_input_tokens_seen, self.progress[3])
        self.metrics.set("kubetune_train_total_steps", self.total_steps)
        self.metrics.push_soon()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.progress = (state.global_step, state.epoch or 0.0, state.num_input_tokens_seen, time.time())

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.heartbeat = time.time()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        for key, name in (
            ("loss", "kubetune_train_loss"),
            ("learning_rate", "kubetune_train_learning_rate"),
            ("grad_norm", "kubetune_train_grad_norm"),
        ):
            if isinstance(logs.get(key), int | float):
                self.metrics.set(name, logs[key])

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not metrics:
            return
        found = scores(metrics)
        if "eval_loss" in found:
            self.metrics.set("kubetune_eval_loss", found.pop("eval_loss"))
        self.metrics.replace("kubetune_eval_metric", {(k.removeprefix("eval_"),): v for k, v in found.items()})
        self.metrics.set("kubetune_eval_step", state.global_step)
        self.metrics.push_soon()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._checkpoint()
            self.metrics.push_soon()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.on_step_end(args, state, control)
            # Throughput over the whole run: one shorter than the sampling window still reports one.
            if self._start is not None and self.progress is not None:
                step, _, tokens, at = self.progress
                start_step, start_tokens, began = self._start
                if step > start_step and at > began:
                    self._rates(step - start_step, tokens - start_tokens, at - began, step)
            self.metrics.push_soon()

    # On the push thread.

    def sample(self) -> None:
        if self.progress is not None:
            step, epoch, tokens, at = self.progress
            self.metrics.set("kubetune_train_global_step", step)
            self.metrics.set("kubetune_train_epoch", epoch)
            self.metrics.set("kubetune_train_progress_timestamp_seconds", max(at, self.heartbeat))
            self._throughput(step, tokens, at)
        self._checkpoint()
        if self.gpu is not None:
            self._gpus(self.gpu)

    def _throughput(self, step: int, tokens: int, at: float) -> None:
        mark = self._mark
        if mark is None or step < mark[0]:
            self._mark = (step, tokens, at)
            return
        seconds = at - mark[2]
        if step == mark[0] or seconds < MIN_WINDOW_SECONDS:
            return
        self._rates(step - mark[0], tokens - mark[1], seconds, step)
        self._mark = (step, tokens, at)

    def _rates(self, steps: int, tokens: int, seconds: float, step: int) -> None:
        """samples/s, tokens/s and the ETA from `steps` optimizer steps (and `tokens`) in `seconds`."""
        steps_per_second = steps / seconds
        samples = steps_per_second * self.samples_per_step
        self.metrics.set("kubetune_train_samples_per_second", samples)
        if tokens > 0:  # counted by the Trainer (include_num_input_tokens_seen)
            self.metrics.set("kubetune_train_tokens_per_second", tokens / seconds)
        elif self.tokens_per_sample:
            self.metrics.set("kubetune_train_tokens_per_second", samples * self.tokens_per_sample)
        self.metrics.set("kubetune_train_eta_seconds", max(self.total_steps - step, 0) / steps_per_second)

    def _checkpoint(self) -> None:
        # The committing callback's attributes, read defensively: uploads may finish on another thread.
        commit = self.commit
        step = getattr(commit, "last_committed", None)
        if step is None:
            return
        when = getattr(commit, "last_committed_time", None)
        if when is None:  # a committer without timestamps: the first time this step was seen
            if self._seen_commit is None or self._seen_commit[0] != step:
                self._seen_commit = (step, time.time())
            when = self._seen_commit[1]
        if hasattr(when, "timestamp"):  # a datetime
            when = when.timestamp()
        self.metrics.set("kubetune_checkpoint_step", step)
        self.metrics.set("kubetune_checkpoint_timestamp_seconds", when)
        for attr, name in (
            ("last_upload_seconds", "kubetune_checkpoint_upload_seconds"),
            ("last_upload_bytes", "kubetune_checkpoint_upload_bytes"),
            ("upload_wait_seconds", "kubetune_checkpoint_upload_wait_seconds_total"),
        ):
            value = getattr(commit, attr, None)
            if isinstance(value, int | float):
                self.metrics.set(name, value)

    def _gpus(self, index: int) -> None:
        if self.cuda is None:
            import torch

            self.cuda = torch.cuda
        cuda = self.cuda
        gpu = (str(index),)
        self.metrics.set("kubetune_gpu_memory_allocated_bytes", cuda.memory_allocated(index), gpu)
        self.metrics.set("kubetune_gpu_memory_reserved_bytes", cuda.memory_reserved(index), gpu)
        if not self._utilization:
            return
        try:  # NVML, through torch: needs the nvidia-ml-py package and a driver
            ratios: dict[Labels, float] = {(str(i),): cuda.utilization(i) / 100 for i in range(cuda.device_count())}
        except Exception as e:
            log.info("no GPU utilization metric: %s", e)
            self._utilization = False
            return
        self.metrics.replace("kubetune_gpu_utilization_ratio", ratios)
