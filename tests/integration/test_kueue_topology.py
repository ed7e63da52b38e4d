"""spec.scheduling.topology under Kueue's topology-aware scheduling (its real controller manager) on the real
control plane: fake GPU nodes labelled with a block and a rack, a Kueue Topology over those labels, and
multi-node FineTuneJobs that must (or would rather) share one rack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import pods, status, wait_phase, workload_of
from tests.kube import apply, get, kubectl, wait_for

pytestmark = pytest.mark.integration
#: The operator runs with its Kueue support on (tests/integration/conftest.py's operator fixture).
KUEUE = True
API = "kueue.x-k8s.io/v1beta2"
BLOCK, RACK, HOST = "example.com/block", "example.com/rack", "kubernetes.io/hostname"
#: The label that puts a node in the topology's ResourceFlavor (the bed's other node, gpu-node-0, lacks it).
POOL = {"example.com/pool": "tas"}
#: One GPU each, so a pod per node: one block of two racks, rack-a with two nodes and rack-b with one.
RACKS = {"tas-a1": "rack-a", "tas-a2": "rack-a", "tas-b1": "rack-b"}
TOPOLOGY, FLAVOR, CLUSTER_QUEUE = "racks", "tas-gpu", "tas"
REQUIRED = "kueue.x-k8s.io/podset-required-topology"
PREFERRED = "kueue.x-k8s.io/podset-preferred-topology"


@pytest.fixture(scope="module")
def racks(control_plane: Any, kubelet: Any, kueue: Any) -> Iterator[None]:
    """Kueue with a Topology (block, rack, host) over three labelled one-GPU nodes, its ResourceFlavor and a
    ClusterQueue with room for eight GPUs (more than the nodes: only the topology can hold a job back).
    The nodes and Kueue's objects go with the module, so no other test's pod lands on these nodes."""
    from tests.testbed.kubelet import NodeSpec

    try:
        for name, rack in RACKS.items():
            kubelet.add_node(NodeSpec(name, gpus=1, labels={**POOL, BLOCK: "block-1", RACK: rack}))
        levels = [{"nodeLabel": label} for label in (BLOCK, RACK, HOST)]
        quota = [("cpu", "64"), ("memory", "256Gi"), ("nvidia.com/gpu", "8")]
        objects = [
            {"apiVersion": API, "kind": "Topology", "metadata": {"name": TOPOLOGY}, "spec": {"levels": levels}},
            {
                "apiVersion": API,
                "kind": "ResourceFlavor",
                "metadata": {"name": FLAVOR},
                "spec": {"nodeLabels": POOL, "topologyName": TOPOLOGY},
            },
            {
                "apiVersion": API,
                "kind": "ClusterQueue",
                "metadata": {"name": CLUSTER_QUEUE},
                "spec": {
                    "namespaceSelector": {},
                    "resourceGroups": [
                        {
                            "coveredResources": [name for name, _ in quota],
                            "flavors": [
                                {"name": FLAVOR, "resources": [{"name": n, "nominalQuota": q} for n, q in quota]}
                            ],
                        }
                    ],
                },
            },
        ]
        done = apply(control_plane, *objects)
        assert done.returncode == 0, done.stderr
        wait_for("the ClusterQueue to be active", lambda: active(control_plane), timeout=60)
        yield
    finally:
        for kind, name in (("clusterqueue", CLUSTER_QUEUE), ("resourceflavor", FLAVOR), ("topology", TOPOLOGY)):
            kubectl(control_plane, "delete", "--ignore-not-found", "--wait=false", f"{kind}.kueue.x-k8s.io", name)
        for name in RACKS:
            kubelet.delete_node(name)


def active(plane: Any) -> bool:
    done = kubectl(plane, "get", "clusterqueue.kueue.x-k8s.io", CLUSTER_QUEUE, "-o", "json", check=False)
    conditions = json.loads(done.stdout).get("status", {}).get("conditions", []) if done.returncode == 0 else []
    return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)


@pytest.fixture
def queue(control_plane: Any, racks: None, namespace: str) -> str:
    """A LocalQueue ``team`` in the test's namespace, on the topology's ClusterQueue."""
    local = {"apiVersion": API, "kind": "LocalQueue", "metadata": {"name": "team"}}
    done = apply(control_plane, {**local, "spec": {"clusterQueue": CLUSTER_QUEUE}}, namespace=namespace)
    assert done.returncode == 0, done.stderr
    return "team"


def admitted(plane: Any, namespace: str, job: str) -> dict[str, Any] | None:
    found = workload_of(plane, namespace, job)
    return found if found and (found.get("status") or {}).get("admission") else None


def hosts(assignment: dict[str, Any]) -> dict[str, int]:
    """Pods per node of a Workload's topologyAssignment, read from its compact form (slices of domains whose
    values per level are one value for all, or a prefix, roots and a suffix, one root per domain)."""
    levels = assignment["levels"]
    out: dict[str, int] = {}
    for piece in assignment["slices"]:
        count = piece["domainCount"]
        columns = []
        for values in piece["valuesPerLevel"]:
            if "universal" in values:
                columns.append([values["universal"]] * count)
            else:
                each = values["individual"]
                columns.append([f"{each.get('prefix', '')}{root}{each.get('suffix', '')}" for root in each["roots"]])
        pods_per = piece["podCounts"]
        counts = [pods_per["universal"]] * count if "universal" in pods_per else pods_per["individual"]
        for domain, n in enumerate(counts):
            out[columns[levels.index(HOST)][domain]] = n
    return out


def bound(plane: Any, namespace: str, name: str, count: int) -> list[dict[str, Any]]:
    """The FineTuneJob's pods once all ``count`` of them are bound to nodes."""
    found = [p for p in pods(plane, namespace, name) if p["spec"].get("nodeName")]
    return found if len(found) == count else []


def test_a_two_node_job_that_requires_one_rack_runs_on_the_nodes_of_one_rack(
    control_plane: Any, run: Any, queue: str, namespace: str
) -> None:
    """nodes: 2, topology required at the rack level: the annotation reaches the Job's pod template and the
    pods, Kueue admits the job with a topology assignment on the one rack that has room (two one-GPU nodes),
    its pods are ungated onto those nodes, and the run trains to the end there."""
    run("racked", resources={"nodes": 2, "gpus": 1}, scheduling={"queueName": queue, "topology": {"level": RACK}})
    job = wait_for("the Job", lambda: get(control_plane, "job", "racked", namespace))
    assert job["spec"]["template"]["metadata"]["annotations"][REQUIRED] == RACK
    found = wait_for("Kueue to admit the job", lambda: admitted(control_plane, namespace, "racked"), timeout=120)
    (assignment,) = found["status"]["admission"]["podSetAssignments"]
    assert hosts(assignment["topologyAssignment"]) == {"tas-a1": 1, "tas-a2": 1}, assignment
    placed = wait_for("both pods bound", lambda: bound(control_plane, namespace, "racked", 2), timeout=120)
    for pod in placed:
        assert pod["metadata"]["annotations"][REQUIRED] == RACK
        assert not pod["spec"].get("schedulingGates"), pod["spec"]  # Kueue's ungater removed its gate
        assert pod["spec"]["nodeSelector"][HOST] == pod["spec"]["nodeName"]  # and pinned the assigned node
    assert {RACKS[p["spec"]["nodeName"]] for p in placed} == {"rack-a"}
    assert sorted(p["spec"]["nodeName"] for p in placed) == ["tas-a1", "tas-a2"]
    wait_phase(control_plane, namespace, "racked", "Succeeded", timeout=420)


def test_a_required_rack_that_no_rack_can_hold_keeps_the_job_queued(
    control_plane: Any, run: Any, queue: str, namespace: str
) -> None:
    """nodes: 3 required in one rack, where the largest rack has two nodes: the quota has room, but Kueue
    keeps the job queued, saying the topology fits only two of its three pods; no pod is created."""
    run("too-wide", resources={"nodes": 3, "gpus": 1}, scheduling={"queueName": queue, "topology": {"level": RACK}})

    def refused() -> dict[str, Any] | None:
        found = workload_of(control_plane, namespace, "too-wide")
        conditions = {c["type"]: c for c in ((found or {}).get("status") or {}).get("conditions") or ()}
        reserved = conditions.get("QuotaReserved", {})
        return reserved if "allows to fit only 2 out of 3" in reserved.get("message", "") else None

    reserved = wait_for("Kueue to say the rack is too small", refused, timeout=120)
    assert reserved["status"] == "False" and f'topology "{TOPOLOGY}"' in reserved["message"], reserved
    queued = wait_for(
        "the FineTuneJob to carry Kueue's reason",
        lambda: (
            "allows to fit only 2 out of 3" in (st := status(control_plane, namespace, "too-wide")).get("message", "")
            and st
        ),
    )
    assert queued["phase"] == "Pending" and "team" in queued["message"], queued
    job = get(control_plane, "job", "too-wide", namespace)
    assert job is not None and job["spec"]["suspend"] is True
    assert pods(control_plane, namespace, "too-wide") == []


def test_a_preferred_rack_spreads_over_the_block_when_no_rack_has_room(
    control_plane: Any, run: Any, queue: str, namespace: str
) -> None:
    """The same three-node job with the rack only preferred: Kueue admits it one level up, in the block, its
    pods land on all three nodes of both racks, and the run trains to the end there."""
    topology = {"level": RACK, "mode": "Preferred"}
    run("spread", resources={"nodes": 3, "gpus": 1}, scheduling={"queueName": queue, "topology": topology})
    job = wait_for("the Job", lambda: get(control_plane, "job", "spread", namespace))
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations[PREFERRED] == RACK and REQUIRED not in annotations
    found = wait_for("Kueue to admit the job", lambda: admitted(control_plane, namespace, "spread"), timeout=120)
    (assignment,) = found["status"]["admission"]["podSetAssignments"]
    assert hosts(assignment["topologyAssignment"]) == {name: 1 for name in RACKS}, assignment
    placed = wait_for("the three pods bound", lambda: bound(control_plane, namespace, "spread", 3), timeout=120)
    assert sorted(p["spec"]["nodeName"] for p in placed) == sorted(RACKS)
    assert all(p["metadata"]["annotations"][PREFERRED] == RACK for p in placed)
    wait_phase(control_plane, namespace, "spread", "Succeeded", timeout=420)
