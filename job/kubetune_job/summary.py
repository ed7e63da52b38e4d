"""Writing the run's JSON summary (kubetune_api.summary.Summary: what the operator copies into status
and `kubetune run` prints), and the arithmetic of its whole-run figures (loss, throughput) across the
attempts of a resumed run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api.exit_codes import ExitCode
from kubetune_api.metrics import api_name
from kubetune_api.summary import LIMIT, Summary

log = logging.getLogger(__name__)


def encode(summary: Summary | Mapping[str, Any], limit: int = LIMIT) -> str:
    """The summary as the termination message: a Summary (the fields the job assembled, checked against
    it) within `limit` bytes, by Summary's own rule for fitting."""
    return (summary if isinstance(summary, Summary) else Summary.model_validate(summary)).encode(limit)


def write(path: Path, summary: Summary | Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(encode(summary))
    except OSError as e:  # never hide the run's outcome behind a summary problem
        log.warning("cannot write the summary to %s: %s", path, e)


# The whole run across attempts. A preempted or killed pod's successor resumes from the newest committed
# checkpoint, and the Trainer's own train_loss and throughput cover only the steps and time of the process
# that calls train(). The figures below cover every step of the run; what an attempt trained after its last
# committed checkpoint is trained again by the next one, so its steps and time count once, in the next.


@dataclass(frozen=True)
class Lineage:
    """The attempts whose checkpoints a run resumed through, as the checkpoint it resumed from records them.

    attempt: this attempt's number, 1 + the resumes before it (a pod that committed no checkpoint leaves
    no trace). start_steps: the global step each attempt began at. seconds and samples: the training
    seconds and samples of the earlier attempts up to the checkpoint this one resumed from.
    """

    attempt: int = 1
    start_steps: tuple[int, ...] = (0,)
    seconds: float = 0.0
    samples: int = 0

    def record(self, *, seconds: float, samples: int) -> dict[str, Any]:
        """What a checkpoint saved `seconds` into this attempt, after `samples` trained in it, carries."""
        return {
            "attempt": self.attempt,
            "start_steps": list(self.start_steps),
            "train_seconds": self.seconds + seconds,
            "train_samples": self.samples + samples,
        }


def resumed_lineage(record: Any, *, step: int) -> Lineage:
    """The lineage of an attempt that begins at global step `step`, from the record (Lineage.record) of
    the checkpoint it resumed from. step 0 is a fresh start. Without a well-formed record (a checkpoint
    written before records existed) the earlier attempts' time and samples are unknown: they count as
    none, so the throughput is this attempt's own, as it was then."""
    if step == 0:
        return Lineage()
    try:
        starts = tuple(int(s) for s in record["start_steps"])
        earlier = Lineage(
            attempt=int(record["attempt"]) + 1,
            start_steps=(*starts, step),
            seconds=float(record["train_seconds"]),
            samples=int(record["train_samples"]),
        )
    except (TypeError, KeyError, ValueError):
        log.warning("checkpoint-%d has no record of earlier attempts: throughput covers this attempt only", step)
        return Lineage(attempt=2, start_steps=(step,))
    return earlier


def run_loss(
    history: list[dict[str, Any]], *, start_steps: Sequence[int], final_step: int, attempt_loss: float
) -> float:
    """Mean training loss per optimizer step over the whole run, from the Trainer's log history.

    Each logged `loss` is the mean over the steps since the previous log of the same attempt (the
    Trainer starts a new interval where an attempt begins), and weighs as many steps. This attempt's
    steps after its last log get what its own mean, the Trainer's `attempt_loss`, leaves for them (none
    when a log comes with each checkpoint, as the job arranges: the last step always saves). Steps an
    earlier attempt trained past its last log have no loss on record and are left out of the mean.
    """
    current = start_steps[-1]
    total = covered = here = 0.0
    previous, last = 0, current
    for entry in history:
        loss, step = entry.get("loss"), entry.get("step")
        if not isinstance(loss, int | float) or not isinstance(step, int):
            continue
        begin = max([previous, *(s for s in start_steps if s < step)])
        previous = step
        if step <= begin:
            continue
        total += loss * (step - begin)
        covered += step - begin
        if step > current:
            here += loss * (step - begin)
            last = step
    tail = final_step - last
    if tail > 0:
        total += attempt_loss * (final_step - current) - here
        covered += tail
    return total / covered if covered else attempt_loss


def per_second(amount: float, seconds: float) -> float:
    """A throughput for the summary (0 when no time was measured)."""
    return round(amount / seconds, 3) if seconds > 0 else 0.0


def camel_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Trainer metric names (eval_f1, train_loss) in the API's spelling (evalF1, trainLoss)."""
    return {api_name(key): round(float(value), 6) for key, value in metrics.items()}


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    """Losses and evaluation scores only: no runtimes, throughputs or epoch counters."""
    skip = ("runtime", "per_second", "epoch")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not k.endswith(skip)}


def failure(code: ExitCode, reason: str, message: str, field: str | None = None, phase: str = "Failed") -> Summary:
    """The summary of a run that ended without training to the end."""
    return Summary(phase=phase, exit_code=int(code), reason=reason, message=message, field=field or None)
