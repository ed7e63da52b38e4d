"""Checkpoint commits, verification and pruning on local storage, and the background upload."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune_job.callbacks import CommitCheckpoints
from kubetune_job.checkpoints import MANIFEST, CheckpointStore, CommitAborted, freeze, prune_plan
from kubetune_job.errors import Preempted, StorageUnavailable
from kubetune_job.storage import LocalStorage, ObjectInfo


def fake_checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * (100 + step))
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return d


def test_commit_then_fetch_round_trip(tmp_path: Path) -> None:
    """A committed checkpoint is fetched back byte for byte, manifest last."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=2)
    store.commit(fake_checkpoint(tmp_path / "local", 10), 10)
    assert (tmp_path / "store" / "checkpoint-10" / MANIFEST).is_file()
    assert store.fetch_latest(tmp_path / "restore") == 10
    restored = tmp_path / "restore" / "checkpoint-10" / "model.safetensors"
    assert restored.read_bytes() == b"w" * 110


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    """Only the newest `keep` committed checkpoints stay."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=2)
    for step in (10, 20, 30):
        store.commit(fake_checkpoint(tmp_path / "local", step), step)
    assert [c.step for c in store.committed()] == [30, 20]
    assert not (tmp_path / "store" / "checkpoint-10").exists()


def test_uncommitted_checkpoint_is_ignored(tmp_path: Path) -> None:
    """Files without a manifest (a pod killed mid-upload) never count as a checkpoint."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=2)
    store.commit(fake_checkpoint(tmp_path / "local", 10), 10)
    fake_checkpoint(tmp_path / "store", 20)  # files, no manifest
    assert store.fetch_latest(tmp_path / "restore") == 10


def test_corrupt_checkpoint_falls_back_with_a_warning(tmp_path: Path) -> None:
    """A file altered after commit fails its checksum; the previous checkpoint is used."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=3)
    for step in (10, 20):
        store.commit(fake_checkpoint(tmp_path / "local", step), step)
    weights = tmp_path / "store" / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)  # same size, other bytes
    assert store.fetch_latest(tmp_path / "restore") == 10
    assert any("checksum mismatch" in w for w in store.warnings)


def test_another_node_fetches_the_checkpoint_rank0_chose(tmp_path: Path) -> None:
    """fetch(N) brings checkpoint-N (not the newest) byte for byte; one gone or altered is a retryable error."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=3)
    for step in (10, 20):
        store.commit(fake_checkpoint(tmp_path / "local", step), step)
    store.fetch(10, tmp_path / "node1")
    assert (tmp_path / "node1" / "checkpoint-10" / "model.safetensors").read_bytes() == b"w" * 110
    assert not (tmp_path / "node1" / "checkpoint-20").exists()
    with pytest.raises(StorageUnavailable, match="checkpoint-30"):
        store.fetch(30, tmp_path / "node1")
    weights = tmp_path / "store" / "checkpoint-20" / "model.safetensors"
    weights.write_bytes(b"x" * weights.stat().st_size)
    with pytest.raises(StorageUnavailable, match=r"model\.safetensors"):
        store.fetch(20, tmp_path / "node1")


def test_prune_never_touches_the_newest_or_the_one_being_written() -> None:
    """Leftovers older than the newest commit go; the newest and the in-flight one stay."""
    objects = [ObjectInfo(f"checkpoint-{s}/f", 1) for s in (5, 10, 20, 30, 40)]
    doomed = prune_plan(objects, committed=[10, 20, 30], keep=1, writing=40)
    assert sorted(doomed) == ["checkpoint-10/f", "checkpoint-20/f", "checkpoint-5/f"]


def test_prune_removes_leftovers_newer_than_the_newest_commit() -> None:
    """Files of a checkpoint a killed pod never committed go, whatever their step; committed ones past keep too."""
    objects = [ObjectInfo(f"checkpoint-{s}/f", 1) for s in (10, 20, 30, 40)]
    doomed = prune_plan(objects, committed=[10, 20], keep=1, writing=None)
    assert sorted(doomed) == ["checkpoint-10/f", "checkpoint-30/f", "checkpoint-40/f"]


def test_freeze_keeps_files_the_trainer_deletes(tmp_path: Path) -> None:
    """A frozen checkpoint survives the Trainer rotating its own copy away, without copying bytes."""
    local = fake_checkpoint(tmp_path / "trainer", 10)
    frozen = freeze(local, tmp_path / "spool" / "checkpoint-10")
    assert (frozen / "model.safetensors").stat().st_ino == (local / "model.safetensors").stat().st_ino
    shutil.rmtree(local)
    assert (frozen / "model.safetensors").read_bytes() == b"w" * 110


def test_commit_aborted_before_its_manifest_stays_uncommitted(tmp_path: Path) -> None:
    """An abort (grace budget spent) stops a commit before the manifest: the files never count."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=2)
    abort = threading.Event()
    abort.set()
    with pytest.raises(CommitAborted):
        store.commit(fake_checkpoint(tmp_path / "local", 10), 10, abort=abort)
    assert (tmp_path / "store" / "checkpoint-10" / "model.safetensors").is_file()
    assert store.committed() == []


def test_a_damaged_step_committed_again_is_kept(tmp_path: Path) -> None:
    """A step rejected at resume and then trained and committed again is a good checkpoint, not pruned."""
    store = CheckpointStore(LocalStorage(str(tmp_path / "store")), keep=2)
    for step in (10, 20):
        store.commit(fake_checkpoint(tmp_path / "local", step), step)
    (tmp_path / "store" / "checkpoint-20" / "model.safetensors").write_bytes(b"x" * 120)
    assert store.resume(tmp_path / "restore") == 10
    assert not (tmp_path / "store" / "checkpoint-20").exists()  # damaged: removed with the leftovers
    store.commit(tmp_path / "local" / "checkpoint-20", 20)
    assert [c.step for c in store.committed()] == [20, 10]


class SlowStorage(LocalStorage):
    """Local storage whose uploads take `delay` seconds each, or fail with `error`."""

    def __init__(self, uri: str, delay: float = 0.0, error: Exception | None = None) -> None:
        super().__init__(uri)
        self.delay, self.error = delay, error

    def upload_file(self, local: Path, key: str) -> None:
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        super().upload_file(local, key)


def save(callback: CommitCheckpoints, trainer_dir: Path, step: int) -> float:
    """Have the Trainer 'save' checkpoint-N and call on_save; return how long the callback blocked."""
    fake_checkpoint(trainer_dir, step)
    args, state = (
        SimpleNamespace(output_dir=str(trainer_dir)),
        SimpleNamespace(global_step=step, is_world_process_zero=True),
    )
    began = time.monotonic()
    callback.on_save(args, state, None)
    return time.monotonic() - began


def end(callback: CommitCheckpoints) -> None:
    callback.on_train_end(None, SimpleNamespace(is_world_process_zero=True), None)


def test_upload_runs_in_the_background_and_the_next_save_waits(tmp_path: Path) -> None:
    """on_save returns before the upload ends; the next save waits for it; train end waits for the last."""
    storage = SlowStorage(str(tmp_path / "store"), delay=0.3)  # files go up at once: 0.3 s per checkpoint
    callback = CommitCheckpoints(CheckpointStore(storage, keep=2), spool=tmp_path / "spool")
    assert save(callback, tmp_path / "trainer", 10) < 0.2
    assert callback.last_committed is None  # still uploading
    assert save(callback, tmp_path / "trainer", 20) > 0.1  # waited for checkpoint-10
    assert callback.last_committed == 10 and callback.upload_wait_seconds > 0.1
    end(callback)
    assert callback.last_committed == 20 and callback.last_upload_bytes == 120 + len('{"global_step": 20}')
    assert callback.last_upload_seconds is not None and callback.last_upload_seconds >= 0.3
    assert callback.last_committed_time is not None and (tmp_path / "store" / "checkpoint-20" / MANIFEST).is_file()
    assert not (tmp_path / "spool" / "checkpoint-20").exists()


def test_a_failed_upload_fails_the_next_save(tmp_path: Path) -> None:
    """A commit that failed in the background is raised at the next save, never skipped silently."""
    storage = SlowStorage(str(tmp_path / "store"), error=StorageUnavailable(None, "endpoint gone"))
    callback = CommitCheckpoints(CheckpointStore(storage, keep=2), spool=tmp_path / "spool")
    save(callback, tmp_path / "trainer", 10)
    with pytest.raises(StorageUnavailable, match="endpoint gone"):
        save(callback, tmp_path / "trainer", 20)


def test_a_spent_grace_budget_abandons_the_upload_without_a_manifest(tmp_path: Path) -> None:
    """Past the SIGTERM deadline, waiting stops with Preempted and the upload never writes its manifest."""
    storage = SlowStorage(str(tmp_path / "store"), delay=0.2)
    deadline = time.monotonic() + 0.1
    callback = CommitCheckpoints(CheckpointStore(storage, keep=2), spool=tmp_path / "spool", deadline=lambda: deadline)
    save(callback, tmp_path / "trainer", 10)
    with pytest.raises(Preempted, match="not committed within the grace budget"):
        end(callback)
    time.sleep(0.5)  # the abandoned upload finishes its files, then stops before the manifest
    assert not (tmp_path / "store" / "checkpoint-10" / MANIFEST).exists()
