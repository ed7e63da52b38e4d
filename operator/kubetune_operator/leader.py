"""Leader election on a coordination.k8s.io/v1 Lease: of several operator replicas (by mistake, or
during a rollout) exactly one runs the handlers, so every Job, status write and Event has one writer.

The decisions are pure: decide() says whether a candidate acquires, renews or waits; claim() and
released() are the Lease specs it writes. Elector does the I/O around them: every write is a create,
or a replace carrying the resourceVersion that was read, so when two candidates decide to acquire at
once the API server lets one write succeed and answers the other 409 (it lost the race).

A holder's Lease expires lease-duration seconds after this candidate last *saw it change*, timed on
this candidate's clock (as client-go's leaderelection does): renewTime, written with the holder's
clock, is never compared with ours, so clock skew between nodes cannot make two leaders. A leader
that could not renew for lease-duration minus one renew period exits, before any standby may take
over; the kubelet restarts it as a standby.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from .settings import OperatorSettings

log = logging.getLogger(__name__)


class Action(Enum):
    ACQUIRE = "acquire"  # no holder, or the holder's Lease expired: write ourselves in
    RENEW = "renew"  # we hold it: write a new renewTime
    WAIT = "wait"  # another candidate holds it


@dataclass(frozen=True)
class Record:
    """What a Lease says about its holder (the parts the decisions read)."""

    holder: str  # "" when released
    duration_seconds: int | None
    acquire_time: str | None
    renew_time: str | None
    transitions: int

    @classmethod
    def of(cls, lease: Mapping[str, Any] | None) -> Record | None:
        """The record of a Lease in its JSON spelling; None when there is no Lease."""
        if lease is None:
            return None
        spec = lease.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=spec.get("leaseDurationSeconds"),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=spec.get("leaseTransitions") or 0,
        )


def observe(seen: tuple[Record | None, float] | None, record: Record | None, now: float) -> tuple[Record | None, float]:
    """The record just read, with when it was first seen: kept from `seen` while the record is unchanged."""
    if seen is not None and seen[0] == record:
        return seen
    return record, now


def decide(record: Record | None, *, identity: str, now: float, observed_at: float, lease_duration: float) -> Action:
    """What a candidate does with the Lease it read.

    now, observed_at: this candidate's monotonic clock, now and when it first saw this record.
    lease_duration: the holder's promise when its record names none."""
    if record is None or not record.holder:
        return Action.ACQUIRE
    if record.holder == identity:
        return Action.RENEW
    expires = observed_at + (record.duration_seconds or lease_duration)
    return Action.ACQUIRE if now >= expires else Action.WAIT


def stamp(when: datetime) -> str:
    """A MicroTime, as a Lease's times are spelled."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def claim(record: Record | None, *, identity: str, now: datetime, lease_duration: int) -> dict[str, Any]:
    """The Lease spec that makes (or keeps) `identity` the holder."""
    mine = record is not None and record.holder == identity
    return {
        "holderIdentity": identity,
        "leaseDurationSeconds": lease_duration,
        "acquireTime": record.acquire_time if mine and record is not None else stamp(now),
        "renewTime": stamp(now),
        "leaseTransitions": 0 if record is None else record.transitions + (0 if mine else 1),
    }


def released(record: Record, *, now: datetime) -> dict[str, Any]:
    """The Lease spec a leader leaves on its way out: no holder, so a standby acquires at its next look
    instead of waiting for the Lease to expire (and a 1 s duration for candidates that ignore an empty holder)."""
    return {
        "holderIdentity": None,
        "leaseDurationSeconds": 1,
        "acquireTime": record.acquire_time,
        "renewTime": stamp(now),
        "leaseTransitions": record.transitions,
    }


def identity_of(settings: OperatorSettings) -> str:
    """The pod's name in a cluster; elsewhere hostname and pid, unique among processes on one API server."""
    return settings.pod_name or f"{socket.gethostname()}_{os.getpid()}"


def _until(deadline: float) -> float:
    """A request's timeout: what is left until `deadline` (monotonic), never quite nothing."""
    return max(0.1, deadline - time.monotonic())


def _why(error: Exception) -> str:
    """One line about a failed request (an ApiException's text carries every response header)."""
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return str(error) or type(error).__name__


def _json(response: Any) -> dict[str, Any]:
    """The body of a response read with _preload_content=False."""
    return dict(json.loads(response.data))


def _exit(reason: str) -> None:
    # Handlers may be mid-way: the process must stop at once, not unwind through kopf (which would keep
    # writing as a leader that no longer is one). The kubelet restarts the container as a standby.
    log.critical("leadership lost (%s): exiting so that only the new leader acts", reason)
    logging.shutdown()
    os._exit(1)


class Elector:
    """Acquires the Lease (blocking), renews it from a thread, releases it on the way out."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: int,
        renew_period: int,
        on_lost: Callable[[str], None] = _exit,
    ) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_period = lease_duration, renew_period
        self._api = k8s.CoordinationV1Api(api)
        self._on_lost = on_lost
        self._lease: dict[str, Any] | None = None  # as last read or written: its resourceVersion guards a write
        self._seen: tuple[Record | None, float] | None = None
        self._renewed_at = 0.0  # monotonic time before the request of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, api: k8s.ApiClient, settings: OperatorSettings) -> Elector:
        assert settings.lease_namespace  # the settings' validator requires it with leader_election
        return cls(
            api,
            namespace=settings.lease_namespace,
            name=settings.lease_name,
            identity=identity_of(settings),
            lease_duration=settings.lease_duration_seconds,
            renew_period=settings.lease_renew_seconds,
        )

    # --- I/O

    def _read(self, deadline: float) -> dict[str, Any] | None:
        try:
            response = self._api.read_namespaced_lease(
                self.name, self.namespace, _preload_content=False, _request_timeout=_until(deadline)
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return _json(response)

    def _write(self, spec: dict[str, Any], deadline: float) -> bool:
        """Create the Lease, or replace the one last read; False when another write came first (409)."""
        # Plain JSON both ways (the client's models would re-spell MicroTimes): Any for its typed signatures.
        body: Any = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec}
        try:
            if self._lease is None:
                body["metadata"] = {"name": self.name, "namespace": self.namespace}
                response = self._api.create_namespaced_lease(
                    self.namespace, body, _preload_content=False, _request_timeout=_until(deadline)
                )
            else:
                body["metadata"] = {**self._lease["metadata"]}  # resourceVersion: replace only what was read
                response = self._api.replace_namespaced_lease(
                    self.name, self.namespace, body, _preload_content=False, _request_timeout=_until(deadline)
                )
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        self._lease = _json(response)
        return True

    def _round(self, deadline: float) -> tuple[Action, Record | None]:
        """Read the Lease, decide, and write if acquiring or renewing, both by `deadline` (monotonic).
        Returns what was done (WAIT when another candidate holds the Lease or won the race to write it)
        and the record read."""
        started = time.monotonic()
        self._lease = self._read(deadline)
        record = Record.of(self._lease)
        self._seen = observe(self._seen, record, started)
        action = decide(
            record,
            identity=self.identity,
            now=started,
            observed_at=self._seen[1],
            lease_duration=self.lease_duration,
        )
        if action is Action.WAIT:
            return action, record
        spec = claim(record, identity=self.identity, now=datetime.now(UTC), lease_duration=self.lease_duration)
        if not self._write(spec, deadline):
            return Action.WAIT, record
        self._renewed_at = started
        return action, record

    # --- the life of a candidate

    def acquire(self) -> None:
        """Wait, looking at the Lease every renew period, until this process holds it."""
        holder = None
        while True:
            try:
                action, record = self._round(time.monotonic() + self.renew_period)
            except Exception as e:  # the API server may be away: keep looking
                log.warning("cannot read or write the Lease %s/%s: %s", self.namespace, self.name, _why(e))
            else:
                if action is not Action.WAIT:
                    log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)
                    return
                if record is not None and record.holder != holder:
                    holder = record.holder
                    log.info("standby: the Lease %s/%s is held by %s", self.namespace, self.name, holder)
            time.sleep(self.renew_period)

    def keep(self) -> None:
        """Renew the Lease from a thread; on losing it (or failing to renew in time), call on_lost."""
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        give_up_after = self.lease_duration - self.renew_period
        pause = float(self.renew_period)
        while not self._stop.wait(pause):
            remaining = self._renewed_at + give_up_after - time.monotonic()
            if remaining <= 0:
                self._on_lost(f"the Lease was not renewed for {give_up_after} s")
                return
            try:
                action, record = self._round(time.monotonic() + min(remaining, self.renew_period))
            except Exception as e:
                log.warning("cannot renew the Lease %s/%s: %s", self.namespace, self.name, _why(e))
                # Retry soon, and look at the deadline again no later than when it passes.
                pause = max(0.0, min(1.0, self._renewed_at + give_up_after - time.monotonic()))
                continue
            if action is Action.WAIT:
                self._on_lost(f"the Lease is held by {record.holder if record else 'another candidate'}")
                return
            pause = float(self.renew_period)

    def release(self) -> None:
        """Stop renewing and leave the Lease without a holder, so a standby takes over at its next look."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_period)
        deadline = time.monotonic() + self.renew_period
        try:
            lease = self._read(deadline)
            record = Record.of(lease)
            if record is None or record.holder != self.identity:
                return
            self._lease = lease
            if self._write(released(record, now=datetime.now(UTC)), deadline):
                log.info("released the Lease %s/%s", self.namespace, self.name)
        except Exception as e:  # it then expires on its own
            log.warning("cannot release the Lease %s/%s: %s", self.namespace, self.name, _why(e))


class _Standby(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the name http.server calls
        code = 200 if self.path.split("?")[0] == "/healthz" else 404
        body = b'{"standby": true}' if code == 200 else b""
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the signature http.server calls
        pass  # a probe every few seconds is not news


@contextmanager
def standby_health(port: int) -> Iterator[None]:
    """Answer /healthz on `port` while waiting for the Lease, or the kubelet would kill the standby; the
    port is free again on exit, for kopf's own liveness endpoint."""
    if port == 0:
        yield
        return
    server = ThreadingHTTPServer(("0.0.0.0", port), _Standby)  # the kubelet probes the pod IP
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
