"""Fixtures that start the test bed's real parts on 127.0.0.1 (docs/testbed.md explains the bed).

Session-scoped: ``control_plane``, ``kube_admin``, ``kubelet`` (node ``gpu-node-0`` with 8 GPUs),
``s3``, ``pushgateway``, ``prometheus``. Function-scoped: ``namespace``. A part whose binaries are
missing skips its tests with a hint, unless KUBETUNE_REQUIRE_TESTBED is set (CI), which turns the
skip into a failure. A failing test's report carries the tail of every running part's log.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.testbed import binaries, processes

REQUIRE_ENV = "KUBETUNE_REQUIRE_TESTBED"
DEFAULT_NODE = "gpu-node-0"
LOG_LINES = 15


class _HasLogs(Protocol):
    def log_files(self) -> dict[str, Path]: ...


# The running parts, for failure reports: name -> object with log_files().
_running: dict[str, _HasLogs] = {}


def require_binaries(names: tuple[str, ...], what: str) -> None:
    """Skip (or, with KUBETUNE_REQUIRE_TESTBED set, fail) when a binary ``what`` needs is missing."""
    missing = binaries.missing(names)
    if not missing:
        return
    skip_or_fail(
        f"{what} needs {', '.join(missing)} (not in {binaries.testbin_dir()} or on PATH): run tests/testbed/build"
    )


def skip_or_fail(message: str) -> None:
    """Skip with ``message``, or fail with it when KUBETUNE_REQUIRE_TESTBED is set (CI)."""
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{message}; {REQUIRE_ENV} is set, so this is an error", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """The project's images built from this tree (``make images``), target -> reference; the test
    kubelet runs their pods as podman containers."""
    from tests.testbed import podman

    if not podman.available():
        skip_or_fail("the images need podman (see docs/testbed.md)")
    refs = {target: podman.tag(target) for target in podman.TARGETS}
    missing = [ref for ref in refs.values() if not podman.image_exists(ref)]
    if missing:
        skip_or_fail(f"images not built from this tree: {', '.join(missing)}; run make images")
    return refs


@pytest.fixture(scope="session")
def testbed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every part's data and logs in this session."""
    return tmp_path_factory.mktemp("testbed")


# The parts' modules are imported inside the fixtures: they need the kubernetes client, which the
# job's own environment (and so its unit tests) does not have.


@pytest.fixture(scope="session")
def control_plane(testbed_dir: Path) -> Iterator[Any]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler (a ``cluster.ControlPlane``)."""
    require_binaries(binaries.KUBERNETES, "the control plane")
    from tests.testbed.cluster import ControlPlane

    plane = ControlPlane.start(testbed_dir / "cluster")
    _running["control plane"] = plane
    yield plane
    _running.pop("control plane", None)
    plane.stop()


@pytest.fixture(scope="session")
def kube_admin(control_plane: Any) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient`` authenticated as a cluster admin (system:masters)."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def kubelet(control_plane: Any, testbed_dir: Path) -> Iterator[Any]:
    """The test kubelet (``kubelet.TestKubelet``) with one Ready node, ``gpu-node-0``, offering 8 GPUs."""
    from tests.testbed.bed import pod_env
    from tests.testbed.kubelet import NodeSpec, TestKubelet

    kubelet = TestKubelet(control_plane.api_client(), workdir=testbed_dir / "kubelet", extra_env=pod_env()).start()
    _running["kubelet"] = kubelet
    try:
        kubelet.add_node(NodeSpec(DEFAULT_NODE))
        yield kubelet
    finally:
        _running.pop("kubelet", None)
        kubelet.stop()
        kubelet.api_client.close()


@pytest.fixture
def namespace(kube_admin: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists; deleted afterwards, its pods force-deleted."""
    from kubernetes import client as k8s

    from tests.testbed.cluster import wait_for_service_account

    core = k8s.CoreV1Api(kube_admin)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    wait_for_service_account(core, name)
    yield name
    core.delete_namespace(name)
    # Pods left running would otherwise wait on their grace periods; a real kubelet cannot be
    # assumed here (the test may not use one), so remove them at once.
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)


@pytest.fixture(scope="session")
def s3(testbed_dir: Path) -> Iterator[Any]:
    """SeaweedFS with its S3 gateway (``s3.SeaweedS3``: endpoint, access_key, secret_key, region)."""
    require_binaries(binaries.S3, "the S3 server")
    from tests.testbed.s3 import SeaweedS3

    server = SeaweedS3.start(testbed_dir / "s3")
    _running["s3"] = server
    yield server
    _running.pop("s3", None)
    server.stop()


@pytest.fixture(scope="session")
def pushgateway(testbed_dir: Path) -> Iterator[Any]:
    """A Prometheus Pushgateway (``prometheus.Pushgateway``: url, address)."""
    require_binaries(("prometheus-pushgateway",), "the Pushgateway")
    from tests.testbed.prometheus import Pushgateway

    gateway = Pushgateway.start(testbed_dir / "pushgateway")
    _running["pushgateway"] = gateway
    yield gateway
    _running.pop("pushgateway", None)
    gateway.stop()


@pytest.fixture(scope="session")
def prometheus(pushgateway: Any, testbed_dir: Path) -> Iterator[Any]:
    """Prometheus scraping the Pushgateway every second with honor_labels (``prometheus.Prometheus``)."""
    require_binaries(("prometheus",), "Prometheus")
    from tests.testbed.prometheus import Prometheus

    prom = Prometheus.start(testbed_dir / "prometheus", targets=[pushgateway.address])
    _running["prometheus"] = prom
    yield prom
    _running.pop("prometheus", None)
    prom.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, add the tail of each running part's log (and where the whole log is) to the report."""
    report = yield
    if report.failed and _running:
        namespace = getattr(item, "funcargs", {}).get("namespace")
        report.sections.append(("test bed logs", _log_summary(namespace)))
    return report


def _log_summary(namespace: str | None) -> str:
    parts = []
    for component, running in list(_running.items()):
        for name, path in running.log_files().items():
            # Pod logs of other tests' namespaces are noise here.
            if "/" in name and namespace is not None and not name.startswith(f"{namespace}/"):
                continue
            parts.append(f"--- {component}: {name} ({path})\n{processes.log_tail(path, lines=LOG_LINES)}")
    return "\n".join(parts)
