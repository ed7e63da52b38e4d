"""Trainer callbacks that connect training to kubetune: checkpoint commits and run accounting."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .checkpoints import CheckpointStore, checkpoint_dir, freeze
from .errors import Preempted
from .summary import Lineage, resumed_lineage

log = logging.getLogger(__name__)


class _Upload(threading.Thread):
    """One checkpoint commit running beside training; keeps what it raised for the waiter."""

    def __init__(self, work: Callable[[threading.Event], None], step: int) -> None:
        # A daemon: a job that exits (preempted past its grace, failed) never waits on an upload.
        super().__init__(name=f"kubetune-upload-{step}", daemon=True)
        self.work = work
        self.step = step
        self.abort = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.work(self.abort)
        except BaseException as e:
            self.error = e


class CommitCheckpoints(TrainerCallback):
    """After each Trainer save, commit checkpoint-N to the checkpoint store in the background.

    Training goes on while checkpoint-N uploads (main process only). At most one upload is in
    flight: a save that comes while the previous upload runs waits for it, and a failed upload
    fails the run at the next save or at train end, never silently. `deadline` (time.monotonic(),
    set by a SIGTERM) bounds every wait: past it the upload is abandoned before its manifest.

    For metrics: upload_wait_seconds (training blocked on uploads, cumulative), last_upload_seconds,
    last_upload_bytes, last_committed (step) and last_committed_time (Unix time).
    """

    def __init__(
        self, store: CheckpointStore, *, spool: Path, deadline: Callable[[], float | None] = lambda: None
    ) -> None:
        self.store = store
        self.spool = spool
        self.deadline = deadline
        self.last_committed: int | None = None
        self.last_committed_time: float | None = None
        self.last_upload_seconds: float | None = None
        self.last_upload_bytes: int | None = None
        self.upload_wait_seconds = 0.0
        self.upload_seconds = 0.0
        self.uploads = 0
        self._flight: _Upload | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)  # snapshots an earlier container left behind

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.wait()
        step = state.global_step
        frozen = freeze(Path(args.output_dir) / checkpoint_dir(step), self.spool / checkpoint_dir(step))
        self._flight = _Upload(lambda abort: self._commit(frozen, step, abort), step)
        self._flight.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.wait()

    def wait(self) -> None:
        """Block until the upload in flight is committed, and raise what it raised."""
        flight = self._flight
        if flight is None:
            return
        began = time.monotonic()
        # Short joins: a SIGTERM arriving during the wait sets a deadline that must be honoured.
        while flight.is_alive():
            deadline = self.deadline()
            if deadline is not None and time.monotonic() >= deadline:
                flight.abort.set()
                self.upload_wait_seconds += time.monotonic() - began
                raise Preempted(
                    None,
                    f"stopped by SIGTERM; checkpoint-{flight.step} was not committed within the grace budget, "
                    f"the newest committed checkpoint is {self.last_committed or 'none'}",
                )
            flight.join(0.2 if deadline is None else min(0.2, max(deadline - time.monotonic(), 0.0)))
        self.upload_wait_seconds += time.monotonic() - began
        self._flight = None
        if flight.error is not None:
            raise flight.error

    def _commit(self, frozen: Path, step: int, abort: threading.Event) -> None:
        began = time.monotonic()
        size = self.store.commit(frozen, step, abort=abort)
        took = time.monotonic() - began
        shutil.rmtree(frozen, ignore_errors=True)
        self.last_upload_seconds, self.last_upload_bytes = took, size
        self.upload_seconds += took
        self.uploads += 1
        self.last_committed, self.last_committed_time = step, time.time()
        log.info("committed checkpoint-%d to %s (%.1f MB in %.2f s)", step, self.store.storage.uri, size / 1e6, took)


class RunAccount(TrainerCallback, ExportableState):
    """Counts the optimizer steps and the training samples this process trained on, to prove that a
    resume repeated and skipped none. Samples are counted as the model sees them (a forward hook in
    training mode, with gradients: a preference task's reference pass does not count), so batches the data
    loader prefetched but never trained on do not count. inputs_per_example: sequences the model reads per
    training example (a preference pair is two, chosen and rejected).

    It also keeps the run's record across attempts (summary.Lineage): as an ExportableState its record
    goes into every checkpoint's trainer_state.json, which the commit manifest covers, and a resumed
    attempt reads it back from the state the Trainer restored. The Trainer's own restoring of callback
    states stays off (training.MANAGED): it would replace this instance with a new one.
    """

    def __init__(self, inputs_per_example: int = 1) -> None:
        self.inputs_per_example = inputs_per_example
        self.steps = 0
        self.total_steps = 0
        self.samples = 0
        self.world_size = 1
        self.lineage = Lineage()
        self._began: float | None = None
        self._hook: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.total_steps = state.max_steps
        self.world_size = args.world_size
        saved = state.stateful_callbacks.get(type(self).__name__)
        record = saved.get("attributes") if isinstance(saved, dict) else None
        self.lineage = resumed_lineage(record, step=state.global_step)
        # A checkpoint from before this record existed lacks the entry the Trainer's save updates in place.
        state.stateful_callbacks[type(self).__name__] = self.state()
        self._began = time.monotonic()
        model = kwargs.get("model")
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and torch.is_grad_enabled():
            name = getattr(module, "main_input_name", "input_ids")
            batch = kwargs.get(name, args[0] if args else None)
            self.samples += len(batch) if batch is not None else 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1

    @property
    def run_samples(self) -> int:
        """Samples all processes trained on in this attempt (each process sees as many)."""
        return self.samples // self.inputs_per_example * self.world_size

    def state(self) -> dict[str, Any]:
        """The record a checkpoint saved now carries (called by the Trainer as it saves one)."""
        seconds = time.monotonic() - self._began if self._began is not None else 0.0
        return {"args": {}, "attributes": self.lineage.record(seconds=seconds, samples=self.run_samples)}


class TrainingDone(Exception):
    """Raised by StopAtLastStep: the run resumed from a checkpoint of its last step, so no step is left."""


class StopAtLastStep(TrainerCallback):
    """Trains no step past the last. A Trainer resumed from a checkpoint of the run's last step that is not at
    an epoch's end (maxSteps, or a SIGTERM that came at the last step) starts one more step anyway: its loop
    checks for the end only after a step. A pod killed while it evaluated or wrote the output would then
    train a step too many on its restart. This stops the Trainer before that step's forward pass."""

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            raise TrainingDone(f"step {state.global_step} of {state.max_steps}")


class LogAtSaves(TrainerCallback):
    """Logs the training loss at every checkpoint, so that each one records the loss of every step up to
    it and a resumed run's mean loss covers every step (summary.run_loss). Registered last, to see the
    saves that other callbacks (the SIGTERM handler) ask for."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        control.should_log = control.should_log or control.should_save

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        control.should_log = control.should_log or control.should_save
