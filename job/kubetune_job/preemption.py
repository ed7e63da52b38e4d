"""SIGTERM (preemption, node drain): stop at the next step, commit a checkpoint within a grace budget.

Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs. While training, the
signal only raises a flag; at the next optimizer step the Trainer saves checkpoint-N and stops, the
upload gets until `grace_seconds` after the signal to commit, and the job exits with the
Preempted code (21) either way. A commit that misses the budget is abandoned before its manifest,
so the restarted pod resumes from the previous committed checkpoint, never from a half one.
Outside training (loading, evaluating, writing the output) there is nothing worth saving: the
signal raises Preempted at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from .distributed import any_rank
from .errors import Preempted

log = logging.getLogger(__name__)


class Preemption(TrainerCallback):
    """The SIGTERM flag, its grace deadline, and the callback that turns it into save-and-stop."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.requested_at: float | None = None
        self._deferred = False

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def deadline(self) -> float | None:
        """time.monotonic() by which the checkpoint must be committed; None without a SIGTERM."""
        return None if self.requested_at is None else self.requested_at + self.grace_seconds

    @contextmanager
    def installed(self) -> Iterator[Preemption]:
        """Handle SIGTERM while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While the block runs (training, the last upload), a SIGTERM only sets the flag."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            log.warning("SIGTERM: saving a checkpoint at the next step, %g s to commit it", self.grace_seconds)
        if not self._deferred:
            raise Preempted(None, "stopped by SIGTERM outside training; nothing new to checkpoint")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every process decides at the same step: a SIGTERM may reach the processes of a pod (or of
        # several pods) at different steps, and one that stopped alone would leave the others waiting
        # in a collective until the kill.
        if any_rank(self.requested):
            if self.requested_at is None:  # another process got the signal: the same budget here
                self.requested_at = time.monotonic()
            control.should_save = True
            control.should_training_stop = True
