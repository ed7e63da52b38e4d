"""Trainer callbacks that connect training to kubetune: checkpoint commits and run accounting."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .checkpoints import CheckpointStore, checkpoint_dir

log = logging.getLogger(__name__)


class CommitCheckpoints(TrainerCallback):
    """After each Trainer save, commit checkpoint-N to the checkpoint store (main process only)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.last_committed: int | None = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        local = Path(args.output_dir) / checkpoint_dir(state.global_step)
        self.store.commit(local, state.global_step)
        self.last_committed = state.global_step
        log.info("committed checkpoint-%d to %s", state.global_step, self.store.storage.uri)


class RunAccount(TrainerCallback):
    """Counts the optimizer steps this process trained, to prove a resume repeated none."""

    def __init__(self) -> None:
        self.steps = 0
        self.total_steps = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.total_steps = state.max_steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1
