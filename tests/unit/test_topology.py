"""spec.scheduling.topology: its validation, its CRD rule, and Kueue's annotation on the Job's pod template."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune_api import spec as api
from kubetune_api.spec import SpecError, parse_manifest
from kubetune_operator.crd import crd
from kubetune_operator.manifests import TOPOLOGY_ANNOTATIONS, Owner, children
from kubetune_operator.settings import OperatorSettings
from tests.unit.test_spec import GOOD

RACK = "example.com/rack"
OWNER = Owner("llama-sft", "ml", "uid-1")
SETTINGS = OperatorSettings(job_image="registry.test/kubetune/kubetune-job:dev")


def manifest(**scheduling: Any) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    doc["spec"]["scheduling"] = scheduling
    return doc


def refused(**scheduling: Any) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_manifest(manifest(**scheduling))
    return e.value.problems


def pod_template(nodes: int = 2, **scheduling: Any) -> dict[str, Any]:
    doc = manifest(**scheduling)
    doc["spec"]["resources"] = {"nodes": nodes}
    (job,) = [o for o in children(OWNER, parse_manifest(doc).spec, SETTINGS) if o["kind"] == "Job"]
    return dict(job["spec"]["template"])


def test_topology_defaults_to_a_required_level() -> None:
    """A level alone asks for it as a requirement."""
    topology = parse_manifest(manifest(queueName="team", topology={"level": RACK})).spec.scheduling.topology
    assert topology is not None and (topology.level, topology.mode) == (RACK, "Required")


@pytest.mark.parametrize("queue", [{}, {"queueName": ""}])
def test_topology_without_a_queue_is_refused_naming_the_field(queue: dict[str, str]) -> None:
    """Only Kueue reads the topology: without queueName it would be ignored, so it is refused."""
    (problem,) = refused(topology={"level": RACK}, **queue)
    assert problem.startswith("spec.scheduling.topology: ") and "set scheduling.queueName" in problem


@pytest.mark.parametrize(
    ("topology", "field"),
    [
        ({"level": "rack name"}, "spec.scheduling.topology.level"),
        ({"level": "a" * 64}, "spec.scheduling.topology.level"),
        ({"level": "-rack"}, "spec.scheduling.topology.level"),
        ({}, "spec.scheduling.topology.level"),
        ({"level": RACK, "mode": "required"}, "spec.scheduling.topology.mode"),
        ({"level": RACK, "nodes": 2}, "spec.scheduling.topology.nodes"),
    ],
)
def test_a_bad_topology_is_refused_naming_the_field(topology: dict[str, Any], field: str) -> None:
    """The level is a node label key; the mode is Required or Preferred; nothing else is a field."""
    problems = refused(queueName="team", topology=topology)
    assert any(p.startswith(f"{field}: ") for p in problems), problems


def test_the_crd_carries_the_same_rule_on_scheduling_naming_topology() -> None:
    """The API server refuses what the CLI refuses, with the same message, reported on the topology field."""
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    scheduling = spec["properties"]["scheduling"]
    assert api.TOPOLOGY_NEEDS_QUEUE in scheduling["x-kubernetes-validations"]
    assert api.TOPOLOGY_NEEDS_QUEUE["fieldPath"] == ".topology"
    topology = scheduling["properties"]["topology"]
    assert topology["required"] == ["level"] and topology["properties"]["mode"]["enum"] == list(api.TOPOLOGY_MODES)
    assert topology["properties"]["level"]["x-kubernetes-validations"][0]["rule"] == api.label_key_rule("self")


@pytest.mark.parametrize(
    ("mode", "annotation"),
    [
        ("Required", "kueue.x-k8s.io/podset-required-topology"),
        ("Preferred", "kueue.x-k8s.io/podset-preferred-topology"),
    ],
)
def test_the_level_reaches_the_pod_template_as_kueues_annotation(mode: str, annotation: str) -> None:
    """Kueue reads a PodSet's topology request from its pod template's annotations (one per mode)."""
    template = pod_template(queueName="team", topology={"level": RACK, "mode": mode})
    assert template["metadata"]["annotations"] == {annotation: RACK}
    assert TOPOLOGY_ANNOTATIONS[mode] == annotation


def test_the_annotation_is_on_the_template_only() -> None:
    """The Job itself carries no topology annotation (Kueue reads the template), and its queue label stays."""
    doc = manifest(queueName="team", topology={"level": RACK})
    (job,) = [o for o in children(OWNER, parse_manifest(doc).spec, SETTINGS) if o["kind"] == "Job"]
    assert "annotations" not in job["metadata"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team"


@pytest.mark.parametrize("nodes", [1, 2])
def test_without_topology_the_template_has_no_annotation(nodes: int) -> None:
    """A queued job without topology is placed by the scheduler alone: no Kueue topology annotation."""
    assert "annotations" not in pod_template(nodes, queueName="team")["metadata"]


def test_the_annotation_and_the_node_selector_go_together() -> None:
    """Topology narrows where the nodeSelector already points: both reach the pods."""
    template = pod_template(queueName="team", topology={"level": RACK}, nodeSelector={"example.com/pool": "a100"})
    assert template["spec"]["nodeSelector"] == {"example.com/pool": "a100"}
    assert template["metadata"]["annotations"] == {TOPOLOGY_ANNOTATIONS["Required"]: RACK}
