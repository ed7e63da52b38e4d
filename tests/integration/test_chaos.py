"""Faults injected into the real control plane while FineTuneJobs arrive: the operator SIGKILLed again
and again during a burst, and the API server stopped and restarted under a running operator. The
invariants: exactly one Job per FineTuneJob, owned by it; every FineTuneJob gets a status; the
operator converges without a restart of its own and its memory stays bounded. `make chaos` runs these
with the other fault and fuzz suites."""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Operator, ftj
from tests.kube import apply, install_crd, kubectl, operator_account, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

#: The operator's resident memory stays under this through every scenario here.
RSS_BOUND_MB = 400


def suspended(name: str, assets: Path) -> dict[str, Any]:
    """A FineTuneJob whose Job is created suspended: no pod, so hundreds fit on two cores."""
    return ftj(name, assets, runPolicy={"suspend": True})


def listing(plane: Any, kind: str, namespace: str) -> list[dict[str, Any]]:
    done = kubectl(plane, "get", kind, "-n", namespace, "-o", "json", "--chunk-size=500")
    return list(json.loads(done.stdout)["items"])


def converged(plane: Any, namespace: str, count: int) -> bool:
    """Every FineTuneJob has a status phase and exactly one Job, owned by it; no Job is anyone else's."""
    ftjs = listing(plane, "ftj", namespace)
    jobs = listing(plane, "jobs", namespace)
    owners = sorted(r["uid"] for j in jobs for r in j["metadata"].get("ownerReferences", []))
    uids = sorted(f["metadata"]["uid"] for f in ftjs)
    phases = {f.get("status", {}).get("phase") for f in ftjs}
    return len(ftjs) == count and owners == uids and len(jobs) == count and phases == {"Suspended"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_operator_sigkilled_again_and_again_during_a_burst(
    control_plane: Any, operator: Operator, namespace: str, assets: Path
) -> None:
    """200 FineTuneJobs applied by 8 clients while the operator is SIGKILLed 6 times and restarted:
    exactly one Job each, owned by it, and every status written."""
    count = 200
    done = threading.Event()

    def killer() -> None:
        rng = random.Random(12)
        for _ in range(6):
            if done.wait(rng.uniform(0.5, 2.5)):
                return
            operator.kill()
            operator.start()

    chaos = threading.Thread(target=killer, name="killer")
    chaos.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            docs = [suspended(f"burst-{i}", assets) for i in range(count)]
            results = list(pool.map(lambda d: apply(control_plane, d, namespace=namespace), docs))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode][:3]
    finally:
        done.set()
        chaos.join()
    wait_for(
        "one Job per FineTuneJob and every status", lambda: converged(control_plane, namespace, count), timeout=240
    )
    assert rss_mb(operator.info["process"].pid) < RSS_BOUND_MB


@pytest.fixture(scope="module")
def own_plane(testbed_dir: Path) -> Iterator[Any]:
    """A control plane of this module's own: its API server is stopped and restarted here."""
    from tests.conftest import require_binaries
    from tests.testbed import binaries
    from tests.testbed.cluster import ControlPlane

    require_binaries(binaries.KUBERNETES, "the control plane")
    plane = ControlPlane.start(testbed_dir / "chaos-plane")
    try:
        install_crd(plane)
        yield plane
    finally:
        plane.stop()


def test_operator_converges_after_an_api_server_restart(own_plane: Any, testbed_dir: Path, assets: Path) -> None:
    """The API server down for 20 s under a running operator: its watches come back by themselves, the
    FineTuneJobs applied before and after get their Jobs and statuses, and the operator never restarts."""
    from tests.testbed.cluster import wait_for_service_account

    workdir = testbed_dir / "chaos-operator"
    workdir.mkdir(parents=True, exist_ok=True)
    op = Operator(operator_account(own_plane, workdir), workdir, progress_interval_seconds="2")
    op.start()
    try:
        kubectl(own_plane, "create", "namespace", "restarts")
        with own_plane.api_client() as api:
            from kubernetes import client as k8s

            wait_for_service_account(k8s.CoreV1Api(api), "restarts")
        for i in range(5):
            assert apply(own_plane, suspended(f"before-{i}", assets), namespace="restarts").returncode == 0
        wait_for("the first statuses", lambda: converged(own_plane, "restarts", 5), timeout=60)
        pid = op.info["process"].pid
        own_plane.restart_apiserver(down=20)
        for i in range(5):
            assert apply(own_plane, suspended(f"after-{i}", assets), namespace="restarts").returncode == 0
        wait_for("convergence after the restart", lambda: converged(own_plane, "restarts", 10), timeout=120)
        assert op.info["process"].poll() is None and op.info["process"].pid == pid
        with urllib.request.urlopen(f"http://127.0.0.1:{op.info['health_port']}/healthz", timeout=5) as answer:
            assert answer.status == 200
        assert rss_mb(pid) < RSS_BOUND_MB
    finally:
        op.stop()
