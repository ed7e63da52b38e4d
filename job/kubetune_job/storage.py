"""Where the job's files live: a local directory or an S3-compatible bucket, behind one interface.

The rest of the job speaks in keys relative to a root URI and never learns which backend it has.
Keys use "/" separators. Listing is always live (no cache), so a restarted pod sees what its
predecessor committed.

S3 goes through obstore (Rust's object_store): no botocore, whose python-dateutil<3 pin clashes
with the kubernetes client, and uploads that run outside the GIL with multipart concurrency, so a
background checkpoint upload costs the training loop almost nothing. Every failure leaves here as
one of two errors: StorageDenied (credentials, permissions, no such bucket: retrying cannot help)
or StorageUnavailable (network, timeouts, 5xx after the retries ran out: the pod is retried).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, Protocol
from xml.etree import ElementTree

from .errors import StorageDenied, StorageUnavailable
from .sigv4 import Credentials, sign

log = logging.getLogger(__name__)
#: (key, upload id) of unfinished multipart uploads.
Uploads = list[tuple[str, str]]


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

    def abort_uploads(self, prefix: str) -> int:
        """Abort the unfinished uploads a killed writer left under prefix; return how many."""


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

    def abort_uploads(self, prefix: str) -> int:
        """Local files are renamed into place whole: a killed writer leaves only *.tmp files, which
        listing shows and pruning deletes with the rest of an uncommitted checkpoint."""
        return 0


def _remove_empty_dirs(root: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if Path(dirpath) != root and not any(Path(dirpath).iterdir()):
            Path(dirpath).rmdir()


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3: the spec's storage block (endpoint, region) wins over the AWS_* environment."""

    endpoint: str | None = None
    region: str | None = None
    #: How long one request is retried (throttling, timeouts, 5xx, dropped connections) before giving up.
    retry_seconds: float = 120.0
    connect_timeout_seconds: float = 5.0
    #: Upper bound for one request, one multipart part included.
    request_timeout_seconds: float = 300.0
    #: Smallest multipart part and parts in flight per file; files above one part go multipart.
    part_bytes: int = 16 << 20
    parts_in_flight: int = 8


#: S3 allows at most 10,000 parts in one multipart upload.
MAX_PARTS = 10_000


def part_size(file_bytes: int, smallest: int) -> int:
    """The multipart part size for a file: ``smallest``, grown in whole MiB so no file needs over MAX_PARTS parts."""
    needed = -(-file_bytes // MAX_PARTS)
    return max(smallest, -(-needed // (1 << 20)) << 20)


@dataclass(frozen=True)
class S3Location:
    """A resolved s3:// URI: where requests go and under which key prefix."""

    bucket: str
    prefix: str
    endpoint: str
    region: str


def resolve_s3(uri: str, options: StorageOptions, env: Mapping[str, str]) -> S3Location:
    """Bucket, prefix, endpoint and region of an s3:// URI (pure: the environment is passed in)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    region = options.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = (
        options.endpoint
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or env.get("AWS_ENDPOINT")
        or f"https://s3.{region}.amazonaws.com"
    )
    return S3Location(bucket=bucket, prefix=prefix.strip("/"), endpoint=endpoint.rstrip("/"), region=region)


Verdict = Literal["denied", "unavailable", "not_found"]

#: S3 error codes that no retry can fix: credentials, permissions, a bucket that is not there.
_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "AuthorizationHeaderMalformed",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "InvalidToken",
    "NoSuchBucket",
    "NotSignedUp",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
}


def classify(kind: str, text: str) -> Verdict:
    """Whether a storage failure is permanent ("denied"), worth a retry ("unavailable") or a missing object.

    kind is the exception's class name; text its message, which carries the HTTP status and the
    S3 error code when the server answered. A server that answered with 4xx will answer the same
    again; anything else (no answer, 5xx, throttling after the client's own retries) may pass.
    """
    code = re.search(r"<Code>(\w+)</Code>", text)
    status = re.search(r"status code: (\d{3})", text)
    if (code and code.group(1) in _DENIED_CODES) or kind in ("PermissionDeniedError", "UnauthenticatedError"):
        return "denied"
    if kind == "FileNotFoundError" or (code and code.group(1) == "NoSuchKey"):
        return "not_found"
    if status and status.group(1) in ("400", "401", "403", "404", "405"):
        return "denied"
    if "credential" in text.lower() and not status:
        return "denied"  # no usable credentials at all (an empty Secret, no web identity)
    return "unavailable"


def short_reason(text: str) -> str:
    """The useful part of an object_store error: the S3 code and message, or the first line."""
    code = re.search(r"<Code>(\w+)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    status = re.search(r"status code: (\d{3})", text)
    if code:
        http = f" (HTTP {status.group(1)})" if status else ""
        return f"{code.group(1)}{http}: {message.group(1) if message else ''}".rstrip(": ")
    first = text.split("\n", 1)[0]
    first = re.sub(r"^Generic S3 error: ", "", first)
    return first[:300]


class S3Storage:
    """Objects under s3://bucket/prefix on any S3-compatible endpoint, through obstore."""

    def __init__(
        self, uri: str, options: StorageOptions, *, env: Mapping[str, str] | None = None, field: str | None = None
    ) -> None:
        from obstore.store import S3Store

        self.uri = uri
        self.options = options
        self.field = field
        env = os.environ if env is None else env
        self.location = loc = resolve_s3(uri, options, env)
        # Keys from the environment (in a pod: the Secret spec.storage.credentialsSecret names);
        # without them obstore falls back to web identity, container or instance credentials.
        self._credentials = (
            Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
            else None
        )
        c = self._credentials
        keys = (
            {"access_key_id": c.access_key, "secret_access_key": c.secret_key, "session_token": c.session_token}
            if c
            else {}
        )
        self._store = S3Store(
            loc.bucket,
            prefix=loc.prefix or None,
            endpoint=loc.endpoint,
            region=loc.region,
            **{k: v for k, v in keys.items() if v},  # type: ignore[arg-type]
            virtual_hosted_style_request=False,
            # Sign the headers, not the body (UNSIGNED-PAYLOAD, as AWS SDKs do over HTTPS): hashing every
            # part for the signature cost client and server a sha256 pass per byte; the manifest's sha256
            # of every file covers checkpoint integrity end to end.
            unsigned_payload=True,
            client_options={
                "allow_http": loc.endpoint.startswith("http://"),
                "connect_timeout": timedelta(seconds=options.connect_timeout_seconds),
                "timeout": timedelta(seconds=options.request_timeout_seconds),
            },
            retry_config={
                "max_retries": 20,
                "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=10)},
                "retry_timeout": timedelta(seconds=options.retry_seconds),
            },
        )

    @contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        """Turn obstore's exceptions into the job's two storage errors, naming what was attempted."""
        from obstore.exceptions import BaseError

        try:
            yield
        except (BaseError, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
                raise  # a local file problem, not storage
            verdict = classify(type(e).__name__, str(e))
            if verdict == "not_found":
                raise FileNotFoundError(f"{self.uri}: no object {key!r}") from None
            loc = self.location
            what = f"{operation} of s3://{loc.bucket}/{join(loc.prefix, key).strip('/')}"
            if verdict == "denied":
                raise StorageDenied(
                    self.field,
                    f"access denied to bucket {loc.bucket!r} ({what} at {loc.endpoint}): {short_reason(str(e))}; "
                    "check the bucket name, the credentials (spec.storage.credentialsSecret) and the bucket policy",
                ) from None
            raise StorageUnavailable(
                self.field,
                f"S3 endpoint {loc.endpoint} unavailable: {what} still failing after retrying for "
                f"{self.options.retry_seconds:g} s: {short_reason(str(e))}",
            ) from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        import obstore

        # object_store lists by whole path segments; filter the parent "directory" for partial names.
        parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        with self._errors("list", prefix):
            pages = obstore.list(self._store, parent or None, chunk_size=1000)
            out = [ObjectInfo(o["path"], o["size"]) for page in pages for o in page if o["path"].startswith(prefix)]
        return sorted(out, key=lambda o: o.key)

    def read_bytes(self, key: str) -> bytes:
        import obstore

        with self._errors("read", key):
            return bytes(obstore.get(self._store, key).bytes())

    def write_bytes(self, key: str, data: bytes) -> None:
        import obstore

        with self._errors("write", key):
            obstore.put(self._store, key, data, use_multipart=False)  # one PUT: atomic

    def upload_file(self, local: Path, key: str) -> None:
        import obstore

        with self._errors("write", key):
            obstore.put(
                self._store,
                key,
                local,
                chunk_size=part_size(local.stat().st_size, self.options.part_bytes),
                max_concurrency=self.options.parts_in_flight,
            )

    def download_file(self, key: str, local: Path) -> None:
        import obstore

        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        with self._errors("read", key), tmp.open("wb") as f:
            for chunk in obstore.get(self._store, key).stream(min_chunk_size=8 << 20):
                f.write(chunk)
        os.replace(tmp, local)

    def delete(self, keys: Iterable[str]) -> None:
        import obstore

        keys = list(keys)
        if keys:
            with self._errors("delete", keys[0]):
                obstore.delete(self._store, keys)

    def incomplete_uploads(self, prefix: str) -> Uploads:
        """(key, upload id) of every multipart upload started under prefix and neither completed nor
        aborted. A call obstore does not offer: signed here (keys from the environment only)."""
        out: Uploads = []
        markers: dict[str, str] = {}
        while True:
            query = {"uploads": "", "prefix": join(self.location.prefix, prefix).lstrip("/"), **markers}
            page = self._request("GET", "", query)
            uploads, markers = parse_uploads(page)
            out += [(key[len(self.location.prefix) :].lstrip("/"), upload_id) for key, upload_id in uploads]
            if not markers:
                return out

    def abort_uploads(self, prefix: str) -> int:
        """Abort what incomplete_uploads finds: parts of a killed writer, invisible to listing but
        stored (and billed) until aborted. Best effort: without keys in the environment, or refused,
        it logs and leaves them to the bucket's lifecycle rule (AbortIncompleteMultipartUpload)."""
        if self._credentials is None:
            log.info("unfinished multipart uploads under %s not checked: no AWS keys in the environment", self.uri)
            return 0
        try:
            uploads = self.incomplete_uploads(prefix)
            for key, upload_id in uploads:
                self._request("DELETE", join(self.location.prefix, key).lstrip("/"), {"uploadId": upload_id})
        except (OSError, ElementTree.ParseError) as e:
            log.warning("could not abort unfinished multipart uploads under %s: %s", self.uri, e)
            return 0
        if uploads:
            log.info("aborted %d unfinished multipart upload(s) under %s", len(uploads), join(self.uri, prefix))
        return len(uploads)

    def _request(self, method: str, key: str, query: Mapping[str, str]) -> bytes:
        """One signed path-style request for `key` in the bucket (the bucket itself for "")."""
        assert self._credentials is not None
        loc = self.location
        path = "/" + urllib.parse.quote(f"{loc.bucket}/{key}" if key else loc.bucket, safe="/-_.~")
        url = f"{loc.endpoint.rstrip('/')}{path}?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"
        headers = sign(method, url, body=b"", credentials=self._credentials, region=loc.region)
        request = urllib.request.Request(url, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=self.options.request_timeout_seconds) as response:
            return bytes(response.read())


def parse_uploads(xml: bytes) -> tuple[Uploads, dict[str, str]]:
    """(key, upload id) pairs of a ListMultipartUploads answer, and the markers of the next page
    (empty on the last one)."""
    root = ElementTree.fromstring(xml)

    def text(element: ElementTree.Element, name: str) -> str:
        found = next((c for c in element if c.tag.rsplit("}", 1)[-1] == name), None)
        return (found.text or "") if found is not None else ""

    uploads = [(text(u, "Key"), text(u, "UploadId")) for u in root if u.tag.rsplit("}", 1)[-1] == "Upload"]
    if text(root, "IsTruncated") != "true":
        return uploads, {}
    return uploads, {"key-marker": text(root, "NextKeyMarker"), "upload-id-marker": text(root, "NextUploadIdMarker")}


def open_storage(uri: str, options: StorageOptions | None = None, *, field: str | None = None) -> Storage:
    """The backend for a URI: s3:// goes to object storage, anything else is a local path.

    field names the spec field the URI came from, in the errors storage raises.
    """
    if is_remote(uri):
        return S3Storage(uri, options or StorageOptions(), field=field)
    return LocalStorage(uri)


def check_writable(storage: Storage) -> None:
    """Write and delete a marker object, so a refused write fails the job now, not after training."""
    key = ".kubetune-write-check"
    storage.write_bytes(key, b"ok")
    storage.delete([key])


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


def upload_dir(
    storage: Storage, directory: Path, prefix: str, *, files_in_flight: int = 4
) -> list[tuple[str, int, str]]:
    """Upload every file of directory under prefix; return (relative path, size, sha256) of each.

    Files go up a few at a time, each hashed while it uploads (obstore and hashlib both release
    the GIL), largest first so a big file never starts last.
    """
    files = sorted(walk_files(directory), key=lambda f: -f[0].stat().st_size)

    def one(item: tuple[Path, str]) -> tuple[str, int, str]:
        path, rel = item
        with ThreadPoolExecutor(1) as hasher:
            digest = hasher.submit(sha256_file, path)
            storage.upload_file(path, join(prefix, rel).lstrip("/"))
            return rel, path.stat().st_size, digest.result()

    with ThreadPoolExecutor(max(1, files_in_flight)) as pool:
        done = list(pool.map(one, files))
    return sorted(done)


#: Written into a download's directory once every file arrived whole: the listing it was made from.
DOWNLOADED = ".kubetune-download.json"


def download_prefix(storage: Storage, prefix: str, directory: Path) -> None:
    """Download every object under prefix into directory, keeping relative paths, and check each file's size
    against the listing. A directory that already holds a whole download of the same listing is kept: a
    base model is fetched once per pod, however many processes and restarts. Otherwise the directory is
    emptied first, so no file of an earlier download the listing no longer names (a model re-uploaded in
    shards, say) is read as part of this one."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    listing = sorted((obj.key[len(prefix) :], obj.size) for obj in storage.list(prefix))
    marker = directory / DOWNLOADED
    try:
        if json.loads(marker.read_text()) == [list(entry) for entry in listing]:
            log.info("%s already holds %s", directory, join(storage.uri, prefix))
            return
    except (OSError, ValueError):
        pass
    shutil.rmtree(directory, ignore_errors=True)
    for relative, size in listing:
        local = directory / relative
        storage.download_file(prefix + relative, local)
        if local.stat().st_size != size:
            raise StorageUnavailable(
                getattr(storage, "field", None),
                f"{join(storage.uri, prefix + relative)} arrived with {local.stat().st_size} of {size} bytes: "
                "it changed after it was listed (a new upload?) or the transfer was cut short",
            )
    if listing:
        marker.write_text(json.dumps(listing))
