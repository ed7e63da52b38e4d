"""Leader election's decisions: who acquires, renews or waits, and the Lease specs they write."""

from __future__ import annotations

import os
import socket
import urllib.request
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from kubetune_operator.leader import Action, Record, claim, decide, identity_of, observe, released, standby_health
from kubetune_operator.settings import OperatorSettings

NOW = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def record(holder: str = "a", *, duration: int | None = 15, transitions: int = 3) -> Record:
    return Record(
        holder=holder,
        duration_seconds=duration,
        acquire_time="2026-01-02T00:00:00.000000Z",
        renew_time="2026-01-02T03:04:00.000000Z",
        transitions=transitions,
    )


def act(rec: Record | None, *, me: str = "b", now: float = 100.0, seen: float = 100.0, duration: float = 15) -> Action:
    return decide(rec, identity=me, now=now, observed_at=seen, lease_duration=duration)


# --- decide


def test_no_lease_is_acquired() -> None:
    """A missing Lease is acquired (created)."""
    assert act(None) is Action.ACQUIRE


def test_a_released_lease_is_acquired_at_once() -> None:
    """A Lease without a holder (its leader released it) is acquired without waiting for it to expire."""
    assert act(record(""), now=100.0, seen=100.0) is Action.ACQUIRE


def test_my_own_lease_is_renewed() -> None:
    """The holder renews, however old the record looks."""
    assert act(record("b"), now=1e9, seen=0.0) is Action.RENEW


def test_another_holders_lease_is_waited_for_until_it_expires() -> None:
    """Another holder's Lease is waited for until its duration has passed since the record last changed."""
    assert act(record("a", duration=15), now=114.9, seen=100.0) is Action.WAIT
    assert act(record("a", duration=15), now=115.0, seen=100.0) is Action.ACQUIRE


def test_the_holders_duration_wins_over_mine() -> None:
    """Expiry uses the duration the holder wrote; mine only when its record names none."""
    assert act(record("a", duration=60), now=130.0, seen=100.0, duration=15) is Action.WAIT
    assert act(record("a", duration=None), now=115.0, seen=100.0, duration=15) is Action.ACQUIRE


# --- observe


def test_an_unchanged_record_keeps_when_it_was_first_seen() -> None:
    """Re-reading the same record keeps the first sighting: the Lease ages on this clock."""
    seen = observe(None, record("a"), 10.0)
    assert observe(seen, record("a"), 50.0) == (record("a"), 10.0)


def test_a_renewal_restarts_the_clock() -> None:
    """A changed record (the holder renewed) is seen anew, so a live leader's Lease never expires."""
    seen = observe(None, record("a"), 10.0)
    renewed = Record("a", 15, record().acquire_time, "2026-01-02T03:04:10.000000Z", 3)
    assert observe(seen, renewed, 50.0) == (renewed, 50.0)
    assert act(renewed, now=60.0, seen=50.0) is Action.WAIT


# --- claim and released


def test_claiming_a_new_lease_starts_at_zero_transitions() -> None:
    """Creating the Lease: I hold it since now, no transition yet."""
    assert claim(None, identity="b", now=NOW, lease_duration=15) == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-01-02T03:04:05.678901Z",
        "renewTime": "2026-01-02T03:04:05.678901Z",
        "leaseTransitions": 0,
    }


def test_renewing_keeps_acquire_time_and_transitions() -> None:
    """A renewal moves renewTime only."""
    spec = claim(record("b"), identity="b", now=NOW, lease_duration=15)
    assert spec["acquireTime"] == record().acquire_time and spec["leaseTransitions"] == 3
    assert spec["renewTime"] == "2026-01-02T03:04:05.678901Z"


def test_taking_over_counts_a_transition() -> None:
    """Taking the Lease from another holder (or after a release) counts one transition, acquired now."""
    for previous in (record("a"), record("")):
        spec = claim(previous, identity="b", now=NOW, lease_duration=15)
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 4
        assert spec["acquireTime"] == "2026-01-02T03:04:05.678901Z"


def test_a_released_lease_has_no_holder_and_is_taken_at_once() -> None:
    """Released: no holder, a 1 s duration, the transitions kept; the next candidate acquires it."""
    spec = released(record("b"), now=NOW)
    assert spec["holderIdentity"] is None and spec["leaseDurationSeconds"] == 1 and spec["leaseTransitions"] == 3
    assert act(Record.of({"spec": spec}), me="c") is Action.ACQUIRE


def test_record_of_a_lease_as_the_api_server_spells_it() -> None:
    """Record.of reads a Lease's JSON; absent fields become an empty holder and zero transitions."""
    lease = {"metadata": {"name": "x"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}
    assert Record.of(lease) == Record("a", 15, None, None, 0)
    assert Record.of({"spec": {}}) == Record("", None, None, None, 0)
    assert Record.of(None) is None


# --- identity and settings


def test_identity_is_the_pod_name_else_hostname_and_pid() -> None:
    """The chart's pod name is the identity; outside a pod, hostname and pid tell processes apart."""
    assert identity_of(OperatorSettings(pod_name="kubetune-operator-5d9-x2")) == "kubetune-operator-5d9-x2"
    assert identity_of(OperatorSettings()) == f"{socket.gethostname()}_{os.getpid()}"


def test_leader_election_needs_a_lease_namespace() -> None:
    """Leader election without the Lease's namespace is refused, naming the variable to set."""
    with pytest.raises(ValidationError, match="KUBETUNE_OPERATOR_LEASE_NAMESPACE"):
        OperatorSettings(leader_election=True)
    assert OperatorSettings(leader_election=True, lease_namespace="kubetune").lease_namespace == "kubetune"


def test_renew_period_must_leave_time_for_a_retry() -> None:
    """A renew period over half the lease duration is refused, naming both variables."""
    with pytest.raises(ValidationError, match=r"LEASE_RENEW_SECONDS \(8\) must be at most half of .*DURATION_SECONDS"):
        OperatorSettings(lease_duration_seconds=15, lease_renew_seconds=8)
    assert OperatorSettings(lease_duration_seconds=6, lease_renew_seconds=3).lease_renew_seconds == 3


# --- the standby's health endpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_standby_answers_healthz_and_frees_the_port() -> None:
    """While waiting, /healthz answers 200 (the kubelet must not kill a standby); afterwards the port
    can be bound again, for kopf's liveness endpoint."""
    port = free_port()
    with standby_health(port), urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
