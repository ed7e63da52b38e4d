"""What a worker does differently when the job runs as several processes (torchrun, DDP).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; building TrainingArguments starts the process group
(gloo on CPU, nccl on GPU). Each side effect belongs to one process:

- the node's main process (LOCAL_RANK 0) downloads the model and data and tokenizes them while the
  others wait, then the others read its files;
- rank 0 fetches the newest committed checkpoint and tells the others its step;
- rank 0 commits checkpoints (once every process has written its part) and writes the output,
  the metrics and the summary.

Without torchrun every process is the main one and nothing here waits for anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from transformers import TrainerCallback

T = TypeVar("T")

#: The CPU process group for any_rank, made at its first call.
_flags: Any = None


def rank() -> int:
    """This process's rank among all processes of the run (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes the summary, output, checkpoints and metrics."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its node: the GPU it trains on (0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_local_main() -> bool:
    """The first process of this node (pod): the one that downloads into the shared work directory."""
    return local_rank() == 0


def _grouped() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if _grouped():
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def local_main_first() -> Iterator[None]:
    """The node's main process runs the block first (downloads, tokenizing), the others after it.

    No barrier on an exception: the failing main process exits, and torchrun stops the waiting ones.
    """
    if not is_local_main():
        barrier()
    yield
    if is_local_main():
        barrier()


def from_main(value: T) -> T:
    """Rank 0's `value` on every process (sent pickled); `value` itself with one process."""
    if not _grouped():
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every process when `flag` is true on any: a collective, so every process calls it at the
    same point (the same step). For decisions all must share, such as stopping on a SIGTERM that reached
    the processes at different steps. Runs on a CPU (gloo) group: no GPU synchronisation per call."""
    global _flags
    if not _grouped():
        return flag
    import torch
    import torch.distributed as dist

    if _flags is None:
        _flags = dist.new_group(backend="gloo")
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_flags)
    return bool(value.item())


class SaveBarrier(TrainerCallback):
    """Holds every process in on_save until all have written their part of checkpoint-N (each its
    own RNG state), so that rank 0 commits a whole checkpoint. Registered before CommitCheckpoints."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        barrier()
