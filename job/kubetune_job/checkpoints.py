"""Checkpoints in storage: commit (files first, manifest last), find the newest good one, prune.

A checkpoint counts as committed only when its manifest exists and every file it lists is present
with the recorded size; a resume also checks each file's sha256 after download. Anything else
under the checkpoint root (a half upload from a killed pod, an old checkpoint past `keep`) is
garbage that pruning removes, never the newest committed checkpoint nor the one being written.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import ObjectInfo, Storage, download_prefix, sha256_file, upload_dir

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
    """Keys to delete: committed checkpoints past the newest `keep`, and uncommitted leftovers
    older than the newest committed one (a pod killed mid-upload). Never the one being written."""
    kept = set(sorted(committed, reverse=True)[:keep])
    newest = max(committed, default=-1)
    doomed = set()
    for step in group_by_step(objects):
        if step in kept or step == writing:
            continue
        if step in committed or step < newest:
            doomed.add(step)
    return [o.key for o in objects if (m := _DIR.match(o.key)) and int(m.group(1)) in doomed]


@dataclass
class CheckpointStore:
    """The checkpoints of one FineTuneJob under one storage root."""

    storage: Storage
    keep: int
    warnings: list[str] = field(default_factory=list)

    def committed(self) -> list[Committed]:
        """Committed checkpoints, newest first (listing checked, checksums not yet)."""
        objects = self.storage.list("checkpoint-")
        present = group_by_step(objects)
        out = []
        for step in sorted(present, reverse=True):
            if MANIFEST not in present[step]:
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

    def fetch_latest(self, into: Path) -> int | None:
        """Download the newest checkpoint that verifies into `into`/checkpoint-N; return N."""
        for c in self.committed():
            local = into / checkpoint_dir(c.step)
            shutil.rmtree(local, ignore_errors=True)
            download_prefix(self.storage, checkpoint_dir(c.step), local)
            bad = [f["path"] for f in c.manifest["files"] if sha256_file(local / f["path"]) != f["sha256"]]
            if not bad:
                (local / MANIFEST).unlink(missing_ok=True)
                return c.step
            self._warn(f"checkpoint-{c.step}: checksum mismatch in {', '.join(bad[:3])}; using an older one")
            shutil.rmtree(local, ignore_errors=True)
        return None

    def commit(self, local: Path, step: int) -> None:
        """Upload checkpoint-N's files, then its manifest, then prune."""
        prefix = checkpoint_dir(step)
        files = [f for f in upload_dir(self.storage, local, prefix) if f[0] != MANIFEST]
        self.storage.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(build_manifest(step, files)).encode())
        self.prune(writing=None)

    def prune(self, writing: int | None) -> None:
        objects = self.storage.list("checkpoint-")
        committed = [c.step for c in self.committed()]
        doomed = prune_plan(objects, committed, self.keep, writing)
        if doomed:
            self.storage.delete(doomed)

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)
