"""The JSON summary fits a Kubernetes termination message; its whole-run figures span every attempt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.summary import LIMIT
from kubetune_job.summary import Lineage, encode, per_second, resumed_lineage, run_loss


def test_long_failure_message_is_cut_to_fit() -> None:
    """A huge error message is shortened so the summary stays within 4096 bytes and valid JSON."""
    text = encode({"phase": "Failed", "exitCode": 1, "reason": "Error", "message": "é" * 10_000})
    assert len(text.encode()) <= LIMIT
    assert json.loads(text)["reason"] == "Error"


def test_small_summary_is_unchanged() -> None:
    """A normal summary passes through whole."""
    summary = {"phase": "Succeeded", "finalStep": 10, "metrics": {"evalF1": 0.9}}
    assert json.loads(encode(summary)) == summary


def logs(*pairs: tuple[int, float]) -> list[dict[str, Any]]:
    """Trainer log entries: a training loss at each (step, loss), with the keys around it the Trainer adds."""
    return [
        {"loss": loss, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": step / 100, "step": step}
        for step, loss in pairs
    ]


def test_run_loss_weighs_each_log_by_the_steps_it_covers() -> None:
    """A log at a checkpoint between two logging steps covers fewer steps and weighs less."""
    history = logs((10, 0.9), (20, 0.7), (25, 0.5))
    assert run_loss(history, start_steps=(0,), final_step=25, attempt_loss=0.0) == pytest.approx(
        (0.9 * 10 + 0.7 * 10 + 0.5 * 5) / 25
    )


def test_run_loss_spans_the_attempts_of_a_resumed_run() -> None:
    """After a resume at step 25 the mean covers both attempts' steps, not only the last one's."""
    history = logs((10, 0.9), (20, 0.7), (25, 0.5), (30, 0.4), (40, 0.3))
    whole = run_loss(history, start_steps=(0, 25), final_step=40, attempt_loss=(0.4 * 5 + 0.3 * 10) / 15)
    assert whole == pytest.approx((0.9 * 10 + 0.7 * 10 + 0.5 * 5 + 0.4 * 5 + 0.3 * 10) / 40)
    assert whole != pytest.approx((0.4 * 5 + 0.3 * 10) / 15)


def test_run_loss_starts_a_new_interval_where_an_attempt_began() -> None:
    """Resumed at 25 from a checkpoint with no log at 25: the log at 30 covers 5 steps; 21-25 have no loss."""
    history = logs((10, 0.9), (20, 0.7), (30, 0.4))
    whole = run_loss(history, start_steps=(0, 25), final_step=30, attempt_loss=0.4)
    assert whole == pytest.approx((0.9 * 10 + 0.7 * 10 + 0.4 * 5) / 25)


def test_run_loss_gives_unlogged_last_steps_what_the_attempt_mean_leaves() -> None:
    """Steps after the last log take the rest of the Trainer's own mean for this attempt."""
    history = logs((10, 0.9), (20, 0.7), (30, 0.4))  # resumed at 20; steps 31-35 logged nowhere, their mean 0.2
    attempt_loss = (0.4 * 10 + 0.2 * 5) / 15
    whole = run_loss(history, start_steps=(0, 20), final_step=35, attempt_loss=attempt_loss)
    assert whole == pytest.approx((0.9 * 10 + 0.7 * 10 + 0.4 * 10 + 0.2 * 5) / 35)


def test_run_loss_reads_only_training_losses() -> None:
    """Evaluation entries and the Trainer's final train_loss entry do not count as step losses."""
    history = [
        *logs((10, 0.9), (20, 0.7)),
        {"eval_loss": 5.0, "epoch": 0.2, "step": 20},
        {"train_loss": 9.0, "train_runtime": 1.0, "epoch": 0.2, "step": 20},
    ]
    assert run_loss(history, start_steps=(0,), final_step=20, attempt_loss=0.0) == pytest.approx(0.8)


def test_run_loss_without_logs_is_the_attempt_mean() -> None:
    """No log at all (a run shorter than its first log): the Trainer's own mean."""
    assert run_loss([], start_steps=(0,), final_step=3, attempt_loss=0.6) == pytest.approx(0.6)


def test_a_fresh_start_is_attempt_one() -> None:
    """Step 0 is a fresh start whatever record is around."""
    assert resumed_lineage({"attempt": 4}, step=0) == Lineage()


def test_a_checkpoint_record_carries_time_and_samples_to_the_next_attempt() -> None:
    """The record of attempt 2 saved 5 s and 80 samples into it makes attempt 3 start from the sums."""
    second = Lineage(attempt=2, start_steps=(0, 20), seconds=10.0, samples=160)
    record = json.loads(json.dumps(second.record(seconds=5.0, samples=80)))  # as trainer_state.json holds it
    assert resumed_lineage(record, step=30) == Lineage(attempt=3, start_steps=(0, 20, 30), seconds=15.0, samples=240)


@pytest.mark.parametrize(
    "record", [None, {}, {"attempt": "x", "start_steps": [0], "train_seconds": 1, "train_samples": 8}]
)
def test_a_checkpoint_without_a_record_counts_its_time_as_unknown(record: Any) -> None:
    """A checkpoint from before records existed: attempt 2, earlier time and samples none."""
    assert resumed_lineage(record, step=40) == Lineage(attempt=2, start_steps=(40,))


def test_throughput_without_time_is_zero() -> None:
    """No measured time gives 0, not a division error; otherwise samples over seconds."""
    assert per_second(100, 0.0) == 0.0
    assert per_second(1600, 8.0) == 200.0
