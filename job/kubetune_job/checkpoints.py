"""Checkpoints in storage: commit (files first, manifest last), find the newest good one, prune.

A checkpoint counts as committed only when its manifest exists and every file it lists is present
with the recorded size; a resume also checks each file's sha256 after download. Anything else
under the checkpoint root (a half upload from a killed pod, an old checkpoint past `keep`) is
garbage that pruning removes, never the newest committed checkpoint nor the one being written.

One pod writes a job's checkpoints at a time, so every uncommitted checkpoint found is a leftover.
Should a dying predecessor still finish an upload after its files were pruned, its manifest lists
files that are missing, and the checkpoint never counts as committed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import StorageUnavailable
from .storage import ObjectInfo, Storage, sha256_file, upload_dir, walk_files

log = logging.getLogger(__name__)

MANIFEST = "kubetune-manifest.json"
_DIR = re.compile(r"^checkpoint-(\d+)/")


@dataclass(frozen=True)
class Committed:
    step: int
    manifest: dict[str, Any]


def checkpoint_dir(step: int) -> str:
    return f"checkpoint-{step}"


def build_manifest(step: int, files: list[tuple[str, int, str]], now: float | None = None) -> dict[str, Any]:
    return {
        "format": 1,
        "step": step,
        "time": now if now is not None else time.time(),
        "files": [{"path": p, "size": s, "sha256": h} for p, s, h in files],
    }


def group_by_step(objects: list[ObjectInfo]) -> dict[int, dict[str, int]]:
    """{step: {path inside the checkpoint: size}} for every checkpoint-N directory in a listing."""
    steps: dict[int, dict[str, int]] = defaultdict(dict)
    for obj in objects:
        m = _DIR.match(obj.key)
        if m:
            steps[int(m.group(1))][obj.key[m.end() :]] = obj.size
    return dict(steps)


def listing_matches(manifest: dict[str, Any], present: dict[str, int]) -> bool:
    """Every file the manifest names is present with its size (cheap check before a download)."""
    return all(present.get(f["path"]) == f["size"] for f in manifest["files"])


def prune_plan(objects: list[ObjectInfo], committed: list[int], keep: int, writing: int | None) -> list[str]:
    """Keys to delete: committed checkpoints past the newest `keep` (never the newest one), and
    uncommitted leftovers (a pod killed mid-upload). Never the checkpoint being written."""
    kept = set(sorted(committed, reverse=True)[: max(keep, 1)])
    doomed = {step for step in group_by_step(objects) if step not in kept and step != writing}
    return [o.key for o in objects if (m := _DIR.match(o.key)) and int(m.group(1)) in doomed]


class CommitAborted(Exception):
    """A commit stopped before its manifest: the checkpoint stays uncommitted."""


def freeze(local: Path, into: Path) -> Path:
    """A hard-linked snapshot of a checkpoint directory, for uploading while training goes on.

    The Trainer deletes old local checkpoints when it saves a new one; the links keep the files
    alive (at no copy cost) until the upload is done. Falls back to copying across filesystems.
    """
    shutil.rmtree(into, ignore_errors=True)
    for path, rel in walk_files(local):
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return into


@dataclass
class CheckpointStore:
    """The checkpoints of one FineTuneJob under one storage root."""

    storage: Storage
    keep: int
    warnings: list[str] = field(default_factory=list)
    #: Steps whose files failed their checksums: never committed, pruned like leftovers.
    rejected: set[int] = field(default_factory=set)

    def committed(self) -> list[Committed]:
        """Committed checkpoints, newest first (listing checked, checksums not yet)."""
        objects = self.storage.list("checkpoint-")
        present = group_by_step(objects)
        out = []
        for step in sorted(present, reverse=True):
            if MANIFEST not in present[step] or step in self.rejected:
                continue
            try:
                manifest = json.loads(self.storage.read_bytes(f"{checkpoint_dir(step)}/{MANIFEST}"))
            except (OSError, ValueError) as e:
                self._warn(f"checkpoint-{step}: unreadable manifest ({e}); skipped")
                continue
            if manifest.get("step") != step or not listing_matches(manifest, present[step]):
                self._warn(f"checkpoint-{step}: files missing or of the wrong size; skipped")
                continue
            out.append(Committed(step, manifest))
        return out

    def resume(self, into: Path) -> int | None:
        """At start: fetch the newest checkpoint that verifies (fetch_latest), then delete what
        interrupted uploads and failed checks left behind, unfinished multipart uploads included
        (no upload of this job is running yet). Return its step, None to start afresh."""
        step = self.fetch_latest(into)
        self.prune(writing=None)
        self.storage.abort_uploads("checkpoint-")
        return step

    def fetch_latest(self, into: Path) -> int | None:
        """Download the newest checkpoint that verifies into `into`/checkpoint-N; return N."""
        for c in self.committed():
            bad = self._fetch(c, into)
            if not bad:
                return c.step
            self._warn(f"checkpoint-{c.step}: checksum mismatch in {', '.join(bad[:3])}; using an older one")
            self.rejected.add(c.step)
            shutil.rmtree(into / checkpoint_dir(c.step), ignore_errors=True)
        return None

    def fetch(self, step: int, into: Path) -> None:
        """Download checkpoint-`step`, chosen by another process (a multi-node run's other nodes fetch
        the one rank 0 resumes from), into `into`/checkpoint-N. StorageUnavailable (retried) when it is
        no longer committed or no longer verifies."""
        chosen = next((c for c in self.committed() if c.step == step), None)
        if chosen is None:
            raise StorageUnavailable("checkpoints.uri", f"checkpoint-{step}, which rank 0 resumes from, is gone")
        if bad := self._fetch(chosen, into):
            raise StorageUnavailable(
                "checkpoints.uri",
                f"checkpoint-{step}, which rank 0 resumes from, fails its checksums: {', '.join(bad[:3])}",
            )

    def _fetch(self, c: Committed, into: Path) -> list[str]:
        local = into / checkpoint_dir(c.step)
        shutil.rmtree(local, ignore_errors=True)
        return self._download_verified(c, local)

    def _download_verified(self, c: Committed, local: Path) -> list[str]:
        """Download the files the manifest lists into local; return those that fail their sha256."""

        def one(entry: dict[str, Any]) -> str | None:
            rel = PurePosixPath(entry["path"])
            if rel.is_absolute() or ".." in rel.parts:
                return entry["path"]  # a manifest never points outside its checkpoint
            target = local / rel
            try:
                self.storage.download_file(f"{checkpoint_dir(c.step)}/{rel}", target)
            except FileNotFoundError:
                return entry["path"]  # deleted since the listing
            return None if sha256_file(target) == entry["sha256"] else entry["path"]

        with ThreadPoolExecutor(4) as pool:
            return [p for p in pool.map(one, c.manifest["files"]) if p is not None]

    def commit(self, local: Path, step: int, *, abort: threading.Event | None = None) -> int:
        """Upload checkpoint-N's files, then its manifest, then prune; return the bytes uploaded.

        A manifest left from an earlier attempt at the same step goes first, so that the files
        being replaced never sit under a manifest. With `abort` set before the manifest is
        written, the commit stops there (CommitAborted) and the checkpoint stays uncommitted.
        """
        prefix = checkpoint_dir(step)
        self.storage.delete([f"{prefix}/{MANIFEST}"])
        self.rejected.discard(step)  # written afresh: no longer the damaged one fetch_latest saw
        files = [f for f in upload_dir(self.storage, local, prefix) if f[0] != MANIFEST]
        if abort is not None and abort.is_set():
            raise CommitAborted(f"checkpoint-{step}: stopped before its manifest; not committed")
        self.storage.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(build_manifest(step, files)).encode())
        self.prune(writing=None)
        return sum(size for _, size, _ in files)

    def prune(self, writing: int | None) -> None:
        """Delete what prune_plan dooms; log leftovers of interrupted uploads by step."""
        objects = self.storage.list("checkpoint-")
        committed = [c.step for c in self.committed()]
        doomed = prune_plan(objects, committed, self.keep, writing)
        leftovers = sorted({int(m.group(1)) for k in doomed if (m := _DIR.match(k))} - set(committed))
        if leftovers:
            log.info("removing uncommitted checkpoint(s) %s (interrupted uploads, failed checks)", leftovers)
        if doomed:
            self.storage.delete(doomed)

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            log.warning(message)
            self.warnings.append(message)
