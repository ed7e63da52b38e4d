"""Checkpoint commits, verification and pruning on local storage."""

from __future__ import annotations

from pathlib import Path

from kubetune_job.checkpoints import MANIFEST, CheckpointStore, prune_plan
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


def test_prune_never_touches_the_newest_or_the_one_being_written() -> None:
    """Leftovers older than the newest commit go; the newest and the in-flight one stay."""
    objects = [ObjectInfo(f"checkpoint-{s}/f", 1) for s in (5, 10, 20, 30, 40)]
    doomed = prune_plan(objects, committed=[10, 20, 30], keep=1, writing=40)
    assert sorted(doomed) == ["checkpoint-10/f", "checkpoint-20/f", "checkpoint-5/f"]
