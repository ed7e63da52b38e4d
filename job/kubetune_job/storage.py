"""Where the job's files live: a local directory or an S3-compatible bucket, behind one interface.

The rest of the job speaks in keys relative to a root URI and never learns which backend it has.
Keys use "/" separators. Listing is always live (no cache), so a restarted pod sees what its
predecessor committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import StorageDenied


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Storage(Protocol):
    """Files under one root URI."""

    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with prefix, recursively."""

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(self, key: str, data: bytes) -> None: ...

    def upload_file(self, local: Path, key: str) -> None: ...

    def download_file(self, key: str, local: Path) -> None: ...

    def delete(self, keys: Iterable[str]) -> None: ...


def join(uri: str, *parts: str) -> str:
    """Join URI or path parts with single slashes."""
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


class LocalStorage:
    """A directory on local disk (the embedded default of `kubetune run`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = local_path(uri)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise ValueError(f"key {key!r} escapes {self.uri}")
        return path

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                rel = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(ObjectInfo(rel, (Path(dirpath) / name).stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see a half-written object

    def upload_file(self, local: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            os.link(local, tmp)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(local, tmp)
        os.replace(tmp, path)

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), local)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        _remove_empty_dirs(self.root)


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


def open_storage(uri: str) -> Storage:
    """The backend for a URI: s3:// goes to object storage, anything else is a local path."""
    if is_remote(uri):
        raise StorageDenied("storage", f"{uri}: s3:// URIs need the object-storage backend, not in this build")
    return LocalStorage(uri)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def walk_files(directory: Path) -> Iterator[tuple[Path, str]]:
    """(absolute path, relative posix key) of every file under directory, sorted."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        yield path, path.relative_to(directory).as_posix()


def upload_dir(storage: Storage, directory: Path, prefix: str) -> list[tuple[str, int, str]]:
    """Upload every file of directory under prefix; return (key, size, sha256) of each."""
    done = []
    for path, rel in walk_files(directory):
        storage.upload_file(path, join(prefix, rel).lstrip("/"))
        done.append((rel, path.stat().st_size, sha256_file(path)))
    return done


def download_prefix(storage: Storage, prefix: str, directory: Path) -> None:
    """Download every object under prefix into directory, keeping relative paths."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for obj in storage.list(prefix):
        storage.download_file(obj.key, directory / obj.key[len(prefix) :])
