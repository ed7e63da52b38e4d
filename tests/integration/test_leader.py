"""Two operator replicas on the real control plane: one leads (one writer of Jobs, status and Events),
the other waits as a standby and takes over when the leader dies or stops; and an operator restricted
to one namespace under a namespaced Role handles its first FineTuneJob in seconds, not after a minute."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.rbac import RULES, lease_rules
from tests.kube import (
    apply,
    bare_finetunejob,
    get,
    install_crd,
    kubectl,
    operator_account,
    operator_process,
    wait_for,
)
from tests.testbed.cluster import Credentials, write_kubeconfig

pytestmark = pytest.mark.integration
OPERATOR_NAMESPACE = "kubetune-system"  # operator_account's
DURATION, RENEW = 6, 2  # seconds: short, so a takeover is quick to wait for
TAKEOVER_SLACK = 10.0  # seconds on top of duration + renew: process start-up, a loaded machine
FIRST_STATUS_BOUND = 20.0  # seconds: kopf retrying its forbidden namespace listing took about 55


def create(plane: Any, namespace: str, *names: str) -> None:
    done = apply(plane, *(bare_finetunejob(n, suspend=True) for n in names), namespace=namespace)
    assert done.returncode == 0, done.stderr


def phase(plane: Any, namespace: str, name: str) -> str | None:
    return ((get(plane, "ftj", name, namespace) or {}).get("status") or {}).get("phase")


def wait_status(plane: Any, namespace: str, names: list[str], timeout: float = 60) -> None:
    for name in names:
        wait_for(f"{name} to be Suspended", lambda n=name: phase(plane, namespace, n) == "Suspended", timeout=timeout)


def holder(plane: Any, lease: str) -> str | None:
    return ((get(plane, "lease", lease, OPERATOR_NAMESPACE) or {}).get("spec") or {}).get("holderIdentity")


def lease_access(plane: Any, lease: str) -> None:
    """What the chart's leader-election Role grants, for operator_account's ServiceAccount: its Lease, in
    its own namespace only."""
    role = f"leases-{lease}"
    docs = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": role, "namespace": OPERATOR_NAMESPACE},
            "rules": lease_rules(lease),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": role, "namespace": OPERATOR_NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": OPERATOR_NAMESPACE}],
        },
    ]
    done = apply(plane, *docs)
    assert done.returncode == 0, done.stderr


def assert_one_writer(plane: Any, namespace: str, names: list[str]) -> None:
    """Exactly one Job per FineTuneJob, and exactly one operator Event per FineTuneJob and reason."""
    jobs = json.loads(kubectl(plane, "get", "jobs", "-n", namespace, "-o", "json").stdout)["items"]
    per_owner = Counter((j["metadata"].get("labels") or {}).get("kubetune.io/finetunejob") for j in jobs)
    assert {n: per_owner[n] for n in names} == dict.fromkeys(names, 1)
    uids = {(get(plane, "ftj", n, namespace) or {})["metadata"]["uid"]: n for n in names}
    events = json.loads(kubectl(plane, "get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    posted: Counter[tuple[str, str]] = Counter()
    for e in events:
        if e["involvedObject"].get("uid") in uids and (e.get("source") or {}).get("component") == "kubetune-operator":
            posted[(uids[e["involvedObject"]["uid"]], e["reason"])] += e.get("count") or 1
    assert {name for name, _ in posted} == set(names), f"FineTuneJobs without an Event: {posted}"
    twice = {key: count for key, count in posted.items() if count != 1}
    assert not twice, f"Events posted more than once (FineTuneJob, reason): {twice}"


@pytest.fixture(scope="module")
def account(control_plane: Any, testbed_dir: Path) -> Path:
    install_crd(control_plane)
    return operator_account(control_plane, testbed_dir)


def replica(account: Path, workdir: Path, *, lease: str, identity: str, **settings: str) -> Any:
    """An operator process electing on `lease` as `identity` (its pod name), watching the whole cluster."""
    return operator_process(
        account,
        workdir,
        leader_election="true",
        lease_namespace=OPERATOR_NAMESPACE,
        lease_name=lease,
        pod_name=identity,
        lease_duration_seconds=str(settings.pop("duration", DURATION)),
        lease_renew_seconds=str(RENEW),
        **settings,
    )


def test_two_replicas_write_once_and_the_standby_takes_over_a_killed_leader(
    control_plane: Any, account: Path, namespace: str, testbed_dir: Path
) -> None:
    """Two replicas: one Job and one Event per phase for each FineTuneJob; after SIGKILL of the leader the
    standby holds the Lease within its duration (plus slack) and gives new FineTuneJobs their status."""
    lease = f"op-{namespace}"[:63]
    lease_access(control_plane, lease)
    work = testbed_dir / "leader" / namespace
    with ExitStack() as stack:
        replicas = {who: stack.enter_context(replica(account, work, lease=lease, identity=who)) for who in ("a", "b")}
        before = [f"before-{i}" for i in range(6)]
        create(control_plane, namespace, *before)
        wait_status(control_plane, namespace, before)
        assert_one_writer(control_plane, namespace, before)

        # Both answer /healthz (operator_process waited for it): the standby too, while it waits.
        leader = wait_for("a leader", lambda: holder(control_plane, lease), timeout=30)
        (standby,) = set(replicas) - {leader}
        replicas[leader]["process"].kill()  # SIGKILL: no release, the Lease must expire
        killed = time.monotonic()
        wait_for(
            f"{standby} to take over the Lease",
            lambda: holder(control_plane, lease) == standby,
            timeout=DURATION + RENEW + TAKEOVER_SLACK,
        )
        print(f"takeover after SIGKILL: {time.monotonic() - killed:.1f} s (duration {DURATION} s, renew {RENEW} s)")

        after = [f"after-{i}" for i in range(3)]
        create(control_plane, namespace, *after)
        wait_status(control_plane, namespace, after)
        assert_one_writer(control_plane, namespace, before + after)
        assert replicas[standby]["process"].poll() is None


def test_a_stopping_leader_releases_the_lease_so_the_standby_takes_over_at_once(
    control_plane: Any, account: Path, namespace: str, testbed_dir: Path
) -> None:
    """SIGTERM: the leader stops kopf, releases the Lease and exits 0; the standby leads well before the
    Lease (60 s here) could have expired, and handles new FineTuneJobs."""
    lease = f"op-{namespace}"[:63]
    lease_access(control_plane, lease)
    work = testbed_dir / "leader" / namespace
    with ExitStack() as stack:
        first = stack.enter_context(replica(account, work, lease=lease, identity="a", duration="60"))
        wait_for("a to lead", lambda: holder(control_plane, lease) == "a", timeout=60)
        stack.enter_context(replica(account, work, lease=lease, identity="b", duration="60"))
        first["process"].terminate()
        assert first["process"].wait(timeout=30) == 0
        assert holder(control_plane, lease) in (None, "b")  # released, or already taken
        wait_for("b to take over the released Lease", lambda: holder(control_plane, lease) == "b", timeout=20)
        create(control_plane, namespace, "after-release")
        wait_status(control_plane, namespace, ["after-release"])
        assert_one_writer(control_plane, namespace, ["after-release"])


def test_a_leader_that_cannot_renew_exits_before_its_lease_expires(
    control_plane: Any, account: Path, namespace: str, testbed_dir: Path
) -> None:
    """With its Lease access revoked, the leader cannot renew and exits non-zero (to restart as a
    standby) instead of acting on without the Lease."""
    lease = f"op-{namespace}"[:63]
    lease_access(control_plane, lease)
    with replica(account, testbed_dir / "leader" / namespace, lease=lease, identity="a") as leading:
        wait_for("a to lead", lambda: holder(control_plane, lease) == "a", timeout=60)
        kubectl(control_plane, "delete", "rolebinding", f"leases-{lease}", "-n", OPERATOR_NAMESPACE)
        code = wait_for(
            "the leader to exit", lambda: leading["process"].poll(), timeout=DURATION + TAKEOVER_SLACK, every=0.2
        )
        assert code != 0
        assert "leadership lost" in leading["log"].read_text()


@pytest.fixture
def namespaced_account(control_plane: Any, namespace: str, testbed_dir: Path) -> Iterator[Path]:
    """A ServiceAccount granted rbac.RULES by a Role in `namespace` only (what the chart's
    watchNamespaces install grants): no ClusterRole, so no namespace or CRD listing."""
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "namespaced-operator"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "namespaced-operator"},
            "rules": RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "namespaced-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "namespaced-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "namespaced-operator", "namespace": namespace}],
        },
    ]
    install_crd(control_plane)
    done = apply(control_plane, *docs, namespace=namespace)
    assert done.returncode == 0, done.stderr
    token = kubectl(control_plane, "create", "token", "namespaced-operator", "-n", namespace, "--duration=1h")
    user = Credentials(f"system:serviceaccount:{namespace}:namespaced-operator", token.stdout.strip())
    path = testbed_dir / "leader" / f"{namespace}.kubeconfig"
    path.parent.mkdir(parents=True, exist_ok=True)
    yield write_kubeconfig(path, server=control_plane.server, ca=control_plane.ca_file, user=user)


def test_a_namespaced_operator_handles_its_first_finetunejob_in_seconds(
    control_plane: Any, namespaced_account: Path, namespace: str, testbed_dir: Path
) -> None:
    """Watching one namespace under a Role there (no cluster-wide read), a new FineTuneJob gets its status
    within FIRST_STATUS_BOUND of the operator answering /healthz."""
    cannot = kubectl(control_plane, "auth", "can-i", "list", "namespaces", kubeconfig=namespaced_account, check=False)
    assert cannot.stdout.strip() == "no"
    with operator_process(namespaced_account, testbed_dir / "leader" / namespace, namespaces=json.dumps([namespace])):
        started = time.monotonic()
        create(control_plane, namespace, "first")
        wait_status(control_plane, namespace, ["first"], timeout=FIRST_STATUS_BOUND)
        print(f"namespaced install: first status {time.monotonic() - started:.1f} s after /healthz answered")
    assert_one_writer(control_plane, namespace, ["first"])
